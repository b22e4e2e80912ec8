"""The README's promises: `python -m server` with no model serves the embedded default (random
weights, generated once into the cache folder), and the curl and SDK examples work as written
(only the port differs: tests never bind 8000)."""

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
        assert "RANDOM" in server.log()
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
            # The first example is a chat completion.
            first = blocks("bash")[0].replace("localhost:8000", f"127.0.0.1:{server.port}")
            out = subprocess.run(["bash", "-ec", first], capture_output=True, text=True, timeout=60).stdout
            assert json.loads(out)["object"] == "chat.completion"

        chat, responses = blocks("python")
        outputs = []
        for python in (chat, responses):
            script = python.replace("localhost:8000", f"127.0.0.1:{server.port}")
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            outputs.append(done.stdout)
        assert "reasoning:" in outputs[0] and "finish:" in outputs[0]
        assert "status:" in outputs[1] and "streamed:" in outputs[1] and "agent:" in outputs[1]
