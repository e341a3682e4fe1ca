"""A running `pleo-proxy run`: SIGHUP reloads, and start-up failures are one clear line."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.certs import make_ca
from tests.processes import PLEO_PROXY, free_port, start_proxy, stop, wait_for, write_config

DEAD_SANDBOX = "http://127.0.0.1:9"


def _status_for_host(port: int, host: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/_proxy/healthz", headers={"Host": host}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


def _edit(path: Path, **sections: dict[str, Any]) -> None:
    doc = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(doc))


@pytest.fixture
def running(tmp_path: Path) -> Any:
    port = free_port()
    config = write_config(
        tmp_path / "proxy.yaml", sandbox_url=DEAD_SANDBOX, port=port, state_dir=tmp_path / "st"
    )
    proc = start_proxy(config)
    try:
        wait_for(f"http://127.0.0.1:{port}/_proxy/healthz")
        yield proc, config, port
    finally:
        stop(proc)


def test_sighup_applies_allowed_hosts_live(running: Any) -> None:
    proc, config, port = running
    assert _status_for_host(port, "proxy.internal") == 421
    _edit(config, listen={"allowed_hosts": ["proxy.internal"]})
    proc.send_signal(signal.SIGHUP)
    _until(lambda: _status_for_host(port, "proxy.internal") == 200)
    assert proc.poll() is None


def test_a_bad_new_config_keeps_the_old_one(running: Any) -> None:
    proc, config, port = running
    _edit(config, listen={"allowed_hosts": ["proxy.internal"]})
    proc.send_signal(signal.SIGHUP)
    _until(lambda: _status_for_host(port, "proxy.internal") == 200)
    _edit(config, listen={"allowed_hosts": ["other.internal"]}, timeouts={"read": "soon"})
    proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)  # a reload that went through would now refuse proxy.internal
    assert proc.poll() is None
    assert _status_for_host(port, "proxy.internal") == 200
    assert _status_for_host(port, "other.internal") == 421


def test_a_listener_change_needs_a_restart_and_keeps_serving(running: Any) -> None:
    proc, config, port = running
    other = free_port()
    _edit(config, listen={"port": other, "allowed_hosts": ["proxy.internal"]})
    proc.send_signal(signal.SIGHUP)
    # The live part applies; the listener stays where it was.
    _until(lambda: _status_for_host(port, "proxy.internal") == 200)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", other), timeout=1).close()
    assert proc.poll() is None


def _start_failure(config: Path) -> tuple[int, list[str]]:
    done = subprocess.run(
        [*PLEO_PROXY, "run", "--config", str(config), "--log-format", "json"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr
    return done.returncode, [line for line in stderr.splitlines() if line.startswith("error:")]


def _config(tmp_path: Path, port: int | None = None, **tokens: str) -> Path:
    config = write_config(
        tmp_path / "proxy.yaml",
        sandbox_url=DEAD_SANDBOX,
        port=port or free_port(),
        state_dir=tmp_path / "st",
    )
    if tokens:
        _edit(config, tokens=tokens)
    return config


def test_port_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, errors = _start_failure(_config(tmp_path, port))
    assert code == 1
    assert errors == [f"error: cannot listen on 127.0.0.1:{port}: address already in use"]
    assert not (tmp_path / "st").exists()  # refused before the store was touched


def test_corrupt_token_file(tmp_path: Path) -> None:
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "tokens.enc").write_bytes(b"\x00garbage")
    code, errors = _start_failure(_config(tmp_path))
    assert code == 1
    assert len(errors) == 1
    assert "tokens.enc" in errors[0]


def test_bad_key(tmp_path: Path) -> None:
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "tokens.key").write_text("not base64 at all!")
    code, errors = _start_failure(_config(tmp_path))
    assert code == 1
    assert len(errors) == 1
    assert "tokens.key" in errors[0]


def test_unusable_state_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = _config(
        tmp_path, path=str(blocker / "tokens.enc"), key_file=str(blocker / "tokens.key")
    )
    code, errors = _start_failure(config)
    assert code == 1
    assert len(errors) == 1
    assert "a-file" in errors[0]


def test_beyond_loopback_without_client_keys(tmp_path: Path) -> None:
    port = free_port()
    config = _config(tmp_path, port)
    _edit(config, listen={"host": "0.0.0.0"})  # noqa: S104
    code, errors = _start_failure(config)
    assert code == 1
    assert errors == [
        f"error: listening on 0.0.0.0:{port}, beyond loopback, needs listen.client_keys:"
        " without them anyone who reaches the port uses the Pleo connections"
    ]
    assert not (tmp_path / "st").exists()  # refused before the store was touched


def test_a_tls_key_that_is_not_the_certificates(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    one, other = ca.issue(tmp_path, "one"), ca.issue(tmp_path, "other")
    config = _config(tmp_path)
    _edit(config, listen={"tls_cert": str(one.cert), "tls_key": str(other.key)})
    code, errors = _start_failure(config)
    assert code == 1
    assert errors == [
        f"error: cannot use listen.tls_cert {str(one.cert)!r} with listen.tls_key"
        f" {str(other.key)!r}: the key does not belong to the certificate"
    ]
    assert not (tmp_path / "st").exists()
