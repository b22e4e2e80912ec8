"""``create_app(settings, engine=...)`` served by uvicorn in a thread, with scripted sampling
written in Python (no script file) installed into the real engine."""

from __future__ import annotations

import threading
import time

import httpx
import uvicorn
from scripted import install_script
from server_process import free_port

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from harmony.tokenizer import load_tokenizer
from server.app import create_app
from server.settings import ServerSettings


def test_create_app_with_a_given_engine(tiny_checkpoint_dir):
    tokenizer = load_tokenizer()
    answer = tokenizer.encode_with_specials("<|channel|>final<|message|>In-process.<|return|>")

    def token_source(prompt_ids, output_ids):
        return answer[min(len(output_ids), len(answer) - 1)]

    llm = LLMEngine(EngineConfig(model_dir=str(tiny_checkpoint_dir), kv_cache_memory=32 * 2**20))
    engine = AsyncEngine(install_script(llm, token_source))
    settings = ServerSettings(host="127.0.0.1", port=free_port(), served_model_name=["inproc"])
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, engine=engine), host="127.0.0.1", port=settings.port)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{settings.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        body = {"model": "inproc", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30).json()
        assert r["choices"][0]["message"]["content"] == "In-process."
        assert r["choices"][0]["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] == len(answer)
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown()
    assert not thread.is_alive()
