"""Ids of the o200k_harmony special tokens (spec harmony.md §1, model.md §5).

Everything from 199998 up is a special (control or reserved) token; ordinary text tokens are
0..199997. The model's embedding has 201088 rows (ids 0..201087).
"""

from __future__ import annotations

STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012

# The text of CONSTRAIN: a content type starting with it is rendered as the token (plus the rest
# as text), and the parser spells the token this way in a content type.
CONSTRAIN_TEXT = "<|constrain|>"
# The content type of function-call arguments.
CONSTRAINED_JSON = CONSTRAIN_TEXT + "json"

FIRST_SPECIAL = 199998
# harmony-rs names reserved ids up to 201088 inclusive; the model has 201088 rows.
LAST_NAMED_SPECIAL = 201088
VOCAB_SIZE = 201088

# "assistant" is a single ordinary token: every completion prompt ends with [START, ASSISTANT].
ASSISTANT = 173781

NAMED_SPECIALS: dict[str, int] = {
    "<|startoftext|>": STARTOFTEXT,
    "<|endoftext|>": ENDOFTEXT,
    "<|return|>": RETURN,
    CONSTRAIN_TEXT: CONSTRAIN,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|call|>": CALL,
}

# Sampling stops on these (stop_tokens_for_assistant_actions): <|end|> only separates
# analysis from the answer inside one completion.
STOP_TOKEN_IDS: tuple[int, ...] = (RETURN, CALL)
# Any of these closes a message while parsing.
TERMINATORS: dict[int, str] = {END: "end", CALL: "call", RETURN: "return"}


def special_tokens() -> dict[str, int]:
    """All special tokens of o200k_harmony, name -> id (named ones plus `<|reserved_N|>`)."""
    by_id = {token_id: name for name, token_id in NAMED_SPECIALS.items()}
    return {
        by_id.get(token_id, f"<|reserved_{token_id}|>"): token_id
        for token_id in range(FIRST_SPECIAL, LAST_NAMED_SPECIAL + 1)
    }
