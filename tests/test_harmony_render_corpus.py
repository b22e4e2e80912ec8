"""Renderer vs openai-harmony on a generated corpus: token-identical prompts for every message
kind, multi-turn histories with reasoning and tool loops, and JSON Schemas of every shape; the
typed `Conversation` of each request renders the same."""

from __future__ import annotations

from harmony_oracle import chat_json_of, encoding, oracle_render
from harmony_strategies import conversations, dates, parameters, tools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harmony.chat_json import conversation_from_chat_json, render_chat_json
from harmony.render import render_conversation

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(conversations(), dates)
def test_conversations_render_like_openai_harmony(request, date):
    prompt = render_chat_json(request, date)
    assert prompt.token_ids == oracle_render(request, date)
    assert prompt.text == encoding().decode(prompt.token_ids)
    # The typed conversation, written back as a request, renders the same in the oracle.
    conversation = conversation_from_chat_json(request, date)
    assert render_conversation(conversation) == prompt
    assert oracle_render(chat_json_of(conversation), date) == prompt.token_ids
    assert conversation_from_chat_json(chat_json_of(conversation), date) == conversation


@settings(SETTINGS, max_examples=150)
@given(st.lists(parameters, min_size=1, max_size=3), tools())
def test_tool_schemas_render_like_openai_harmony(schemas, more_tools):
    request = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [
            {"type": "function", "function": {"name": f"t{i}", "parameters": s}}
            for i, s in enumerate(schemas)
        ]
        + more_tools,
    }
    assert render_chat_json(request, None).token_ids == oracle_render(request, None)
