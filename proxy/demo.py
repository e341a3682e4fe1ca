"""`pleo-proxy demo`: the bundled sandbox and a proxy in front of it, in one process.

State lives in a fresh temporary directory. With `auto_approve`, the demo walks the
real authorise → consent → callback path over HTTP itself, as a browser would.
"""

from __future__ import annotations

import asyncio
import html
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import aiohttp

from proxy.config import Config, Listen, Pleo, TokensConfig
from proxy.connect.authorise import read_authorize_url
from proxy.http.serve import serve
from proxy.sandbox import SandboxSettings, start_sandbox
from proxy.secret import Secret

DEMO_SCOPES = ("users:read", "export-jobs:read", "test:test")

_FORM = re.compile(r"<form\b[^>]*>.*?</form>", re.S | re.I)
_ACTION = re.compile(r"""action=["']([^"']*)["']""", re.I)
_INPUT = re.compile(r"<(?:input|button)\b[^>]*>", re.I)
_ATTR = re.compile(r"""(\w+)=["']([^"']*)["']""")


def demo_config(*, port: int, sandbox_url: str, state_dir: Path) -> Config:
    redirect_uri = f"http://localhost:{port}/_proxy/callback"
    return Config(
        listen=Listen(host="127.0.0.1", port=port),
        pleo=Pleo(
            environment="sandbox",
            api_url=sandbox_url,
            authorize_url=f"{sandbox_url}/oauth/authorize",
            token_url=f"{sandbox_url}/oauth/token",
            client_id="sandbox-client",
            client_secret=Secret("sandbox-secret"),
            scopes=DEMO_SCOPES,
            redirect_uri=redirect_uri,
        ),
        tokens=TokensConfig(path=state_dir / "tokens.enc", key_file=state_dir / "tokens.key"),
    )


async def run_demo(*, port: int, sandbox_port: int = 0, auto_approve: bool = False) -> None:
    """Serve until interrupted."""
    state_dir = Path(tempfile.mkdtemp(prefix="pleo-proxy-demo-"))
    redirect_uri = f"http://localhost:{port}/_proxy/callback"
    sandbox = await start_sandbox(SandboxSettings(redirect_uris=(redirect_uri,)), port=sandbox_port)
    config = demo_config(port=port, sandbox_url=sandbox.url, state_dir=state_dir)

    def on_listening(addresses: list[tuple[str, int]]) -> None:
        url = read_authorize_url(config)
        print(f"sandbox Pleo:   {sandbox.url}")
        print(f"proxy:          http://127.0.0.1:{port}  (state in {state_dir})")
        print(f"authorise here: {url}")
        print(f"then try:       curl -s http://127.0.0.1:{port}/v1/introspect")
        sys.stdout.flush()
        if auto_approve and url:
            asyncio.get_running_loop().create_task(_approve(url))

    try:
        await serve(config, on_listening=on_listening)
    finally:
        await sandbox.close()


async def _approve(setup_url: str) -> None:
    try:
        walk = await walk_authorisation(setup_url, approve=True)
        if walk.status != 200:
            raise ValueError(f"the callback answered {walk.status}")
        print("auto-approve: connected to the sandbox company")
    except (aiohttp.ClientError, ValueError) as exc:
        print(f"auto-approve failed: {exc}", file=sys.stderr)
    sys.stdout.flush()


@dataclass(frozen=True)
class Walk:
    callback_url: str  # where Pleo sent the browser back (holds the code: never log it)
    status: int
    page: str


async def walk_authorisation(setup_url: str, *, approve: bool = True) -> Walk:
    """Click through the authorise page and the sandbox's consent page like a browser."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        async with session.get(setup_url) as resp:
            page = await resp.text()
            resp.raise_for_status()
        url = await _submit_first_form(session, setup_url, page, {})
        async with session.get(url, allow_redirects=False) as resp:
            consent = await resp.text()
            resp.raise_for_status()
        decision = {"decision": "approve" if approve else "deny"}
        callback = await _submit_first_form(session, url, consent, decision)
        async with session.get(callback) as resp:
            return Walk(callback_url=callback, status=resp.status, page=await resp.text())


async def _submit_first_form(
    session: aiohttp.ClientSession, page_url: str, page: str, overrides: dict[str, str]
) -> str:
    """POST the page's first form; return the redirect's Location (absolute)."""
    form = _FORM.search(page)
    if form is None:
        raise ValueError(f"no form on {page_url}")
    action = _ACTION.search(form.group(0))
    target = urljoin(page_url, html.unescape(action.group(1)) if action else page_url)
    fields: dict[str, str] = {}
    for tag in _INPUT.findall(form.group(0)):
        attrs = {k.lower(): html.unescape(v) for k, v in _ATTR.findall(tag)}
        if attrs.get("type", "").lower() == "hidden" and "name" in attrs:
            fields[attrs["name"]] = attrs.get("value", "")
    fields.update(overrides)
    async with session.post(target, data=fields, allow_redirects=False) as resp:
        location = resp.headers.get("Location")
        if resp.status not in (302, 303) or location is None:
            raise ValueError(f"{target} answered {resp.status}, not a redirect")
        return urljoin(target, location)
