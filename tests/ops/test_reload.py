"""What a reload applies live, what it leaves for a restart, and a bad file changing nothing."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import yaml

from proxy.config import load_config
from proxy.ops.reload import LiveSettings, applicable, reload, restart_needed
from tests.processes import write_config


def _write(tmp_path: Path, **overrides: dict[str, object]) -> Path:
    return write_config(
        tmp_path / "proxy.yaml",
        sandbox_url="http://127.0.0.1:9",
        port=18080,
        state_dir=tmp_path / "st",
        **overrides,
    )


def test_live_settings_apply_and_others_are_named(tmp_path: Path) -> None:
    running = load_config(_write(tmp_path))
    path = _write(
        tmp_path,
        listen={"port": 18081, "allowed_hosts": ["proxy.internal"]},
        pleo={"client_id": "another"},
        timeouts={"read": 3},
    )
    new = load_config(path)
    applied = applicable(running, new)
    assert applied.listen.allowed_hosts == ("proxy.internal",)
    assert applied.timeouts.read == 3
    assert applied.listen.port == 18080
    assert applied.pleo == running.pleo
    assert restart_needed(applied, new) == ["listen.port", "pleo.client_id"]
    assert restart_needed(applied, applied) == []


def test_reload_swaps_the_policy_and_level(tmp_path: Path) -> None:
    live = LiveSettings(load_config(_write(tmp_path)))
    path = _write(tmp_path, listen={"allowed_hosts": ["proxy.internal"]})
    doc = yaml.safe_load(path.read_text())
    doc["log_level"] = "error"
    path.write_text(yaml.safe_dump(doc))
    root = logging.getLogger()
    before = root.level
    try:
        applied = reload(live, path)
        assert root.level == logging.ERROR
    finally:
        root.setLevel(before)
    assert applied is not None
    assert live.config is applied
    assert "proxy.internal" in live.policy.host_names


def test_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    live = LiveSettings(load_config(_write(tmp_path)))
    config, policy = live.config, live.policy
    path = _write(tmp_path, timeouts={"read": "soon"}, listen={"allowed_hosts": ["x.internal"]})
    assert reload(live, path) is None
    assert live.config is config
    assert live.policy is policy


def test_restart_needed_names_top_level_scalars(tmp_path: Path) -> None:
    running = load_config(_write(tmp_path))
    changed = replace(running, log_level="debug")
    assert restart_needed(running, changed) == ["log_level"]


KEYS = [{"key": "first-client-key-0123456789"}, {"key": "second-client-key-0123456789"}]


def test_client_keys_apply_live(tmp_path: Path) -> None:
    live = LiveSettings(load_config(_write(tmp_path, listen={"client_keys": KEYS[:1]})))
    path = _write(tmp_path, listen={"client_keys": KEYS[1:]})
    applied = reload(live, path)
    assert applied is not None
    assert [k.key.reveal() for k in applied.listen.client_keys] == [KEYS[1]["key"]]
    assert live.policy.keys.enabled
    assert restart_needed(applied, load_config(path)) == []


def test_keys_cannot_all_go_while_a_listener_is_beyond_loopback(tmp_path: Path) -> None:
    live = LiveSettings(load_config(_write(tmp_path, listen={"client_keys": KEYS})))
    live.keys_required = True
    config, policy = live.config, live.policy
    assert reload(live, _write(tmp_path, listen={"client_keys": []})) is None
    assert (live.config, live.policy) == (config, policy)
    # Without a listener beyond loopback, keys are optional and may go.
    live.keys_required = False
    applied = reload(live, _write(tmp_path, listen={"client_keys": []}))
    assert applied is not None
    assert not live.policy.keys.enabled


def test_tls_files_apply_live_but_turning_tls_on_needs_a_restart(tmp_path: Path) -> None:
    for name in ("a.pem", "a.key", "b.pem", "b.key"):
        (tmp_path / name).write_text("PEM")
    plain = load_config(_write(tmp_path))
    first = load_config(_write(tmp_path, listen={"tls_cert": "a.pem", "tls_key": "a.key"}))
    second = load_config(_write(tmp_path, listen={"tls_cert": "b.pem", "tls_key": "b.key"}))
    applied = applicable(first, second)
    assert (applied.listen.tls_cert, applied.listen.tls_key) == (
        tmp_path / "b.pem",
        tmp_path / "b.key",
    )
    turned_on = applicable(plain, first)
    assert turned_on.listen.tls_cert is None
    assert "listen.tls_cert" in restart_needed(turned_on, first)
    turned_off = applicable(first, plain)
    assert turned_off.listen.tls_cert == tmp_path / "a.pem"
    assert "listen.tls_cert" in restart_needed(turned_off, plain)
