"""Container HEALTHCHECK: exit 0 when the server's liveness endpoint answers 200, else 1.

Runs inside the image as ``python3 /usr/local/bin/gptoss-healthcheck`` (no curl in the
image). It asks ``/health`` on the loopback at ``GPTOSS_PORT`` (the port the server reads
from the same variable), so a port set through the environment needs no second setting.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def probe(port: int, path: str = "/health", timeout: float = 4.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main() -> int:
    port = int(os.environ.get("GPTOSS_PORT", "8000"))
    return 0 if probe(port) else 1


if __name__ == "__main__":
    sys.exit(main())
