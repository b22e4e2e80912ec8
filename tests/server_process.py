"""Run the real server as a subprocess on a free loopback port (tests, benchmarks, deploy checks).

    with ServerProcess(["--model", str(ckpt)]) as srv:
        httpx.get(srv.url + "/v1/models")

It starts ``python -m server`` with the given flags (or, with ``script=``, the same server with
scripted sampling: ``tests/scripted_server.py``), waits for ``/ready`` and on exit sends
SIGTERM (then SIGKILL if it will not go), keeping the log for failure messages.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

SCRIPTED_SERVER = Path(__file__).resolve().parent / "scripted_server.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        ready_timeout: float = 120.0,
        api_key: str | None = None,
        script: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        entry = ["-m", "server"] if script is None else [str(SCRIPTED_SERVER), "--script", str(script)]
        self.args = [sys.executable, *entry, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        root = str(Path(__file__).resolve().parent.parent)
        self.env["PYTHONPATH"] = root + os.pathsep + self.env.get("PYTHONPATH", "")
        self.ready_timeout = ready_timeout
        self.api_key = api_key
        self.proc: subprocess.Popen | None = None
        fd, self._log_path = tempfile.mkstemp(prefix="gptoss-server-", suffix=".log")
        os.close(fd)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, until: str = "/ready") -> ServerProcess:
        """Start, then wait until the probe ``until`` answers 200 ("/health": the process
        serves, whether or not the model has loaded)."""
        with open(self._log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                message = f"server exited with {self.proc.returncode}:\n{self.log()}"
                self.__exit__()
                raise RuntimeError(message)
            try:
                if httpx.get(self.url + until, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        message = f"server: {until} not 200 after {self.ready_timeout}s:\n{self.log()}"
        self.__exit__()
        raise RuntimeError(message)

    def metric(self, name: str) -> float:
        """One unlabelled sample of ``/metrics`` (probes need no API key)."""
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"metric {name} missing")

    def wait_engine_idle(self, timeout: float = 10.0) -> None:
        """Wait until the engine runs nothing, queues nothing and holds no KV block.

        A client that closes a stream aborts it, but the server notices asynchronously: a test
        that needs the slots back waits here instead of racing the abort."""
        names = ("gptoss_num_requests_running", "gptoss_num_requests_waiting", "gptoss_kv_cache_blocks_used")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.metric(name) == 0 for name in names):
                return
            time.sleep(0.05)
        raise AssertionError("engine still holds requests or KV blocks")

    def log(self) -> str:
        return Path(self._log_path).read_text(errors="replace")[-20000:]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            os.unlink(self._log_path)
