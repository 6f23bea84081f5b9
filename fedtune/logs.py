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
# Longest message a handler installed by setup_logging writes; what a peer sent should be
# clipped where it enters a message (``shown``, ``clip``), this is the last line of defence.
MAX_MESSAGE_CHARS = 8000


class _OfflineKernelLookup(logging.Filter):
    """Drops the two warnings importing bitsandbytes prints on CPUs with AVX512-BF16: it asks the
    ``kernels`` package for an optional fused kernel from the Hugging Face Hub, which fails
    offline (fedtune always runs offline) and falls back to bitsandbytes' own kernels. peft
    imports bitsandbytes whenever it is installed, so every run would print them."""

    NOISE = ("Failed to load CPU gemm_4bit_forward", "Skipping publisher trust check")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def quiet_offline_kernel_lookup() -> None:
    """Install ``_OfflineKernelLookup`` on the two loggers concerned (once)."""
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OfflineKernelLookup) for f in logger.filters):
            logger.addFilter(_OfflineKernelLookup())


def clip(value: object, limit: int = 200) -> str:
    """``value`` as text fit for one log line: at most ``limit`` characters (the rest counted),
    with line breaks and other unprintable characters escaped. For whatever a peer controls
    (names, ids, reasons) before it goes into a log line or an error message."""
    text = value if isinstance(value, str) else str(value)
    more = len(text) - limit
    if more > 0:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return f"{text}...(+{more} chars)" if more > 0 else text


def shown(value: object, limit: int = 200) -> str:
    """Like ``repr(value)`` for a string (quoted, escaped), but at most ``limit`` characters of
    it: how error messages name something a peer chose, such as a tensor name."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        return f"{text[:limit]!r}...(+{len(text) - limit} chars)"
    return repr(text)


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


class Bounded(logging.Filter):
    """Cuts a record's message to ``limit`` characters (the rest counted)."""

    def __init__(self, limit: int = MAX_MESSAGE_CHARS) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > self.limit:
            record.msg, record.args = f"{message[: self.limit]}...(+{len(message) - self.limit} chars)", None
        return True


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
    handler.addFilter(Bounded())
    root.addHandler(handler)
    root.setLevel(root_level)
    logging.getLogger("fedtune").setLevel(fedtune_level)
    return handler


def redact(secrets: list[str]) -> None:
    """Add a :class:`Redact` filter for ``secrets`` to every handler of the root logger, ahead
    of its other filters (a secret is replaced whole before any message is cut short)."""
    for handler in logging.getLogger().handlers:
        handler.filters.insert(0, Redact(secrets))
