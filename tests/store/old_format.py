"""The old envelope (PLEOPX1, as released before entries were bound to their names), for
tests of the upgrade: a blob the released code sealed, and a helper that seals the same way.

PLEOPX1: b"PLEOPX1\\n" | kid (first 8 bytes of the key's SHA-256) | nonce (12) | AES-256-GCM
ciphertext+tag, with associated data b"PLEOPX1\\n" + kid + b"pleo-proxy token state".
"""

from __future__ import annotations

import base64
import hashlib
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# Made by `proxy.store.crypto.seal(GOLDEN_PLAINTEXT, GOLDEN_KEY)` at commit 0853d9d.
GOLDEN_KEY = bytes(range(32))
GOLDEN_PLAINTEXT = b'{"access_token":"AT-golden","refresh_token":"RT-golden"}'
GOLDEN_V1 = base64.b64decode(
    "UExFT1BYMQpjDc0pZsQzZnU7NqcoE92PnJXyJleHW5JQLKZCuMMyqo4toU4JdJgC7rwN/hSadvCPtS997npX"
    "/Ul0Gx3xJeL1X0tc32cYapSCsgTRPv+tFVGvPg2YbyuG9xYiiw=="
)


def seal_v1(plaintext: bytes, key: bytes) -> bytes:
    """`plaintext` sealed under `key` in the old format, as an older pleo-proxy wrote it."""
    magic = b"PLEOPX1\n"
    kid = hashlib.sha256(key).digest()[:8]
    nonce = secrets.token_bytes(12)
    aad = magic + kid + b"pleo-proxy token state"
    return magic + kid + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)
