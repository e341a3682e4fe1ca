"""`pleo-proxy`: the subcommands of the contract, exit codes and human output.

Exit codes: 0 ok, 1 runtime failure, 2 bad input or configuration. Errors go to
stderr as `error: …` (or `path.to.key: message` lines). Holds no business logic and
prints no secret, except `token`, whose whole point is to print the access token.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.config import Config, load_config
from proxy.errors import ConfigError, ProxyError
from proxy.names import DEFAULT_CONNECTION, NAME_RULE, is_valid_name
from proxy.ops.logs import redact, setup_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
# Beyond the token-request timeout: the two writes of a refresh helper's last exchange.
HELPER_GRACE = 10.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pleo-proxy", description="A local reverse proxy that adds Pleo OAuth to plain HTTP."
    )
    parser.add_argument("--version", action="version", version=f"pleo-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, type=Path, metavar="FILE")
        return p

    run = with_config("run", "serve the proxy")
    run.add_argument("--log-format", choices=["text", "json"], default=None)
    run.add_argument(
        "--workers",
        type=_positive,
        default=None,
        metavar="N",
        help="processes on one port (default: the config's `workers`, else 1)",
    )
    # A worker of `--workers N` (listens with SO_REUSEPORT); not for people to use.
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    demo = sub.add_parser("demo", help="the bundled sandbox and a proxy in front of it")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--sandbox-port", type=int, default=0)
    demo.add_argument("--auto-approve", action="store_true")
    sandbox = sub.add_parser("sandbox", help="run the bundled fake Pleo")
    sandbox.add_argument("--port", type=int, default=8090)
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--redirect-uri", action="append", default=[])
    with_config("check-config", "validate a configuration file")
    for name, help_text in (
        ("authorize-url", "print the one-time authorise URL"),
        ("status", "print the status of one connection, or of every one, as JSON"),
        ("token", "print a valid access token (refreshing if needed)"),
        ("import-tokens", "store tokens given as JSON (or JSON lines) on stdin"),
        ("logout", "delete the local tokens"),
    ):
        with_config(name, help_text).add_argument("--connection", metavar="NAME", default=None)
    connect = with_config("connect", "create a connection if new; print its one-time link")
    connect.add_argument("name", metavar="NAME")
    connect.add_argument("--return-to", metavar="URL", default=None)
    with_config("rotate-key", "re-seal every token file under a new key")
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("must be a whole number of at least 1")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: str = args.command
    try:
        if command in ("demo", "sandbox"):
            return _run_without_config(command, args)
        config = load_config(args.config)
        return _run_with_config(command, config, args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except ProxyError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{(exc.strerror or type(exc).__name__).lower()}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _run_without_config(command: str, args: argparse.Namespace) -> int:
    setup_logging("info")
    if command == "sandbox":
        from proxy.sandbox import SandboxSettings, serve_sandbox_forever

        uris = tuple(args.redirect_uri) or SandboxSettings().redirect_uris
        settings = SandboxSettings(redirect_uris=uris)
        asyncio.run(serve_sandbox_forever(settings, host=args.host, port=args.port))
        return EXIT_OK
    from proxy.demo import run_demo

    asyncio.run(
        run_demo(port=args.port, sandbox_port=args.sandbox_port, auto_approve=args.auto_approve)
    )
    return EXIT_OK


def _run_with_config(command: str, config: Config, args: argparse.Namespace) -> int:
    if command == "check-config":
        print("configuration OK")
        return EXIT_OK
    if command == "run":
        return _run(config, args)
    # Here, not at the top: the token commands' modules (the lifecycle, the store, the
    # HTTP client) cost `run` and `check-config` memory and start-up time for nothing.
    from proxy import cli_tokens

    connection: str | None = getattr(args, "name", None) or getattr(args, "connection", None)
    if connection is not None and not is_valid_name(connection):
        return cli_tokens.usage_error(f"invalid connection name {connection!r}: {NAME_RULE}")
    if command == "authorize-url":
        return _authorize_url(config, connection)
    setup_logging("warning")
    if command == "connect":
        assert connection is not None  # noqa: S101 - a required argument
        return _connect(config, connection, args.return_to)
    if command == "rotate-key":
        return asyncio.run(_rotate_key(config))
    handlers: dict[str, Callable[[Config, str | None], Coroutine[Any, Any, int]]] = {
        "status": cli_tokens.status,
        "token": cli_tokens.token,
        "import-tokens": cli_tokens.import_tokens,
        "logout": cli_tokens.logout,
    }
    return asyncio.run(handlers[command](config, connection))


def _connect(config: Config, connection: str, return_to: str | None) -> int:
    from proxy import cli_tokens  # lazily, as in _run_with_config
    from proxy.http.connections_api import return_to_problem

    if config.pleo.uses_api_key:
        return cli_tokens.usage_error("connections need OAuth; pleo.api_key is set")
    if return_to is not None and (problem := return_to_problem(config, return_to)):
        return cli_tokens.usage_error(problem)
    return asyncio.run(cli_tokens.connect(config, connection, return_to))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (the `speed` extra), else asyncio's."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run(config: Config, args: argparse.Namespace) -> int:
    """`run`: serve (or supervise workers); a start-up failure is one `error:` line, exit 1."""
    setup_logging(config.log_level, fmt=args.log_format)
    workers = args.workers if args.workers is not None else config.workers
    # As PID 1 (a container's entrypoint) even one worker runs under the supervisor: when
    # PID 1 ends, the kernel kills everything in the container, the refresh helper of a
    # killed worker too; the supervisor waits for it (see proxy/ops/workers.py).
    if (workers > 1 or os.getpid() == 1) and not args.worker:
        from proxy.ops.workers import supervise

        linger = config.timeouts.token_request + HELPER_GRACE
        return supervise(args.config, workers, log_format=args.log_format, linger=linger)
    from proxy.http.serve import serve
    from proxy.ops.workers import announce_ready

    def listening(addresses: list[tuple[str, int]]) -> None:
        announce_ready()

    serving = serve(config, config_path=args.config, reuse_port=args.worker, on_listening=listening)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serving)
    except (ProxyError, OSError, KeyboardInterrupt):
        raise
    except Exception as exc:
        # Never a traceback on the console: one line, redacted like the logs are.
        print(
            f"error: cannot run the proxy: {redact(f'{type(exc).__name__}: {exc}')}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def _authorize_url(config: Config, connection: str | None) -> int:
    from proxy import cli_tokens  # lazily, as in _run_with_config
    from proxy.connect.urlfile import read_authorize_url

    name = connection or DEFAULT_CONNECTION
    url = read_authorize_url(config, name)
    if url is None:
        status = asyncio.run(cli_tokens.read_status(config, name))
        if status["state"] == "authorised":
            print("already authorised: no authorise URL is needed", file=sys.stderr)
        elif name in config.connections.names:
            print("no authorise URL yet: start the proxy with `pleo-proxy run`", file=sys.stderr)
        else:
            print(
                f"no authorise URL: make a link with `pleo-proxy connect {name}`", file=sys.stderr
            )
        return EXIT_FAILURE
    print(url)
    return EXIT_OK


async def _rotate_key(config: Config) -> int:
    from proxy.store.files import rotate_key

    if config.tokens.store != "file":
        # Re-sealing the shared Redis value for every instance is not built yet.
        print("error: rotate-key supports tokens.store: file only", file=sys.stderr)
        return EXIT_USAGE

    key_id = await rotate_key(config)
    print(f"token files re-sealed under key {key_id}")
    return EXIT_OK
