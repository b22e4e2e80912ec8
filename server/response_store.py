"""A bounded key-value store of opaque bytes that replicas can share (the Responses API's
stored responses: one JSON record per response id).

``open_response_store("memory" | "redis://HOST:PORT/DB", max_bytes=..., ttl_seconds=...)``.

The same rules hold for both kinds:

- **Size.** An entry costs ``len(key.encode()) + len(value)`` bytes; the total stays at or
  under ``max_bytes``. A put that would go over evicts the least recently used entries first
  (a put and a get hit are both uses). A single entry larger than ``max_bytes`` is **not
  stored** (everything else stays; an older value under that key is removed, so a get never
  returns a stale one) and a warning is logged with its size.
- **Age.** An entry is gone ``ttl_seconds`` after its last put (a get does not extend it).
- **Misses.** ``get`` returns None for a key that is unknown, expired or evicted.

``MemoryResponseStore`` lives in this process (an ``OrderedDict`` in use order plus one in put
order, so expiry and eviction are O(1) per entry, with no background task). ``RedisResponseStore``
(``server/response_store_redis.py``) keeps the values under ``<namespace>v:<key>`` with Redis key expiry as the TTL, and the shared
accounting beside them: a sorted set of keys by last use (scores from a shared counter), a
sorted set of expiry times (Redis's own clock), a hash of sizes and a byte total. Every
operation is one Lua script, so replicas pointing at one Redis (standalone, not Cluster) see
each other's entries and share one byte cap and one LRU order.

A Redis that is down or too slow raises ``ResponseStoreUnavailable`` (within the socket
timeout, never a hang); the HTTP layer turns it into a 503.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "gptoss:resp:"
DEFAULT_REDIS_TIMEOUT_SECONDS = 2.0


class ResponseStoreUnavailable(Exception):
    """The store cannot be reached or did not answer in time (HTTP: 503)."""


@dataclass(frozen=True)
class StoreStats:
    entries: int
    bytes: int


class ResponseStore(Protocol):
    async def put(self, key: str, value: bytes) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def delete(self, key: str) -> bool: ...

    async def stats(self) -> StoreStats: ...

    async def close(self) -> None: ...


def entry_size(key: str, value: bytes) -> int:
    """What one entry counts against ``max_bytes``."""
    return len(key.encode()) + len(value)


def _check_bounds(max_bytes: int, ttl_seconds: float) -> None:
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, not {max_bytes}")
    if not ttl_seconds > 0:
        raise ValueError(f"ttl_seconds must be positive, not {ttl_seconds}")


def _warn_oversize(key: str, size: int, max_bytes: int) -> None:
    logger.warning(
        "response store: entry %r is %d bytes, over the store's cap of %d bytes; not stored",
        key,
        size,
        max_bytes,
    )


class MemoryResponseStore:
    """This process only. Not thread-safe: use it from one event loop (no operation awaits)."""

    def __init__(self, *, max_bytes: int, ttl_seconds: float) -> None:
        _check_bounds(max_bytes, ttl_seconds)
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self._by_use: OrderedDict[str, bytes] = OrderedDict()  # least recently used first
        self._by_put: OrderedDict[str, float] = OrderedDict()  # key -> expiry, oldest put first
        self._bytes = 0

    def _drop(self, key: str) -> bool:
        value = self._by_use.pop(key, None)
        if value is None:
            return False
        del self._by_put[key]
        self._bytes -= entry_size(key, value)
        return True

    def _expire(self, now: float) -> None:
        # The TTL is the same for every entry, so put order is expiry order.
        while self._by_put:
            key, expires = next(iter(self._by_put.items()))
            if expires > now:
                break
            self._drop(key)

    async def put(self, key: str, value: bytes) -> None:
        value = bytes(value)
        now = time.monotonic()
        self._expire(now)
        self._drop(key)
        size = entry_size(key, value)
        if size > self.max_bytes:
            _warn_oversize(key, size, self.max_bytes)
            return
        while self._bytes + size > self.max_bytes:
            self._drop(next(iter(self._by_use)))
        self._by_use[key] = value
        self._by_put[key] = now + self.ttl_seconds
        self._bytes += size

    async def get(self, key: str) -> bytes | None:
        expires = self._by_put.get(key)
        if expires is None:
            return None
        if expires <= time.monotonic():
            self._drop(key)
            return None
        self._by_use.move_to_end(key)
        return self._by_use[key]

    async def delete(self, key: str) -> bool:
        self._expire(time.monotonic())
        return self._drop(key)

    async def stats(self) -> StoreStats:
        self._expire(time.monotonic())
        return StoreStats(entries=len(self._by_use), bytes=self._bytes)

    async def close(self) -> None:
        self._by_use.clear()
        self._by_put.clear()
        self._bytes = 0


def open_response_store(
    spec: str,
    *,
    max_bytes: int,
    ttl_seconds: float,
    namespace: str = DEFAULT_NAMESPACE,
    timeout_seconds: float = DEFAULT_REDIS_TIMEOUT_SECONDS,
) -> ResponseStore:
    """``"memory"`` or ``"redis://HOST:PORT/DB"`` (``rediss://`` for TLS; user and password
    in the URL as usual). Opening connects to nothing: the first operation does, and raises
    ``ResponseStoreUnavailable`` if Redis is not there."""
    from server.response_store_redis import RedisResponseStore, redact_url  # redis-py only when used

    if spec == "memory":
        return MemoryResponseStore(max_bytes=max_bytes, ttl_seconds=ttl_seconds)
    if urlsplit(spec).scheme in ("redis", "rediss"):
        return RedisResponseStore(
            spec,
            max_bytes=max_bytes,
            ttl_seconds=ttl_seconds,
            namespace=namespace,
            timeout_seconds=timeout_seconds,
        )
    raise ValueError(f"unknown response store {redact_url(spec)!r}: use 'memory' or redis://HOST:PORT/DB")
