"""The Redis response store: one byte cap and one LRU order shared by every replica.

See ``server.response_store`` for the rules both stores keep.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from server.response_store import (
    DEFAULT_NAMESPACE,
    DEFAULT_REDIS_TIMEOUT_SECONDS,
    ResponseStoreUnavailable,
    StoreStats,
    _check_bounds,
    _warn_oversize,
    entry_size,
)

# KEYS: 1 lru (zset key -> use counter), 2 exp (zset key -> expiry ms, Redis clock),
# 3 sizes (hash key -> bytes), 4 total (bytes), 5 clock (use counter).
# ARGV[1]: the value-key prefix. Every script starts with the shared helpers.
_LUA_HELPERS = """
if redis.replicate_commands then redis.replicate_commands() end  -- Redis < 7: TIME before writes
local lru, exp, sizes, total, clock = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function forget(member)  -- the accounting only; returns whether it was there
  local size = redis.call('HGET', sizes, member)
  if not size then return false end
  redis.call('DECRBY', total, size)
  redis.call('HDEL', sizes, member)
  redis.call('ZREM', lru, member)
  redis.call('ZREM', exp, member)
  return true
end
local function drop(member)
  redis.call('DEL', prefix .. member)
  return forget(member)
end
local function sweep(now)  -- entries Redis has expired (or is about to): out of the accounting
  local gone = redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, 1000)
  for _, member in ipairs(gone) do drop(member) end
end
"""

# ARGV: 2 key, 3 value, 4 size, 5 ttl ms, 6 max bytes -> {stored 0/1, evicted count}
_PUT = (
    _LUA_HELPERS
    + """
local member, value = ARGV[2], ARGV[3]
local size, ttl, cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
sweep(now)
drop(member)
if size > cap then return {0, 0} end
redis.call('SET', prefix .. member, value, 'PX', ttl)
redis.call('HSET', sizes, member, size)
redis.call('INCRBY', total, size)
redis.call('ZADD', lru, redis.call('INCR', clock), member)
redis.call('ZADD', exp, now + ttl, member)
local evicted = 0
while tonumber(redis.call('GET', total) or '0') > cap do
  local oldest = redis.call('ZRANGE', lru, 0, 0)
  if #oldest == 0 or oldest[1] == member then break end
  drop(oldest[1])
  evicted = evicted + 1
end
return {1, evicted}
"""
)

# ARGV: 2 key -> the value or nil (a hit moves the key to the recent end)
_GET = (
    _LUA_HELPERS
    + """
local member = ARGV[2]
local value = redis.call('GET', prefix .. member)
if not value then
  forget(member)
  return false
end
redis.call('ZADD', lru, 'XX', redis.call('INCR', clock), member)
return value
"""
)

# ARGV: 2 key -> 1 if a live value was there
_DELETE = (
    _LUA_HELPERS
    + """
local member = ARGV[2]
local existed = redis.call('DEL', prefix .. member)
forget(member)
return existed
"""
)

# -> {entries, bytes}
_STATS = (
    _LUA_HELPERS
    + """
sweep(now_ms())
return {redis.call('ZCARD', lru), tonumber(redis.call('GET', total) or '0')}
"""
)


def redact_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


class RedisResponseStore:
    """Shared by every process pointing at the same Redis URL and namespace."""

    def __init__(
        self,
        url: str,
        *,
        max_bytes: int,
        ttl_seconds: float,
        namespace: str = DEFAULT_NAMESPACE,
        timeout_seconds: float = DEFAULT_REDIS_TIMEOUT_SECONDS,
    ) -> None:
        _check_bounds(max_bytes, ttl_seconds)
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self.namespace = namespace
        self._where = redact_url(url)
        # One retry without backoff (a pooled connection that a Redis restart closed), then
        # the error: with the socket timeouts a dead Redis costs at most ~2 timeouts.
        self._redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
        )
        self._keys = [namespace + name for name in ("lru", "exp", "sizes", "bytes", "clock")]
        self._prefix = namespace + "v:"
        self._put = self._redis.register_script(_PUT)
        self._get = self._redis.register_script(_GET)
        self._delete = self._redis.register_script(_DELETE)
        self._stats = self._redis.register_script(_STATS)

    def __repr__(self) -> str:
        return f"RedisResponseStore({self._where!r}, namespace={self.namespace!r})"

    async def _run(self, script: Any, *args: Any) -> Any:
        try:
            return await script(keys=self._keys, args=[self._prefix, *args])
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise ResponseStoreUnavailable(f"response store at {self._where} is unreachable: {exc}") from exc
        except redis.exceptions.RedisError as exc:  # OOM, READONLY replica, LOADING, ...
            raise ResponseStoreUnavailable(f"response store at {self._where} failed: {exc}") from exc

    async def put(self, key: str, value: bytes) -> None:
        size = entry_size(key, value)
        ttl_ms = max(1, round(self.ttl_seconds * 1000))
        stored, _evicted = await self._run(self._put, key, bytes(value), size, ttl_ms, self.max_bytes)
        if not stored:
            _warn_oversize(key, size, self.max_bytes)

    async def get(self, key: str) -> bytes | None:
        return await self._run(self._get, key)

    async def delete(self, key: str) -> bool:
        return bool(await self._run(self._delete, key))

    async def stats(self) -> StoreStats:
        entries, total = await self._run(self._stats)
        return StoreStats(entries=int(entries), bytes=int(total))

    async def ping(self) -> None:
        """Raises ``ResponseStoreUnavailable`` unless Redis answers (for a startup check)."""
        try:
            await self._redis.ping()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise ResponseStoreUnavailable(f"response store at {self._where} is unreachable: {exc}") from exc

    async def close(self) -> None:
        aclose = getattr(self._redis, "aclose", None)  # redis-py >= 5.0.1; close() before
        await (aclose() if aclose is not None else self._redis.close())
