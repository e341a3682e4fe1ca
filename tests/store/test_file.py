"""FileStore: the store contract, plus file modes, corruption, keys and atomicity.

Key rotation, which re-seals every connection's file, is tested in test_files.py.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import shutil
import signal
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.errors import StoreError
from proxy.names import DEFAULT_CONNECTION
from proxy.store.crypto import generate_key, key_id, open_sealed, seal
from proxy.store.file import FileStore
from tests.store.contract import CHECKS, Check, Harness, check_id, sample_state

CHILD_TIMEOUT = 30.0


@dataclass(frozen=True)
class Paths:
    state_dir: Path
    token: Path
    key: Path

    def store(self, key: bytes | None = None, environ: dict[str, str] | None = None) -> FileStore:
        return FileStore(self.token, key, key_file=self.key, environ=environ or {})

    def child_setup(self) -> str:
        # The child gets an empty environment mapping too, so a PLEO_PROXY_KEY in the
        # test runner's environment cannot change which key it uses.
        return (
            "from pathlib import Path\n"
            "from proxy.store.file import FileStore\n"
            "async def make_store():\n"
            f"    return FileStore(Path({str(self.token)!r}), key_file=Path({str(self.key)!r}),"
            " environ={})\n"
        )


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    state_dir = tmp_path / "state"  # not created: the store creates it
    return Paths(state_dir, state_dir / "tokens.enc", state_dir / "tokens.key")


@pytest.fixture
def harness(paths: Paths) -> Harness:
    async def make_store() -> FileStore:
        return paths.store()

    async def raw_bytes() -> bytes | None:
        return paths.token.read_bytes() if paths.token.exists() else None

    async def write_raw(data: bytes) -> None:
        paths.state_dir.mkdir(mode=0o700, exist_ok=True)
        paths.token.write_bytes(data)

    return Harness(make_store, raw_bytes, write_raw, paths.child_setup())


@pytest.mark.parametrize("check", CHECKS, ids=check_id)
async def test_contract(check: Check, harness: Harness) -> None:
    await asyncio.wait_for(check(harness), 90.0)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


async def test_modes_of_created_files(paths: Paths) -> None:
    store = paths.store()
    await store.save(sample_state(1))
    async with store.lock(1.0):
        assert mode(paths.token.with_name("tokens.enc.lock")) == 0o600
    assert mode(paths.state_dir) == 0o700
    assert mode(paths.token) == 0o600
    assert mode(paths.key) == 0o600
    await store.close()


async def test_loose_lock_file_is_tightened(paths: Paths) -> None:
    paths.state_dir.mkdir(mode=0o700)
    lock_file = paths.token.with_name("tokens.enc.lock")
    lock_file.touch()
    lock_file.chmod(0o644)
    store = paths.store()
    async with store.lock(1.0):
        pass
    assert mode(lock_file) == 0o600
    await store.close()


async def test_save_replaces_a_loose_token_file_with_a_0600_one(paths: Paths) -> None:
    store = paths.store()
    await store.save(sample_state(1))
    paths.token.chmod(0o644)
    await store.save(sample_state(2))
    assert mode(paths.token) == 0o600
    await store.close()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 0x80]), "authentication failed"),
        (lambda raw: raw[:20], "truncated"),
        (lambda raw: b"", "foreign"),
    ],
    ids=["flipped-bit", "truncated", "empty"],
)
async def test_corrupt_file_is_error_and_untouched(
    paths: Paths, damage: Callable[[bytes], bytes], problem: str
) -> None:
    store = paths.store()
    await store.save(sample_state(1))
    damaged = damage(paths.token.read_bytes())
    paths.token.write_bytes(damaged)
    with pytest.raises(StoreError) as caught:
        await store.load()
    assert problem in caught.value.detail
    assert str(paths.token) in caught.value.detail
    with pytest.raises(StoreError):
        await store.verify()
    assert paths.token.read_bytes() == damaged
    await store.close()


async def test_malformed_plaintext_is_error(paths: Paths) -> None:
    key = generate_key()
    paths.state_dir.mkdir()
    plaintext = b'{"version": 1, "tokens": {"access_token": "x"}}'
    paths.token.write_bytes(seal(plaintext, key, name=DEFAULT_CONNECTION))
    store = paths.store(key)
    with pytest.raises(StoreError, match="corrupt") as caught:
        await store.load()
    assert "access_token" not in caught.value.detail
    await store.close()


async def test_wrong_key_names_both_key_ids(paths: Paths) -> None:
    sealer, other = generate_key(), generate_key()
    writer = paths.store(sealer)
    await writer.save(sample_state(1))
    reader = paths.store(other)
    with pytest.raises(StoreError) as caught:
        await reader.load()
    assert key_id(sealer) in caught.value.detail
    assert key_id(other) in caught.value.detail
    assert str(paths.token) in caught.value.detail
    await writer.close()
    await reader.close()


async def test_foreign_file_is_error_naming_the_path(paths: Paths) -> None:
    paths.state_dir.mkdir()
    paths.token.write_text("access_token=abc\n")
    store = paths.store()
    with pytest.raises(StoreError) as caught:
        await store.load()
    assert caught.value.detail == f"token file {paths.token} is foreign: not sealed by pleo-proxy"
    assert paths.token.read_text() == "access_token=abc\n"
    await store.close()


async def test_missing_key_file_with_existing_token_file_is_error(paths: Paths) -> None:
    store = paths.store()
    await store.save(sample_state(1))
    paths.key.unlink()
    with pytest.raises(StoreError, match="does not exist"):
        await store.load()
    assert not paths.key.exists()  # not replaced by a new key that could not open it
    await store.close()


async def test_closed_store_refuses_use(paths: Paths) -> None:
    store = paths.store()
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.load()
    with pytest.raises(StoreError, match="closed"):
        store.lock(1.0)


KILL_WRITER = """
import asyncio, sys
from proxy.tokenset import StoredState

async def _write():
    store = await make_store()
    generation = BASE
    while True:
        generation += 1
        blob = f"{generation}:".encode().hex() * 20000
        await store.save(StoredState(generation=generation, extra={"blob": blob}))
        if generation == BASE + 1:
            print("saving", flush=True)

asyncio.run(_write())
"""


def writer_blob(generation: int) -> str:
    return f"{generation}:".encode().hex() * 20000


async def test_sigkill_during_saves_never_leaves_a_torn_file(paths: Paths) -> None:
    rng = random.Random(1234)
    base = 0
    for _ in range(20):
        script = paths.child_setup() + f"BASE = {base}\n" + KILL_WRITER
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), CHILD_TIMEOUT)
            assert line == b"saving\n"
            await asyncio.sleep(rng.uniform(0.0, 0.05))
            child.send_signal(signal.SIGKILL)
        finally:
            if child.returncode is None:
                child.kill()
            await child.wait()
        store = paths.store()
        state = await store.load()
        await store.close()
        assert state is not None
        assert state.generation > base
        assert state.extra == {"blob": writer_blob(state.generation)}
        base = state.generation


async def run_child(script: str, *, prefix: tuple[str, ...] = ()) -> str:
    child = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await asyncio.wait_for(child.communicate(), CHILD_TIMEOUT)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == 0
    return out.decode()


TRY_SAVE = """
import asyncio
from proxy.errors import StoreError
from proxy.names import DEFAULT_CONNECTION
from proxy.tokenset import StoredState

async def _try():
    store = await make_store()
    for action in ("save", "verify"):
        try:
            if action == "save":
                await store.save(StoredState(generation=99, extra={"pad": "x" * 65536}))
            else:
                await store.verify()
            print(action, "ok")
        except StoreError as exc:
            print(action, "StoreError:", exc.detail)
    await store.close()

asyncio.run(_try())
"""


def without_dac_override() -> tuple[str, ...]:
    """A command prefix under which permission bits bind, even for root.

    Tests run as root here, and root ignores a directory's mode. setpriv (util-linux)
    drops the capabilities that bypass permission checks from the bounding set, so
    the child is still uid 0 but a 0500 directory really refuses it (EACCES).
    """
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to drop root's DAC override"
    return (setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--")


async def test_read_only_directory_is_error_and_old_file_intact(paths: Paths) -> None:
    store = paths.store()
    await store.save(sample_state(1))
    await store.close()
    before = paths.token.read_bytes()
    paths.state_dir.chmod(0o500)
    try:
        out = await run_child(paths.child_setup() + TRY_SAVE, prefix=without_dac_override())
    finally:
        paths.state_dir.chmod(0o700)
    assert f"save StoreError: cannot write {paths.token}: Permission denied" in out
    assert f"verify StoreError: token directory {paths.state_dir} is not writable" in out
    assert paths.token.read_bytes() == before
    assert temp_files(paths.state_dir) == []


async def test_write_failure_midway_is_error_and_old_file_intact(paths: Paths) -> None:
    """Disk full, simulated: a file-size limit makes the temp file's write fail partway.

    RLIMIT_FSIZE binds root too, and fails the write with EFBIG where a full disk
    gives ENOSPC; both reach the store as an OSError during the temp file's write.
    """
    store = paths.store()
    await store.save(sample_state(1))
    await store.close()
    before = paths.token.read_bytes()
    limit = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
    )
    out = await run_child(limit + paths.child_setup() + TRY_SAVE)
    assert f"save StoreError: cannot write {paths.token}: File too large" in out
    assert paths.token.read_bytes() == before
    assert temp_files(paths.state_dir) == []


async def test_key_from_environment(paths: Paths) -> None:
    key = generate_key()
    encoded = base64.urlsafe_b64encode(key).decode().rstrip("=")
    store = paths.store(environ={"PLEO_PROXY_KEY": encoded})
    await store.verify()
    await store.save(sample_state(1))
    assert not paths.key.exists()
    assert open_sealed(paths.token.read_bytes(), [key], name=DEFAULT_CONNECTION)
    assert await store.load() == sample_state(1)
    await store.close()


async def test_bad_environment_key_is_error_without_its_value(paths: Paths) -> None:
    store = paths.store(environ={"PLEO_PROXY_KEY": "c2hvcnQta2V5"})
    with pytest.raises(StoreError, match="PLEO_PROXY_KEY") as caught:
        await store.save(sample_state(1))
    assert "c2hvcnQta2V5" not in caught.value.detail
    assert not paths.token.exists()
    await store.close()


async def test_group_readable_key_file_is_refused(paths: Paths) -> None:
    store = paths.store()
    await store.save(sample_state(1))
    paths.key.chmod(0o640)
    with pytest.raises(StoreError) as caught:
        await store.load()
    assert "(mode 0640); chmod 600 it" in caught.value.detail
    assert str(paths.key) in caught.value.detail
    await store.close()


async def test_verify_creates_directory_and_key(paths: Paths) -> None:
    store = paths.store()
    await store.verify()
    assert mode(paths.state_dir) == 0o700
    assert mode(paths.key) == 0o600
    assert not paths.token.exists()
    assert temp_files(paths.state_dir) == []
    await store.close()


async def test_verify_fails_when_directory_cannot_exist(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    store = FileStore(blocker / "tokens.enc", key_file=blocker / "tokens.key", environ={})
    with pytest.raises(StoreError) as caught:
        await store.verify()
    assert caught.value.detail == f"token directory {blocker} is not writable: Not a directory"
    with pytest.raises(StoreError) as caught:
        await store.save(sample_state(1))
    # Saving needs the key first, and the key file cannot exist there either.
    assert caught.value.detail == f"cannot open key file {blocker / 'tokens.key'}: Not a directory"
    await store.close()
