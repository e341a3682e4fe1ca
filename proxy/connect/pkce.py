"""PKCE (RFC 7636, S256 only) and the random nonces of the authorise flow.

Pure functions over `secrets` and `hashlib`: no I/O, no state, imports nothing from `proxy`.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import string

# RFC 7636 §4.1: the verifier's alphabet is the unreserved URI characters.
VERIFIER_ALPHABET = string.ascii_letters + string.digits + "-._~"
VERIFIER_LENGTH = 64  # within RFC 7636's 43..128; 64 chars of 66 symbols ≈ 386 bits


def new_verifier() -> str:
    """A fresh code verifier: 64 random characters of RFC 7636's alphabet."""
    return "".join(secrets.choice(VERIFIER_ALPHABET) for _ in range(VERIFIER_LENGTH))


def challenge_s256(verifier: str) -> str:
    """The S256 code challenge: base64url(sha256(ASCII(verifier))) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_state() -> str:
    """An unguessable `state` value for one authorisation request (anti-CSRF)."""
    return secrets.token_urlsafe(32)


def new_setup_code() -> str:
    """The one-time code in the local authorise page's URL."""
    return secrets.token_urlsafe(24)
