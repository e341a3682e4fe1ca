"""Serving: the listening sockets, the runners of every listener, signals and shutdown.

`serve()` binds the main listener (or takes systemd's sockets), each connection's own
port and the pages listener before anything starts, so a taken port (or a listener
beyond loopback without client keys, or an unusable TLS certificate) is reported first;
then runs until SIGTERM/SIGINT, reloads on SIGHUP (the TLS certificate too), and shuts
down gracefully. Must not build routes or handle requests (proxy.http.app does).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.config import Config, is_loopback_host
from proxy.errors import ProxyError
from proxy.http.app import build_app, listener_app, runner_options
from proxy.http.dispatch import install_shortcut
from proxy.http.keys import REGISTRY_KEY
from proxy.http.tls import TLS_KEY, TlsError, certificates_for
from proxy.lifecycle.credentials import CredentialSource
from proxy.ops import sdnotify
from proxy.ops.reload import LIVE_KEY, reload

log = logging.getLogger(__name__)

# Pending connections the kernel queues for us (aiohttp's TCPSite default).
LISTEN_BACKLOG = 128
# The listeners besides the main one: (connection name, its sockets); None: the pages.
Listeners = list[tuple[str | None, list[socket.socket]]]


def _bound_addresses(runner: web.AppRunner) -> list[tuple[str, int]]:
    return [(str(addr[0]), int(addr[1])) for addr in runner.addresses]


class ListenError(ProxyError):
    """The configured address cannot be listened on (taken, not ours, no permission)."""


def apply_reload(app: web.Application, runner: web.AppRunner, config_path: Path) -> None:
    """SIGHUP: re-read `config_path`; apply what may change live, say what needs a restart."""
    sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        applied = reload(app[LIVE_KEY], config_path)
        if applied is not None:
            registry = app.get(REGISTRY_KEY)
            if registry is not None:
                registry.use_config(applied)
            # Read by runner.cleanup() at shutdown; aiohttp itself sets it this way.
            runner._shutdown_timeout = applied.timeouts.shutdown
            _reload_certificate(app, applied)
    finally:
        sdnotify.notify("READY=1")


def _reload_certificate(app: web.Application, applied: Config) -> None:
    """Re-read the TLS certificate and key (renewed files, or new paths) for new handshakes."""
    tls = app.get(TLS_KEY)
    cert, key = applied.listen.tls_cert, applied.listen.tls_key
    if tls is None or cert is None or key is None:
        return
    try:
        tls.reload(cert, key)
    except TlsError as exc:
        log.error("TLS certificate not reloaded: %s; the running one stays in use", exc.detail)
        return
    log.info("TLS certificate reloaded", extra={"fields": {"event": "reload", "tls": str(cert)}})


@contextlib.contextmanager
def _signals_set(stop: asyncio.Event, on_hup: Callable[[], None]) -> collections.abc.Iterator[None]:
    """SIGTERM/SIGINT set `stop`, SIGHUP reloads (main thread only: asyncio's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for signum in signums[:2]:
        loop.add_signal_handler(signum, stop.set)
    # systemd's ExecReload sends SIGHUP; without a handler it would end the process.
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        yield
    finally:
        for signum in signums:
            loop.remove_signal_handler(signum)


def _reloader(
    app: web.Application, runner: web.AppRunner, config_path: Path | None
) -> Callable[[], None]:
    def on_hup() -> None:
        if config_path is None:
            log.warning("SIGHUP: no configuration file to reload; restart to apply changes")
            return
        apply_reload(app, runner, config_path)

    return on_hup


def _bind(family: int, address: Any, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # Workers share the port; the kernel spreads new connections between them.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_sockets(config: Config, *, reuse_port: bool = False) -> list[socket.socket]:
    """Sockets systemd passed (socket activation), else the configured address, bound now.

    Bound before anything else starts, so a taken port is reported before the store is
    opened or a setup URL is made.
    """
    passed = sdnotify.listen_fds()
    if passed:
        return passed
    return bind_address(config.listen.host, config.listen.port, reuse_port=reuse_port)


def bind_address(host: str, port: int, *, reuse_port: bool) -> list[socket.socket]:
    """Sockets for every address `host` resolves to; ListenError naming what failed."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, _, _, _, address in dict.fromkeys(infos):
            sockets.append(_bind(family, address, reuse_port=reuse_port))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(f"cannot listen on {host}:{port}: {reason.lower()}") from None
    return sockets


async def _serve_until(
    stop: asyncio.Event, on_hup: Callable[[], None], announce: Callable[[], None]
) -> None:
    """Announce readiness, then wait for `stop`; signal handlers are in place before."""
    interval = sdnotify.watchdog_interval()
    watchdog = asyncio.create_task(sdnotify.watchdog_loop(interval)) if interval else None
    try:
        # Handlers first: a SIGHUP right after READY=1 must reload, not end the process.
        with _signals_set(stop, on_hup):
            announce()
            sdnotify.notify("READY=1")
            await stop.wait()
    finally:
        sdnotify.notify("STOPPING=1")
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog


async def serve(
    config: Config,
    *,
    credentials: CredentialSource | None = None,
    on_listening: Callable[[list[tuple[str, int]]], None] | None = None,
    stop: asyncio.Event | None = None,
    config_path: Path | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve until `stop` is set or SIGTERM/SIGINT, then shut down gracefully.

    Shutdown stops accepting, lets in-flight requests finish for up to
    `timeouts.shutdown` seconds, cancels the rest, then closes the upstream session.
    SIGHUP re-reads `config_path` (see `proxy.ops.reload`). `reuse_port` lets several
    worker processes listen on one port (SO_REUSEPORT).
    """
    stop = stop if stop is not None else asyncio.Event()
    tls = certificates_for(config.listen.tls_cert, config.listen.tls_key)
    sockets, others, keys_required = _bind_all(config, reuse_port=reuse_port)
    # A refresh Pleo answered must be persisted even if this process is killed meanwhile.
    app = build_app(config, credentials=credentials, refresh_helper=True)
    app[LIVE_KEY].keys_required = keys_required
    ssl_context = None
    if tls is not None:
        app[TLS_KEY] = tls
        ssl_context = tls.context
    runner = web.AppRunner(app, **runner_options(config))
    side_runners: list[web.AppRunner] = []
    try:
        # setup() runs the cleanup contexts: the store is open and verified after it.
        await runner.setup()
        install_shortcut(runner)
        for sock in sockets:
            await web.SockSite(runner, sock, ssl_context=ssl_context).start()
        for connection, socks in others:
            side = web.AppRunner(listener_app(app, connection=connection), **runner_options(config))
            side_runners.append(side)
            await side.setup()
            install_shortcut(side)
            # The pages listener (connection None) stays plain HTTP behind its HTTPS front.
            side_ssl = ssl_context if connection is not None else None
            for sock in socks:
                await web.SockSite(side, sock, ssl_context=side_ssl).start()

        def announce() -> None:
            if on_listening is not None:
                on_listening(_bound_addresses(runner))

        await _serve_until(stop, _reloader(app, runner, config_path), announce)
    finally:
        for side in side_runners:
            await side.cleanup()
        await runner.cleanup()
        _close_all(sockets)
        for _, socks in others:
            _close_all(socks)


def _bind_all(config: Config, *, reuse_port: bool) -> tuple[list[socket.socket], Listeners, bool]:
    """Every listener's sockets, bound and checked (client keys beyond loopback), or none."""
    sockets = listen_sockets(config, reuse_port=reuse_port)
    others: Listeners = []
    try:
        others = other_listeners(config, reuse_port=reuse_port)
        return sockets, others, check_client_keys(config, sockets, others)
    except BaseException:
        _close_all(sockets)
        for _, socks in others:
            _close_all(socks)
        raise


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def other_listeners(config: Config, *, reuse_port: bool) -> Listeners:
    """Sockets of each connection's own port, and of the pages listener (name None)."""
    bound: Listeners = []
    try:
        for spec in config.connections.configured:
            if spec.port is not None:
                socks = bind_address(config.listen.host, spec.port, reuse_port=reuse_port)
                bound.append((spec.name, socks))
        pages = config.pages
        if pages.port is not None:
            host = pages.host or config.listen.host
            bound.append((None, bind_address(host, pages.port, reuse_port=reuse_port)))
    except BaseException:
        for _, socks in bound:
            _close_all(socks)
        raise
    return bound


def _beyond_loopback(sockets: list[socket.socket]) -> list[str]:
    """`host:port` of each socket bound beyond loopback (Unix sockets are local)."""
    found: list[str] = []
    for sock in sockets:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        host, port = sock.getsockname()[:2]
        if not is_loopback_host(host):
            found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return found


def check_client_keys(config: Config, sockets: list[socket.socket], others: Listeners) -> bool:
    """Whether a listener is beyond loopback; ListenError when it is and has no keys.

    The sockets really bound count (also systemd's), not the configured name. The pages
    listener (name None) is exempt: browsers reach it and cannot send a key.
    """
    connection_sockets = [sock for name, socks in others if name is not None for sock in socks]
    beyond = _beyond_loopback(sockets + connection_sockets)
    if beyond and not config.listen.client_keys:
        raise ListenError(
            f"listening on {beyond[0]}, beyond loopback, needs listen.client_keys:"
            " without them anyone who reaches the port uses the Pleo connections"
        )
    return bool(beyond)
