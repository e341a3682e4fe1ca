"""Config files as YAML: text → document, duplicate keys refused, errors cut short.

Owns the PyYAML loader and the wording of its errors (the position and PyYAML's short
`problem`, never a snippet of the file). `proxy.config.load_config` imports it when it
reads a file, so what only builds a `Config` from a mapping (the refresh helper, which
gets its settings over a socket) never loads PyYAML. Must not validate settings.
"""

from __future__ import annotations

from typing import Any

import yaml

from proxy.errors import FILE_PROBLEM_PATH, ConfigError, Problem


def parse_document(text: str) -> object:
    """The YAML document in `text`; ConfigError (at the file as a whole) if it is not one."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(FILE_PROBLEM_PATH, _yaml_message(exc))]) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML would silently let the last win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                message = f"duplicate key {key!r}"
                raise yaml.constructor.ConstructorError(None, None, message, key_node.start_mark)
            seen.add(key if isinstance(key, str) else id(key_node))
        return super().construct_mapping(node, deep=deep)


def _yaml_message(exc: yaml.YAMLError) -> str:
    # Only PyYAML's short `problem` and the position: its snippet would echo file content.
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "syntax error"
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
