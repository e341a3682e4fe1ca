"""Configuration reload (SIGHUP): which settings apply live, and swapping them in.

Live: `log_level`, `timeouts.*`, `listen.allowed_hosts`, `listen.allowed_origins`,
`listen.client_keys` (rotation without a restart), and `listen.tls_cert`/`tls_key` while
TLS stays on (the certificate itself is re-read by proxy.http.serve). Everything else
(listener, Pleo endpoints and client, store, refresh policy, ...) needs a restart: a
reload keeps the running values for those and says so in one log line. A config file
with problems, or one that would leave a listener beyond loopback without client keys,
is reported and changes nothing. Must not open listeners, sessions or stores.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from aiohttp import web

from proxy.config import Config, load_config
from proxy.errors import ConfigError
from proxy.http.guard import Policy
from proxy.http.keys import CONFIG_KEY
from proxy.ops.logs import set_level

log = logging.getLogger("proxy.reload")


class LiveSettings:
    """The configuration in force: swapped as a whole on reload (readers never see a mix)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.policy = Policy.from_config(config)
        # Set by serve() when a listener is beyond loopback: keys may change, not go.
        self.keys_required = False

    def swap(self, config: Config) -> None:
        self.config = config
        self.policy = Policy.from_config(config)


LIVE_KEY = web.AppKey("live_settings", LiveSettings)


def current_config(app: web.Application) -> Config:
    """The configuration in force for `app` (the start-up one when it has no live holder)."""
    live = app.get(LIVE_KEY)
    return app[CONFIG_KEY] if live is None else live.config


def applicable(running: Config, new: Config) -> Config:
    """`running` with the live-changeable settings of `new`."""
    # New certificate paths apply live; turning TLS on or off rebinds: a restart.
    tls_stays = (running.listen.tls_cert is None) == (new.listen.tls_cert is None)
    files = new.listen if tls_stays else running.listen
    listen = dataclasses.replace(
        running.listen,
        allowed_hosts=new.listen.allowed_hosts,
        allowed_origins=new.listen.allowed_origins,
        client_keys=new.listen.client_keys,
        tls_cert=files.tls_cert,
        tls_key=files.tls_key,
    )
    return dataclasses.replace(
        running, listen=listen, timeouts=new.timeouts, log_level=new.log_level
    )


def restart_needed(applied: Config, new: Config) -> list[str]:
    """Dotted names of the settings that differ between `applied` and `new` (restart-only)."""
    changed: list[str] = []
    for field in dataclasses.fields(new):
        ours, theirs = getattr(applied, field.name), getattr(new, field.name)
        if ours == theirs:
            continue
        if dataclasses.is_dataclass(theirs) and not isinstance(theirs, type):
            changed += [
                f"{field.name}.{sub.name}"
                for sub in dataclasses.fields(theirs)
                if getattr(ours, sub.name) != getattr(theirs, sub.name)
            ]
        else:
            changed.append(field.name)
    return changed


def read_new_config(path: Path) -> Config | None:
    """The file's configuration, or None after logging its problems as `path: message`."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("%s", problem, extra={"fields": {"event": "reload", "problem": str(problem)}})
        log.error("configuration not reloaded: %s has problems; keeping the running one", path)
        return None


def reload(live: LiveSettings, path: Path) -> Config | None:
    """Re-read `path` and apply what can change live; the config now in force, or None."""
    new = read_new_config(path)
    if new is None:
        return None
    if live.keys_required and not new.listen.client_keys:
        log.error(
            "configuration not reloaded: listen.client_keys is empty, and a listener is"
            " beyond loopback; keeping the running one",
            extra={"fields": {"event": "reload", "problem": "listen.client_keys"}},
        )
        return None
    applied = applicable(live.config, new)
    pending = restart_needed(applied, new)
    if pending:
        log.warning(
            "configuration changes to %s need a restart; running with the old values",
            ", ".join(pending),
            extra={"fields": {"event": "reload", "restart_needed": pending}},
        )
    live.swap(applied)
    set_level(applied.log_level)
    log.info("configuration reloaded", extra={"fields": {"event": "reload"}})
    return applied
