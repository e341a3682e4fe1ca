"""The bundled fake Pleo (authorisation server + API stand-ins) for the demo and the tests.

Must not be imported by the proxy's request path.
"""

from proxy.sandbox.server import (
    STATE_KEY,
    RunningSandbox,
    SandboxSettings,
    SandboxState,
    build_sandbox_app,
    serve_sandbox_forever,
    start_sandbox,
)

__all__ = [
    "STATE_KEY",
    "RunningSandbox",
    "SandboxSettings",
    "SandboxState",
    "build_sandbox_app",
    "serve_sandbox_forever",
    "start_sandbox",
]
