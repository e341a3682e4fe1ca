"""Logging set-up: human text or JSON lines on stderr, with a redaction filter.

The filter is the last line of defence: secrets travel as `Secret` and are never
formatted into messages, but if a future change logs one by mistake, anything that
looks like a credential is masked before the line is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Credential-looking values: auth schemes, OAuth parameters in URLs/forms/JSON, JWTs.
_REDACTIONS = [
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{4,}"),
    re.compile(
        r"(?i)([\"']?(?:access_token|refresh_token|client_secret|api_key|code|code_verifier"
        r"|password|authorization|token)[\"']?\s*[=:]\s*[\"']?)[^\s\"'&,;}]{4,}"
    ),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
]


def redact(text: str) -> str:
    """Mask anything in `text` that looks like a credential."""
    text = _REDACTIONS[0].sub(lambda m: f"{m.group(1)} [redacted]", text)
    text = _REDACTIONS[1].sub(lambda m: f"{m.group(1)}[redacted]", text)
    return _REDACTIONS[2].sub("[redacted]", text)


class RedactingFilter(logging.Filter):
    """Formats the record's message once, redacted, so no argument escapes unmasked."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            doc.update(extra)
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = record.exc_info[0].__name__
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str = "info", *, fmt: str | None = None) -> None:
    """Log to stderr: JSON lines when `fmt == "json"` or stderr is not a TTY, else text."""
    if fmt is None:
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))
    # aiohttp's access log duplicates our own request line (issue: operating it).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
