"""A real ``redis-server`` for tests, on a free loopback port (never a mock).

``RedisServer.start()`` runs ``redis-server --port N --bind 127.0.0.1 --save '' --appendonly no``
in a temporary folder and waits until it answers PING; ``stop()`` kills it. The session fixture
``redis_server`` (import ``redis_server_fixture`` into a test module) shares one server; tests
keep apart by namespacing their keys. Without a ``redis-server`` binary (Debian's package
``redis-server``; .ci/run installs it) the tests that need one fail: never a mock, never a skip.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    workdir: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, startup_timeout: float = 15.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install -y redis-server; .ci/run does it)")
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between probe and bind
            port = free_port()
            workdir = tempfile.mkdtemp(prefix="gptoss-redis-")
            command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            command += ["--dir", workdir, "--daemonize", "no", "--loglevel", "warning"]
            with (Path(workdir) / "redis.log").open("wb") as log:  # the child keeps its copy
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
            server = cls(port=port, process=process, workdir=workdir)
            deadline = time.monotonic() + startup_timeout
            while time.monotonic() < deadline and process.poll() is None:
                if ping(port):
                    return server
                time.sleep(0.02)
            last_error = server.stop()
        raise RuntimeError(f"redis-server did not answer PING: {last_error.strip()}")

    def stop(self) -> str:
        """Kill it (if still running); returns what it printed."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        log = Path(self.workdir) / "redis.log"
        output = log.read_text(errors="replace") if log.exists() else ""
        shutil.rmtree(self.workdir, ignore_errors=True)
        return output


@pytest.fixture(scope="session", name="redis_server")
def redis_server_fixture() -> Iterator[RedisServer]:
    server = RedisServer.start()
    try:
        yield server
    finally:
        server.stop()
