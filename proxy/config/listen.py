"""The `listen:` keys for listening beyond loopback: client keys and the TLS files.

`ClientKey` values, their spec for the reader, and the rules that span keys (exactly one
of `key` / `key_file`, `tls_cert` with `tls_key`, no key listed twice). Must not open
sockets or TLS contexts (proxy.http.tls does), and never puts a key in a message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config.reader import Reader, SectionList, Spec, valid
from proxy.config.values import (
    parse_existing_file,
    parse_list_of,
    parse_secret,
    parse_secret_file,
)
from proxy.names import check_name
from proxy.secret import Secret

MIN_KEY_LENGTH = 16
KEY_RULE = f"at least {MIN_KEY_LENGTH} visible ASCII characters (no spaces)"


@dataclass(frozen=True)
class ClientKey:
    """A key clients present, e.g. `ClientKey(Secret("k" * 32), connections=("acme",))`."""

    key: Secret
    connections: tuple[str, ...] | None = None  # None: every connection


def _shaped(secret: Secret) -> Secret:
    # A header value is trimmed by every HTTP parser and may not hold controls, so a
    # key with spaces or control bytes could never match; a short one is guessable.
    value = secret.reveal()
    if len(value) < MIN_KEY_LENGTH or not all("!" <= c <= "~" for c in value):
        raise ValueError(f"a client key must be {KEY_RULE}")
    return secret


def _key(value: object) -> Secret:
    return _shaped(parse_secret(value))


def _key_file(read_path: Callable[[object], Path]) -> Callable[[object], Secret]:
    read = parse_secret_file(read_path)

    def parse(value: object) -> Secret:
        return _shaped(read(value))

    return parse


def _connection_names(value: object) -> tuple[str, ...]:
    names = parse_list_of(check_name)(value)
    if not names:
        raise ValueError("must name at least one connection; leave it out to allow every one")
    return tuple(dict.fromkeys(names))


def listen_spec(path: Callable[[object], Path]) -> Spec:
    """The reader's spec for `listen.client_keys`, `listen.tls_cert` and `listen.tls_key`."""
    client_key: Spec = {
        "key": _key,
        "key_file": _key_file(path),
        "connections": _connection_names,
    }
    return {
        "client_keys": SectionList(client_key, masked=True),
        "tls_cert": parse_existing_file(path),
        "tls_key": parse_existing_file(path),
    }


def build_listen_access(values: Mapping[str, Any], reader: Reader) -> dict[str, Any]:
    """The `Listen` fields of the keys above: `client_keys`, `tls_cert`, `tls_key`."""
    at = reader.ends.get("listen", reader.seq)
    items = values.get("client_keys", [])
    keys = _client_keys(items if isinstance(items, list) else [], reader, at)
    given = {"tls_cert", "tls_key"} & set(values)
    if len(given) == 1:
        (present,) = given
        missing = "tls_key" if present == "tls_cert" else "tls_cert"
        reader.add(f"listen.{missing}", f"required with listen.{present}: set both", at=at)
    files = valid(values)
    return {"client_keys": keys, "tls_cert": files.get("tls_cert"), "tls_key": files.get("tls_key")}


def _client_keys(items: list[Any], reader: Reader, at: int) -> tuple[ClientKey, ...]:
    keys: list[ClientKey] = []
    seen: dict[Secret, int] = {}
    for index, item in enumerate(items):
        path = f"listen.client_keys[{index}]"
        if not isinstance(item, Mapping) or not _one_source(item, path, reader, at):
            continue
        secret = item.get("key", item.get("key_file"))
        connections = item.get("connections")
        if not isinstance(secret, Secret) or not isinstance(connections, tuple | None):
            continue  # the reader has reported it
        if secret in seen:
            reader.add(path, f"the same key as listen.client_keys[{seen[secret]}]", at=at)
            continue
        seen[secret] = index
        keys.append(ClientKey(secret, connections))
    return tuple(keys)


def _one_source(item: Mapping[str, Any], path: str, reader: Reader, at: int) -> bool:
    """Exactly one of `key` and `key_file` (like oauth2-proxy's SecretSource)."""
    if "key" in item and "key_file" in item:
        reader.add(f"{path}.key_file", "set either key or key_file, not both", at=at)
        return False
    if "key" not in item and "key_file" not in item:
        reader.add(f"{path}.key", "required: set key or key_file", at=at)
        return False
    return True
