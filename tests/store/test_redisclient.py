"""RedisBackend: every operation's redis-py errors become StoreErrors at the one boundary,
naming the Redis but never its password; and the URL shown in messages."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.errors import LockTimeout, StoreError
from proxy.store import TokenStore
from proxy.store.redis import RedisStore, RedisStores
from proxy.store.redisclient import RedisBackend, display_url
from tests.certs import make_ca
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


async def test_a_user_password_and_db_in_the_url_are_used(tmp_path: Path) -> None:
    with running_redis("--requirepass", "admin-pass", password="admin-pass") as server:
        admin = aioredis.Redis.from_url(f"redis://:admin-pass@127.0.0.1:{server.port}/0")
        try:
            rules = ("on", ">proxy-pass", "~*", "&*", "+@all")
            await admin.execute_command("ACL", "SETUSER", "proxy", *rules)  # type: ignore[no-untyped-call]
            url = f"redis://proxy:proxy-pass@127.0.0.1:{server.port}/7"
            store = RedisStore(url, prefix=PREFIX, key_file=tmp_path / "k", environ={})
            try:
                await store.verify()
                async with store.lock(1.0):
                    await store.save(sample_state(3))
                assert await store.load() == sample_state(3)
            finally:
                await store.close()
            # In db 7, as the URL says, and nowhere in db 0.
            assert await admin.exists(f"{PREFIX}state") == 0
            seven = aioredis.Redis.from_url(f"redis://:admin-pass@127.0.0.1:{server.port}/7")
            assert await seven.exists(f"{PREFIX}state") == 1
            await seven.aclose()
        finally:
            await admin.aclose()


async def test_rediss_verifies_the_server_with_the_ca_named_in_the_url(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    server_files = ca.issue(tmp_path, "redis")
    ca_file = ca.path
    tls_port = free_port()
    tls: tuple[str, ...] = ("--tls-port", str(tls_port), "--tls-cert-file", str(server_files.cert))
    tls += ("--tls-key-file", str(server_files.key), "--tls-auth-clients", "no")
    with running_redis(*tls, "--requirepass", "tls-pass", password="tls-pass"):
        url = f"rediss://:tls-pass@127.0.0.1:{tls_port}/2?ssl_ca_certs={ca_file}"
        store = RedisStore(url, prefix=PREFIX, key_file=tmp_path / "k", environ={})
        try:
            await store.verify()
            await store.save(sample_state(4))
            assert await store.load() == sample_state(4)
        finally:
            await store.close()
        # Without that CA the server's certificate is not trusted: refused, and said so.
        untrusted = RedisStore(
            f"rediss://:tls-pass@127.0.0.1:{tls_port}/2", prefix=PREFIX, key_file=tmp_path / "k"
        )
        try:
            with pytest.raises(StoreError) as caught:
                await untrusted.load()
        finally:
            await untrusted.close()
    assert f"rediss://127.0.0.1:{tls_port}/2" in caught.value.detail
    assert (
        "CERTIFICATE_VERIFY_FAILED" in caught.value.detail or "certificate" in caught.value.detail
    )
    assert "tls-pass" not in caught.value.detail
