"""Test support: obtain real tokens from the sandbox, and configs pointing at it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp

from proxy import oauth, pkce
from proxy.config import Config, Listen, Pleo, Refresh, Timeouts, TokensConfig
from proxy.secret import Secret
from proxy.tokenset import TokenSet

SCOPES = ("users:read", "test:test")


def sandbox_config(
    sandbox_url: str,
    state_dir: Path,
    *,
    port: int = 0,
    redirect_uri: str = "http://localhost:8080/_proxy/callback",
    before_expiry: float = 120.0,
    client_secret: str = "sandbox-secret",
) -> Config:
    """A proxy configuration for the sandbox at `sandbox_url`, state in `state_dir`."""
    return Config(
        listen=Listen(host="127.0.0.1", port=port),
        pleo=Pleo(
            environment="sandbox",
            api_url=sandbox_url,
            authorize_url=f"{sandbox_url}/oauth/authorize",
            token_url=f"{sandbox_url}/oauth/token",
            client_id="sandbox-client",
            client_secret=Secret(client_secret),
            scopes=SCOPES,
            redirect_uri=redirect_uri,
        ),
        tokens=TokensConfig(path=state_dir / "tokens.enc", key_file=state_dir / "tokens.key"),
        refresh=Refresh(before_expiry=before_expiry),
        timeouts=Timeouts(token_request=5.0, connect=2.0, read=30.0, shutdown=5.0),
    )


def with_redirect(config: Config, redirect_uri: str) -> Config:
    return replace(config, pleo=replace(config.pleo, redirect_uri=redirect_uri))


async def grant_tokens(config: Config, *, now: float) -> TokenSet:
    """Run the code flow against the sandbox with auto-approve on; return the tokens."""
    verifier = pkce.new_verifier()
    url = oauth.build_authorize_url(
        config.pleo, state="teststate", code_challenge=pkce.challenge_s256(verifier)
    )
    async with aiohttp.ClientSession() as session:
        await session.post(
            f"{config.pleo.api_url}/_sandbox/knobs",
            json={"auto_approve": True, "redirect_uris": [config.pleo.redirect_uri]},
        )
        async with session.get(url, allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            location = resp.headers["Location"]
        code = parse_qs(urlsplit(location).query)["code"][0]
        return await oauth.exchange_code(
            session, config.pleo, code=Secret(code), code_verifier=verifier, timeout=5, now=now
        )
