"""The container image's HEALTHCHECK: GET /_proxy/healthz where the config says we listen.

usage: healthcheck.py [CONFIG [/_proxy/PATH]]   (e.g. /_proxy/readyz for a readiness probe)

Exit 0 on a 200, else 1 with one line on stderr. Standard library and the installed
`proxy` package only (no curl, no shell); reads the config, never writes anything. With
`listen.client_keys` set it presents one of them (readyz is not exempt from keys), and
never prints it.
"""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from proxy.config import ClientKey, Listen, load_config
from proxy.errors import ProxyError
from proxy.secret import Secret

DEFAULT_CONFIG = Path("/etc/pleo-proxy/config.yaml")
DEFAULT_PATH = "/_proxy/healthz"
RESERVED = "/_proxy/"  # never a path that would be forwarded to Pleo
TIMEOUT = 4.0  # below the image's HEALTHCHECK --timeout, so we report instead of being killed
# A wildcard listener is reached on loopback, which the Host guard always accepts.
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - matched, not bound
# The header proxy/http/client_keys.py reads a key from (not imported: that pulls in aiohttp).
KEY_HEADER = "X-Proxy-Key"


def probe_target(config_path: Path, path: str) -> tuple[str, Secret | None]:
    """The URL to probe and the client key to present (None when keys are off)."""
    listen = load_config(config_path).listen
    return probe_url(listen, path), probe_key(listen.client_keys)


def probe_key(keys: tuple[ClientKey, ...]) -> Secret | None:
    """The first key allowed every connection, else the first key: a key limited to some
    connections is refused on the process-wide readyz unless it may use `default`."""
    unlimited = [k for k in keys if k.connections is None]
    chosen = (unlimited or list(keys))[:1]
    return chosen[0].key if chosen else None


def probe_url(listen: Listen, path: str) -> str:
    host = WILDCARDS.get(listen.host, listen.host)
    if ":" in host:
        host = f"[{host}]"
    # Once listen.tls_cert exists the listener speaks TLS; tolerate configs before and after.
    scheme = "https" if getattr(listen, "tls_cert", None) else "http"
    return f"{scheme}://{host}:{listen.port}{path}"


def check(url: str, key: Secret | None = None) -> int:
    """The status the proxy answers `url` with (presenting `key`, if any); raises OSError
    when nothing answers."""
    # No ProxyHandler settings from the environment: HTTPS_PROXY/HTTP_PROXY are there for
    # the upstream, and this request must reach our own listener, not a corporate proxy.
    # Our own certificate may name a public host, so it is not verified against 127.0.0.1.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    headers = {KEY_HEADER: key.reveal()} if key is not None else {}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - http(s), probe_url's
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def main(argv: list[str]) -> int:
    config_path = Path(argv[1]) if len(argv) > 1 else DEFAULT_CONFIG
    path = argv[2] if len(argv) > 2 else DEFAULT_PATH
    if not path.startswith(RESERVED):
        print(
            f"unhealthy: {path!r} is not one of the proxy's own {RESERVED} paths", file=sys.stderr
        )
        return 1
    try:
        url, key = probe_target(config_path, path)
        status = check(url, key)
    except ProxyError as exc:  # a config problem; never holds a secret value
        print(f"unhealthy: {config_path}: {exc.detail}", file=sys.stderr)
        return 1
    except OSError as exc:  # refused, timed out, TLS failure (URLError is an OSError)
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
