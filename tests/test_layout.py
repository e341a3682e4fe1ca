"""The package's shape: one-way imports, and a test file for every module.

mitmproxy's `filename_matching.py` idea: a module without tests, or an import that
goes the wrong way, fails here instead of in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"
TESTS = ROOT / "tests"

# Modules whose tests live in a file named after something else.
COVERED_BY = {
    "proxy/__init__.py": None,
    "proxy/__main__.py": "tests/test_cli.py",
    "proxy/access_log.py": "tests/test_access_log.py",
    "proxy/authorise_pages.py": "tests/test_authorise.py",
    "proxy/config_values.py": "tests/test_config.py",
    "proxy/credentials.py": "tests/test_forward.py",
    "proxy/demo.py": "tests/test_e2e.py",
    "proxy/errors.py": "tests/test_app.py",
    "proxy/keys.py": "tests/test_app.py",
    "proxy/secret.py": "tests/test_tokens.py",
    "proxy/token_rules.py": "tests/test_tokens.py",
    "proxy/tokenset.py": "tests/test_tokens.py",
    "proxy/urls.py": "tests/test_authorise.py",
    "proxy/store/__init__.py": "tests/store/contract.py",
    "proxy/store/crypto.py": "tests/store/test_crypto.py",
    "proxy/store/file.py": "tests/store/test_file.py",
}
# The leaves anyone may import must not import the request path above them.
LEAVES = (
    "config",
    "config_values",
    "errors",
    "secret",
    "pkce",
    "tokenset",
    "token_rules",
    "urls",
    "sdnotify",
)
REQUEST_PATH = ("app", "guard", "forward", "tokens", "oauth", "authorise", "admin", "store")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_module_has_a_test_file() -> None:
    missing = []
    for module in _modules():
        rel = module.relative_to(ROOT).as_posix()
        if rel.startswith("proxy/sandbox/"):
            continue  # the sandbox's modules are all exercised by tests/test_sandbox.py
        if rel in COVERED_BY:
            covered = COVERED_BY[rel]
            if covered is not None and not (ROOT / covered).exists():
                missing.append(f"{rel} → {covered}")
            continue
        if not list(TESTS.rglob(f"test_{module.stem}.py")):
            missing.append(rel)
    assert missing == []


def test_sandbox_is_not_imported_by_the_request_path() -> None:
    offenders = [
        module.relative_to(ROOT).as_posix()
        for module in _modules()
        if module.stem in REQUEST_PATH or module.parent.name == "store"
        if any(name.startswith("proxy.sandbox") for name in _imports(module))
    ]
    assert offenders == []


def test_sandbox_imports_nothing_from_the_proxy() -> None:
    offenders = [
        f"{module.name}: {name}"
        for module in (PACKAGE / "sandbox").glob("*.py")
        for name in _imports(module)
        if name.startswith("proxy.") and not name.startswith("proxy.sandbox")
    ]
    assert offenders == []


def test_leaf_modules_import_nothing_above_them() -> None:
    offenders = [
        f"{leaf}: {name}"
        for leaf in LEAVES
        for name in _imports(PACKAGE / f"{leaf}.py")
        if any(name == f"proxy.{up}" or name.startswith(f"proxy.{up}.") for up in REQUEST_PATH)
    ]
    assert offenders == []
