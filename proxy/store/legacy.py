"""Which old-format (PLEOPX1) entries may still open, and under which name only.

PLEOPX1 binds no connection name, so its bytes alone cannot tell connection A's entry from
A's entry copied over B's. The first start of a version that seals PLEOPX2 records every
PLEOPX1 entry it finds, by name and digest, in one sealed record (the manifest); from then
on a PLEOPX1 entry opens only under the name it was recorded with and with the very bytes
recorded, until its next write rewrites it as PLEOPX2. Pure: the stores read and write the
record. No message holds a secret or a digest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from proxy.errors import StoreError
from proxy.store.crypto import MAGIC, is_legacy, open_sealed, seal

# What the record is sealed as: never a connection's name (those start with [a-z0-9]), so
# the record cannot be copied over an entry, nor an entry over the record.
MANIFEST_NAME = ".legacy-entries"
MANIFEST_VERSION = 1
DIGEST_BYTES = 16  # the blobs are sealed under our key: no one can craft a collision


def digest(blob: bytes) -> str:
    """The name-independent fingerprint of one stored blob (hex)."""
    return hashlib.sha256(blob).digest()[:DIGEST_BYTES].hex()


@dataclass(frozen=True)
class Manifest:
    """The PLEOPX1 entries found at the upgrade: connection name → digest of its blob."""

    entries: Mapping[str, str] = field(default_factory=dict)

    def allows(self, name: str, blob: bytes) -> bool:
        recorded = self.entries.get(name)
        return recorded is not None and hmac.compare_digest(recorded, digest(blob))


def survey(found: Mapping[str, bytes]) -> Manifest:
    """The record to write for a store that holds `found` (name → blob) and no record yet.

    Once any entry is PLEOPX2 this version has run on the store already, so a missing
    record was removed: nothing found now is trusted, and the record made allows nothing.
    """
    if any(blob.startswith(MAGIC) for blob in found.values()):
        return Manifest()
    return Manifest({name: digest(blob) for name, blob in found.items() if is_legacy(blob)})


def seal_manifest(manifest: Manifest, key: bytes) -> bytes:
    doc = {"version": MANIFEST_VERSION, "entries": dict(sorted(manifest.entries.items()))}
    return seal(json.dumps(doc, separators=(",", ":")).encode(), key, name=MANIFEST_NAME)


def open_manifest(blob: bytes, keys: Sequence[bytes], *, what: str) -> Manifest:
    """The record sealed in `blob`; StoreError if it does not open or is malformed."""
    plaintext = open_sealed(blob, keys, name=MANIFEST_NAME, what=what)
    try:
        doc = json.loads(plaintext)
        entries = doc["entries"] if doc.get("version") == MANIFEST_VERSION else None
        if not isinstance(entries, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in entries.items()
        ):
            raise ValueError
    except (ValueError, TypeError, AttributeError, KeyError):
        raise StoreError(f"{what} is corrupt (not a record of old-format entries)") from None
    return Manifest(entries)


def check_legacy(manifest: Manifest | None, name: str, blob: bytes, *, what: str) -> None:
    """Nothing if the PLEOPX1 `blob` may open as connection `name`'s entry; else StoreError."""
    if manifest is not None and manifest.allows(name, blob):
        return
    why = (
        "this store has no record of its old-format entries"
        if manifest is None
        else f"it is not the old-format entry recorded for connection {name} at the upgrade"
    )
    raise StoreError(
        f"{what} is in the old format (PLEOPX1), which is not bound to connection {name},"
        f" and {why}: refused, as it may be another connection's entry copied there;"
        " import the connection's tokens again or authorise it again"
    )
