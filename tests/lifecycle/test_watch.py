"""The store's change marker, on a real file store: quiet until something is touched."""

from __future__ import annotations

from pathlib import Path

from proxy.lifecycle.watch import ChangeMarker
from proxy.store import open_stores
from proxy.tokenset import StoredState
from tests.flows import sandbox_config


async def test_names_come_only_after_the_marker_moved(tmp_path: Path) -> None:
    stores = open_stores(sandbox_config("http://127.0.0.1:9", tmp_path))
    try:
        marker = ChangeMarker(stores)
        await marker.start()
        assert await marker.names_if_changed() is None
        await stores.store("made").save(StoredState())
        await stores.touch()
        names = await marker.names_if_changed()
        assert names is not None
        assert "made" in names
        assert await marker.names_if_changed() is None, "seen once, then quiet again"
    finally:
        await stores.close()
