"""Pipeline events -> Responses API stream events, and the response they build.

The stream is ``response.created``, ``response.in_progress``, then per output item
``output_item.added``, its parts and deltas, ``output_item.done``, then exactly one terminal
event (``response.completed``, ``response.incomplete`` or ``response.failed``) carrying the
whole response. Items follow the model's Harmony messages: analysis -> a ``reasoning`` item,
final and preambles -> ``message`` items (``phase`` ``final_answer`` / ``commentary``), calls
-> ``function_call`` items, or ``custom_tool_call`` items for a custom tool (its input streams as
``custom_tool_call_input`` deltas). A call of a namespaced tool carries its API name and
``namespace``. The non-streaming body is the response these same events built.
"""

from __future__ import annotations

import secrets
from typing import Any

from server import events as ev
from server.errors import APIError
from server.reasoning_seal import ReasoningSealer
from server.responses_input import ToolName
from server.responses_wire import (
    CustomToolCallOut,
    FunctionCallOut,
    IncompleteDetails,
    InputTokensDetails,
    MessageOut,
    OutputItem,
    OutputText,
    OutputTokensDetails,
    ReasoningOut,
    ReasoningTextPart,
    ResponseBody,
    ResponseErrorOut,
    ResponseUsage,
    StreamEvent,
)

_ERROR_CODES = {429: "rate_limit_exceeded", 400: "invalid_prompt"}  # the SDK's codes; else server_error


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


class ResponseBuilder:
    def __init__(
        self, response: ResponseBody, sealer: ReasoningSealer | None, tool_names: dict[str, ToolName]
    ) -> None:
        self.response = response
        self._sealer = sealer  # set when the client asked for encrypted reasoning
        self._tool_names = tool_names  # prompt name -> the API's name of each offered tool
        self._seq = 0
        self._open: tuple[str, int] | None = None  # (kind, Harmony message number) of the open item
        self._length = False

    def _event(self, kind: str, **fields: Any) -> StreamEvent:
        event = StreamEvent(type=kind, sequence_number=self._seq, **fields)
        self._seq += 1
        return event

    def _dump(self, model: Any) -> dict:
        return model.model_dump(mode="json")

    @property
    def _index(self) -> int:
        return len(self.response.output) - 1

    @property
    def _item(self) -> OutputItem:
        return self.response.output[-1]

    def start(self) -> list[StreamEvent]:
        body = self._dump(self.response)
        return [
            self._event("response.created", response=body),
            self._event("response.in_progress", response=body),
        ]

    def __call__(self, event: ev.Event) -> list[StreamEvent]:
        if isinstance(event, ev.ReasoningText):
            return self._text("reasoning", event.message, event.text)
        if isinstance(event, ev.ContentText):
            kind = "preamble" if event.preamble else "message"
            return self._text(kind, event.message, event.text) if event.text else []
        if isinstance(event, ev.ToolCallBegun):
            out = self._close()
            tool = self._tool_names.get(event.name, ToolName(event.name))
            call: OutputItem = (
                CustomToolCallOut(
                    id=item_id("ctc"), call_id=event.id, name=tool.name, namespace=tool.namespace
                )
                if tool.custom
                else FunctionCallOut(
                    id=item_id("fc"), call_id=event.id, name=tool.name, namespace=tool.namespace
                )
            )
            self.response.output.append(call)
            self._open = ("call", event.message)
            return [
                *out,
                self._event(
                    "response.output_item.added", output_index=self._index, item=self._dump(self._item)
                ),
            ]
        if isinstance(event, ev.ToolCallArguments):
            item = self._item
            where = {"item_id": item.id, "output_index": self._index, "delta": event.text}
            if isinstance(item, CustomToolCallOut):
                item.input += event.text
                return [self._event("response.custom_tool_call_input.delta", **where)]
            assert isinstance(item, FunctionCallOut)
            item.arguments += event.text
            return [self._event("response.function_call_arguments.delta", **where)]
        if isinstance(event, ev.ToolCallEnded):
            return self._close()
        if isinstance(event, ev.Finished):
            self._length = event.reason == "length"
            return self._close()
        if isinstance(event, ev.Usage):
            self.response.usage = ResponseUsage(
                input_tokens=event.prompt_tokens,
                input_tokens_details=InputTokensDetails(
                    cached_tokens=event.cached_tokens,
                    cache_write_tokens=event.prompt_tokens - event.cached_tokens,
                ),
                output_tokens=event.completion_tokens,
                output_tokens_details=OutputTokensDetails(reasoning_tokens=event.reasoning_tokens),
                total_tokens=event.total_tokens,
            )
            return self._finish()
        if isinstance(event, ev.Failed):
            return self.fail(event.error)
        return []

    def fail(self, error: APIError) -> list[StreamEvent]:
        out = self._close()
        self.response.status = "failed"
        self.response.error = ResponseErrorOut(
            code=_ERROR_CODES.get(error.status, "server_error"), message=error.message
        )
        return [*out, self._event("response.failed", response=self._dump(self.response))]

    def _finish(self) -> list[StreamEvent]:
        if self._length:
            self.response.status = "incomplete"
            self.response.incomplete_details = IncompleteDetails()
            return [self._event("response.incomplete", response=self._dump(self.response))]
        self.response.status = "completed"
        return [self._event("response.completed", response=self._dump(self.response))]

    # -- items --------------------------------------------------------------------------------------

    def _text(self, kind: str, message: int, text: str) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if self._open != (kind, message):
            out += self._close()
            out += self._begin(kind, message)
        item = self._item
        if isinstance(item, ReasoningOut):
            item.content[0].text += text
            out.append(
                self._event(
                    "response.reasoning_text.delta",
                    item_id=item.id,
                    output_index=self._index,
                    content_index=0,
                    delta=text,
                )
            )
        else:
            assert isinstance(item, MessageOut)
            item.content[0].text += text
            out.append(
                self._event(
                    "response.output_text.delta",
                    item_id=item.id,
                    output_index=self._index,
                    content_index=0,
                    delta=text,
                    logprobs=[],
                )
            )
        return out

    def _begin(self, kind: str, message: int) -> list[StreamEvent]:
        item: OutputItem = (
            ReasoningOut(id=item_id("rs"))
            if kind == "reasoning"
            else MessageOut(id=item_id("msg"), phase="commentary" if kind == "preamble" else "final_answer")
        )
        part = ReasoningTextPart(text="") if kind == "reasoning" else OutputText(text="")
        self.response.output.append(item)
        self._open = (kind, message)
        added = self._event("response.output_item.added", output_index=self._index, item=self._dump(item))
        item.content.append(part)  # type: ignore[arg-type]
        where = {"item_id": item.id, "output_index": self._index, "content_index": 0}
        return [added, self._event("response.content_part.added", **where, part=self._dump(part))]

    def _close(self) -> list[StreamEvent]:
        """End the open item: its parts' done events, then ``output_item.done``."""
        if self._open is None:
            return []
        self._open = None
        item, index = self._item, self._index
        out = []
        if isinstance(item, ReasoningOut):
            text = item.content[0].text
            out.append(
                self._event(
                    "response.reasoning_text.done",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    text=text,
                )
            )
            if self._sealer is not None:
                item.encrypted_content = self._sealer.seal(text)
        elif isinstance(item, MessageOut):
            part = item.content[0]
            where = {"item_id": item.id, "output_index": index, "content_index": 0}
            out.append(self._event("response.output_text.done", **where, text=part.text, logprobs=[]))
            out.append(self._event("response.content_part.done", **where, part=self._dump(part)))
        elif isinstance(item, CustomToolCallOut):
            out.append(
                self._event(
                    "response.custom_tool_call_input.done",
                    item_id=item.id,
                    output_index=index,
                    input=item.input,
                )
            )
        else:
            assert isinstance(item, FunctionCallOut)
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=index,
                    name=item.name,
                    arguments=item.arguments,
                )
            )
        item.status = "completed"
        out.append(self._event("response.output_item.done", output_index=index, item=self._dump(item)))
        return out
