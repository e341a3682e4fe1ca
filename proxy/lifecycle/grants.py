"""A new grant from an authorisation code: the exchange at Pleo, and whose company it is.

The OAuth half of connecting a customer, so the pages never speak OAuth themselves.
One attempt each (the customer starts again on failure); the subject lookup is best
effort and never fails the grant. Must not store tokens or render anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp

from proxy.config import Config
from proxy.connect import pkce
from proxy.errors import ProxyError
from proxy.lifecycle import oauth
from proxy.secret import Secret
from proxy.tokenset import TokenSet

log = logging.getLogger("proxy.authorise")


@dataclass(frozen=True)
class NewGrant:
    tokens: TokenSet
    subject: str | None
    company_name: str | None


def authorize_redirect(config: Config, *, state: str, verifier: str) -> str:
    """Where the browser goes to consent: Pleo's authorise URL with the PKCE challenge."""
    challenge = pkce.challenge_s256(verifier)
    return oauth.build_authorize_url(config.pleo, state=state, code_challenge=challenge)


async def grant_from_code(
    session: aiohttp.ClientSession,
    config: Config,
    *,
    code: Secret,
    verifier: Secret,
    now: float,
) -> NewGrant:
    """Exchange `code` (raises the OAuthError kinds of `oauth.exchange_code`), then look up
    the subject and company name (None, None when Pleo does not say)."""
    tokens = await oauth.exchange_code(
        session,
        config.pleo,
        code=code,
        code_verifier=verifier.reveal(),
        timeout=config.timeouts.token_request,
        now=now,
    )
    subject, company = await _identify(session, config, tokens)
    return NewGrant(tokens, subject, company)


async def _identify(
    session: aiohttp.ClientSession, config: Config, tokens: TokenSet
) -> tuple[str | None, str | None]:
    bearer = Secret(f"{tokens.token_type} {tokens.access_token.reveal()}")
    try:
        subject = await oauth.introspect(
            session, config.pleo, authorization=bearer, timeout=config.timeouts.token_request
        )
    except ProxyError as exc:
        log.warning("could not look up the connected company: %s", exc.code)
        return None, None
    return subject.subject_urn, subject.company_name
