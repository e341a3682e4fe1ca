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
    "proxy/config/reader.py": "tests/config/test_config.py",
    "proxy/config/sections.py": "tests/config/test_config.py",
    "proxy/connect/flows.py": "tests/connect/test_authorise.py",
    "proxy/connect/urlfile.py": "tests/connect/test_authorise.py",
    "proxy/lifecycle/refresh.py": "tests/lifecycle/test_manager.py",
    "proxy/lifecycle/background.py": "tests/lifecycle/test_manager.py",
    "proxy/lifecycle/flight.py": "tests/lifecycle/test_manager.py",
    "proxy/lifecycle/remote.py": "tests/lifecycle/test_exchange.py",
    "proxy/lifecycle/entries.py": "tests/lifecycle/test_registry.py",
    "proxy/lifecycle/cache.py": "tests/lifecycle/test_registry.py",
    "proxy/lifecycle/grants.py": "tests/connect/test_authorise.py",
    "proxy/connect/messages.py": "tests/connect/test_authorise.py",
    "proxy/connect/routes.py": "tests/connect/test_authorise.py",
    "proxy/config/__init__.py": "tests/config/test_config.py",
    "proxy/config/values.py": "tests/config/test_config.py",
    "proxy/config/yamldoc.py": "tests/config/test_config.py",
    "proxy/connect/__init__.py": None,
    "proxy/connect/pages.py": "tests/connect/test_authorise.py",
    "proxy/demo.py": "tests/test_e2e.py",
    "proxy/errors.py": "tests/http/test_app.py",
    "proxy/http/__init__.py": None,
    "proxy/http/body.py": "tests/http/test_forward.py",
    "proxy/http/keys.py": "tests/http/test_app.py",
    "proxy/http/serve.py": "tests/http/test_app.py",
    "proxy/lifecycle/__init__.py": None,
    "proxy/lifecycle/credentials.py": "tests/http/test_forward.py",
    "proxy/lifecycle/rules.py": "tests/lifecycle/test_manager.py",
    "proxy/ops/__init__.py": None,
    "proxy/secret.py": "tests/lifecycle/test_manager.py",
    "proxy/tokenset.py": "tests/lifecycle/test_manager.py",
    "proxy/urls.py": "tests/connect/test_authorise.py",
    "proxy/store/__init__.py": "tests/store/contract.py",
}
# The leaves anyone may import must not import the core above them (paths under proxy/).
LEAVES = (
    "config/__init__.py",
    "config/values.py",
    "errors.py",
    "secret.py",
    "connect/pkce.py",
    "tokenset.py",
    "lifecycle/rules.py",
    "urls.py",
    "names.py",
    "ops/sdnotify.py",
    "ops/logs.py",
    "ops/metrics.py",
    "ops/events.py",
)
# The core, by package or module: what a leaf must never import.
CORE = (
    "proxy.http",
    "proxy.connect.authorise",
    "proxy.connect.pages",
    "proxy.connect.routes",
    "proxy.lifecycle.manager",
    "proxy.lifecycle.oauth",
    "proxy.lifecycle.registry",
    "proxy.store",
    "proxy.cli",
    "proxy.demo",
)
# Where the request path lives: none of it may import the sandbox.
REQUEST_PATH_DIRS = ("http", "connect", "lifecycle", "store", "ops", "config")


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
        if module.relative_to(PACKAGE).parts[0] in REQUEST_PATH_DIRS
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
        for name in _imports(PACKAGE / leaf)
        if any(name == up or name.startswith(f"{up}.") for up in CORE)
    ]
    assert offenders == []


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_no_import_circles() -> None:
    """Module-level imports (not TYPE_CHECKING, not inside functions) form no cycle."""
    graph = {_module_name(p): _top_level_imports(p) for p in _modules()}
    known = set(graph)
    for name, deps in graph.items():
        graph[name] = {d for d in deps if d in known and d != name}
    cycles: list[str] = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" → ".join([*trail[trail.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def _top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names
