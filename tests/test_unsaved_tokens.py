"""The disk fails after Pleo rotated: the only live tokens are kept and written later.

A real proxy process; the sandbox's token endpoint is slowed so that the file-size
limit (prlimit from outside, on the proxy and its refresh helper) lands between the
in-progress mark and the final write.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy.store.file import FileStore
from tests.sandboxes import RunningSandbox, get_stats, sandbox, set_knobs
from tests.test_faults import file_size_limit, get, proxy_process

__all__ = ["sandbox"]


async def test_tokens_refreshed_while_the_disk_is_full_are_not_lost(
    sandbox: RunningSandbox, tmp_path: Path
) -> None:
    async with proxy_process(sandbox, tmp_path) as (child, base, config):
        assert (await get(f"{base}/v1/introspect"))[0] == 200
        before = await get_stats(sandbox.url)
        # Latency delays the API's 401 (t=2 s: the mark is written) and then the token
        # endpoint's answer (t=4 s: the final write). The disk fills in between.
        await set_knobs(sandbox.url, api_401_once=True, latency=2.0)
        request = asyncio.create_task(get(f"{base}/v1/introspect"))
        await asyncio.sleep(3.0)
        with file_size_limit(child.pid, 64):
            status, body = await request
            assert (status, body["error"]) == (503, "store_error")
            assert (await get_stats(sandbox.url))["refresh_grants"] == before["refresh_grants"] + 1
            # Still full: nothing more goes to Pleo with the spent refresh token.
            await set_knobs(sandbox.url, latency=0)
            status, body = await get(f"{base}/v1/introspect")
            assert (status, body["error"]) == (503, "store_error")
        status, _ = await get(f"{base}/v1/introspect")
        assert status == 200
        stats = await get_stats(sandbox.url)
        assert stats["refresh_grants"] == before["refresh_grants"] + 1
        assert stats["reuse_detected"] == 0
    stored = await FileStore.from_config(config).load()
    assert stored is not None
    assert stored.refresh_count == 1
    assert stored.refresh_started_at is None
