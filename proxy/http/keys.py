"""Typed keys for what the aiohttp application holds; one place, so modules agree."""

from __future__ import annotations

import collections
from collections.abc import Callable

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.config import Config
from proxy.lifecycle.credentials import CredentialSource
from proxy.lifecycle.manager import TokenManager
from proxy.lifecycle.registry import Registry
from proxy.ops.events import EventSink

CONFIG_KEY = web.AppKey("config", Config)
CLOCK_KEY: web.AppKey[Callable[[], float]] = web.AppKey("clock")
# How long things last in this process (proxy/lifecycle/clocks.py): never stepped.
STEADY_KEY: web.AppKey[Callable[[], float]] = web.AppKey("steady")
UPSTREAM_SESSION_KEY = web.AppKey("upstream_session", aiohttp.ClientSession)
CREDENTIALS_KEY = web.AppKey("credentials", CredentialSource)
TOKENS_KEY = web.AppKey("tokens", TokenManager)  # the default connection, when there is one
REGISTRY_KEY = web.AppKey("registry", Registry)  # absent in API-key mode
# Set on a connection's own listener: every request there is for that connection.
FIXED_CONNECTION_KEY = web.AppKey("fixed_connection", str)
EVENTS_KEY = web.AppKey("events", EventSink)
# Requests refused by the guard (and by a client key's connection limit), by reason.
REFUSALS_KEY = web.AppKey("guard_refusals", collections.Counter[str])
# Token exchanges run in the refresh helper process (see proxy/lifecycle/exchange.py).
REFRESH_HELPER_KEY = web.AppKey("refresh_helper", bool)
# The front middleware (proxy.http.front), for the router shortcut (proxy.http.dispatch).
FRONT_KEY: web.AppKey[Middleware] = web.AppKey("front")
