"""server/response_store.py: the same rules on the in-process store and on a real Redis
(tests/redis_server.py starts one), plus what only Redis has: replicas sharing entries and one
byte cap, and a Redis that is down or stuck raising ResponseStoreUnavailable within a bound."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from redis_server import RedisServer, free_port, redis_server_fixture  # noqa: F401 (a fixture)

from server.cli import parse_settings
from server.response_store import (
    MemoryResponseStore,
    ResponseStore,
    ResponseStoreUnavailable,
    StoreStats,
    entry_size,
    open_response_store,
)
from server.response_store_redis import RedisResponseStore, redact_url
from server.settings import ServerSettings

MakeStore = Callable[..., ResponseStore]


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[MakeStore]:
    """``make_store(max_bytes=..., ttl_seconds=...)`` -> a fresh, empty store of that kind (for
    Redis a namespace of its own on the shared server). Call it inside the test's event loop."""
    namespace = f"test:{uuid.uuid4().hex}:"
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else "memory"

    def make(max_bytes: int = 1 << 20, ttl_seconds: float = 60.0) -> ResponseStore:
        return open_response_store(url, max_bytes=max_bytes, ttl_seconds=ttl_seconds, namespace=namespace)

    yield make


def value(key: str, size: int) -> bytes:
    """A value that makes the entry exactly ``size`` bytes."""
    return b"x" * (size - len(key.encode()))


# -- the rules, on both kinds ----------------------------------------------------------------------


def test_put_get_delete(make_store: MakeStore) -> None:
    async def body() -> None:
        store = make_store()
        assert await store.get("resp_1") is None
        assert await store.stats() == StoreStats(entries=0, bytes=0)
        record = b'{"id": "resp_1", "output": []}'
        await store.put("resp_1", record)
        assert await store.get("resp_1") == record
        binary = bytes(range(256)) * 3  # opaque bytes: NULs, not UTF-8
        await store.put("résp_2", binary)
        assert await store.get("résp_2") == binary
        assert await store.stats() == StoreStats(
            2, entry_size("resp_1", record) + entry_size("résp_2", binary)
        )
        await store.put("resp_1", b"v2")  # a put replaces
        assert await store.get("resp_1") == b"v2"
        assert await store.stats() == StoreStats(2, len("resp_1") + 2 + len("résp_2".encode()) + 768)
        assert await store.delete("resp_1") is True
        assert await store.delete("resp_1") is False
        assert await store.delete("never") is False
        assert await store.get("resp_1") is None
        await store.put("empty", b"")
        assert await store.get("empty") == b""  # an empty value is a hit, not a miss
        assert (await store.stats()).entries == 2
        await store.close()

    run(body())


def test_the_byte_cap_evicts_the_least_recently_used_first(make_store: MakeStore) -> None:
    async def body() -> None:
        store = make_store(max_bytes=300)
        for key in ("a", "b", "c"):
            await store.put(key, value(key, 100))
        assert await store.stats() == StoreStats(3, 300)  # exactly at the cap: nothing goes
        assert await store.get("a") is not None  # a hit is a use: b is now the oldest
        await store.put("d", value("d", 100))
        assert await store.get("b") is None
        assert [k for k in "acd" if await store.get(k) is None] == []
        # Order now (oldest first): a, c, d. A 150-byte entry evicts a and c.
        await store.put("e", value("e", 150))
        assert await store.get("a") is None and await store.get("c") is None
        assert await store.get("d") is not None and await store.get("e") is not None
        assert await store.stats() == StoreStats(2, 250)
        await store.put("d", value("d", 50))  # a put is a use and re-counts the size
        assert await store.stats() == StoreStats(2, 200)
        await store.put("f", value("f", 110))  # e is the oldest now
        assert await store.get("e") is None and await store.get("d") is not None
        assert await store.stats() == StoreStats(2, 160)
        await store.close()

    run(body())


def test_an_entry_over_the_cap_is_not_stored_and_the_rest_stays(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        store = make_store(max_bytes=200)
        await store.put("small", value("small", 100))
        with caplog.at_level(logging.WARNING, logger="server.response_store"):
            await store.put("big", value("big", 201))
        assert await store.get("big") is None
        assert await store.get("small") is not None
        assert "201 bytes" in caplog.text and "not stored" in caplog.text
        assert await store.stats() == StoreStats(1, 100)
        # Over the cap under a key that holds a value: the old value goes too (never stale).
        await store.put("small", value("small", 500))
        assert await store.get("small") is None
        assert await store.stats() == StoreStats(0, 0)
        # Exactly the cap fits, and evicts everything else.
        await store.put("a", value("a", 60))
        await store.put("whole", value("whole", 200))
        assert await store.get("a") is None and await store.get("whole") is not None
        assert await store.stats() == StoreStats(1, 200)
        await store.close()

    run(body())


def test_entries_expire_ttl_after_their_last_put(make_store: MakeStore) -> None:
    async def body() -> None:
        store = make_store(ttl_seconds=1.0)
        await store.put("old", b"1")
        await asyncio.sleep(0.6)
        await store.put("new", b"2")
        assert await store.get("old") == b"1"  # a get is a use but does not extend the TTL
        await asyncio.sleep(0.6)
        assert await store.get("old") is None
        assert await store.get("new") == b"2"
        assert await store.stats() == StoreStats(1, len("new") + 1)  # expired bytes leave the count
        await store.put("new", b"3")  # a put restarts the clock
        await asyncio.sleep(0.6)
        assert await store.get("new") == b"3"
        await asyncio.sleep(0.6)
        assert await store.get("new") is None
        assert await store.stats() == StoreStats(0, 0)
        assert await store.delete("new") is False
        await store.close()

    run(body())


def test_expired_entries_free_their_bytes_for_new_ones(make_store: MakeStore) -> None:
    """Expired entries do not count against the cap: live ones are not evicted for them."""

    async def body() -> None:
        store = make_store(max_bytes=300, ttl_seconds=0.5)
        await store.put("a", value("a", 200))
        await asyncio.sleep(0.6)
        await store.put("b", value("b", 150))
        await store.put("c", value("c", 150))
        assert await store.get("b") is not None and await store.get("c") is not None
        assert await store.stats() == StoreStats(2, 300)
        await store.close()

    run(body())


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryResponseStore(max_bytes=0, ttl_seconds=1)
    with pytest.raises(ValueError, match="ttl_seconds"):
        MemoryResponseStore(max_bytes=1, ttl_seconds=0)
    with pytest.raises(ValueError, match="unknown response store"):
        open_response_store("memcached://h", max_bytes=1, ttl_seconds=1)
    assert isinstance(open_response_store("memory", max_bytes=1, ttl_seconds=1), MemoryResponseStore)
    store = open_response_store("redis://127.0.0.1:1/0", max_bytes=1, ttl_seconds=1)
    assert isinstance(store, RedisResponseStore)  # opening connects to nothing
    run(store.close())


# -- Redis: replicas -------------------------------------------------------------------------------


def test_two_redis_replicas_share_entries_lru_and_one_byte_cap(redis_server: RedisServer) -> None:
    namespace = f"test:{uuid.uuid4().hex}:"

    async def body() -> None:
        one, two = (
            RedisResponseStore(redis_server.url, max_bytes=300, ttl_seconds=60, namespace=namespace)
            for _ in range(2)
        )
        await one.put("a", value("a", 100))
        assert await two.get("a") == value("a", 100)  # one's put, two's get
        await two.put("b", value("b", 100))
        await one.put("c", value("c", 100))
        assert await one.stats() == await two.stats() == StoreStats(3, 300)
        assert await two.get("a") is not None  # two's hit makes a recent for one too
        await one.put("d", value("d", 100))  # the shared cap: b (oldest anywhere) goes
        assert await two.get("b") is None and await one.get("b") is None
        assert await one.get("a") is not None
        assert await two.delete("a") is True  # two's delete, one's miss
        assert await one.get("a") is None and await one.delete("a") is False
        assert await one.stats() == await two.stats() == StoreStats(2, 200)
        other = RedisResponseStore(
            redis_server.url, max_bytes=300, ttl_seconds=60, namespace=namespace + "x:"
        )
        assert await other.get("c") is None  # another namespace is another store
        for store in (one, two, other):
            await store.close()

    run(body())


def test_concurrent_puts_from_replicas_keep_the_count_exact(redis_server: RedisServer) -> None:
    namespace = f"test:{uuid.uuid4().hex}:"

    async def body() -> None:
        stores = [
            RedisResponseStore(redis_server.url, max_bytes=1000, ttl_seconds=60, namespace=namespace)
            for _ in range(3)
        ]
        await asyncio.gather(
            *(stores[i % 3].put(f"k{i % 25}", value(f"k{i % 25}", 40 + i % 7)) for i in range(300))
        )
        stats = await stores[0].stats()
        assert stats.bytes <= 1000
        live = [await stores[1].get(f"k{i}") for i in range(25)]
        assert stats.entries == sum(v is not None for v in live)
        assert stats.bytes == sum(entry_size(f"k{i}", v) for i, v in enumerate(live) if v is not None)
        for store in stores:
            await store.close()

    run(body())


def test_an_entry_redis_expired_by_itself_leaves_the_accounting(redis_server: RedisServer) -> None:
    """The value key carries the TTL (Redis's own expiry); a miss on it cleans up the rest."""
    namespace = f"test:{uuid.uuid4().hex}:"

    async def body() -> None:
        store = RedisResponseStore(redis_server.url, max_bytes=1000, ttl_seconds=60, namespace=namespace)
        await store.put("k", b"v")
        ttl_ms = await store._redis.pttl(namespace + "v:k")
        assert 59_000 < ttl_ms <= 60_000
        await store._redis.delete(namespace + "v:k")  # as if Redis had expired or evicted it
        assert await store.get("k") is None
        assert await store.stats() == StoreStats(0, 0)
        await store.close()

    run(body())


# -- Redis: unavailable ----------------------------------------------------------------------------


def test_a_redis_that_is_not_running_raises_unavailable_at_once() -> None:
    port = free_port()  # nothing listens there

    async def body() -> None:
        store = RedisResponseStore(
            f"redis://user:s3cret@127.0.0.1:{port}/0", max_bytes=100, ttl_seconds=1, timeout_seconds=1
        )
        operations: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.put("k", b"v"),
            lambda: store.get("k"),
            lambda: store.delete("k"),
            store.stats,
            store.ping,
        ]
        for operation in operations:
            started = time.monotonic()
            with pytest.raises(ResponseStoreUnavailable) as info:
                await operation()
            assert time.monotonic() - started < 3
            assert f"127.0.0.1:{port}" in str(info.value) and "s3cret" not in str(info.value)
        assert "s3cret" not in repr(store)
        await store.close()

    run(body())


def test_a_redis_that_never_answers_times_out_instead_of_hanging() -> None:
    """A listener that accepts connections and never replies: the socket timeout bounds each call."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    async def body() -> None:
        store = RedisResponseStore(
            f"redis://127.0.0.1:{port}/0", max_bytes=100, ttl_seconds=1, timeout_seconds=0.3
        )
        started = time.monotonic()
        with pytest.raises(ResponseStoreUnavailable):
            await asyncio.wait_for(store.get("k"), timeout=10)
        assert time.monotonic() - started < 2  # two attempts of 0.3 s, not the 10 s guard
        await store.close()

    try:
        run(body())
    finally:
        listener.close()


def test_a_redis_that_goes_down_raises_unavailable() -> None:
    server = RedisServer.start()
    try:

        async def before() -> None:
            store = RedisResponseStore(server.url, max_bytes=100, ttl_seconds=60, timeout_seconds=1)
            await store.put("k", b"v")
            assert await store.get("k") == b"v"
            server.stop()
            with pytest.raises(ResponseStoreUnavailable):
                await store.get("k")
            with pytest.raises(ResponseStoreUnavailable):
                await store.put("k", b"w")
            await store.close()

        run(before())
    finally:
        server.stop()


# -- settings --------------------------------------------------------------------------------------


def test_store_settings_defaults_and_parsing() -> None:
    s = ServerSettings()
    assert (s.response_store, s.response_store_max_bytes, s.response_store_ttl) == ("memory", 2**30, 86400.0)
    assert s.reasoning_encryption_key is None
    s = parse_settings(
        ["--response-store", "redis://redis:6379/0", "--response-store-max-bytes", "256MiB"],
        environ={"GPTOSS_RESPONSE_STORE_TTL": "3600", "GPTOSS_RESPONSE_STORE": "memory"},
    )
    assert (s.response_store, s.response_store_max_bytes, s.response_store_ttl) == (
        "redis://redis:6379/0",
        256 * 2**20,
        3600.0,
    )
    for spec in (
        "memory",
        "redis://h",
        "redis://h:6379",
        "rediss://user:pw@h:6380/3",
        "redis://[::1]:6379/0",
    ):
        assert parse_settings(["--response-store", spec], environ={}).response_store == spec
    s = parse_settings([], environ={"GPTOSS_RESPONSE_STORE": "redis://:pw@h:6379/0"})
    assert "pw" not in repr(s) and s.response_store == "redis://:pw@h:6379/0"  # usable, never shown


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("redis-server:6379", "not a response store: 'redis-server:6379'"),
        ("memcached://h:11211", "not a response store"),
        ("Memory", "not a response store"),
        ("redis://h:port/0", "bad port"),
        ("redis:///0", "no host"),
        ("redis://h:6379/zero", "database must be a number"),
    ],
)
def test_a_bad_response_store_is_a_clear_error_at_parse_time(
    capsys: pytest.CaptureFixture[str], spec: str, message: str
) -> None:
    for argv, environ in (([], {"GPTOSS_RESPONSE_STORE": spec}), (["--response-store", spec], {})):
        with pytest.raises(SystemExit) as exc:
            parse_settings(argv, environ=environ)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "redis://HOST:6379/0" in err, err


def test_bad_store_sizes_and_ttls_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for env in ({"GPTOSS_RESPONSE_STORE_MAX_BYTES": "lots"}, {"GPTOSS_RESPONSE_STORE_TTL": "0.5"}):
        with pytest.raises(SystemExit):
            parse_settings([], environ=env)
    assert "GPTOSS_RESPONSE_STORE_TTL" in capsys.readouterr().err


def test_redact_url() -> None:
    assert redact_url("redis://u:p@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://:p@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
