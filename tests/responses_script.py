"""The scripted model output and request helpers the ``/v1/responses`` server tests share: which
prompt gets which Harmony completion (tests/scripted_server.py reads the script), the tools
those completions call, and a JSON POST to a running server."""

from __future__ import annotations

import httpx

MODEL = "gpt-oss-test"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
PATCH_TEXT = "*** Begin Patch\n*** Add File: hi.txt\n+hello\n*** End Patch"
APPLY_PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Apply a patch to files",
    "format": {"type": "grammar", "syntax": "lark", "definition": "start: /[\\s\\S]+/"},
}
SCRIPT = {
    "rules": [
        {
            "match": "TOOLRESULT:sunny",
            "output": "<|channel|>analysis<|message|>The tool says sunny.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris.<|return|>",
        },
        {
            "match": "SCRIPT:weather",
            "output": "<|channel|>analysis<|message|>User wants the weather.<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
            '<|message|>{"city": "Paris"}<|call|>',
        },
        {
            "match": "SCRIPT:patch",
            "output": "<|channel|>analysis<|message|>Write the patch.<|end|>"
            "<|start|>assistant<|channel|>commentary<|message|>Applying it.<|end|>"
            "<|start|>assistant to=functions.apply_patch<|channel|>commentary<|message|>"
            + PATCH_TEXT
            + "<|call|>",
        },
        {
            "match": "SCRIPT:shell",
            "output": "<|channel|>analysis<|message|>Run it.<|end|>"
            "<|start|>assistant to=functions.shell<|channel|>commentary <|constrain|>json"
            '<|message|>{"cmd": "ls"}<|call|>',
        },
        {"match": "SCRIPT:long", "output": "<|channel|>final<|message|>tick ", "repeat": True},
    ],
    "default": "<|channel|>analysis<|message|>Thinking.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
}


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=30)
