"""The redaction filter, tested by logging real secrets on purpose and grepping the bytes."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.http_exceptions import LineTooLong

from proxy.ops.logs import SETUP_URL_LOGGER, log_handler, set_level

ACCESS_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEyMyJ9.c2lnbmF0dXJlLWJ5dGVz"
OPAQUE_TOKEN = "opaque-access-token-7f3a9c2e"
REFRESH_TOKEN = "rt-91b2c3d4e5f60718"
CLIENT_SECRET = "cs-very-secret-5a6b7c8d"
CODE = "authcode-0a1b2c3d4e"
STATE = "state-ffeeddccbbaa"
SETUP = "setupcode-1234567890abcdef"
SECRETS = (ACCESS_TOKEN, OPAQUE_TOKEN, REFRESH_TOKEN, CLIENT_SECRET, CODE, STATE)


@pytest.fixture(params=["json", "text"])
def captured(request: pytest.FixtureRequest) -> Iterator[io.StringIO]:
    """A logger named `leaky` writing through the real handler into a buffer."""
    stream = io.StringIO()
    handler = log_handler(stream, fmt=request.param)
    for name in ("leaky", SETUP_URL_LOGGER):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    try:
        yield stream
    finally:
        for name in ("leaky", SETUP_URL_LOGGER):
            logger = logging.getLogger(name)
            logger.removeHandler(handler)
            logger.setLevel(logging.NOTSET)
            logger.propagate = True


def _leak_everything(log: logging.Logger) -> None:
    log.info("token %s", ACCESS_TOKEN)
    log.info("headers: {'Authorization': 'Bearer %s'}", OPAQUE_TOKEN)
    log.info("Authorization: Bearer %s", OPAQUE_TOKEN)
    log.warning("GET /_proxy/callback?code=%s&state=%s", CODE, STATE)
    log.error("token response %s", json.dumps({"refresh_token": REFRESH_TOKEN}))
    log.error("form body grant_type=refresh_token&refresh_token=%s", REFRESH_TOKEN)
    log.error("config client_secret: %s", CLIENT_SECRET)
    log.info("fields", extra={"fields": {"auth": f"Bearer {OPAQUE_TOKEN}", "n": [f"code={CODE}"]}})
    try:
        raise RuntimeError(f"refresh failed with access_token={OPAQUE_TOKEN}")
    except RuntimeError:
        log.exception("unexpected")


def test_secrets_logged_on_purpose_never_reach_the_stream(captured: io.StringIO) -> None:
    _leak_everything(logging.getLogger("leaky"))
    written = captured.getvalue().encode()
    assert written.count(b"\n") >= 9  # every line was written, masked
    for secret in SECRETS:
        assert secret.encode() not in written, secret
    assert b"[redacted]" in written


def test_setup_code_is_masked_except_in_the_authorise_line(captured: io.StringIO) -> None:
    url = f"http://localhost:8080/_proxy/authorize?setup={SETUP}"
    logging.getLogger("leaky").warning("someone logged %s", url)
    assert SETUP.encode() not in captured.getvalue().encode()
    # The one line that is how the operator gets in keeps its setup code...
    logging.getLogger(SETUP_URL_LOGGER).warning("open %s to authorise this proxy", url)
    assert SETUP.encode() in captured.getvalue().encode()
    # ...and nothing else in that logger's lines escapes.
    logging.getLogger(SETUP_URL_LOGGER).warning("callback code=%s state=%s", CODE, STATE)
    written = captured.getvalue().encode()
    assert CODE.encode() not in written
    assert STATE.encode() not in written


def test_plain_prose_survives(captured: io.StringIO) -> None:
    logging.getLogger("leaky").info("token state: %s → %s", "authorised", "refreshing")
    assert "token state: authorised → refreshing" in captured.getvalue()


def test_json_lines_carry_structured_fields() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("leaky.json")
    logger.addHandler(log_handler(stream, fmt="json"))
    logger.propagate = False
    try:
        logger.warning("refresh failed", extra={"fields": {"event": "refresh", "outcome": "x"}})
    finally:
        logger.handlers.clear()
        logger.propagate = True
    doc = json.loads(stream.getvalue())
    assert doc["level"] == "warning"
    assert doc["event"] == "refresh"
    assert doc["outcome"] == "x"


def test_set_level_changes_the_root_level() -> None:
    root = logging.getLogger()
    before = root.level
    try:
        set_level("error")
        assert root.level == logging.ERROR
        set_level("debug")
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(before)


def test_a_rejected_requests_bytes_never_reach_the_stream(captured: io.StringIO) -> None:
    # aiohttp logs parse errors with the start of the offending line: here a header
    # whose value is not credential-shaped, so only dropping the bytes can hide it.
    line = b"X-Api-Session-Blob: " + b"q" * 30 + OPAQUE_TOKEN.encode()
    try:
        raise LineTooLong(line[:100].decode(), "8190")
    except LineTooLong:
        logging.getLogger("leaky").exception("Error handling request from %s", "127.0.0.1")
    written = captured.getvalue()
    assert "LineTooLong" in written
    assert "q" * 30 not in written
    assert OPAQUE_TOKEN not in written


def test_text_without_any_trigger_is_returned_as_it_is_and_triggers_still_redact() -> None:
    from proxy.ops.logs import redact

    plain = "/v1/expenses/0b1e-4c2a"
    assert redact(plain) is plain
    assert redact("/v1/x?access_token=abcdefgh") == "/v1/x?access_token=[redacted]"
    assert "abcdefgh" not in redact("Bearer abcdefgh")
    assert "[redacted]" in redact("eyJabcdefghij.eyJabcdefghij.sig")


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def coalescing_logger(stream: io.StringIO) -> logging.Logger:
    logger = logging.getLogger("tests.coalescing")
    logger.handlers[:] = [log_handler(stream, fmt="json")]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


async def test_lines_of_one_loop_iteration_reach_the_stream_in_one_write_in_order() -> None:
    stream = CountingStream()
    logger = coalescing_logger(stream)
    for index in range(50):
        logger.info("line %d", index)
    assert stream.writes == 0, "waiting for the loop's next callbacks"
    await asyncio.sleep(0)
    assert stream.writes == 1
    logger.info("after")
    logger.handlers[0].flush()  # logging's shutdown does this: nothing is left behind
    messages = [json.loads(line)["msg"] for line in stream.getvalue().splitlines()]
    assert messages == [f"line {i}" for i in range(50)] + ["after"]
    assert stream.writes == 2


def test_outside_an_event_loop_each_line_is_written_at_once() -> None:
    stream = CountingStream()
    logger = coalescing_logger(stream)
    logger.info("one")
    assert stream.writes == 1
    logger.info("two")
    assert [json.loads(line)["msg"] for line in stream.getvalue().splitlines()] == ["one", "two"]


def _fields_and_record_lines(handler: logging.Handler, stream: io.StringIO) -> list[dict[str, Any]]:
    """The same line logged through `log_fields` and as an ordinary record."""
    from proxy.ops.logs import log_fields

    logger = logging.getLogger("fields-test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fields = {"method": "GET", "path": "/v1/é", "status": 200, "upstream_ms": None}
    try:
        log_fields(logger, logging.INFO, lambda: ("GET /v1/é 200", fields))
        logger.info("GET /v1/é 200", extra={"fields": fields, "redacted": True})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
    docs = [json.loads(line) for line in stream.getvalue().splitlines()]
    for doc in docs:
        doc.pop("ts")
    return docs


def test_a_line_of_fields_is_the_line_its_record_would_give() -> None:
    stream = io.StringIO()
    direct, through_record = _fields_and_record_lines(log_handler(stream, fmt="json"), stream)
    assert direct == through_record
    assert direct["logger"] == "fields-test"
    assert direct["level"] == "info"
    assert direct["path"] == "/v1/é"


def test_a_line_of_fields_reaches_any_other_handler_as_a_record() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    stream = io.StringIO()
    _fields_and_record_lines(Keep(), stream)
    assert [r.getMessage() for r in records] == ["GET /v1/é 200", "GET /v1/é 200"]
    assert records[0].fields == records[1].fields  # type: ignore[attr-defined]


def test_a_line_of_fields_respects_the_handler_level() -> None:
    stream = io.StringIO()
    handler = log_handler(stream, fmt="json")
    handler.setLevel(logging.WARNING)
    assert _fields_and_record_lines(handler, stream) == []


def _indexed(index: int) -> tuple[str, dict[str, Any]]:
    return f"fields {index}", {"index": index}


async def test_lines_of_fields_keep_their_place_among_records_in_one_write() -> None:
    from proxy.ops.logs import log_fields

    stream = CountingStream()
    logger = coalescing_logger(stream)
    for index in range(20):
        if index % 2:
            log_fields(logger, logging.INFO, functools.partial(_indexed, index))
        else:
            logger.info("record %d", index)
    assert stream.writes == 0  # formatted and written at the loop's next callbacks
    await asyncio.sleep(0)
    assert stream.writes == 1
    docs = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [d["msg"] for d in docs] == [
        f"fields {i}" if i % 2 else f"record {i}" for i in range(20)
    ]
    assert [d.get("index") for d in docs] == [i if i % 2 else None for i in range(20)]
