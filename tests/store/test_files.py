"""FileStores: the connection-stores contract, the directory layout, and key rotation.

Rotation re-seals every connection's file; its crash-safety ordering is checked by
building the states a crash leaves behind.
"""

from __future__ import annotations

import asyncio
import base64
import stat
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from proxy.config import Config, TokensConfig
from proxy.errors import LockTimeout, StoreError
from proxy.names import DEFAULT_CONNECTION
from proxy.store import open_stores
from proxy.store.crypto import generate_key, key_id, open_sealed, read_key_file, seal
from proxy.store.file import FileStore, old_key_path
from proxy.store.files import FileStores, rotate_key
from tests.store import names_contract
from tests.store.connections_contract import STORES_CHECKS, StoresCheck, StoresHarness
from tests.store.contract import check_id, sample_state
from tests.store.names_contract import NAMES_CHECKS, EntriesHarness

CONNECTIONS = ("acme", "globex", "initech.eu")


@dataclass(frozen=True)
class Paths:
    state_dir: Path
    token: Path
    key: Path

    @property
    def connections(self) -> Path:
        return self.state_dir / "connections"

    def entry(self, name: str) -> Path:
        return self.token if name == DEFAULT_CONNECTION else self.connections / f"{name}.enc"

    def store(self, key: bytes | None = None, environ: dict[str, str] | None = None) -> FileStore:
        """The pre-connections store of `default`, as the proxy opened it before."""
        return FileStore(self.token, key, key_file=self.key, environ=environ or {})

    def stores(self, key: bytes | None = None) -> FileStores:
        return FileStores(self.token, key, key_file=self.key, environ={})

    def config(self) -> Config:
        return Config(tokens=TokensConfig(path=self.token, key_file=self.key))

    def child_setup(self) -> str:
        # An empty environment mapping: a PLEO_PROXY_KEY in the runner's cannot interfere.
        return (
            "from pathlib import Path\n"
            "from proxy.store.files import FileStores\n"
            "async def make_stores():\n"
            f"    return FileStores(Path({str(self.token)!r}), key_file=Path({str(self.key)!r}),"
            " environ={})\n"
        )


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    state_dir = tmp_path / "state"  # not created: the stores create it
    return Paths(state_dir, state_dir / "tokens.enc", state_dir / "tokens.key")


@pytest.fixture
def harness(paths: Paths) -> StoresHarness:
    async def make_stores() -> FileStores:
        return paths.stores()

    async def make_legacy() -> FileStore:
        return FileStore.from_config(paths.config())

    async def raw_values() -> list[bytes]:
        files = [p for p in paths.state_dir.rglob("*") if p.is_file()]
        return [p.read_bytes() for p in files if p != paths.key]

    return StoresHarness(make_stores, make_legacy, raw_values, paths.child_setup())


@pytest.mark.parametrize("check", STORES_CHECKS, ids=check_id)
async def test_connections_contract(check: StoresCheck, harness: StoresHarness) -> None:
    await asyncio.wait_for(check(harness), 90.0)


@pytest.fixture
def entries(paths: Paths) -> EntriesHarness:
    async def make_stores() -> FileStores:
        return paths.stores()

    async def make_legacy() -> FileStore:
        return FileStore.from_config(paths.config())

    async def read_entry(name: str) -> bytes | None:
        path = paths.entry(name)
        return path.read_bytes() if path.exists() else None

    async def write_entry(name: str, blob: bytes) -> None:
        paths.entry(name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths.entry(name).write_bytes(blob)

    async def rotate() -> None:
        await rotate_key(paths.config(), environ={})

    return EntriesHarness(make_stores, make_legacy, read_entry, write_entry, paths.key, rotate)


@pytest.mark.parametrize("check", NAMES_CHECKS, ids=check_id)
async def test_names_contract(check: names_contract.Check, entries: EntriesHarness) -> None:
    await asyncio.wait_for(check(entries), 90.0)


async def test_after_rotate_key_no_old_format_blob_opens(entries: EntriesHarness) -> None:
    await asyncio.wait_for(
        names_contract.check_after_rotate_key_no_old_format_blob_opens(entries), 90.0
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_layout_of_connections_beside_the_default_file(paths: Paths) -> None:
    stores = open_stores(paths.config())
    assert isinstance(stores, FileStores)
    try:
        await stores.store(DEFAULT_CONNECTION).save(sample_state(1))
        await stores.store("acme").save(sample_state(2))
        async with stores.store("acme").lock(1.0):
            pass
        await stores.touch()
    finally:
        await stores.close()
    entries = sorted(p.relative_to(paths.state_dir).as_posix() for p in paths.state_dir.rglob("*"))
    assert entries == [
        "connections",
        "connections/.changes",
        "connections/acme.enc",
        "connections/acme.enc.lock",
        "tokens.enc",
        "tokens.key",
    ]
    assert mode(paths.connections) == 0o700
    for name in ("acme.enc", "acme.enc.lock", ".changes"):
        assert mode(paths.connections / name) == 0o600
    assert stores.path("acme") == paths.connections / "acme.enc"
    assert stores.path(DEFAULT_CONNECTION) == paths.token


async def test_names_ignores_what_is_not_an_entry(paths: Paths) -> None:
    stores = paths.stores()
    await stores.store("acme").save(sample_state(1))
    strays = (".acme.enc.0a1b2c.tmp", "UPPER.enc", "default.enc", "notes.txt", ".changes.enc")
    for stray in strays:
        (paths.connections / stray).write_bytes(b"x")
    (paths.connections / "dir.enc").mkdir()
    (paths.connections / "globex.enc.lock").touch()
    assert await stores.names() == ["acme"]
    await stores.close()


async def test_remove_keeps_the_lock_file(paths: Paths) -> None:
    stores = paths.stores()
    store = stores.store("acme")
    await store.save(sample_state(1))
    async with store.lock(1.0):
        await stores.remove("acme")
    assert not paths.entry("acme").exists()
    # Deleting a lock file others may be waiting on would split the lock in two.
    assert (paths.connections / "acme.enc.lock").exists()
    await stores.close()


async def test_changed_reads_the_marker_file(paths: Paths) -> None:
    stores = paths.stores()
    assert await stores.changed() == ""
    assert not paths.connections.exists()  # reading creates nothing
    await stores.touch()
    marker = (paths.connections / ".changes").read_text()
    assert await stores.changed() == marker != ""
    await stores.close()


async def test_verify_creates_both_directories(paths: Paths) -> None:
    stores = paths.stores()
    await stores.verify()
    assert mode(paths.state_dir) == 0o700
    assert mode(paths.connections) == 0o700
    assert mode(paths.key) == 0o600
    assert sorted(p.name for p in paths.connections.iterdir()) == []
    await stores.close()


async def test_verify_with_entries_but_no_key_makes_no_key(paths: Paths) -> None:
    writer = paths.stores()
    await writer.store("acme").save(sample_state(1))
    await writer.close()
    paths.key.unlink()
    stores = paths.stores()
    with pytest.raises(StoreError, match="does not exist"):
        await stores.verify()
    assert not paths.key.exists()  # a new key would open none of the entries
    await stores.close()


async def test_verify_checks_default_and_leaves_other_connections_to_their_use(
    paths: Paths,
) -> None:
    sealer, configured = generate_key(), generate_key()
    writer = paths.stores(sealer)
    await writer.store("acme").save(sample_state(1))
    stores = paths.stores(configured)
    await stores.verify()  # one customer's entry never stops the start-up
    with pytest.raises(StoreError) as caught:
        await stores.store("acme").load()
    assert key_id(sealer) in caught.value.detail
    assert str(paths.entry("acme")) in caught.value.detail
    await writer.store(DEFAULT_CONNECTION).save(sample_state(2))
    await writer.close()
    with pytest.raises(StoreError) as caught:
        await stores.verify()
    assert key_id(sealer) in caught.value.detail
    await stores.close()


# Key rotation.


async def save_all(paths: Paths, key: bytes | None = None) -> None:
    stores = paths.stores(key)
    for n, name in enumerate((DEFAULT_CONNECTION, *CONNECTIONS)):
        await stores.store(name).save(sample_state(n, marker=name))
    await stores.close()


async def assert_all_sealed_under(paths: Paths, key: bytes) -> None:
    stores = paths.stores(key)  # this key and no other
    for n, name in enumerate((DEFAULT_CONNECTION, *CONNECTIONS)):
        assert await stores.store(name).load() == sample_state(n, marker=name)
        assert open_sealed(paths.entry(name).read_bytes(), [key], name=name)
    await stores.close()


async def test_rotate_key(paths: Paths) -> None:
    store = paths.store()
    await store.save(sample_state(3))
    old_key = read_key_file(paths.key)
    new_id = await rotate_key(paths.config(), environ={})
    new_key = read_key_file(paths.key)
    assert new_id == key_id(new_key) != key_id(old_key)
    assert mode(paths.key) == 0o600
    assert not old_key_path(paths.key).exists()
    assert await store.load() == sample_state(3)
    with pytest.raises(StoreError, match=key_id(new_key)):
        await paths.store(old_key).load()
    assert open_sealed(paths.token.read_bytes(), [new_key], name=DEFAULT_CONNECTION)
    await store.close()


async def test_rotate_key_reseals_every_connection(paths: Paths) -> None:
    await save_all(paths)
    old_key = read_key_file(paths.key)
    new_id = await rotate_key(paths.config(), environ={})
    new_key = read_key_file(paths.key)
    assert new_id == key_id(new_key) != key_id(old_key)
    assert not old_key_path(paths.key).exists()
    await assert_all_sealed_under(paths, new_key)


async def test_rotate_key_finishes_an_interrupted_rotation(paths: Paths) -> None:
    # The state a crash leaves between "switch the key file" and "re-seal": the files
    # are still sealed under the key kept in `.old` (one was re-sealed already).
    old_key, newer_key = generate_key(), generate_key()
    await save_all(paths, old_key)
    plaintext = open_sealed(paths.entry("globex").read_bytes(), [old_key], name="globex")
    paths.entry("globex").write_bytes(seal(plaintext, newer_key, name="globex"))
    paths.key.write_bytes(base64.b64encode(newer_key) + b"\n")
    paths.key.chmod(0o600)
    old_key_path(paths.key).write_bytes(base64.b64encode(old_key) + b"\n")
    old_key_path(paths.key).chmod(0o600)
    store = paths.store()
    assert await store.load() == sample_state(0, marker=DEFAULT_CONNECTION)  # `.old` opens it
    new_id = await rotate_key(paths.config(), environ={})
    assert not old_key_path(paths.key).exists()
    assert key_id(read_key_file(paths.key)) == new_id
    await assert_all_sealed_under(paths, read_key_file(paths.key))
    for stale in (old_key, newer_key):
        with pytest.raises(StoreError):
            await paths.store(stale).load()
    await store.close()


async def test_rotate_key_stopped_by_a_held_lock_can_be_finished(paths: Paths) -> None:
    await save_all(paths)
    stores = paths.stores()
    async with stores.store("globex").lock(1.0):
        # Stops after switching the key with some files re-sealed: what a crash leaves.
        with pytest.raises(LockTimeout):
            await rotate_key(paths.config(), environ={}, lock_timeout=0.2)
        assert old_key_path(paths.key).exists()
        state = await stores.store("globex").load()  # still opens, through `.old`
        assert state == sample_state(2, marker="globex")
    await stores.close()
    new_id = await rotate_key(paths.config(), environ={})
    assert not old_key_path(paths.key).exists()
    assert key_id(read_key_file(paths.key)) == new_id
    await assert_all_sealed_under(paths, read_key_file(paths.key))


async def test_rotate_key_refuses_when_an_entry_does_not_open(paths: Paths) -> None:
    await save_all(paths)
    key_before = paths.key.read_bytes()
    foreign = seal(b'{"version": 1}', generate_key(), name="initech.eu")
    paths.entry("initech.eu").write_bytes(foreign)
    with pytest.raises(StoreError, match=r"initech\.eu"):
        await rotate_key(paths.config(), environ={})
    assert paths.key.read_bytes() == key_before  # nothing changed
    assert not old_key_path(paths.key).exists()
    assert paths.entry("initech.eu").read_bytes() == foreign


async def test_rotate_key_without_token_file_makes_a_new_key(paths: Paths) -> None:
    first = await rotate_key(paths.config(), environ={})
    second = await rotate_key(paths.config(), environ={})
    assert first != second == key_id(read_key_file(paths.key))
    assert not paths.token.exists()


async def test_rotate_key_refuses_an_environment_key(paths: Paths) -> None:
    key = generate_key()
    environ = {"PLEO_PROXY_KEY": base64.b64encode(key).decode()}
    store = paths.store(environ=environ)
    await store.save(sample_state(1))
    before = paths.token.read_bytes()
    with pytest.raises(StoreError, match="PLEO_PROXY_KEY"):
        await rotate_key(paths.config(), environ=environ)
    assert paths.token.read_bytes() == before
    assert not paths.key.exists()
    await store.close()


async def test_save_after_rotation_by_another_store_uses_the_new_key(paths: Paths) -> None:
    running = paths.stores()  # stands for a running proxy that never restarts
    await running.store("acme").save(sample_state(1))
    await rotate_key(paths.config(), environ={})
    await running.store("acme").save(replace(sample_state(2), company_name="after rotation"))
    new_key = read_key_file(paths.key)
    assert open_sealed(paths.entry("acme").read_bytes(), [new_key], name="acme")
    await running.close()
