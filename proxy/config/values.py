"""Scalar parsers for the configuration: each raises a short ValueError, never with a
secret in it; the reader in `proxy.config` adds the key path. Also `${ENV}` substitution
(per scalar, after YAML parsing) and the loopback rule. No I/O beyond reading `*_file`
secrets; no network.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from proxy.secret import Secret

MIB = 1024 * 1024


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 (brackets allowed): never off the machine."""
    name = host.strip().lower()
    if name == "localhost":
        return True
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


# --- scalar parsers: each raises a short ValueError; the reader adds the key path ---

T = TypeVar("T")
Parser = Callable[[object], Any]


class AtItem(ValueError):
    """A problem with one item of a list: reported at `key[index]`."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def describe(value: object) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def parse_string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe(value)}")
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def parse_secret(value: object) -> Secret:
    # Never echo: whatever sits at a secret key may be the secret, even when mistyped.
    if not isinstance(value, str):
        raise ValueError("expected a string")
    if not value:
        raise ValueError("must not be empty")
    return Secret(value)


def parse_integer(value: object) -> int:
    # Numeric strings are accepted because `${PORT}` substitutes to a string.
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {describe(value)}")
    return value


def parse_port(value: object) -> int:
    port = parse_integer(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"expected a port from 0 to 65535, got {port}")
    return port


_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": MIB, "gib": 1024 * MIB, "kb": 1000}
_SIZE_UNITS |= {"mb": 1000**2, "gb": 1000**3}


def _quantity(value: object, units: Mapping[str, float], expected: str) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        # float() of a YAML integer past ~1e308 raises OverflowError; inf is refused below.
        number = float(value) if abs(value) < 1e308 else math.inf
    elif isinstance(value, str) and (m := _QUANTITY.fullmatch(value.strip())):
        unit = units.get(m[2].lower())
        number = None if unit is None else float(m[1]) * unit
    if number is None or not math.isfinite(number):
        raise ValueError(f"expected {expected}, got {describe(value)}")
    if number < 0:
        raise ValueError(f"must not be negative, got {describe(value)}")
    return number


def parse_duration(*, zero_ok: bool) -> Parser:
    def parse(value: object) -> float:
        seconds = _quantity(value, _DURATION_UNITS, "a duration like 90, '90s', '2m', '1h', '7d'")
        if seconds == 0 and not zero_ok:
            raise ValueError("must be greater than zero")
        return seconds

    return parse


def parse_size(value: object) -> int:
    return int(_quantity(value, _SIZE_UNITS, "a size like 1048576, '512KiB', '1MiB'"))


def parse_within(parse: Callable[[object], int], low: int, high: int) -> Parser:
    """`parse`, then a range check: limits outside it break every client or guard nothing."""

    def bounded(value: object) -> int:
        number = parse(value)
        if not low <= number <= high:
            raise ValueError(f"must be from {low} to {high}, got {number}")
        return number

    return bounded


def parse_choice(kind: str, choices: tuple[str, ...]) -> Parser:
    """The one place closed choices (the `Literal` types) are checked against the YAML."""

    def parse(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(
                f"unknown {kind} {describe(value)}; expected one of {', '.join(choices)}"
            )
        return value

    return parse


def parse_url(value: object, *, base_only: bool = False) -> str:
    text = parse_string(value)
    parts = urlsplit(text)
    if "@" in parts.netloc:  # checked first: a URL with userinfo is not echoed back
        raise ValueError("must not contain a user name or password")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an absolute http(s) URL, got {text!r}")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError(f"invalid port in URL {text!r}") from None
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError("plain http is allowed only for loopback hosts")
    if parts.fragment or (base_only and parts.query):
        raise ValueError("must not have a " + ("fragment" if parts.fragment else "query"))
    return text


def parse_api_url(value: object) -> str:
    # Without the trailing slash, `api_url + request.raw_path` is the upstream URL.
    return parse_url(value, base_only=True).rstrip("/")


def parse_redis_url(value: object) -> str:
    text = parse_string(value)
    if urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return text


def parse_origin(value: object) -> str:
    text = parse_string(value)
    parts = urlsplit(text)
    extra = parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc
    if parts.scheme not in ("http", "https") or not parts.hostname or extra:
        raise ValueError(f"expected an origin like 'https://app.example.com', got {text!r}")
    # Browsers send Origin in this form: scheme://host[:port], lower case, no slash.
    return f"{parts.scheme}://{parts.netloc.lower()}"


def parse_host(value: object) -> str:
    text = parse_string(value)
    if any(c in text for c in "/@?# \t"):
        raise ValueError(f"expected a host name, optionally with ':port', got {text!r}")
    return text


def _scope(value: object) -> str:
    text = parse_string(value)
    if any(c.isspace() for c in text):
        raise ValueError(f"a scope must not contain whitespace, got {text!r}")
    return text


def parse_list_of(item: Callable[[object], T]) -> Callable[[object], tuple[T, ...]]:
    def parse(value: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {describe(value)}")
        out: list[T] = []
        for index, element in enumerate(value):
            try:
                out.append(item(element))
            except ValueError as exc:
                raise AtItem(index, str(exc)) from None
        return tuple(out)

    return parse


def parse_scopes(value: object) -> tuple[str, ...]:
    # A string is split on spaces, so `scopes: ${PLEO_SCOPES}` works.
    return parse_list_of(_scope)(value.split() if isinstance(value, str) else value)


def parse_path(base_dir: Path, environ: Mapping[str, str]) -> Callable[[object], Path]:
    def parse(value: object) -> Path:
        text = parse_string(value)
        if text == "~" or text.startswith("~/"):
            return home_dir(environ) / text[2:]
        if text.startswith("~"):
            raise ValueError(f"'~user' paths are not supported, got {text!r}")
        return base_dir / text  # an absolute `text` replaces base_dir

    return parse


def parse_existing_file(read_path: Callable[[object], Path]) -> Parser:
    def parse(value: object) -> Path:
        path = read_path(value)
        if not path.is_file():
            raise ValueError(f"no such file: {str(path)!r}")
        return path

    return parse


def parse_secret_file(read_path: Callable[[object], Path]) -> Parser:
    def parse(value: object) -> Secret:
        path = read_path(value)
        # Messages name the path and the OS reason, never the content.
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {str(path)!r}: {exc.strerror or 'error'}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{str(path)!r} is not UTF-8 text") from None
        text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
        if not text:
            raise ValueError(f"{str(path)!r} is empty")
        return Secret(text)

    return parse


def home_dir(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("HOME") or Path.home())


# --- ${ENV} substitution, per scalar after parsing ---

_REFERENCE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|\$\{"
)


def _substitute_text(text: str, environ: Mapping[str, str]) -> str:
    def expand(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, default = match["name"], match["default"]
        if name is None:
            raise ValueError("malformed '${' reference; expected ${NAME} or ${NAME:-default}")
        value = environ.get(name)
        if default is not None and not value:  # shell semantics: unset or empty
            return str(default)
        if value is None:
            raise ValueError(f"environment variable {name} is not set")
        return value

    return _REFERENCE.sub(expand, text)


def substitute(value: object, environ: Mapping[str, str]) -> object:
    if isinstance(value, str):
        return _substitute_text(value, environ)
    if isinstance(value, list):
        out: list[object] = []
        for index, element in enumerate(value):
            try:
                out.append(substitute(element, environ))
            except ValueError as exc:
                raise AtItem(index, str(exc)) from None
        return out
    return value
