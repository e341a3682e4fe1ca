"""The connection commands as a user runs them: `--connection`, `connect`, bulk imports."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp

from proxy.config import Config
from proxy.tokenset import TokenSet
from tests.connections import (
    connections_config,
    distinct_companies,
    get_json,
    serving,
    url_of,
    write_connections_config,
)
from tests.flows import grant_tokens
from tests.processes import cli
from tests.sandboxes import RunningSandbox, get_stats, sandbox

__all__ = ["sandbox"]

BULK = 1000


def token_doc(tokens: TokenSet, **extra: object) -> dict[str, object]:
    return {
        "access_token": tokens.access_token.reveal(),
        "refresh_token": tokens.refresh_token.reveal() if tokens.refresh_token else None,
        "expires_in": max(1, int(tokens.expires_at - time.time())),
        **extra,
    }


def setup(sandbox: RunningSandbox, tmp_path: Path, **kwargs: object) -> tuple[Config, Path]:
    config = connections_config(sandbox.url, tmp_path, **kwargs)  # type: ignore[arg-type]
    return config, write_connections_config(tmp_path / "c.yaml", config)


async def test_a_thousand_connections_imported_in_one_call_each_serve_by_header(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config, config_file = setup(sandbox, tmp_path)
    await distinct_companies(sandbox.url, config)
    grants = [await grant_tokens(config, now=time.time()) for _ in range(BULK)]
    lines = [json.dumps(token_doc(t, connection=f"c{i:04d}")) for i, t in enumerate(grants)]
    code, out, err = await asyncio.to_thread(
        cli, "import-tokens", "--config", str(config_file), stdin="\n".join(lines).encode()
    )
    assert code == 0, err
    assert f"{BULK} connection" in out
    async with serving(config), aiohttp.ClientSession() as session:
        semaphore = asyncio.Semaphore(32)

        async def subject(i: int) -> str:
            async with semaphore:
                headers = {"X-Pleo-Connection": f"c{i:04d}"}
                status, body = await get_json(
                    session, f"{url_of(config)}/v1/introspect", headers=headers
                )
            assert status == 200, body
            return str(body["data"]["subjectURN"])

        subjects = await asyncio.gather(*(subject(i) for i in range(BULK)))
    assert len(set(subjects)) == BULK, "each connection carried its own grant"
    assert (await get_stats(sandbox.url))["refresh_grants"] == 0


async def test_bad_lines_are_reported_by_number_and_nothing_is_imported(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config, config_file = setup(sandbox, tmp_path)
    good = token_doc(await grant_tokens(config, now=time.time()), connection="good")
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "connection": "Bad Name"}),
        json.dumps({"connection": "nofields"}),
        "",
        json.dumps([1, 2]),
    ]
    code, _, err = cli(
        "import-tokens", "--config", str(config_file), stdin="\n".join(lines).encode()
    )
    assert code == 2
    for number in (2, 3, 4, 6):
        assert f"line {number}:" in err
    assert "line 1:" not in err
    assert "nothing was imported" in err
    assert str(good["access_token"]) not in err
    code, out, _ = cli("status", "--config", str(config_file))
    assert json.loads(out) == {"connections": []}
    duplicate = "\n".join([json.dumps(good), json.dumps(good)]).encode()
    code, _, err = cli("import-tokens", "--config", str(config_file), stdin=duplicate)
    assert code == 2
    assert "twice" in err


async def test_connection_flag_on_every_token_command(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    config, config_file = setup(sandbox, tmp_path, names=[("acme", None)])
    tokens = await grant_tokens(config, now=time.time())
    base = ("--config", str(config_file))
    doc = json.dumps(token_doc(tokens)).encode()
    assert cli("import-tokens", "--connection", "acme", *base, stdin=doc)[0] == 0
    code, out, _ = cli("token", "--connection", "acme", *base)
    assert (code, out.strip()) == (0, tokens.access_token.reveal())
    code, out, _ = cli("status", "--connection", "acme", *base)
    assert json.loads(out)["state"] == "authorised"
    assert tokens.access_token.reveal() not in out
    code, out, err = cli("authorize-url", "--connection", "acme", *base)
    assert code == 1
    assert "already authorised" in err
    assert cli("logout", "--connection", "acme", *base)[0] == 0
    code, out, _ = cli("status", "--connection", "acme", *base)
    assert json.loads(out)["state"] == "unauthorised"
    for command in ("token", "status", "logout", "authorize-url", "import-tokens"):
        code, _, err = cli(command, "--connection", "Not/Valid", *base, stdin=doc)
        assert code == 2, command
        assert "invalid connection name" in err
    code, _, err = cli("token", "--connection", "nosuch", *base)
    assert code == 1
    assert "no connection named 'nosuch'" in err


async def test_connect_prints_a_link_and_refuses_a_foreign_return_to(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    _, config_file = setup(sandbox, tmp_path, return_to_origins=("https://app.example.com",))
    base = ("--config", str(config_file))
    code, out, err = cli("connect", "newco", *base, "--return-to", "https://app.example.com/done")
    assert code == 0, err
    link = out.strip()
    assert "/_proxy/authorize?connection=newco&setup=" in link
    assert "created" in err
    code, again, _ = cli("connect", "newco", *base)
    assert code == 0
    assert again.strip() != link, "a new link replaces the old one"
    code, _, err = cli("connect", "newco", *base, "--return-to", "https://evil.example/x")
    assert code == 2
    assert "return_to" in err
    code, _, err = cli("connect", "Bad", *base)
    assert code == 2
    code, out, _ = cli("status", *base)
    assert [c["name"] for c in json.loads(out)["connections"]] == ["newco"]
    code, _, err = cli("authorize-url", "--connection", "newco", *base)
    assert code == 1
    assert "pleo-proxy connect newco" in err
