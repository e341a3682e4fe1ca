"""RedisBackend: every operation's redis-py errors become StoreErrors at the one boundary,
naming the Redis but never its password; and the URL shown in messages."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from proxy.errors import LockTimeout, StoreError
from proxy.store import TokenStore
from proxy.store.redis import RedisStore, RedisStores
from proxy.store.redisclient import RedisBackend, display_url
from tests.processes import free_port
from tests.redis_server import running_redis
from tests.store.contract import sample_state

PREFIX = "pleo-proxy:test:"


async def test_unreachable_redis_is_error_with_the_url_but_no_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://operator:hunter2-pass@127.0.0.1:{port}/3"
    store = RedisStore(url, prefix=PREFIX, key_file=tmp_path / "k", environ={}, timeout=2.0)
    expected = f"cannot reach Redis at redis://127.0.0.1:{port}/3: "
    started = time.monotonic()
    try:
        for action in (store.verify, store.load, store.delete, _lock_once(store)):
            with pytest.raises(StoreError) as caught:
                await action()
            assert not isinstance(caught.value, LockTimeout)
            assert caught.value.detail.startswith(expected), caught.value.detail
            assert "hunter2-pass" not in caught.value.detail
            assert "operator" not in caught.value.detail
        with pytest.raises(StoreError, match="cannot reach Redis"):
            await store.save(sample_state(1))
    finally:
        await store.close()
    assert time.monotonic() - started < 20.0  # reported, not retried for long


def _lock_once(store: TokenStore) -> Callable[[], Awaitable[None]]:
    async def take() -> None:
        async with store.lock(5.0):
            pytest.fail("took a lock on a Redis that is not there")

    return take


async def test_wrong_password_is_error_without_the_password(tmp_path: Path) -> None:
    with running_redis("--requirepass", "right-password", password="right-password") as server:
        url = f"redis://:wrong-password@127.0.0.1:{server.port}/0"
        store = RedisStore(url, prefix=PREFIX, key_file=tmp_path / "k", environ={})
        try:
            with pytest.raises(StoreError) as caught:
                await store.verify()
        finally:
            await store.close()
        good = RedisStore(
            f"redis://:right-password@127.0.0.1:{server.port}/0",
            prefix=PREFIX,
            key_file=tmp_path / "k",
            environ={},
        )
        try:
            await good.verify()
            await good.save(sample_state(2))
            assert await good.load() == sample_state(2)
        finally:
            await good.close()
    assert f"redis://127.0.0.1:{server.port}/0" in caught.value.detail
    assert "password" not in caught.value.detail.replace("username-password", "")
    assert "wrong-password" not in caught.value.detail


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:p@db.example:6380/2", "redis://db.example:6380/2"),
        ("rediss://:p@[::1]/0", "rediss://[::1]:6379/0"),
        ("redis://localhost", "redis://localhost:6379/0"),
        ("unix:///run/redis.sock?db=1&password=p", "unix:///run/redis.sock?db=1"),
    ],
)
def test_display_url_drops_credentials(url: str, shown: str) -> None:
    assert display_url(url) == shown


async def test_unreachable_redis_fails_every_connection_operation_alike(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://operator:hunter2-pass@127.0.0.1:{port}/3"
    backend = RedisBackend(url, key_file=tmp_path / "k", environ={}, timeout=2.0)
    stores = RedisStores(backend, prefix=PREFIX)
    acme = stores.store("acme")
    expected = f"cannot reach Redis at redis://127.0.0.1:{port}/3: "
    actions: list[Callable[[], Awaitable[object]]] = [
        stores.names,
        stores.verify,
        stores.touch,
        stores.changed,
        lambda: stores.exists("acme"),
        lambda: stores.remove("acme"),
        acme.load,
        acme.delete,
        lambda: acme.save(sample_state(1)),
        _lock_once(acme),
    ]
    try:
        for action in actions:
            with pytest.raises(StoreError) as caught:
                await action()
            assert not isinstance(caught.value, LockTimeout)
            assert caught.value.detail.startswith(expected), caught.value.detail
            assert "hunter2-pass" not in caught.value.detail
            assert "operator" not in caught.value.detail
    finally:
        await stores.close()
