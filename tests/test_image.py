"""The container image: `scripts/build-image` on a debootstrapped Debian base, and the image
run the way the README runs it (read-only root, non-root, config mounted, state in a
volume) against the sandbox on the host.

Real podman and debootstrap; when either is missing the test fails, never skips
(`apt-get install podman runc debootstrap`, as scripts/test does). The base's root
filesystem is cached in BASE_CACHE: the first run spends a minute or more in debootstrap.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.flows import grant_tokens, sandbox_config
from tests.processes import (
    PLEO_PROXY,
    free_port,
    http_get,
    import_tokens,
    sandbox_process,
    start_proxy,
    stop,
    wait_for,
    write_config,
)
from tests.upstreams import dead_port

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[1]
BUILD_IMAGE = ROOT / "scripts" / "build-image"
HEALTHCHECK = ROOT / "image" / "healthcheck.py"
BASE_CACHE = Path("/var/tmp/pleo-proxy-image-base")
SUITE = "bookworm"  # python3 3.11.2: the oldest python the image supports
# No python3-venv: the image's venv is made without pip, and this proves it needs no ensurepip.
PACKAGES = ("python3", "ca-certificates")
FALLBACK_MIRROR = "http://deb.debian.org/debian"
APT_SOURCES = Path("/etc/apt")
CONFIG_IN_IMAGE = "/etc/pleo-proxy/config.yaml"
STATE_IN_IMAGE = "/var/lib/pleo-proxy"
HEALTHCHECK_IN_IMAGE = ("/opt/pleo-proxy/bin/python3", "/opt/pleo-proxy/healthcheck.py")
# crun and podman's default rlimits are refused on the CI machines; runc and small limits
# work everywhere podman does. CONTAINERS_CONF reaches scripts/build-image's podman too.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
"""
DEBOOTSTRAP_TIMEOUT = 600.0
BUILD_TIMEOUT = 600.0
PODMAN_TIMEOUT = 120.0


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: apt-get install podman runc debootstrap")
    return path


def debian_mirror() -> str:
    """The mirror apt already uses for SUITE (deb822 .sources or one-line .list files)."""
    for uri, suites in _apt_sources():
        if SUITE in suites:
            return uri
    return FALLBACK_MIRROR


def _apt_sources() -> Iterator[tuple[str, list[str]]]:
    for path in sorted((APT_SOURCES / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, list[str]] = {}
            for line in stanza.splitlines():
                key, colon, value = line.partition(":")
                if colon and not line.startswith(("#", " ", "\t")):
                    fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"]:
                yield from ((uri, fields.get("suites", [])) for uri in fields.get("uris", []))
    lists = [APT_SOURCES / "sources.list", *sorted((APT_SOURCES / "sources.list.d").glob("*.list"))]
    for path in lists:
        for line in path.read_text().splitlines() if path.exists() else []:
            words = line.split("#", 1)[0].split()
            if words[:1] != ["deb"]:
                continue
            words = words[1:]
            if words and words[0].startswith("["):  # [arch=… signed-by=…]
                while words and not words[0].endswith("]"):
                    words = words[1:]
                words = words[1:]
            if len(words) >= 2:
                yield words[0], [words[1]]


def _mounts_under(path: Path) -> list[str]:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    inside = [line.split()[1] for line in mounts if line.split()[1].startswith(f"{path}/")]
    return sorted(inside, key=len, reverse=True)


def _remove_rootfs(path: Path) -> None:
    """rm -r a (half-)debootstrapped tree, never following a mount left in it into the host."""
    for mount in _mounts_under(path):
        subprocess.run(["umount", "--lazy", mount], timeout=30, check=False)
    assert _mounts_under(path) == [], f"still mounted under {path}; remove it by hand"
    shutil.rmtree(path, ignore_errors=True)


def base_tarball() -> Path:
    """A tarball of a minimal SUITE with python3, made once per mirror and package set."""
    mirror = debian_mirror()
    key = hashlib.sha256(f"{SUITE} minbase {','.join(PACKAGES)} {mirror}".encode()).hexdigest()
    cache = BASE_CACHE / key[:16]
    tarball = cache / "rootfs.tar"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits instead of debootstrapping too
        if tarball.exists():
            return tarball
        for stale in cache.glob("rootfs.*"):  # from a run that was killed; none is running
            if stale.is_dir():
                _remove_rootfs(stale)
            else:
                stale.unlink()
        _debootstrap(cache / "rootfs.new", mirror, tarball)
    return tarball


def _debootstrap(rootfs: Path, mirror: str, tarball: Path) -> None:
    include = f"--include={','.join(PACKAGES)}"
    command = [require("debootstrap"), "--variant=minbase", include, SUITE, str(rootfs), mirror]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT, check=False
        )
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-3000:]}{done.stderr}"
        partial = tarball.with_name("rootfs.tar.new")
        subprocess.run(
            ["tar", "-C", str(rootfs), "-c", "-f", str(partial), "."], timeout=300, check=True
        )
        partial.replace(tarball)  # only a complete tarball is ever found
    finally:
        _remove_rootfs(rootfs)


class Podman:
    """podman with this machine's runtime settings; every call bounded in time."""

    def __init__(self, conf: Path) -> None:
        self.binary = require("podman")
        require("runc")
        require("debootstrap")  # even with a cached base: a fresh machine needs it
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(
        self, *args: str, stdin: str = "", check: bool = True, timeout: float = PODMAN_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.binary, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
        return done


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    return Podman(tmp_path_factory.mktemp("podman") / "containers.conf")


@pytest.fixture(scope="module")
def image(podman: Podman) -> Iterator[str]:
    """The image built by scripts/build-image on a fresh Debian base; both removed after."""
    suffix = uuid.uuid4().hex[:10]
    base, tag = f"localhost/pleo-proxy-test-base:{suffix}", f"localhost/pleo-proxy-test:{suffix}"
    assert os.access(BUILD_IMAGE, os.X_OK), f"{BUILD_IMAGE} is not executable"
    try:
        podman("import", str(base_tarball()), base)
        built = subprocess.run(
            [sys.executable, str(BUILD_IMAGE), "--base", base, "--tag", tag],
            capture_output=True,
            text=True,
            env=podman.env,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        assert built.returncode == 0, built.stderr[-4000:]
        yield tag
    finally:
        podman("rmi", "--force", tag, base, check=False)


def test_image_runs_as_a_numeric_non_root_user_without_a_shell(podman: Podman, image: str) -> None:
    config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    health = json.loads(
        podman("image", "inspect", "--format", "{{json .HealthCheck}}", image).stdout
    )
    uid, _, gid = config["User"].partition(":")
    assert uid.isdigit()  # Kubernetes' runAsNonRoot can only check a number
    assert int(uid) != 0
    assert gid.isdigit()
    assert config["Entrypoint"] == ["/opt/pleo-proxy/bin/pleo-proxy"]
    assert config["Cmd"] == ["run", "--config", CONFIG_IN_IMAGE]
    assert f"STATE_DIRECTORY={STATE_IN_IMAGE}" in config["Env"]
    assert list(config["Volumes"]) == [STATE_IN_IMAGE]
    assert health["Test"] == ["CMD", *HEALTHCHECK_IN_IMAGE, CONFIG_IN_IMAGE]  # exec: no sh -c


def _proxy_config(path: Path, *, sandbox_url: str, port: int) -> Path:
    """A config with no paths in it: the tokens default into $STATE_DIRECTORY."""
    doc = {
        "listen": {"host": "127.0.0.1", "port": port},
        "pleo": {
            "environment": "sandbox",
            "api_url": sandbox_url,
            "authorize_url": f"{sandbox_url}/oauth/authorize",
            "token_url": f"{sandbox_url}/oauth/token",
            "client_id": "sandbox-client",
            "client_secret": "${PLEO_CLIENT_SECRET}",
            "scopes": ["users:read", "test:test"],
            "redirect_uri": f"http://localhost:{port}/_proxy/callback",
        },
        "timeouts": {"token_request": 5, "connect": 2, "shutdown": 5},
    }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o644)  # read by the image's user, not root
    return path


def _tokens_json(sandbox_url: str, state_dir: Path) -> str:
    tokens = asyncio.run(grant_tokens(sandbox_config(sandbox_url, state_dir), now=time.time()))
    assert tokens.refresh_token is not None
    return json.dumps(
        {
            "access_token": tokens.access_token.reveal(),
            "refresh_token": tokens.refresh_token.reveal(),
            "expires_in": max(1, int(tokens.expires_at - time.time())),
            "token_type": "Bearer",
            "scope": " ".join(tokens.scopes),
        }
    )


def _in_container(podman: Podman, name: str, code: str) -> subprocess.CompletedProcess[str]:
    """`python3 -c code` in the running container (the image has no shell to call on)."""
    return podman("exec", name, "python3", "-c", code, check=False, timeout=30)


@contextmanager
def _serving(podman: Podman, image: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The image serving on the host's loopback with imported tokens: (its URL, container)."""
    port = free_port()
    suffix = uuid.uuid4().hex[:10]
    container, volume = f"pleo-proxy-test-{suffix}", f"pleo-proxy-test-state-{suffix}"
    with sandbox_process() as sandbox_url:
        config = _proxy_config(tmp_path / "config.yaml", sandbox_url=sandbox_url, port=port)
        flags = [
            "--read-only",
            "--read-only-tmpfs=false",  # no writable /tmp or /run either, as in Kubernetes
            "--network=host",  # the sandbox and our client are on the host's 127.0.0.1
            f"--volume={config}:{CONFIG_IN_IMAGE}:ro",
            f"--volume={volume}:{STATE_IN_IMAGE}",
            "--env=PLEO_CLIENT_SECRET=sandbox-secret",
        ]
        try:
            podman("volume", "create", volume)
            tokens = _tokens_json(sandbox_url, tmp_path)
            importing = ["import-tokens", "--config", CONFIG_IN_IMAGE]
            podman("run", "--rm", "--interactive", *flags, image, *importing, stdin=tokens)
            podman("run", "--detach", f"--name={container}", *flags, image)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_for(f"{url}/_proxy/healthz", timeout=60)
            except TimeoutError as exc:
                logs = podman("logs", container, check=False)
                raise AssertionError(f"{exc}\n{logs.stdout}{logs.stderr}") from None
            yield url, container
        finally:
            podman("rm", "--force", "--time=0", container, check=False)
            podman("volume", "rm", "--force", volume, check=False)


def test_image_serves_from_a_read_only_root_as_non_root(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    with _serving(podman, image, tmp_path) as (url, container):
        assert http_get(f"{url}/_proxy/readyz")[0] == 200  # the tokens, from the volume
        status, body = http_get(f"{url}/v1/introspect")
        assert status == 200, body

        ids = _in_container(podman, container, "import os; print(os.getuid(), os.getgid())")
        uid, gid = (int(n) for n in ids.stdout.split())
        assert uid != 0
        assert gid != 0
        code = f"import json, os; print(json.dumps(os.listdir({STATE_IN_IMAGE!r})))"
        listing = _in_container(podman, container, code)
        assert {"tokens.enc", "tokens.key"} <= set(json.loads(listing.stdout))
        for path in ("/opt/pleo-proxy/x", "/tmp/x"):
            write = _in_container(podman, container, f"open({path!r}, 'w')")
            assert "Read-only file system" in write.stderr, path

        health = podman("healthcheck", "run", container, check=False, timeout=60)
        assert health.returncode == 0, health.stdout + health.stderr
        # The README's Kubernetes readiness probe: the same script, exec'd, on readyz.
        ready = [*HEALTHCHECK_IN_IMAGE, CONFIG_IN_IMAGE, "/_proxy/readyz"]
        probe = podman("exec", container, *ready, check=False, timeout=30)
        assert probe.returncode == 0, probe.stderr

        podman("stop", "--time=10", container, timeout=60)
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", container).stdout
        assert exit_code.strip() == "0"  # SIGTERM drained and exited, not killed


def _healthcheck(config: Path, env: dict[str, str], *path: str) -> subprocess.CompletedProcess[str]:
    """The script the image's HEALTHCHECK runs, run here on the host."""
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), str(config), *path],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=30,
        check=False,
    )


def test_healthcheck_fails_when_nothing_listens_or_the_config_is_bad(tmp_path: Path) -> None:
    with dead_port() as port:
        config = _proxy_config(
            tmp_path / "config.yaml", sandbox_url="http://127.0.0.1:1", port=port
        )
        refused = _healthcheck(config, {"PLEO_CLIENT_SECRET": "s"})
    assert refused.returncode == 1
    assert refused.stderr.startswith("unhealthy: ")
    unset = _healthcheck(config, {"PLEO_CLIENT_SECRET": ""})  # ${PLEO_CLIENT_SECRET}: unset
    assert unset.returncode == 1
    assert unset.stderr.startswith(f"unhealthy: {config}: pleo.client_secret")
    forwarded = _healthcheck(config, {"PLEO_CLIENT_SECRET": "s"}, "/v1/introspect")
    assert forwarded.returncode == 1  # only the proxy's own paths: never a call to Pleo
    assert "/_proxy/" in forwarded.stderr


def test_healthcheck_passes_on_healthz_and_fails_on_readyz_before_authorising(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = _proxy_config(tmp_path / "config.yaml", sandbox_url="http://127.0.0.1:1", port=port)
    env = {"PLEO_CLIENT_SECRET": "s", "STATE_DIRECTORY": str(tmp_path)}
    proxy = subprocess.Popen(
        [*PLEO_PROXY, "run", "--config", str(config)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/_proxy/healthz")
        assert _healthcheck(config, env).returncode == 0
        unready = _healthcheck(config, env, "/_proxy/readyz")
        assert unready.returncode == 1
        assert unready.stderr.endswith("answered 503\n")
    finally:
        stop(proxy)


def test_healthcheck_presents_a_client_key_where_keys_are_configured(tmp_path: Path) -> None:
    key = f"probe-key-{uuid.uuid4().hex}"
    limited = f"limited-key-{uuid.uuid4().hex}"
    key_file = tmp_path / "client.key"
    key_file.write_text(f"{key}\n")
    with sandbox_process() as sandbox_url:
        port = free_port()
        state = tmp_path / "state"
        # The first key may use another connection only: refused on the process-wide readyz.
        keys = [{"key": limited, "connections": ["other"]}, {"key_file": str(key_file)}]
        config = write_config(
            tmp_path / "config.yaml",
            sandbox_url=sandbox_url,
            port=port,
            state_dir=state,
            listen={"client_keys": keys},
        )
        proxy = start_proxy(config)
        try:
            readyz = f"http://127.0.0.1:{port}/_proxy/readyz"
            wait_for(f"http://127.0.0.1:{port}/_proxy/healthz")  # exempt from keys
            # What the probe sent before it presented a key, and what it got.
            assert http_get(readyz)[0] == 401
            unready = _healthcheck(config, {}, "/_proxy/readyz")
            assert unready.returncode == 1
            assert unready.stderr.endswith("answered 503\n"), "past the key: not yet authorised"
            tokens = asyncio.run(grant_tokens(sandbox_config(sandbox_url, state), now=time.time()))
            import_tokens(config, tokens)
            deadline = time.monotonic() + 10
            while (ready := _healthcheck(config, {}, "/_proxy/readyz")).returncode != 0:
                assert time.monotonic() < deadline, ready.stderr
                time.sleep(0.2)
            assert http_get(readyz)[0] == 401, "still refused without a key"
        finally:
            stop(proxy)
    for run in (unready, ready):
        assert key not in run.stdout + run.stderr
        assert limited not in run.stdout + run.stderr
