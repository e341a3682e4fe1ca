"""Sealing token state at rest (AES-256-GCM in a versioned envelope) and loading the key.

Owns the envelope formats, key ids, and where the key comes from (environment, systemd
credential, key file created 0600). Must not log, or do I/O other than reading or creating
the key file; no message ever contains a key or plaintext.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from proxy.errors import StoreError

KEY_BYTES = 32
NONCE_BYTES = 12  # 96 bits: the GCM nonce size that needs no extra hashing
KID_BYTES = 8
# Envelope: MAGIC | kid (8 raw bytes) | nonce (12) | ciphertext+tag. The magic names the
# format and its version; a new format gets a new magic, never a reinterpreted one.
# PLEOPX2 binds the entry's name (the connection's) in the associated data; PLEOPX1 did
# not, so one connection's entry copied over another's opened there as if it were its.
# Every write is PLEOPX2; PLEOPX1 still opens (under any name) until its next write, or
# until a key rotation retires the key it was sealed under (SECURITY.md, threat 5).
MAGIC = b"PLEOPX2\n"
LEGACY_MAGIC = b"PLEOPX1\n"
MAGIC_FAMILY = b"PLEOPX"
HEADER_BYTES = len(MAGIC) + KID_BYTES + NONCE_BYTES
TAG_BYTES = 16
# Binds the ciphertext to what it is for, so a blob sealed for another purpose with the
# same key (should one ever exist) does not open as token state.
PURPOSE = b"pleo-proxy token state"

ENV_KEY = "PLEO_PROXY_KEY"
CREDENTIAL_NAME = "tokens.key"


def generate_key() -> bytes:
    """32 fresh random bytes: a new AES-256 key."""
    return secrets.token_bytes(KEY_BYTES)


def key_id(key: bytes) -> str:
    """A non-secret name for `key`: the first 8 bytes of its SHA-256, in hex."""
    return hashlib.sha256(key).digest()[:KID_BYTES].hex()


def _aad(magic: bytes, kid: bytes, name: str) -> bytes:
    # The header is authenticated: swapping the kid or the version makes GCM fail.
    if magic == LEGACY_MAGIC:
        return LEGACY_MAGIC + kid + PURPOSE
    # Length-prefixed, so that no name is a prefix of another's associated data.
    encoded = name.encode()
    return magic + kid + PURPOSE + len(encoded).to_bytes(2, "big") + encoded


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise StoreError(f"the token key must be {KEY_BYTES} bytes, not {len(key)}")


def seal(plaintext: bytes, key: bytes, *, name: str) -> bytes:
    """Encrypt and authenticate `plaintext` under `key` as the entry named `name` (a
    connection's name), with a fresh random nonce: it opens under that name only."""
    # Imported here, not above: cryptography is ~5 MiB of RSS that API-key mode and most
    # CLI commands never use (tests/test_imports.py keeps it that way).
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    _check_key(key)
    kid = bytes.fromhex(key_id(key))
    nonce = secrets.token_bytes(NONCE_BYTES)
    return MAGIC + kid + nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(MAGIC, kid, name))


def open_sealed(
    blob: bytes,
    keys: Sequence[bytes],
    *,
    name: str,
    what: str = "token file",
) -> bytes:
    """The plaintext of `blob` sealed as the entry `name`, opened with whichever of `keys`
    sealed it; else StoreError.

    `what` names the thing in messages ("token file", "token value in Redis"). A PLEOPX1
    blob binds no name: it opens under whatever `name` it is found (as every released
    version read it), so that no grant is lost in an upgrade, rolling or not.
    """
    # Imported here for the reason given in seal().
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    check_envelope(blob, what=what)
    magic = blob[: len(MAGIC)]
    kid = blob[len(MAGIC) : len(MAGIC) + KID_BYTES]
    nonce = blob[len(MAGIC) + KID_BYTES : HEADER_BYTES]
    key = _key_for(kid, keys)
    if key is None:
        configured = ", ".join(key_id(k) for k in keys) or "none"
        raise StoreError(
            f"{what} was sealed with key id {kid.hex()} which is not the configured key"
            f" (key id {configured})"
        )
    try:
        return AESGCM(key).decrypt(nonce, blob[HEADER_BYTES:], _aad(magic, kid, name))
    except InvalidTag:
        # GCM cannot tell a flipped bit from another name: both are named, neither guessed.
        raise StoreError(
            f"{what} does not open as connection {name}'s entry (authentication failed):"
            " it is corrupt, or it is another connection's entry copied there"
        ) from None


def is_legacy(blob: bytes) -> bool:
    """Whether `blob` is in the old envelope (PLEOPX1), which binds no connection name."""
    return blob.startswith(LEGACY_MAGIC)


def sealed_key_id(blob: bytes, *, what: str = "token file") -> str:
    """The id of the key `blob` was sealed under, read from its header (no key needed)."""
    check_envelope(blob, what=what)
    return blob[len(MAGIC) : len(MAGIC) + KID_BYTES].hex()


def check_envelope(blob: bytes, *, what: str = "token file") -> None:
    """StoreError unless `blob` looks like one of our envelopes (no key needed)."""
    if not blob.startswith(MAGIC_FAMILY):
        raise StoreError(f"{what} is foreign: not sealed by pleo-proxy")
    if not blob.startswith((MAGIC, LEGACY_MAGIC)):
        raise StoreError(f"{what} has an unsupported format version (newer pleo-proxy?)")
    if len(blob) < HEADER_BYTES + TAG_BYTES:
        raise StoreError(f"{what} is corrupt (truncated)")


def _key_for(kid: bytes, keys: Sequence[bytes]) -> bytes | None:
    for key in keys:
        _check_key(key)
        if key_id(key) == kid.hex():
            return key
    return None


def parse_key(text: str | bytes, *, source: str) -> bytes:
    """A key from its base64 (standard or URL-safe, padding optional) text form."""
    raw = text.strip() if isinstance(text, str) else text.strip().decode("ascii", "replace")
    try:
        padded = raw.replace("-", "+").replace("_", "/") + "=" * (-len(raw) % 4)
        key = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise StoreError(f"{source} is not valid base64 (expected base64 of 32 bytes)") from None
    if len(key) != KEY_BYTES:
        raise StoreError(f"{source} must be base64 of {KEY_BYTES} bytes, not {len(key)} bytes")
    return key


def format_key(key: bytes) -> bytes:
    """The key file form of `key`: one base64 line, as PLEO_PROXY_KEY accepts it."""
    return base64.b64encode(key) + b"\n"


def key_source(environ: Mapping[str, str]) -> str | None:
    """Where an externally managed key comes from ("PLEO_PROXY_KEY", a credential), or None."""
    if environ.get(ENV_KEY):
        return ENV_KEY
    credential = _credential_path(environ)
    if credential is not None and credential.exists():
        return f"systemd credential {credential}"
    return None


def _credential_path(environ: Mapping[str, str]) -> Path | None:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    return Path(directory) / CREDENTIAL_NAME if directory else None


def load_key(key_file: Path, *, environ: Mapping[str, str], create: bool) -> bytes:
    """The token key: PLEO_PROXY_KEY → $CREDENTIALS_DIRECTORY/tokens.key → `key_file`.

    The key file is created (32 random bytes, 0600) when missing and `create` is true.
    """
    if environ.get(ENV_KEY):
        return parse_key(environ[ENV_KEY], source=ENV_KEY)
    credential = _credential_path(environ)
    if credential is not None and credential.exists():
        # systemd owns the credential's mode (0400, private mount): no mode check here.
        return parse_key(_read(credential), source=f"systemd credential {credential}")
    try:
        return read_key_file(key_file)
    except FileNotFoundError:
        if not create:
            raise StoreError(f"key file {key_file} does not exist") from None
    return _create_key_file(key_file)


def read_key_file(key_file: Path) -> bytes:
    """Read a key file, refusing one that others may read. FileNotFoundError if absent."""
    try:
        fd = os.open(key_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot open key file {key_file}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise StoreError(f"key file {key_file} is not a regular file")
        if mode & 0o077:
            raise StoreError(
                f"key file {key_file} must not be readable by others"
                f" (mode {stat.S_IMODE(mode):04o}); chmod 600 it"
            )
        return parse_key(handle.read(), source=f"key file {key_file}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None


def _create_key_file(key_file: Path) -> bytes:
    """Create the key file with a new key; if another process won the race, use theirs."""
    key = generate_key()
    try:
        key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Write a private temp file completely, then hard-link it into place: link fails
        # if the name exists, so a concurrent reader never sees a half-written key file.
        temp = key_file.with_name(f".{key_file.name}.{secrets.token_hex(6)}.tmp")
        write_private(temp, format_key(key))
        try:
            os.link(temp, key_file)
        except FileExistsError:
            return read_key_file(key_file)
        finally:
            temp.unlink(missing_ok=True)
        fsync_dir(key_file.parent)
    except OSError as exc:
        raise StoreError(f"cannot create key file {key_file}: {exc.strerror}") from None
    return key


def write_private(path: Path, data: bytes) -> None:
    """Create `path` (must not exist: O_EXCL) with mode 0600, write `data`, fsync it.

    Removes the file again if anything fails. Raises OSError.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode is filtered by the umask: be exact
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def fsync_dir(directory: Path) -> None:
    """Make a rename or link in `directory` durable. Raises OSError."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
