"""The README's promises: `python -m server` with no model serves the embedded default
(`gpt-oss-tiny`, written once into the cache folder), and the curl and SDK examples work as
written (only the port differs: tests never bind 8000) and give the answers the README shows."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_process import ServerProcess

from server.settings import DEFAULT_MODEL_NAME

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    text = README.read_text()
    usage = text[text.index("## Talking to the server") :]
    return re.findall(rf"```{language}\n(.*?)```", usage, flags=re.S)


@pytest.mark.slow
def test_embedded_default_and_readme_examples(tmp_path):
    cache = tmp_path / "cache"
    with ServerProcess(["--cache-dir", str(cache)]) as server:
        assert (cache / "default-tiny" / "config.json").exists()
        assert "gpt-oss-tiny" in server.log()
        models = httpx.get(server.url + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == [DEFAULT_MODEL_NAME]

        bash = blocks("bash")
        assert len(bash) >= 3 and all("localhost:8000" in b for b in bash)
        if shutil.which("curl"):
            for block in bash:
                script = block.replace("localhost:8000", f"127.0.0.1:{server.port}")
                done = subprocess.run(["bash", "-ec", script], capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, done.stderr
                assert not re.search(r'"error":\s*\{', done.stdout), done.stdout  # `"error": null` is fine
            # The first example: reasoning and the exact sum; the second: a call, then the answer.
            outs = [run_curl(b, server.port) for b in bash[:2]]
            first = json.loads(outs[0])
            assert first["object"] == "chat.completion"
            message = first["choices"][0]["message"]
            assert message["reasoning"] and message["content"].strip().endswith("802"), message
            call, answer = decode_all(outs[1])
            (tool_call,) = call["choices"][0]["message"]["tool_calls"]
            assert tool_call["function"]["name"] == "get_weather"
            assert json.loads(tool_call["function"]["arguments"]) == {"city": "Tokyo"}
            text = answer["choices"][0]["message"]["content"]
            assert "21" in text and "Tokyo" in text, text

        chat, responses = blocks("python")
        outputs = []
        for python in (chat, responses):
            script = python.replace("localhost:8000", f"127.0.0.1:{server.port}")
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            outputs.append(done.stdout)
        lines = dict(line.split(": ", 1) for line in outputs[0].splitlines() if ": " in line)
        assert lines["reasoning"] and lines["tool call"].startswith('get_weather {"city": "Paris"}'), outputs[
            0
        ]
        assert "18" in lines["answer"] and "Paris" in lines["answer"], outputs[0]
        assert lines["parsed"] == "Person(name='Maria Lopez', age=34)", outputs[0]
        assert outputs[0].rstrip().endswith("64 + 29 = 93"), outputs[0]  # the streamed sum
        lines = dict(line.split(": ", 1) for line in outputs[1].splitlines() if ": " in line)
        assert "Adam Clark" in lines["answer"], outputs[1]
        assert lines["streamed"] == "response.created ... response.completed", outputs[1]
        assert "18" in lines["agent"] and "Oslo" in lines["agent"], outputs[1]


def run_curl(block: str, port: int) -> str:
    script = block.replace("localhost:8000", f"127.0.0.1:{port}")
    return subprocess.run(["bash", "-ec", script], capture_output=True, text=True, timeout=60).stdout


def decode_all(text: str) -> list[dict]:
    """The JSON documents printed one after another (two curl calls in one block)."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while at < len(text.strip()):
        doc, at = decoder.raw_decode(text, at)
        out.append(doc)
        while at < len(text) and text[at].isspace():
            at += 1
    return out
