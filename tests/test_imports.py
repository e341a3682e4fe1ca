"""What each way of running the proxy imports: nothing its mode does not use.

Every module imported costs each process its memory for good (cryptography alone is
~5 MiB of RSS), so what a mode never uses is imported where it is used. Checked in a
fresh interpreter, on `sys.modules` (names are stable; byte counts are not).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.processes import free_port, http_get, stop, wait_for
from tests.upstreams import dead_port

REPO_ROOT = Path(__file__).resolve().parents[1]
# Runs `proxy.cli.main(argv)` and, at exit, writes the names of every imported module.
RECORDING_MAIN = """
import atexit, json, sys
out, argv = sys.argv[1], sys.argv[2:]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
from proxy.cli import main
sys.exit(main(argv))
"""
# Never needed to serve in API-key mode: the token store, its crypto and Redis, the
# token commands, the sandbox, the refresh helper's own side.
NOT_FOR_API_KEY_MODE = (
    "cryptography",
    "redis",
    "proxy.cli_tokens",
    "proxy.store.file",
    "proxy.store.files",
    "proxy.store.redis",
    "proxy.sandbox",
    "proxy.lifecycle.exchanger",
)


def _api_key_config(path: Path, *, port: int, api_url: str) -> Path:
    doc = {
        "listen": {"host": "127.0.0.1", "port": port},
        "pleo": {"api_url": api_url, "api_key": "test-api-key"},
        "tokens": {"path": str(path.parent / "tokens.enc"), "key_file": str(path.parent / "k")},
        "timeouts": {"shutdown": 2, "connect": 2},
    }
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def _recording(out: Path, *argv: str) -> list[str]:
    return [sys.executable, "-c", RECORDING_MAIN, str(out), *argv]


def _run(command: list[str]) -> str:
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def _found(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(f"{n}.") for n in names))


def test_serving_in_api_key_mode_imports_no_store_crypto_or_token_commands(
    tmp_path: Path,
) -> None:
    port = free_port()
    out = tmp_path / "modules.json"
    with dead_port() as upstream_port:
        config = _api_key_config(
            tmp_path / "c.yaml", port=port, api_url=f"http://127.0.0.1:{upstream_port}"
        )
        proc = subprocess.Popen(
            _recording(out, "run", "--config", str(config)),
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/_proxy/readyz")
            # One forwarded request: whatever the request path imports late, it has now.
            status, _ = http_get(f"http://127.0.0.1:{port}/v1/expenses")
            assert status == 502
        finally:
            stop(proc)
    assert proc.returncode == 0
    modules = set(json.loads(out.read_text()))
    assert "proxy.http.forward" in modules  # it did serve
    assert _found(modules, NOT_FOR_API_KEY_MODE) == []


def test_check_config_imports_no_http_stack_lifecycle_or_store(tmp_path: Path) -> None:
    config = _api_key_config(tmp_path / "c.yaml", port=8080, api_url="https://example.org")
    out = tmp_path / "modules.json"
    _run(_recording(out, "check-config", "--config", str(config)))
    modules = set(json.loads(out.read_text()))
    assert "proxy.config" in modules
    unused = ("aiohttp", "cryptography", "proxy.http", "proxy.lifecycle", "proxy.store")
    assert _found(modules, unused) == []


def test_refresh_helper_imports_no_server_metrics_or_yaml() -> None:
    # The helper (one per serving process in OAuth mode) makes token requests only.
    code = "import json, sys, proxy.lifecycle.exchanger; print(json.dumps(sorted(sys.modules)))"
    modules = set(json.loads(_run([sys.executable, "-c", code])))
    assert "proxy.lifecycle.exchanger" in modules
    unused = ("aiohttp.web", "prometheus_client", "yaml", "proxy.http", "proxy.connect")
    assert _found(modules, unused) == []
