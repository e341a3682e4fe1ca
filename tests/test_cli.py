"""`pleo-proxy` subcommands as a user runs them: real processes, exit codes, output."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from proxy.config import load_config
from proxy.store.file import FileStore
from proxy.tokenset import TokenSet
from tests.flows import grant_tokens, sandbox_config
from tests.processes import cli, write_config
from tests.sandboxes import RunningSandbox, get_stats, sandbox

__all__ = ["sandbox"]


def test_check_config_reports_every_problem_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "listen: {port: 70000}\n"
        "pleo: {environment: prod, client_id: x, client_secret: hunter2-secret}\n"
        "tokens: {pathh: /tmp/x}\n"
    )
    code, out, err = cli("check-config", "--config", str(config))
    assert code == 2
    lines = err.strip().splitlines()
    assert any(line.startswith("listen.port: ") for line in lines)
    assert any(line.startswith("pleo.environment: ") for line in lines)
    assert any(line.startswith("tokens.pathh: unknown key") for line in lines)
    assert "hunter2-secret" not in out + err


def test_check_config_accepts_the_example(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "config.example.yaml"
    env = {"PLEO_CLIENT_ID": "id", "PLEO_CLIENT_SECRET": "secret"}
    code, out, _ = cli("check-config", "--config", str(example), env=env)
    assert code == 0
    assert "OK" in out


def test_run_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("listen: [1, 2]\n")
    code, _, err = cli("run", "--config", str(config))
    assert code == 2
    assert err.startswith("listen: ")


def _sandbox_config_file(sandbox: RunningSandbox, tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "c.yaml", sandbox_url=sandbox.url, port=18080, state_dir=tmp_path / "state"
    )


async def _import_granted(
    sandbox: RunningSandbox, config_file: Path, *, expires_in: int
) -> tuple[TokenSet, str]:
    """Tokens from the sandbox, stored with `pleo-proxy import-tokens`; (tokens, its output)."""
    state = config_file.parent / "state"
    tokens = await grant_tokens(sandbox_config(sandbox.url, state), now=time.time())
    assert tokens.refresh_token is not None
    doc = {
        "access_token": tokens.access_token.reveal(),
        "refresh_token": tokens.refresh_token.reveal(),
        "expires_in": expires_in,
        "scope": "users:read",
    }
    code, out, err = cli(
        "import-tokens", "--config", str(config_file), stdin=json.dumps(doc).encode()
    )
    assert code == 0, err
    return tokens, out + err


async def test_status_token_logout_round(sandbox: RunningSandbox, tmp_path: Path) -> None:
    config_file = _sandbox_config_file(sandbox, tmp_path)
    code, out, _ = cli("status", "--config", str(config_file))
    assert code == 0
    assert json.loads(out)["state"] == "unauthorised"

    tokens, printed = await _import_granted(sandbox, config_file, expires_in=600)
    assert tokens.refresh_token is not None
    assert tokens.access_token.reveal() not in printed

    code, out, _ = cli("status", "--config", str(config_file))
    status = json.loads(out)
    assert status["state"] == "authorised"
    assert set(status) >= {
        "state",
        "expires_at",
        "scopes",
        "subject",
        "last_refresh",
        "refresh_count",
    }
    assert tokens.access_token.reveal() not in out
    assert tokens.refresh_token.reveal() not in out

    code, out, _ = cli("token", "--config", str(config_file))
    assert code == 0
    assert out.strip() == tokens.access_token.reveal()

    code, _, err = cli("authorize-url", "--config", str(config_file))
    assert code == 1
    assert "already authorised" in err

    code, out, _ = cli("logout", "--config", str(config_file))
    assert code == 0
    assert await FileStore.from_config(load_config(config_file)).load() is None
    code, out, _ = cli("status", "--config", str(config_file))
    assert json.loads(out)["state"] == "unauthorised"


async def test_token_refreshes_an_expired_token(sandbox: RunningSandbox, tmp_path: Path) -> None:
    config_file = _sandbox_config_file(sandbox, tmp_path)
    tokens, _ = await _import_granted(sandbox, config_file, expires_in=1)
    await asyncio.sleep(1.1)
    # In a thread: the sandbox answers from this test's event loop.
    code, out, err = await asyncio.to_thread(cli, "token", "--config", str(config_file))
    assert code == 0, err
    assert out.strip() not in ("", tokens.access_token.reveal())
    assert (await get_stats(sandbox.url))["refresh_grants"] == 1


def test_import_tokens_rejects_bad_json(tmp_path: Path) -> None:
    config_file = write_config(
        tmp_path / "c.yaml", sandbox_url="http://127.0.0.1:9", port=18080, state_dir=tmp_path
    )
    code, _, err = cli("import-tokens", "--config", str(config_file), stdin=b"{not json")
    assert code == 2
    assert "not JSON" in err
    code, _, err = cli("import-tokens", "--config", str(config_file), stdin=b'{"expires_in": 5}')
    assert code == 2
    assert not (tmp_path / "tokens.enc").exists()


async def test_rotate_key_reseals_under_a_new_key(sandbox: RunningSandbox, tmp_path: Path) -> None:
    config_file = _sandbox_config_file(sandbox, tmp_path)
    state = config_file.parent / "state"
    tokens, _ = await _import_granted(sandbox, config_file, expires_in=600)
    old_key = (state / "tokens.key").read_bytes()
    code, out, err = cli("rotate-key", "--config", str(config_file))
    assert code == 0, err
    assert "re-sealed under key" in out
    assert (state / "tokens.key").read_bytes() != old_key
    code, out, _ = cli("token", "--config", str(config_file))
    assert code == 0
    assert out.strip() == tokens.access_token.reveal()


def test_rotate_key_refuses_the_redis_store(tmp_path: Path) -> None:
    config_file = write_config(
        tmp_path / "c.yaml",
        sandbox_url="http://127.0.0.1:9",
        port=18080,
        state_dir=tmp_path,
        tokens={"store": "redis", "redis_url": "redis://127.0.0.1:9/0"},
    )
    code, _, err = cli("rotate-key", "--config", str(config_file))
    assert code == 2
    assert "tokens.store: file only" in err
    assert not (tmp_path / "tokens.key").exists()
