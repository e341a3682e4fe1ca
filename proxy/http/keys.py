"""Typed keys for what the aiohttp application holds; one place, so modules agree."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from aiohttp import web

from proxy.config import Config
from proxy.lifecycle.credentials import CredentialSource
from proxy.lifecycle.manager import TokenManager

CONFIG_KEY = web.AppKey("config", Config)
CLOCK_KEY: web.AppKey[Callable[[], float]] = web.AppKey("clock")
UPSTREAM_SESSION_KEY = web.AppKey("upstream_session", aiohttp.ClientSession)
CREDENTIALS_KEY = web.AppKey("credentials", CredentialSource)
TOKENS_KEY = web.AppKey("tokens", TokenManager)  # absent in API-key mode
