"""Config fuzzing: any YAML document is a Config or a ConfigError of `path: message` problems.

Hypothesis builds documents from random nested dicts, lists and scalars at known and
unknown keys (and random text as YAML); `parse_config`/`load_config` must never raise
anything else. A few generated files go through `pleo-proxy check-config`: exit 2 and
one `path: message` line per problem, never a traceback.
`PLEO_PROXY_FUZZ_EXAMPLES` raises the number of generated documents (default 300).
"""

from __future__ import annotations

import datetime
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from proxy.config import Config, load_config, parse_config
from proxy.errors import ConfigError
from tests.processes import cli

FUZZ_EXAMPLES = int(os.environ.get("PLEO_PROXY_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize="PLEO_PROXY_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
BASE_DIR = Path(tempfile.gettempdir())
ENVIRON = {"HOME": "/home/fuzz", "PORT": "8081", "EMPTY": ""}

# Every section and key the config knows (config.example.yaml documents them all).
KNOWN: dict[str, tuple[str, ...]] = {
    "listen": ("host", "port", "allowed_hosts", "allowed_origins"),
    "pleo": (
        "environment", "api_url", "authorize_url", "token_url", "client_id",
        "client_secret", "client_secret_file", "token_auth_method", "scopes",
        "redirect_uri", "api_key", "api_key_file", "ca_file",
    ),
    "tokens": ("store", "path", "key_file", "redis_url"),
    "refresh": ("before_expiry", "replay_body_limit", "keepalive"),
    "timeouts": ("connect", "read", "token_request", "shutdown"),
    "limits": ("max_request_line", "max_header_size", "max_headers", "idle_timeout"),
}  # fmt: skip
TOP_SCALARS = ("log_level",)

# Strings that reach the edges of the parsers: units, references, URLs, paths.
EDGE_STRINGS = st.sampled_from(
    ["", " ", "0", "-1", "+5", "1e999", "9" * 400, "1.5", "90s", "2m", "1h", "7d",
     "500ms", "5y", "1MiB", "1 parsec", "${PORT}", "${MISSING}", "${EMPTY:-9}", "${",
     "$$", "~", "~/x", "~root/x", "/", "\x00", "a\nb", "http://localhost",
     "https://example.com/x?q#f", "http://user:pw@127.0.0.1", "http://[::1", "http://evil",
     "redis://127.0.0.1", "unix:///x", "https://app.example.com", "production", "sandbox",
     "file", "redis", "client_secret_basic", "debug", "users:read", "a b", "127.0.0.1",
     "[::1]:80", "/dev/null", "/etc", "x" * 300]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([10**400, -(10**400), 2**63, 2**31, 65536, 0]),
    st.floats(),
    st.text(max_size=20),
    EDGE_STRINGS,
    st.dates(),
    st.datetimes(),
    st.binary(max_size=8),
)
KEYS = st.one_of(st.text(max_size=10), st.integers(), st.none(), st.booleans(), st.floats())


def values() -> st.SearchStrategy[Any]:
    return st.recursive(
        SCALARS,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
        max_leaves=6,
    )


def section(keys: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """Mostly a mapping of known keys (each any value), sometimes an unknown key or junk."""
    known = st.fixed_dictionaries({}, optional={key: values() for key in keys})
    extra = st.dictionaries(st.text(max_size=10), values(), max_size=2)
    return st.one_of(known, st.builds(lambda k, e: {**e, **k}, known, extra), values())


DOCUMENTS = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={name: section(keys) for name, keys in KNOWN.items()}
        | {key: values() for key in TOP_SCALARS},
    ),
    st.builds(
        lambda known, extra: {**extra, **known},
        st.fixed_dictionaries({"pleo": section(KNOWN["pleo"])}),
        st.dictionaries(KEYS, values(), max_size=3),
    ),
    values(),
)


def assert_config_or_problems(result: Config | ConfigError) -> None:
    """The whole contract: a Config, or problems that each have a path and a message."""
    if isinstance(result, Config):
        return
    assert result.problems
    for problem in result.problems:
        assert isinstance(problem.path, str)
        assert problem.path
        assert isinstance(problem.message, str)
        assert problem.message


def parse(document: object) -> Config | ConfigError:
    try:
        return parse_config(document, base_dir=BASE_DIR, environ=ENVIRON)
    except ConfigError as exc:
        return exc


def load(path: Path) -> Config | ConfigError:
    try:
        return load_config(path, environ=ENVIRON)
    except ConfigError as exc:
        return exc


@FUZZ
@given(document=DOCUMENTS)
def test_any_document_is_a_config_or_path_message_problems(document: object) -> None:
    assert_config_or_problems(parse(document))


@FUZZ
@given(document=DOCUMENTS)
def test_any_yaml_file_is_a_config_or_path_message_problems(document: object) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(document), encoding="utf-8")
        assert_config_or_problems(load(path))


YAML_SNIPPETS = st.sampled_from(
    ["listen:", "  port: ", "pleo:\n  client_id: x", "- a", "{", "}", "[", "&a x", "*a",
     "!!python/object:os.system x", "!!binary ZZZ", "? x", "|", ">", "%YAML 1.1", "---",
     "...", "a: b: c", "\t", "x: !!set {a}", "x: 2024-01-01", "k: &r [*r]", "\"\\x\"",
     "<<: *a", "a: 1\na: 2", "\ufeff", "\x85"]
)  # fmt: skip


@FUZZ
@given(parts=st.lists(st.one_of(YAML_SNIPPETS, st.text(max_size=12)), max_size=8))
def test_any_text_is_a_config_or_path_message_problems(parts: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text("\n".join(parts), encoding="utf-8", errors="surrogatepass")
        assert_config_or_problems(load(path))


def test_check_config_prints_path_message_lines_and_exits_2(tmp_path: Path) -> None:
    """A handful of generated invalid files through the real CLI (subprocesses are slow)."""
    rng = random.Random(5)
    documents: list[object] = [
        {"listen": {"port": "eighty"}, "limits": {"max_headers": [1]}, "bogus": {1: None}},
        {"pleo": {"client_id": ["x"], "scopes": {"a": 1}}, "timeouts": {"read": 10**400}},
        {"tokens": datetime.date(2024, 1, 1), "refresh": {"keepalive": float("nan")}},
    ]
    for _ in range(2):
        section_name = rng.choice(sorted(KNOWN))
        documents.append(
            {section_name: {key: rng.choice([[], {}, True]) for key in KNOWN[section_name]}}
        )
    for index, document in enumerate(documents):
        path = tmp_path / f"c{index}.yaml"
        path.write_text(yaml.safe_dump(document))
        code, out, err = cli("check-config", "--config", str(path))
        assert code == 2, (document, out, err)
        assert "Traceback" not in out + err
        lines = [line for line in (out + err).splitlines() if line.strip()]
        assert lines
        problems = load(path)
        assert isinstance(problems, ConfigError)
        for problem in problems.problems:
            assert str(problem) in lines
