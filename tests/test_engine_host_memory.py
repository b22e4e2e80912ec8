"""The CPU host memory policy (engine/host_memory.py)."""

from __future__ import annotations

import platform
import sys

from engine.host_memory import keep_freed_memory


def test_host_memory_policy_is_accepted_where_glibc_runs() -> None:
    applied = keep_freed_memory()
    assert keep_freed_memory() == applied  # idempotent
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert applied
