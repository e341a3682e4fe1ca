"""PKCE verifier/challenge and the flow's nonces."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from proxy.connect import pkce

VERIFIER_RE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")


def test_challenge_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce.challenge_s256(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_verifier_follows_rfc7636_and_is_fresh() -> None:
    verifiers = {pkce.new_verifier() for _ in range(50)}
    assert len(verifiers) == 50
    for verifier in verifiers:
        assert len(verifier) == 64
        assert VERIFIER_RE.fullmatch(verifier)


def test_challenge_is_unpadded_base64url_of_43_chars() -> None:
    challenge = pkce.challenge_s256(pkce.new_verifier())
    assert len(challenge) == 43
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge)


def test_challenge_rejects_non_ascii_verifier() -> None:
    with pytest.raises(UnicodeEncodeError):
        pkce.challenge_s256("é" * 43)


@pytest.mark.parametrize("make", [pkce.new_state, pkce.new_setup_code])
def test_nonces_are_urlsafe_and_unique(make: Callable[[], str]) -> None:
    values = {make() for _ in range(50)}
    assert len(values) == 50
    for value in values:
        assert isinstance(value, str)
        assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", value)


def test_setup_code_has_24_bytes_of_entropy() -> None:
    assert len(pkce.new_setup_code()) == 32  # token_urlsafe(24): 24 bytes → 32 chars
