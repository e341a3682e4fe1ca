"""The sealing envelope and key loading: round trips, names, the old format, tampering, key
ids, key sources."""

from __future__ import annotations

import asyncio
import base64
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.errors import StoreError
from proxy.store.crypto import (
    HEADER_BYTES,
    KID_BYTES,
    LEGACY_MAGIC,
    MAGIC,
    NONCE_BYTES,
    check_envelope,
    format_key,
    generate_key,
    is_legacy,
    key_id,
    key_source,
    load_key,
    open_sealed,
    parse_key,
    seal,
    sealed_key_id,
)
from tests.store.old_format import GOLDEN_KEY, GOLDEN_PLAINTEXT, GOLDEN_V1, seal_v1

PLAINTEXT = b'{"access_token":"AT-123","refresh_token":"RT-456"}'
NAME = "acme"


def test_round_trip() -> None:
    key = generate_key()
    assert open_sealed(seal(PLAINTEXT, key, name=NAME), [key], name=NAME) == PLAINTEXT
    assert open_sealed(seal(b"", key, name=NAME), [key], name=NAME) == b""


@pytest.mark.parametrize("other", ["acme2", "acm", "default", "globex", ""])
def test_an_entry_opens_under_its_own_name_only(other: str) -> None:
    key = generate_key()
    blob = seal(PLAINTEXT, key, name=NAME)
    with pytest.raises(StoreError) as caught:
        open_sealed(blob, [key], name=other, what="token file x")
    detail = caught.value.detail
    assert detail == (
        f"token file x does not open as connection {other}'s entry (authentication failed):"
        " it is corrupt, or it is another connection's entry copied there"
    )
    assert "AT-123" not in detail
    assert key.hex() not in detail


def test_the_current_format_is_version_2_and_the_old_one_is_told_apart() -> None:
    key = generate_key()
    assert MAGIC == b"PLEOPX2\n"
    assert LEGACY_MAGIC == b"PLEOPX1\n"
    assert not is_legacy(seal(PLAINTEXT, key, name=NAME))
    assert is_legacy(seal_v1(PLAINTEXT, key))
    check_envelope(seal_v1(PLAINTEXT, key))
    assert sealed_key_id(seal_v1(PLAINTEXT, key)) == key_id(key)


def test_an_old_format_blob_from_the_released_code_opens_under_any_name() -> None:
    # GOLDEN_V1 was made by the PLEOPX1 seal() as released, not by this test's helper.
    assert open_sealed(GOLDEN_V1, [GOLDEN_KEY], name=NAME) == GOLDEN_PLAINTEXT
    # It binds no name: it opens as any (the residual risk SECURITY.md states, threat 5).
    assert open_sealed(GOLDEN_V1, [GOLDEN_KEY], name="other") == GOLDEN_PLAINTEXT
    # Once its key is retired (rotate-key), it opens under none.
    with pytest.raises(StoreError, match="not the configured key"):
        open_sealed(GOLDEN_V1, [generate_key()], name=NAME)
    # The helper the store tests use writes exactly that format.
    assert open_sealed(seal_v1(b"x", GOLDEN_KEY), [GOLDEN_KEY], name=NAME) == b"x"


def test_an_old_format_blob_with_any_byte_changed_is_refused() -> None:
    key = generate_key()
    blob = seal_v1(b"short secret", key)
    for index in range(len(LEGACY_MAGIC), len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(StoreError):
            open_sealed(bytes(tampered), [key], name=NAME)


def test_sealed_blob_carries_magic_and_key_id_but_no_plaintext() -> None:
    key = generate_key()
    blob = seal(PLAINTEXT, key, name=NAME)
    assert blob.startswith(MAGIC)
    assert blob[len(MAGIC) : len(MAGIC) + KID_BYTES].hex() == key_id(key)
    assert b"AT-123" not in blob
    assert b"RT-456" not in blob


def test_sealed_key_id_reads_the_header_without_a_key() -> None:
    key = generate_key()
    assert sealed_key_id(seal(PLAINTEXT, key, name=NAME)) == key_id(key)
    with pytest.raises(StoreError, match="foreign"):
        sealed_key_id(b"not an envelope", what="token file x")


def test_opens_with_whichever_configured_key_sealed_it() -> None:
    first, second = generate_key(), generate_key()
    assert open_sealed(seal(PLAINTEXT, second, name=NAME), [first, second], name=NAME) == (
        PLAINTEXT
    )
    old = seal_v1(PLAINTEXT, second)
    assert open_sealed(old, [first, second], name=NAME) == PLAINTEXT


def test_tampering_with_any_byte_is_an_error() -> None:
    key = generate_key()
    blob = seal(b"short secret", key, name=NAME)
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(StoreError):
            open_sealed(bytes(tampered), [key], name=NAME)


def test_truncation_is_an_error() -> None:
    key = generate_key()
    blob = seal(PLAINTEXT, key, name=NAME)
    for length in (0, len(MAGIC), HEADER_BYTES, HEADER_BYTES + 15, len(blob) - 1):
        with pytest.raises(StoreError):
            open_sealed(blob[:length], [key], name=NAME)


def test_wrong_key_names_both_key_ids() -> None:
    sealer, configured = generate_key(), generate_key()
    with pytest.raises(StoreError) as caught:
        open_sealed(seal(PLAINTEXT, sealer, name=NAME), [configured], name=NAME)
    detail = caught.value.detail
    assert detail == (
        f"token file was sealed with key id {key_id(sealer)} which is not the configured key"
        f" (key id {key_id(configured)})"
    )


def test_kid_swap_fails_authentication() -> None:
    # Relabel a blob sealed under `first` as sealed under `second`: with both keys
    # configured, `second` is chosen, and GCM (key and AAD both differ) refuses it.
    first, second = generate_key(), generate_key()
    for blob in (
        bytearray(seal(PLAINTEXT, first, name=NAME)),
        bytearray(seal_v1(PLAINTEXT, first)),
    ):
        blob[len(MAGIC) : len(MAGIC) + KID_BYTES] = bytes.fromhex(key_id(second))
        with pytest.raises(StoreError, match="authentication failed"):
            open_sealed(bytes(blob), [first, second], name=NAME)


def test_version_and_foreign_data_are_named() -> None:
    key = generate_key()
    blob = seal(PLAINTEXT, key, name=NAME)
    with pytest.raises(StoreError, match="unsupported format version"):
        open_sealed(b"PLEOPX3\n" + blob[len(MAGIC) :], [key], name=NAME)
    with pytest.raises(StoreError, match="foreign: not sealed by pleo-proxy"):
        open_sealed(b'{"access_token": "x"}', [key], name=NAME)
    with pytest.raises(StoreError, match="token value in Redis is foreign"):
        open_sealed(b"", [key], name=NAME, what="token value in Redis")
    # The old magic relabelled as the new one (or back) is refused: the header is bound.
    with pytest.raises(StoreError, match="authentication failed"):
        open_sealed(MAGIC + seal_v1(PLAINTEXT, key)[len(MAGIC) :], [key], name=NAME)
    with pytest.raises(StoreError, match="authentication failed"):
        open_sealed(LEGACY_MAGIC + blob[len(MAGIC) :], [key], name=NAME)


def test_nonces_and_ciphertexts_are_unique() -> None:
    key = generate_key()
    blobs = [seal(PLAINTEXT, key, name=NAME) for _ in range(2000)]
    nonces = {b[len(MAGIC) + KID_BYTES : HEADER_BYTES] for b in blobs}
    assert len(nonces) == len(blobs)
    assert all(len(n) == NONCE_BYTES for n in nonces)
    assert len(set(blobs)) == len(blobs)


def test_key_id_is_stable_and_distinct() -> None:
    key = generate_key()
    assert key_id(key) == key_id(bytes(key))
    assert len(key_id(key)) == 16
    assert key_id(key) != key_id(generate_key())


def test_wrong_size_key_is_refused() -> None:
    with pytest.raises(StoreError, match="32 bytes"):
        seal(PLAINTEXT, b"k" * 16, name=NAME)


@pytest.mark.parametrize(
    "encode",
    [
        lambda k: base64.b64encode(k).decode(),
        lambda k: base64.urlsafe_b64encode(k).decode().rstrip("="),
        lambda k: "  " + base64.b64encode(k).decode() + "\n",
    ],
    ids=["standard", "urlsafe-unpadded", "whitespace"],
)
def test_parse_key_accepts_base64_forms(encode: Callable[[bytes], str]) -> None:
    key = generate_key()
    assert parse_key(encode(key), source="PLEO_PROXY_KEY") == key


@pytest.mark.parametrize(
    ("text", "problem"),
    [("not base64!!", "not valid base64"), (base64.b64encode(b"x" * 31).decode(), "not 31")],
)
def test_parse_key_refuses_bad_keys_without_echoing_them(text: str, problem: str) -> None:
    with pytest.raises(StoreError, match=problem) as caught:
        parse_key(text, source="PLEO_PROXY_KEY")
    assert text not in caught.value.detail
    assert "PLEO_PROXY_KEY" in caught.value.detail


def test_load_key_creates_a_private_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "new-dir" / "tokens.key"
    key = load_key(key_file, environ={}, create=True)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    # One base64 line, so it can be pasted into PLEO_PROXY_KEY as it is.
    assert key_file.read_bytes() == format_key(key)
    assert parse_key(key_file.read_text(), source="x") == key
    assert load_key(key_file, environ={}, create=True) == key
    assert list(key_file.parent.iterdir()) == [key_file]


def test_load_key_without_create_refuses_a_missing_file(tmp_path: Path) -> None:
    key_file = tmp_path / "tokens.key"
    with pytest.raises(StoreError, match="does not exist"):
        load_key(key_file, environ={}, create=False)
    assert not key_file.exists()


def test_load_key_refuses_a_group_readable_file(tmp_path: Path) -> None:
    key_file = tmp_path / "tokens.key"
    load_key(key_file, environ={}, create=True)
    key_file.chmod(0o644)
    with pytest.raises(StoreError) as caught:
        load_key(key_file, environ={}, create=True)
    assert caught.value.detail == (
        f"key file {key_file} must not be readable by others (mode 0644); chmod 600 it"
    )


def test_load_key_refuses_a_malformed_file(tmp_path: Path) -> None:
    key_file = tmp_path / "tokens.key"
    key_file.write_text("hunter2\n")
    key_file.chmod(0o600)
    with pytest.raises(StoreError, match=f"key file {key_file}") as caught:
        load_key(key_file, environ={}, create=True)
    assert "hunter2" not in caught.value.detail


def test_load_key_precedence(tmp_path: Path) -> None:
    env_key, credential_key = generate_key(), generate_key()
    key_file = tmp_path / "tokens.key"
    file_key = load_key(key_file, environ={}, create=True)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "tokens.key").write_bytes(format_key(credential_key))
    both = {
        "PLEO_PROXY_KEY": base64.b64encode(env_key).decode(),
        "CREDENTIALS_DIRECTORY": str(credentials),
    }
    assert load_key(key_file, environ=both, create=True) == env_key
    assert key_source(both) == "PLEO_PROXY_KEY"
    only_credential = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert load_key(key_file, environ=only_credential, create=True) == credential_key
    assert key_source(only_credential) == f"systemd credential {credentials / 'tokens.key'}"
    # A credentials directory without our credential falls through to the key file.
    empty = tmp_path / "empty-credentials"
    empty.mkdir()
    assert load_key(key_file, environ={"CREDENTIALS_DIRECTORY": str(empty)}, create=True) == (
        file_key
    )
    assert key_source({"CREDENTIALS_DIRECTORY": str(empty)}) is None


async def test_concurrent_creation_agrees_on_one_key(tmp_path: Path) -> None:
    key_file = tmp_path / "tokens.key"
    keys = await asyncio.gather(
        *(asyncio.to_thread(load_key, key_file, environ={}, create=True) for _ in range(16))
    )
    assert len(set(keys)) == 1
    assert load_key(key_file, environ={}, create=False) == keys[0]
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.key"]
