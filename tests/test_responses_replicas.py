"""``/v1/responses`` across replicas: two server processes behind one real Redis, as pods
behind a load balancer, each continuing, reading and deleting the other's responses."""

from __future__ import annotations

import json

import httpx
from responses_script import MODEL, SCRIPT, WEATHER, post
from server_process import ServerProcess


def test_two_replicas_sharing_redis_continue_each_others_responses(tiny_checkpoint_dir, tmp_path):
    """Two server processes behind one Redis (as replicas behind a load balancer): a response
    made on one is continued, read, listed and deleted on the other."""
    from redis_server import RedisServer

    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    redis = RedisServer.start()
    args = ["--model", str(tiny_checkpoint_dir), "--served-model-name", MODEL, "--kv-cache-memory", "64MiB",
            "--max-model-len", "2048", "--response-store", redis.url, "--reasoning-encryption-key", "shared"]  # fmt: skip
    try:
        with ServerProcess(args, script=script) as a, ServerProcess(args, script=script) as b:
            first = post(a, "/v1/responses", {"input": "SCRIPT:weather", "tools": [WEATHER]}).json()
            call = first["output"][-1]
            result = {
                "type": "function_call_output",
                "call_id": call["call_id"],
                "output": "TOOLRESULT:sunny",
            }
            second = post(
                b,
                "/v1/responses",
                {"input": [result], "tools": [WEATHER], "previous_response_id": first["id"]},
            )
            assert second.status_code == 200
            assert second.json()["output"][-1]["content"][0]["text"] == "It is sunny in Paris."
            assert httpx.get(f"{a.url}/v1/responses/{second.json()['id']}").json()["status"] == "completed"
            assert httpx.delete(f"{b.url}/v1/responses/{first['id']}").json()["deleted"] is True
            assert httpx.get(f"{a.url}/v1/responses/{first['id']}").status_code == 404
            # Sealed reasoning made on one replica opens on the other (one shared key).
            sealed = post(
                a,
                "/v1/responses",
                {"input": "hi", "store": False, "include": ["reasoning.encrypted_content"]},
            )
            reasoning = sealed.json()["output"][0]
            back = post(
                b, "/v1/responses/input_tokens", {"input": [reasoning, {"role": "user", "content": "more"}]}
            )
            assert back.status_code == 200
    finally:
        redis.stop()
