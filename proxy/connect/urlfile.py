"""The `authorize-url` files: where a running proxy leaves a connection's setup URL.

`<state dir>/authorize-url` for `default` (as always), `<state dir>/authorize-urls/NAME`
for other configured connections; mode 0600, written atomically. `pleo-proxy
authorize-url` reads them. Must not hold anything but the URL.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import suppress
from pathlib import Path

from proxy.config import Config
from proxy.names import DEFAULT_CONNECTION

URL_FILE_NAME = "authorize-url"
URL_DIR_NAME = "authorize-urls"


def url_file(config: Config, connection: str = DEFAULT_CONNECTION) -> Path:
    if connection == DEFAULT_CONNECTION:
        return config.tokens.state_dir / URL_FILE_NAME
    return config.tokens.state_dir / URL_DIR_NAME / connection


def read_authorize_url(config: Config, connection: str = DEFAULT_CONNECTION) -> str | None:
    """The current setup URL as written by a running proxy, or None (none is needed)."""
    try:
        text = url_file(config, connection).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(path: Path, text: str) -> None:
    """Atomically replace `path` with `text`, mode 0600: temp file, fsync, rename, fsync dir."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def remove_file(path: Path) -> None:
    path.unlink(missing_ok=True)
    with suppress(FileNotFoundError):
        _fsync_dir(path.parent)
