"""Logging set-up: human text or JSON lines on stderr, with a redaction filter.

The filter is the last line of defence: secrets travel as `Secret` and are never
formatted into messages, but if a future change logs one by mistake, anything that
looks like a credential is masked before the line is written: message, structured
fields and exception text alike. Must not decide what is logged, only how.

One exemption: the authorise page URL (`?setup=<code>`) logged by the `proxy.authorise` logger
keeps its setup code, because that line is how the operator gets in (the same URL is
in the 0600 `authorize-url` file). Every other record has `setup=` masked too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
MASK = "[redacted]"
# The logger whose setup URL stays readable (see the module docstring).
SETUP_URL_LOGGER = "proxy.authorise"

_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{4,}")
_CREDENTIAL_NAMES = (
    r"access_token|refresh_token|id_token|client_secret|api_key|code|code_verifier"
    r"|password|authorization|token|secret"
)
# `name=value`, `name: value`, `"name": "value"`; the value up to a delimiter.
_NAMED = r"([\"']?\b(?:{names})[\"']?\s*{sep}\s*[\"']?)[^\s\"'&,;}}]{{4,}}"
_CREDENTIAL_PARAM = re.compile("(?i)" + _NAMED.format(names=_CREDENTIAL_NAMES, sep="[=:]"))
# OAuth `state` and our `setup` code travel as query parameters: only `name=value`, so
# that prose such as "token state: authorised" stays readable.
_QUERY_PARAM = re.compile("(?i)" + _NAMED.format(names="state", sep="="))
_SETUP_PARAM = re.compile("(?i)" + _NAMED.format(names="setup", sep="="))
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")


# Every pattern above needs one of these: text without any is returned as it is, after
# one scan instead of five (most log lines, and most access-log paths).
_MAYBE_SECRET = re.compile(r"[\s=:]|eyJ")


def redact(text: str, *, keep_setup: bool = False) -> str:
    """Mask anything in `text` that looks like a credential (and setup codes, unless kept)."""
    if _MAYBE_SECRET.search(text) is None:
        return text
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _CREDENTIAL_PARAM.sub(lambda m: f"{m.group(1)}{MASK}", text)
    text = _QUERY_PARAM.sub(lambda m: f"{m.group(1)}{MASK}", text)
    if not keep_setup:
        text = _SETUP_PARAM.sub(lambda m: f"{m.group(1)}{MASK}", text)
    return _JWT.sub(MASK, text)


def _redact_value(value: Any, *, keep_setup: bool) -> Any:
    if isinstance(value, str):
        return redact(value, keep_setup=keep_setup)
    if isinstance(value, list | tuple):
        return [_redact_value(v, keep_setup=keep_setup) for v in value]
    if isinstance(value, dict):
        return {k: _redact_value(v, keep_setup=keep_setup) for k, v in value.items()}
    return value


def _drop_request_bytes(record: logging.LogRecord) -> None:
    """aiohttp logs a rejected request's parse error with the offending bytes in it
    (e.g. the start of an over-long `Authorization` header): keep only the error's kind."""
    exc_type = record.exc_info[0] if record.exc_info else None
    if exc_type is None:
        return
    # Imported here: importing aiohttp (its whole client) for every CLI command that only
    # sets up logging would cost each of them ~13 MiB and ~150 ms.
    from aiohttp.http_exceptions import HttpProcessingError

    if issubclass(exc_type, HttpProcessingError):
        record.msg = f"{record.getMessage()} ({exc_type.__name__}; request bytes not logged)"
        record.args = None
        record.exc_info = None
        record.exc_text = None


class RedactingFilter(logging.Filter):
    """Formats the record's message once, redacted, so no argument escapes unmasked."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "redacted", False):
            return True  # built from fixed words and fields redacted one by one
        _drop_request_bytes(record)
        keep_setup = record.name == SETUP_URL_LOGGER
        record.msg = redact(record.getMessage(), keep_setup=keep_setup)
        record.args = None
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = _redact_value(fields, keep_setup=keep_setup)
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            # The traceback's exception messages are text too; format them here, redacted
            # (formatters reuse exc_text rather than formatting exc_info again).
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def _timestamp(self, created: float, msecs: float) -> str:
        # One strftime per second, not per line: a busy proxy writes thousands a second.
        second = int(created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self._timestamp(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            doc.update(extra)
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = record.exc_info[0].__name__
        return _ENCODER.encode(doc)

    def format_fields(
        self, created: float, level: int, name: str, msg: str, fields: dict[str, Any]
    ) -> str:
        """The line `format` gives a record of these parts, without building the record."""
        msecs = (created - int(created)) * 1000
        doc = {
            "ts": self._timestamp(created, msecs),
            "level": logging.getLevelName(level).lower(),
            "logger": name,
            "msg": msg,
        }
        doc.update(fields)
        return _ENCODER.encode(doc)


# One encoder for every line: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


class CoalescingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines logged in one event-loop iteration reach the stream in one write.

    A busy proxy logs a line per request; written and flushed one by one, that was a
    system call each. Inside an event loop a line waits only until the loop's next
    callbacks run; elsewhere (the CLI, other threads) it is written at once. `flush()`
    (logging's shutdown and close call it) writes whatever waits.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        # Lines, and the parts of lines `log_fields` left to format at the write: done
        # together, one after another, formatting costs a third of what it does when
        # interleaved with request handling (bench/README.md).
        self._waiting: list[str | _Fields] = []
        self._scheduled = False

    @property
    def json(self) -> JsonFormatter | None:
        """The formatter when it writes JSON (what `log_fields` can format for)."""
        formatter = self.formatter
        return formatter if type(formatter) is JsonFormatter else None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        # emit() runs under the handler's lock (Handler.handle), so does the list.
        self._add(line)

    def emit_fields(self, fields: _Fields) -> None:
        """A line of `log_fields`, queued like an emitted record's, formatted at the write."""
        self.acquire()
        try:
            self._add(fields)
        finally:
            self.release()

    def _add(self, line: str | _Fields) -> None:
        self._waiting.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_waiting()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            self._write_waiting()
        finally:
            self.release()

    def _write_waiting(self) -> None:
        if not self._waiting:
            return
        terminator = self.terminator
        text = "".join(
            item if isinstance(item, str) else item.line() + terminator for item in self._waiting
        )
        self._waiting.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr gone (closed pipe): nothing left to tell


# A line's message and structured fields, made when (and only if) the line is written.
LineParts = Callable[[], tuple[str, dict[str, Any]]]


def log_fields(logger: logging.Logger, level: int, parts: LineParts) -> None:
    """Log a line built only from redacted parts and numbers (the access line).

    When every handler the record would reach is one of ours writing JSON, the line goes
    to them directly and `parts` is called when they write: a LogRecord through the
    logger chain, and formatting amid request handling, were most of the access line's
    cost. Anything else (another handler, a filter on a logger, text format) gets the
    ordinary record, made now. The caller checks the level.
    """
    handlers = _json_handlers(logger, level)
    if handlers is None:
        msg, fields = parts()
        logger.log(level, msg, extra={"fields": fields, "redacted": True})
        return
    waiting = _Fields(handlers[0][1], time.time(), level, logger.name, parts)
    for handler, _ in handlers:  # every JsonFormatter writes the same line
        handler.emit_fields(waiting)


@dataclass(slots=True)
class _Fields:
    """What `log_fields` was given, and when: its line, made when it is written."""

    formatter: JsonFormatter
    created: float
    level: int
    name: str
    parts: LineParts
    _line: str | None = None

    def line(self) -> str:
        if self._line is None:
            msg, fields = self.parts()
            self._line = self.formatter.format_fields(
                self.created, self.level, self.name, msg, fields
            )
        return self._line


def _json_handlers(
    logger: logging.Logger, level: int
) -> list[tuple[CoalescingHandler, JsonFormatter]] | None:
    """The handlers `logger.log` would call, if all are JSON CoalescingHandlers with
    only the redacting filter and no logger on the way filters; else None."""
    found: list[tuple[CoalescingHandler, JsonFormatter]] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if level < handler.level:
                continue
            if type(handler) is not CoalescingHandler:  # a subclass may emit differently
                return None
            formatter = handler.json
            if formatter is None or any(type(f) is not RedactingFilter for f in handler.filters):
                return None
            found.append((handler, formatter))
        current = current.parent if current.propagate else None
    return found or None


def log_handler(stream: Any, *, fmt: str) -> logging.Handler:
    """A handler writing to `stream` as `fmt` ("json" or "text"), redaction included."""
    handler = CoalescingHandler(stream)
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def set_level(level: str) -> None:
    """The root level by name (a reload changes it while serving)."""
    logging.getLogger().setLevel(LEVELS.get(level, logging.INFO))


def setup_logging(level: str = "info", *, fmt: str | None = None) -> None:
    """Log to stderr: JSON lines when `fmt == "json"` or stderr is not a TTY, else text."""
    if fmt is None:
        fmt = "text" if sys.stderr.isatty() else "json"
    # No format of ours names the caller, thread or process: not looking them up for
    # every record (a stack walk among them) is the logging docs' own optimisation.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [log_handler(sys.stderr, fmt=fmt)]
    set_level(level)
    # aiohttp's access log duplicates our own request line (issue: operating it).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
