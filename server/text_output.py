"""One raw completion choice as API-neutral events: the generated text as it decodes.

No Harmony parsing: special tokens are written as text unless ``skip_special``; the stop token
that ended the generation is not part of the text. Stop strings cut the text and end the
choice at once. Each token's logprob is placed at the offset where its text starts.
"""

from __future__ import annotations

from engine.types import RequestOutput
from harmony.tokenizer import HarmonyTokenizer, IncrementalDecoder
from server.events import ChoiceEvent, ContentText, Finished, PlacedLogprob, finish_reason
from server.stop_strings import StopStringFilter


class TextAssembler:
    def __init__(
        self, choice: int, tokenizer: HarmonyTokenizer, stops: list[str], *, skip_special: bool
    ) -> None:
        self.choice = choice
        self._decoder = IncrementalDecoder(tokenizer, include_special=not skip_special)
        self._stop = StopStringFilter(stops)
        self._length = 0  # characters of text emitted so far
        self._text: list[str] = []
        self.reasoning_tokens = 0  # raw text has no channels

    @property
    def stopped(self) -> bool:
        return self._stop.stopped is not None

    def summary(self) -> str:
        return f"text={''.join(self._text)!r}"

    def feed(self, out: RequestOutput) -> list[ChoiceEvent]:
        pieces: list[str] = []
        placed: list[PlacedLogprob] = []
        logprobs = out.logprobs or [None] * len(out.token_ids)
        for token_id, logprob in zip(out.token_ids, logprobs, strict=False):
            if out.finish_reason == "stop" and token_id == out.stop_token_id:
                continue  # the stop token itself is not part of the text
            if logprob is not None:
                placed.append(PlacedLogprob(logprob, self._length + sum(map(len, pieces))))
            pieces.append(self._stop.feed(self._decoder.feed(token_id)))
            if self.stopped:
                break
        finished: Finished | None = None
        if self.stopped:
            finished = Finished(self.choice, "stop", self._stop.stopped)
        elif out.finished:
            pieces.append(self._stop.feed(self._decoder.flush()))
            pieces.append(self._stop.flush())
            reason = finish_reason(out.finish_reason, stop_string_matched=False, ended_in_tool_call=False)
            finished = Finished(
                self.choice, reason, out.stop_token_id if out.finish_reason == "stop" else None
            )
        text = "".join(pieces)
        self._length += len(text)
        self._text.append(text)
        events: list[ChoiceEvent] = []
        if text or placed:
            events.append(ContentText(self.choice, 0, text, tuple(placed)))
        if finished is not None:
            events.append(finished)
        return events
