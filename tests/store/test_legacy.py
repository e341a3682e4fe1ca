"""The record of old-format entries: what it allows, how it is sealed, what it refuses."""

from __future__ import annotations

import pytest

from proxy.errors import StoreError
from proxy.store.crypto import generate_key, open_sealed, seal
from proxy.store.legacy import (
    MANIFEST_NAME,
    Manifest,
    check_legacy,
    digest,
    open_manifest,
    seal_manifest,
    survey,
)
from proxy.tokenset import state_to_json
from tests.store.contract import sample_state
from tests.store.old_format import seal_v1

KEY = generate_key()
ACME = seal_v1(state_to_json(sample_state(1, "acme")), KEY)
GLOBEX = seal_v1(state_to_json(sample_state(2, "globex")), KEY)


def test_an_old_format_entry_is_allowed_under_its_recorded_name_and_bytes_only() -> None:
    manifest = survey({"acme": ACME, "globex": GLOBEX})
    assert manifest.allows("acme", ACME)
    assert manifest.allows("globex", GLOBEX)
    assert not manifest.allows("globex", ACME)  # acme's entry copied over globex's
    assert not manifest.allows("initech", ACME)  # nor over a name not recorded
    assert not manifest.allows("acme", ACME[:-1] + bytes([ACME[-1] ^ 1]))


def test_the_survey_records_only_old_format_entries() -> None:
    current = seal(b"{}", KEY, name="default")
    assert survey({"acme": ACME, "junk": b"not ours"}).entries == {"acme": digest(ACME)}
    assert survey({}).entries == {}
    # One entry in the new format: this version ran here already, so the record was
    # removed since; nothing found now is trusted.
    assert survey({"acme": ACME, "default": current}).entries == {}


def test_the_record_round_trips_sealed_and_bound_to_its_own_name() -> None:
    manifest = survey({"acme": ACME})
    blob = seal_manifest(manifest, KEY)
    assert open_manifest(blob, [KEY], what="record") == manifest
    assert b"acme" not in blob  # sealed: not even the names are readable
    # Neither the record nor an entry opens as the other.
    with pytest.raises(StoreError, match="authentication failed"):
        open_sealed(blob, [KEY], name="acme")
    with pytest.raises(StoreError, match="authentication failed"):
        open_manifest(seal(b"{}", KEY, name="acme"), [KEY], what="record")
    assert MANIFEST_NAME.startswith(".")  # no connection name can start so


@pytest.mark.parametrize(
    "plaintext",
    [b"[]", b"{}", b'{"version": 2, "entries": {}}', b'{"version": 1, "entries": {"a": 1}}', b"x"],
)
def test_a_malformed_record_is_an_error(plaintext: bytes) -> None:
    blob = seal(plaintext, KEY, name=MANIFEST_NAME)
    with pytest.raises(StoreError) as caught:
        open_manifest(blob, [KEY], what="the record x")
    assert caught.value.detail == "the record x is corrupt (not a record of old-format entries)"


def test_a_record_under_another_key_is_an_error_naming_the_key_ids() -> None:
    blob = seal_manifest(Manifest(), generate_key())
    with pytest.raises(StoreError, match="not the configured key"):
        open_manifest(blob, [KEY], what="record")


def test_refusals_name_the_connection_and_why_but_no_secret() -> None:
    manifest = survey({"acme": ACME})
    check_legacy(manifest, "acme", ACME, what="token file a")
    with pytest.raises(StoreError) as caught:
        check_legacy(manifest, "globex", ACME, what="token file g")
    detail = caught.value.detail
    assert detail.startswith(
        "token file g is in the old format (PLEOPX1), which is not bound to connection globex,"
        " and it is not the old-format entry recorded for connection globex at the upgrade"
    )
    assert "another connection's entry copied there" in detail
    assert digest(ACME) not in detail
    with pytest.raises(StoreError, match="this store has no record of its old-format entries"):
        check_legacy(None, "acme", ACME, what="token file a")
