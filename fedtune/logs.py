"""Log output for the services: readable lines on a terminal, or one JSON object per line for a
log collector (``--log-format json``), with secrets redacted either way.

A JSON record has ``ts`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``, plus any
``extra={...}`` fields the call gave (fedtune passes ``round`` and ``client_id`` where they
apply) and ``exc`` with the traceback when there is one. The standard library's logging does
all of the work; this module only formats, so nothing here needs a logging framework.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is kept.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
LOG_FORMATS = ("rich", "plain", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class Redact(logging.Filter):
    """Replaces every occurrence of the given secrets in a record's message with ``[redacted]``,
    so a secret that ends up in an error message or a library's log line never reaches the log."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(secret in message for secret in self.secrets):
                for secret in self.secrets:
                    message = message.replace(secret, "[redacted]")
                record.msg, record.args = message, None
        return True


def setup_logging(fmt: str = "rich", *, root_level: int = logging.WARNING, fedtune_level: int = logging.INFO) -> logging.Handler:
    """Install one handler on the root logger in the given format; returns it (add a
    :class:`Redact` filter to it once secrets are known)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: choose one of {', '.join(LOG_FORMATS)}")
    handler: logging.Handler
    if fmt == "rich":
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, log_time_format="[%X]")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(root_level)
    logging.getLogger("fedtune").setLevel(fedtune_level)
    return handler


def redact(secrets: list[str]) -> None:
    """Add a :class:`Redact` filter for ``secrets`` to every handler of the root logger."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(Redact(secrets))
