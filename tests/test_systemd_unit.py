"""The systemd units: `systemd-analyze verify` is clean, the exposure score stays low, and
the unit agrees with the code (credential names, the CLI it starts)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from proxy.cli import HELPER_GRACE
from proxy.config import Timeouts
from proxy.store.crypto import CREDENTIAL_NAME

REPO_ROOT = Path(__file__).resolve().parents[1]
UNIT_DIR = REPO_ROOT / "systemd"
SERVICE = UNIT_DIR / "pleo-proxy.service"
SOCKET = UNIT_DIR / "pleo-proxy.socket"
INSTALLED_BINARY = "/usr/local/bin/pleo-proxy"
MAX_EXPOSURE = 2.0
ANALYZE_TIMEOUT = 60.0
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def directives(unit: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; keys may repeat, so no configparser."""
    section, found = "", []
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(unit: Path, key: str) -> list[str]:
    return [value for _, k, value in directives(unit) if k == key]


def installable_copy(tmp_path: Path) -> Path:
    """The units in tmp_path, ExecStart pointing at the pleo-proxy installed here.

    `verify` refuses an ExecStart binary that does not exist, and /usr/local/bin is
    not ours to write in a test; everything else is verified as shipped. The
    LoadCredential= sources in /etc need no rewrite: verify does not open them (they
    are read only when the service starts).
    """
    binary = shutil.which("pleo-proxy")
    assert binary is not None, "pleo-proxy is not installed (pip install -e .)"
    text = SERVICE.read_text()
    assert INSTALLED_BINARY in text
    service = tmp_path / SERVICE.name
    service.write_text(text.replace(INSTALLED_BINARY, str(Path(binary).resolve())))
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    return service


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool is not None, "systemd-analyze is missing: apt-get install systemd"
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=ANALYZE_TIMEOUT, check=False
    )


def verify_problems(unit: Path) -> str:
    """Everything `systemd-analyze verify` complains about; "" for a clean unit."""
    result = analyze("verify", str(unit))
    problems = (result.stdout + result.stderr).strip()
    return problems or ("" if result.returncode == 0 else f"exit {result.returncode}")


def test_service_unit_verifies_cleanly(tmp_path: Path) -> None:
    assert verify_problems(installable_copy(tmp_path)) == ""


def test_socket_unit_verifies_cleanly(tmp_path: Path) -> None:
    installable_copy(tmp_path)
    assert verify_problems(tmp_path / SOCKET.name) == ""


@pytest.mark.parametrize(
    ("directive", "broken"),
    [("\nType=notify", "\nType=notifyy"), ("\nExecStart=/", "\nExecStart=/nonexistent/")],
)
def test_verify_reports_a_broken_unit(tmp_path: Path, directive: str, broken: str) -> None:
    # The check above is only worth something if verify speaks up on this machine.
    service = installable_copy(tmp_path)
    service.write_text(service.read_text().replace(directive, broken, 1))
    assert verify_problems(service) != ""


def test_security_exposure_is_at_most_two(tmp_path: Path) -> None:
    result = analyze("security", "--offline=yes", str(installable_copy(tmp_path)))
    match = EXPOSURE.search(result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE


def test_unit_is_notify_type_with_reload() -> None:
    assert values(SERVICE, "Type") == ["notify"]
    assert values(SERVICE, "NotifyAccess") == ["main"]
    assert values(SERVICE, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert values(SERVICE, "Restart") == ["on-failure"]


def test_a_killed_main_process_leaves_its_refresh_helper_the_time_to_finish() -> None:
    """systemd must not SIGKILL the helper when the main process dies: not `mixed`
    (SIGKILL to the rest once the main process is gone), not `OOMPolicy=kill`."""
    assert values(SERVICE, "KillMode") == ["control-group"]
    assert values(SERVICE, "OOMPolicy") == ["stop"]
    assert values(SERVICE, "SendSIGKILL") in ([], ["yes"])
    (stop_timeout,) = values(SERVICE, "TimeoutStopSec")
    defaults = Timeouts()
    needed = defaults.shutdown + defaults.token_request + HELPER_GRACE
    assert float(stop_timeout.removesuffix("s")) >= needed


def test_credentials_are_the_names_the_code_reads() -> None:
    # The store looks for $CREDENTIALS_DIRECTORY/<CREDENTIAL_NAME>; the README's config
    # names ${CREDENTIALS_DIRECTORY}/client_secret.
    loaded = dict(value.split(":", 1) for value in values(SERVICE, "LoadCredential"))
    assert loaded == {
        "client_secret": "/etc/pleo-proxy/client_secret",
        CREDENTIAL_NAME: "/etc/pleo-proxy/tokens.key",
    }
    readme = (UNIT_DIR / "README.md").read_text()
    assert "client_secret_file: ${CREDENTIALS_DIRECTORY}/client_secret" in readme


def test_exec_start_is_a_command_line_the_cli_accepts(tmp_path: Path) -> None:
    """ExecStart, with systemd's expansion done by hand, reaches config validation."""
    (exec_start,) = values(SERVICE, "ExecStart")
    (tmp_path / "config.yaml").write_text("listen: {port: not-a-port}\n")
    argv = exec_start.replace("${CONFIGURATION_DIRECTORY}", str(tmp_path)).split()
    assert argv[0] == INSTALLED_BINARY
    binary = shutil.which("pleo-proxy")
    assert binary is not None
    result = subprocess.run(
        [binary, *argv[1:]], capture_output=True, text=True, timeout=ANALYZE_TIMEOUT, check=False
    )
    # Exit 2 and a `listen.port: ...` line: argparse took every flag and the config was
    # read from the expanded path (an unknown flag would be a usage error instead).
    assert result.returncode == 2
    assert "usage:" not in result.stderr
    assert re.search(r"^listen\.port: ", result.stdout + result.stderr, re.M)


def test_socket_listens_on_the_default_loopback_port() -> None:
    assert values(SOCKET, "ListenStream") == ["127.0.0.1:8080"]


def test_unit_is_hardened() -> None:
    expected = {
        "DynamicUser": "yes",
        "StateDirectory": "pleo-proxy",
        "StateDirectoryMode": "0700",
        "ConfigurationDirectory": "pleo-proxy",
        "UMask": "0077",
        "ProtectSystem": "strict",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }
    assert {key: values(SERVICE, key) for key in expected} == {
        key: [value] for key, value in expected.items()
    }
    assert values(SERVICE, "SystemCallFilter") == ["@system-service", "~@privileged @resources"]
    # Pleo's addresses are not fixed: an IP allow list would cut the proxy off.
    assert values(SERVICE, "IPAddressDeny") == []
