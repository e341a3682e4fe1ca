"""The guard: which requests may reach the token at all, and the refusal answering the rest.

Owns the Host allow-list (DNS-rebinding defence), the cross-site rule (`Origin`,
`Sec-Fetch-Site`), origin-form targets only and no CONNECT (never an open proxy), and
client keys (matched by proxy.http.client_keys). `admit()` is pure; `refuse()` only
gathers a `RequestView` and answers refusals (proxy.http.front calls it first). Must
not know about tokens, the upstream, or config parsing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from yarl import URL

from proxy.config import Config
from proxy.http.client_keys import (
    KEY_HEADER,
    PROXY_AUTHORIZATION,
    SCOPE_KEY,
    KeyProblem,
    KeyRing,
    Scope,
    admit as admit_key,
)
from proxy.http.keys import REFUSALS_KEY as REFUSALS_KEY
from proxy.secret import Secret
from proxy.urls import origin_of

RESERVED_PREFIX = "/_proxy/"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CROSS_SITE_FETCH = frozenset({"cross-site", "same-site"})


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: HTTP status, stable error code, human detail."""

    status: int
    code: str
    detail: str
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}


# Built per request: slots, not frozen (a frozen dataclass's __init__ is ~5x slower).
@dataclass(slots=True)
class RequestView:
    """The parts of a request the guard looks at, as they arrived on the wire."""

    method: str
    target: str  # the raw request target (origin-form starts with "/")
    path: str  # the decoded path, as the router matches it
    hosts: tuple[str, ...]  # every Host header value (normally exactly one)
    origin: str | None = None
    sec_fetch_site: str | None = None
    local_port: int | None = None  # the port the connection really arrived on
    scheme: str = "http"  # "https" on a TLS listener
    proxy_authorization: tuple[Secret, ...] = ()  # every Proxy-Authorization value
    proxy_keys: tuple[Secret, ...] = ()  # every X-Proxy-Key value


@dataclass(frozen=True)
class Policy:
    """What the guard allows; built once from the config (`Policy.from_config(cfg)`)."""

    host_names: frozenset[str]  # lower-case names, allowed with or without an allowed port
    host_ports: frozenset[str]  # lower-case exact `name:port` entries from allowed_hosts
    ports: frozenset[int]
    origins: frozenset[str]  # normalised extra origins (allowed_origins + redirect URI's)
    keys: KeyRing = field(default_factory=KeyRing)  # listen.client_keys; empty: keys off

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        names = {n.lower() for n in LOOPBACK_NAMES}
        names.add(_bracketed(config.listen.host).lower())
        exact: set[str] = set()
        for entry in config.listen.allowed_hosts:
            name, port = _split_host(entry.lower())
            if name is None:
                continue
            if port is None:
                names.add(name)
            else:
                exact.add(f"{name}:{port}")
        origins = {_normalise_origin(o) for o in config.listen.allowed_origins}
        origins.add(origin_of(config.pleo.redirect_uri).lower())
        public = config.pages.public_url
        if public is not None:
            # The pages listener behind a public front: browsers name it, and post from it.
            origins.add(origin_of(public).lower())
            names.add(_bracketed(URL(public).host or "").lower())
        return cls(
            frozenset(names),
            frozenset(exact),
            frozenset({config.listen.port}),
            frozenset(origins),
            keys=KeyRing.of(config.listen.client_keys),
        )


# RFC 9110 §15.5.2: a 401 names the scheme it wants.
_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="pleo-auth-proxy"'),)
KEY_REFUSALS = {
    KeyProblem.REQUIRED: Refusal(
        401,
        KeyProblem.REQUIRED.value,
        f"a client key is required: send {PROXY_AUTHORIZATION}: Bearer <key>"
        f" or {KEY_HEADER}: <key>",
        _CHALLENGE,
    ),
    KeyProblem.INVALID: Refusal(
        401,
        KeyProblem.INVALID.value,
        f"the client key is not valid (send one key, as {PROXY_AUTHORIZATION}: Bearer <key>"
        f" or {KEY_HEADER}: <key>)",
        _CHALLENGE,
    ),
}


def admit(view: RequestView, policy: Policy, *, keys: bool = True) -> Refusal | Scope | None:
    """The refusal for this request; else the client key's scope (None: no key needed).

    `keys=False` skips client keys (the pages listener: browsers cannot send one).
    """
    refusal = check_request(view, policy)
    if refusal is not None or not keys:
        return refusal
    verdict = admit_key(policy.keys, view.path, view.proxy_authorization, view.proxy_keys)
    return KEY_REFUSALS[verdict] if isinstance(verdict, KeyProblem) else verdict


def check(view: RequestView, policy: Policy) -> Refusal | None:
    """The refusal for this request, client keys included, or None when it may pass."""
    verdict = admit(view, policy)
    return verdict if isinstance(verdict, Refusal) else None


def check_request(view: RequestView, policy: Policy) -> Refusal | None:
    """The refusal for the request's shape, Host and site, or None (no client keys)."""
    # Target shape first: an absolute-form request carries the *target's* Host, so
    # "not an open proxy" is the true answer, not "wrong host".
    if view.method == "CONNECT":
        return Refusal(405, "method_not_allowed", "CONNECT is not supported: this is not a proxy")
    if not view.target.startswith("/"):
        return Refusal(
            400,
            "absolute_form_not_allowed",
            "only origin-form request targets (/path) are accepted",
        )
    if not _host_allowed(view, policy):
        return Refusal(421, "host_not_allowed", "the Host header does not name this proxy")
    if _is_cross_site_guarded(view) and _is_cross_site(view, policy):
        return Refusal(403, "cross_site_request", "cross-site browser requests are refused")
    return None


def _host_allowed(view: RequestView, policy: Policy) -> bool:
    if len(view.hosts) != 1:
        return False  # missing or repeated Host: ambiguous, refuse (RFC 9112 §3.2)
    host = view.hosts[0].strip().lower()
    if host in policy.host_ports:
        return True
    name, port = _split_host(host)
    if name is None or name not in policy.host_names:
        return False
    ports = policy.ports | ({view.local_port} if view.local_port is not None else set())
    return port is None or port in ports


def _is_cross_site_guarded(view: RequestView) -> bool:
    """Forwarded requests and state-changing reserved actions; never the OAuth callback GET."""
    if not view.path.startswith(RESERVED_PREFIX):
        return True
    # The callback is a cross-site top-level navigation from Pleo by design; state,
    # the Lax cookie and PKCE protect it. Reserved GET pages change nothing.
    return view.method not in SAFE_METHODS


def _is_cross_site(view: RequestView, policy: Policy) -> bool:
    fetch_site = (view.sec_fetch_site or "").strip().lower()
    if fetch_site in CROSS_SITE_FETCH:
        return True
    if view.origin is None:
        return False  # not a browser CORS/form request (curl, apps)
    origin = _normalise_origin(view.origin)
    if origin == "null":
        return True  # sandboxed iframes, file:// pages, redirects: never trusted
    own = {f"{view.scheme}://{h.strip().lower()}" for h in view.hosts}
    return origin not in own and origin not in policy.origins


def _split_host(host: str) -> tuple[str | None, int | None]:
    """`name[:port]` or `[v6][:port]` → (name, port); (None, None) when malformed."""
    if host.startswith("["):
        name, sep, rest = host.partition("]")
        if not sep:
            return None, None
        name += "]"
        if not rest:
            return name, None
        if not rest.startswith(":"):
            return None, None
        return name, _port(rest[1:])
    if host.count(":") > 1:
        return None, None  # a bare IPv6 literal is not a valid Host
    name, sep, port = host.partition(":")
    if not name:
        return None, None
    return name, (_port(port) if sep else None)


def _port(text: str) -> int | None:
    return int(text) if text.isdigit() and len(text) <= 5 else -1


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _normalise_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def view_of(request: web.Request) -> RequestView:
    """Gather the guard's inputs from an aiohttp request (raw values, no fallbacks)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    local_port = sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None
    return RequestView(
        method=request.method.upper(),
        target=request.raw_path,
        path=request.path,
        # request.host falls back to the socket address; the guard wants what was sent.
        hosts=tuple(request.headers.getall("Host", ())),
        origin=request.headers.get("Origin"),
        sec_fetch_site=request.headers.get("Sec-Fetch-Site"),
        local_port=local_port,
        scheme=request.scheme,
        proxy_authorization=_secrets(request, PROXY_AUTHORIZATION),
        proxy_keys=_secrets(request, KEY_HEADER),
    )


def _secrets(request: web.Request, name: str) -> tuple[Secret, ...]:
    values = request.headers.getall(name, ())
    return tuple(map(Secret, values)) if values else ()  # most requests send none


def refuse(
    request: web.Request, policy: Policy, *, client_keys: bool = True
) -> web.Response | None:
    """The refusal to answer `request` with (counted), or None to let it through.

    `client_keys=False` for the pages listener, which browsers use (they send no key).
    """
    verdict = admit(view_of(request), policy, keys=client_keys)
    if not isinstance(verdict, Refusal):
        if verdict is not None:
            request[SCOPE_KEY] = verdict  # checked once the connection is known
        return None
    request.app[REFUSALS_KEY][verdict.code] += 1
    response = web.json_response(
        verdict.body(), status=verdict.status, headers=dict(verdict.headers)
    )
    # The client may have sent a body we never read: do not keep the connection.
    response.force_close()
    return response
