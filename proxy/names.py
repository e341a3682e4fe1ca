"""Connection names: the one rule for what a name may be, and the implicit `default`.

A leaf: imports nothing from the package. Names appear in paths, Redis keys and file
names, so the rule keeps them to a safe, case-free alphabet.
"""

from __future__ import annotations

import re

DEFAULT_CONNECTION = "default"
NAME_RULE = "1-63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def is_valid_name(name: str) -> bool:
    """True when `name` may name a connection (`^[a-z0-9][a-z0-9._-]{0,62}$`)."""
    return _NAME.fullmatch(name) is not None


def check_name(name: object) -> str:
    """`name` if valid; ValueError naming the rule (never echoing a long value) otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"a connection name must be a string; {NAME_RULE}")
    if not is_valid_name(name):
        shown = name if len(name) <= 64 and name.isprintable() else "(not shown)"
        raise ValueError(f"invalid connection name {shown!r}: {NAME_RULE}")
    return name
