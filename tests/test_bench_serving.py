"""bench/serving.py against the real server: every request streams exactly --max-tokens tokens
from a token-id prompt, latencies are measured per token, and failures are counted, not fatal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from server_process import ServerProcess

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "serving.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_serving", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server():
    with ServerProcess([]) as srv:  # the embedded default model
        yield srv


def bench_args(base_url: str, max_tokens: int) -> argparse.Namespace:
    return argparse.Namespace(
        base_url=base_url, model="gpt-oss-tiny", api_key=None, max_tokens=max_tokens, timeout=60.0
    )


def test_each_request_streams_max_tokens_with_per_token_latencies(server):
    bench = load_bench()
    prompts = [[1_000 + 7 * i + j for j in range(20)] for i in range(5)]
    level = asyncio.run(bench.run_level(bench_args(server.url + "/v1", 9), 3, prompts))
    assert level.requests == len(level.results) == 5
    for r in level.results:
        assert r.error is None
        assert r.output_tokens == 9  # ignore_eos and min_tokens hold the request to max_tokens
        assert r.ttft_s is not None and r.ttft_s > 0
        # Streamed token by token, not buffered: most of the 9 tokens arrive as chunks of their
        # own (a byte token that ends mid-character may carry no text, so not all 8 gaps), and
        # the timings fit inside the level's wall time.
        assert len(r.gaps_s) >= 4
        assert r.ttft_s + sum(r.gaps_s) <= level.wall_s
    cells = [c.strip() for c in level.row().strip("|").split("|")]
    assert cells[0] == "3" and cells[1] == "5" and float(cells[2]) > 0 and cells[-1] == "0"


def test_failures_are_counted_not_fatal(server):
    bench = load_bench()
    dead = bench_args("http://127.0.0.1:9/v1", 4)  # nothing listens on the discard port
    level = asyncio.run(bench.run_level(dead, 2, [[1_000] * 4] * 3))
    assert all(r.error for r in level.results)
    assert level.row().rstrip().endswith("| 3 |")
    bad = asyncio.run(bench.run_level(bench_args(server.url + "/v1", -1), 1, [[1_000] * 4]))
    assert bad.results[0].error.startswith("HTTP 400")


def test_cli_prints_a_table_and_the_servers_peak_memory(server):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--base-url", server.url + "/v1", "--concurrency", "1,2",
         "--prompt-tokens", "16", "--max-tokens", "6", "--server-pid", str(server.proc.pid)],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2"]
    assert all(r.rstrip().endswith("| 0 |") for r in rows)
    assert "server peak RSS (VmHWM):" in out and "GiB" in out


class DropFirstConnections:
    """A loopback TCP relay to the server that reads and then closes its first `drops`
    connections without an answer (what llama-server now and then does to a fresh one)."""

    def __init__(self, target_port: int, drops: int):
        self.target_port, self.drops = target_port, drops
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.drops > 0:
                self.drops -= 1
                conn.recv(1 << 16)  # the request, so that closing sends FIN, not RST
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_a_connection_closed_unanswered_is_sent_again(server):
    bench = load_bench()
    port = int(server.url.rsplit(":", 1)[1])
    relay = DropFirstConnections(port, drops=bench.CONNECT_ATTEMPTS - 1)
    try:
        args = bench_args(f"http://127.0.0.1:{relay.port}/v1", 5)
        level = asyncio.run(bench.run_level(args, 1, [[1_000] * 8]))
        (r,) = level.results
        assert r.error is None and r.output_tokens == 5 and r.retries == bench.CONNECT_ATTEMPTS - 1
        # One drop more than the attempts: an error, counted in the table.
        relay.drops = bench.CONNECT_ATTEMPTS
        level = asyncio.run(bench.run_level(args, 1, [[1_000] * 8]))
        assert "RemoteProtocolError" in level.results[0].error and level.row().rstrip().endswith("| 1 |")
    finally:
        relay.close()
