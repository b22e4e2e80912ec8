"""Renderer on typed input (`harmony.conversation` -> `render_conversation`): tool loops, the drop
rule, the one rendering error; each rendering checked token for token against openai-harmony
(the conversation written as a request by `chat_json_of`)."""

from __future__ import annotations

import json

import pytest
from harmony_oracle import chat_json_of, oracle_render

from harmony import tokens
from harmony.chat_json import conversation_from_chat_json, render_chat_json
from harmony.conversation import REASONING_EFFORTS, Conversation, FunctionTool, ToolCall, Turn
from harmony.messages import HarmonyMessage
from harmony.render import RenderError, harmony_messages, render_conversation

DATE = "2025-08-05"
WEATHER = FunctionTool(
    "get_weather",
    "Gets the weather",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def render(conversation: Conversation):
    """Our rendering, asserted identical to the oracle's before it is returned."""
    prompt = render_conversation(conversation)
    assert prompt.token_ids == oracle_render(chat_json_of(conversation), conversation.date)
    assert prompt.token_ids[-2:] == [tokens.START, tokens.ASSISTANT]
    assert prompt.stop_token_ids == [tokens.RETURN, tokens.CALL]
    return prompt


def test_a_tool_loop_resolves_results_by_call_id():
    conversation = Conversation(
        turns=(
            Turn("system", "Be brief."),
            Turn("user", "Weather and time in Paris?"),
            Turn(
                "assistant",
                "Let me check.",
                reasoning="Need both.",
                tool_calls=(
                    ToolCall("get_weather", '{"city":"Paris"}', id="a"),
                    ToolCall("get_time", "{}", id="b"),
                ),
            ),
            Turn("tool", "noon", tool_call_id="b"),
            Turn("tool", "sunny", tool_call_id="a", name="ignored_when_the_id_resolves"),
            Turn("tool", "42", tool_call_id="unknown", name="lookup"),
        ),
        tools=(WEATHER, FunctionTool("get_time")),
        reasoning_effort="high",
        date=DATE,
    )
    prompt = render(conversation)
    assert "Current date: 2025-08-05\n\nReasoning: high\n\n" in prompt.text
    assert "# Instructions\n\nBe brief.\n\n# Tools\n\n## functions\n\nnamespace functions {" in prompt.text
    assert prompt.text.endswith(
        "<|start|>assistant<|channel|>analysis<|message|>Need both.<|end|>"
        "<|start|>assistant<|channel|>commentary<|message|>Let me check.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        '{"city":"Paris"}<|call|>'
        "<|start|>assistant to=functions.get_time<|channel|>commentary <|constrain|>json<|message|>{}<|call|>"
        "<|start|>functions.get_time to=assistant<|channel|>commentary<|message|>noon<|end|>"
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny<|end|>"
        "<|start|>functions.lookup to=assistant<|channel|>commentary<|message|>42<|end|>"
        "<|start|>assistant"
    )


def test_a_reused_call_id_resolves_to_the_latest_call():
    conversation = Conversation(
        turns=(
            Turn("user", "q"),
            Turn("assistant", tool_calls=(ToolCall("first", "{}", id="c"),)),
            Turn("tool", "1", tool_call_id="c"),
            Turn("assistant", tool_calls=(ToolCall("second", "{}", id="c"),)),
            Turn("tool", "2", tool_call_id="c"),
        )
    )
    text = render(conversation).text
    assert "<|start|>functions.first to=assistant<|channel|>commentary<|message|>1<|end|>" in text
    assert "<|start|>functions.second to=assistant<|channel|>commentary<|message|>2<|end|>" in text


def test_the_drop_rule_keeps_only_analysis_after_the_last_final():
    conversation = Conversation(
        turns=(
            Turn("user", "q1"),
            Turn("assistant", "a1", reasoning="think1"),
            Turn("user", "q2"),
            Turn("assistant", "a2", reasoning="think2"),
            Turn("user", "q3"),
            Turn("assistant", reasoning="think3", tool_calls=(ToolCall("f", "{}", id="x"),)),
            Turn("tool", "done", tool_call_id="x"),
        )
    )
    text = render(conversation).text
    assert "think1" not in text and "think2" not in text
    assert "<|channel|>final<|message|>a1<|end|>" in text and "<|channel|>final<|message|>a2<|end|>" in text
    assert "<|start|>assistant<|channel|>analysis<|message|>think3<|end|>" in text
    # A reasoning-only last turn (no final after it) keeps its analysis too.
    assert "think4" in render(Conversation((Turn("user", "q"), Turn("assistant", reasoning="think4")))).text


def test_harmony_messages_are_the_mapping_without_the_trailing_start():
    messages = harmony_messages(
        Conversation((Turn("user", "q"), Turn("assistant", "a", reasoning="r"), Turn("user", "q2")))
    )
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2] == HarmonyMessage("assistant", "a", channel="final")


def test_leading_instructions_later_developer_turns_and_empty_ones():
    conversation = Conversation(
        (
            Turn("system", ""),
            Turn("developer", "One."),
            Turn("system", "Two."),
            Turn("user", "q"),
            Turn("developer", ""),
            Turn("system", "Now formal."),
            Turn("user", "q2"),
        )
    )
    text = render(conversation).text
    assert "<|start|>developer<|message|># Instructions\n\nOne.\n\nTwo.<|end|><|start|>user" in text
    assert "q<|end|><|start|>developer<|message|># Instructions\n\nNow formal.<|end|><|start|>user" in text


@pytest.mark.parametrize(
    ("turns", "index"),
    [
        ((Turn("user", "q"), Turn("tool", "x", tool_call_id="nope")), 1),
        # empty and leading system turns count: the index is the turn's, not a Harmony message's
        ((Turn("system", ""), Turn("system", "S"), Turn("user", "q"), Turn("tool", "x")), 3),
        # a call without id resolves nothing; a call later in the conversation does not count
        (
            (
                Turn("user", "q"),
                Turn("assistant", tool_calls=(ToolCall("f", "{}"),)),
                Turn("tool", "x", tool_call_id="later"),
                Turn("assistant", tool_calls=(ToolCall("g", "{}", id="later"),)),
            ),
            2,
        ),
        ((Turn("user", "q"), Turn("tool", "x", tool_call_id="c", name="")), 1),
    ],
)
def test_an_unresolvable_tool_turn_names_its_index(turns, index):
    with pytest.raises(RenderError) as info:
        render_conversation(Conversation(turns))
    assert info.value.index == index
    assert info.value.field == "tool_call_id"
    assert info.value.param == f"messages[{index}].tool_call_id"
    assert "cannot resolve the tool" in info.value.message


def test_typed_input_is_not_shape_checked_again():
    """Whatever the builder put in a Turn is rendered as is (e.g. arguments that are not JSON)."""
    conversation = Conversation(
        (Turn("user", "q"), Turn("assistant", tool_calls=(ToolCall("f", "not json", id="1"),)))
    )
    assert "<|constrain|>json<|message|>not json<|call|>" in render(conversation).text


def test_render_error_param():
    assert RenderError("m", index=3, field="tool_call_id").param == "messages[3].tool_call_id"
    assert RenderError("m", index=0).param == "messages[0]"
    assert RenderError("m", param="tools[0].type").param == "tools[0].type"
    assert RenderError("m").param is None
    error = RenderError("m", param="tools[0].type")
    assert (error.message, error.index, error.field, str(error)) == ("m", None, None, "m")


def test_conversation_checks_the_effort_and_the_role():
    assert REASONING_EFFORTS == ("low", "medium", "high")
    for effort in REASONING_EFFORTS:
        assert f"Reasoning: {effort}\n" in render(Conversation((Turn("user"),), reasoning_effort=effort)).text
    for bad in ("HIGH", "minimal", ""):
        with pytest.raises(ValueError, match="reasoning_effort"):
            Conversation((Turn("user"),), reasoning_effort=bad)
    with pytest.raises(ValueError, match="role"):
        Turn("wizard")  # type: ignore[arg-type]


def test_lists_are_frozen_into_tuples():
    conversation = Conversation(
        [Turn("assistant", tool_calls=[ToolCall("f", "{}")])],  # type: ignore[arg-type]
        tools=[FunctionTool("f")],  # type: ignore[arg-type]
    )
    assert isinstance(conversation.turns, tuple) and isinstance(conversation.tools, tuple)
    assert isinstance(conversation.turns[0].tool_calls, tuple)


def test_chat_json_builds_the_typed_conversation():
    request = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
            {"role": "user", "content": None, "name": "ignored"},
            {
                "role": "assistant",
                "reasoning": "",
                "reasoning_content": "why",
                "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": {"é": [1]}}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "reasoning": {"effort": " Low "},
    }
    assert conversation_from_chat_json(request, DATE) == Conversation(
        turns=(
            Turn("system", "AB"),
            Turn("user", ""),
            Turn("assistant", reasoning="why", tool_calls=(ToolCall("f", '{"é": [1]}', id="c1"),)),
            Turn("tool", "ok", tool_call_id="c1"),
        ),
        tools=(FunctionTool("f", "", {"type": "object"}),),
        reasoning_effort="low",
        date=DATE,
    )


def test_chat_json_tool_choice_none_leaves_the_tools_out():
    request = {
        "messages": [{"role": "user", "content": "q"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    without = render_chat_json({"messages": request["messages"]}, DATE)
    assert render_chat_json({**request, "tool_choice": "none"}, DATE) == without
    assert render_chat_json({**request, "tool_choice": "auto"}, DATE) != without
    with pytest.raises(RenderError) as info:  # the tools are still checked
        render_chat_json({**request, "tools": [{"type": "web_search"}], "tool_choice": "none"}, DATE)
    assert info.value.param == "tools[0].type"


def test_response_formats_render_per_spec():
    """harmony.md §4: `# Response Formats\n\n## {name}\n\n// {description}\n{json schema}`
    appended to the developer message (after instructions and tools)."""
    from harmony.conversation import Conversation, ResponseFormat, Turn
    from harmony.render import render_conversation

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    conv = Conversation(
        turns=(Turn("system", "Be brief."), Turn("user", "Extract: Ann is 30 years old.")),
        response_formats=(ResponseFormat("person", schema, "A person."),),
    )
    text = render_conversation(conv).text
    expected_dev = (
        "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Response Formats\n\n## person\n\n"
        "// A person.\n" + json.dumps(schema) + "<|end|>"
    )
    assert expected_dev in text
    alone = render_conversation(
        Conversation(turns=(Turn("user", "x"),), response_formats=(ResponseFormat("p", {}),))
    )
    assert "<|start|>developer<|message|># Response Formats\n\n## p\n\n{}<|end|>" in alone.text
