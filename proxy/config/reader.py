"""The config reader: walks a parsed YAML document in order, collecting every problem.

Sections are mappings checked against a spec (unknown keys are problems, with a
suggestion); values go through their parser after `${ENV}` substitution; a list of
sections reports problems as `key[index].sub`. Must not build config objects.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from proxy.config.values import AtItem, Parser, describe, substitute
from proxy.errors import Problem


@dataclass(frozen=True)
class SectionList:
    """A list of mappings, each checked against `spec`; a bare list may stand for the
    section's `shorthand` key (`connections: [...]` means `connections: {configured: [...]}`)."""

    spec: Spec
    shorthand: str | None = None
    section: Spec | None = None  # the mapping form's own keys, when `shorthand` is set
    # Items that may be secrets (`client_keys`): a misshapen one is described by its
    # kind only, never by its value (`- my-key` where `- key: my-key` was meant).
    masked: bool = False


Spec = Mapping[str, Union[Parser, "Spec", SectionList]]
INVALID = object()  # a key that was present but had a problem


class Reader:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.seq = 0  # keys visited so far: problems are sorted by it (document order)
        self.ends: dict[str, int] = {}  # section → seq of its last key
        self._problems: list[tuple[int, Problem]] = []

    def add(self, path: str, message: str, *, at: int | None = None) -> None:
        self._problems.append((self.seq if at is None else at, Problem(path, message)))

    def problems(self) -> list[Problem]:
        return [problem for _, problem in sorted(self._problems, key=lambda item: item[0])]

    def section(self, value: object, path: str, spec: Spec) -> dict[str, Any]:
        """The parsed keys of one mapping; absent keys are absent, failed ones `INVALID`."""
        out: dict[str, Any] = {}
        if value is not None and not isinstance(value, Mapping):
            self.add(path, f"expected a mapping, got {describe(value)}")
        for key, raw in value.items() if isinstance(value, Mapping) else ():
            self.seq += 1
            key_path = key_path_of(path, key)
            entry = spec.get(key) if isinstance(key, str) else None
            if entry is None:
                self.add(key_path, _unknown_key(key, spec))
            elif isinstance(entry, SectionList):
                out[key] = self._section_list(raw, key_path, entry)
            elif isinstance(entry, Mapping):
                out[key] = self.section(raw, key_path, entry)
            elif raw is not None:  # `key:` with no value means "use the default"
                out[key] = self.value(raw, key_path, entry)
        self.ends[path] = self.seq
        return out

    def _section_list(self, raw: object, path: str, entry: SectionList) -> Any:
        if entry.shorthand is not None and entry.section is not None:
            if isinstance(raw, list):
                return {entry.shorthand: self.sections(raw, path, entry.spec)}
            inner = {**entry.section, entry.shorthand: SectionList(entry.spec)}
            return self.section(raw, path, inner)
        return self.sections(raw, path, entry.spec, masked=entry.masked)

    def sections(
        self, value: object, path: str, spec: Spec, *, masked: bool = False
    ) -> list[Any] | object:
        """Each mapping of a list, parsed; problems at `path[index].key`."""
        shown = _kind if masked else describe
        if value is None:
            return []
        if not isinstance(value, list):
            self.add(path, f"expected a list, got {shown(value)}")
            return INVALID
        out: list[Any] = []
        for i, item in enumerate(value):
            if masked and item is not None and not isinstance(item, Mapping):
                self.add(f"{path}[{i}]", f"expected a mapping, got {shown(item)}")
                out.append(INVALID)
                continue
            out.append(self.section(item, f"{path}[{i}]", spec))
        return out

    def value(self, raw: object, path: str, parse: Parser) -> Any:
        try:
            return parse(substitute(raw, self.environ))
        except ValueError as exc:
            where = f"{path}[{exc.index}]" if isinstance(exc, AtItem) else path
            self.add(where, str(exc))
            return INVALID


_PLAIN_KEY = re.compile(r"[^\s:.\[\]'\"]+")


def key_path_of(path: str, key: object) -> str:
    """`path.key`; an odd key (empty, not a string, with spaces or dots) is quoted by repr
    so every problem still reads as one unambiguous `path: message` line."""
    name = key if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) else repr(key)
    return f"{path}.{name}" if path else name


def _kind(value: object) -> str:
    """What `value` is, without showing it: `a string`, `an integer`, `a mapping`."""
    if isinstance(value, Mapping | list):
        return describe(value)
    kinds = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    return kinds.get(type(value), f"a value of type {type(value).__name__}")


def _unknown_key(key: object, spec: Spec) -> str:
    close = difflib.get_close_matches(str(key), list(spec), n=1)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key; expected one of {', '.join(spec)}"


def valid(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not INVALID}
