"""Structured logs: one JSON object per line with the round and client a line is about, and
secrets redacted from every line whatever the format."""

from __future__ import annotations

import io
import json
import logging

import pytest

from fedtune.logs import JsonFormatter, Redact, setup_logging


def _capture(formatter: logging.Formatter, *filters: logging.Filter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    for f in filters:
        handler.addFilter(f)
    logger = logging.getLogger(f"fedtune.test.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate, logger.level = False, logging.DEBUG
    return logger, stream


def test_a_json_line_carries_level_logger_message_and_the_extra_fields():
    logger, stream = _capture(JsonFormatter())
    logger.warning("round %d: update of %s clipped", 3, "c7", extra={"round": 3, "client_id": "c7"})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "warning" and first["logger"] == logger.name
    assert first["message"] == "round 3: update of c7 clipped"
    assert (first["round"], first["client_id"]) == (3, "c7")
    assert first["ts"].endswith("+00:00")
    assert second["message"] == "failed" and "ValueError: boom" in second["exc"]


def test_secrets_are_redacted_from_messages_and_their_arguments():
    secret = "s3cr3t-enrollment-value"
    logger, stream = _capture(JsonFormatter(), Redact([secret, ""]))
    logger.error("register refused for secret %s", secret)
    logger.info("nothing to hide")
    lines = stream.getvalue().splitlines()
    assert secret not in stream.getvalue()
    assert json.loads(lines[0])["message"] == "register refused for secret [redacted]"
    assert json.loads(lines[1])["message"] == "nothing to hide"


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="choose one of rich, plain, json"):
        setup_logging("xml")


def test_the_coordinator_logs_json_lines_with_the_round(tmp_path, capsys):
    """``--log-format json`` end to end through the CLI's set-up, on a coordinator that cannot
    start (its model folder is missing): stderr still has parseable lines only."""
    from fedtune.cli import main

    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        code = main(["coordinator", "--log-format", "json", "--model", str(tmp_path / "missing"), "--run-dir", str(tmp_path / "run")])
        assert code == 2
        handler = root.handlers[0]
        assert isinstance(handler.formatter, JsonFormatter)
        logging.getLogger("fedtune.coordinator.engine").info("round %d open", 2, extra={"round": 2})
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        assert {"message": "round 2 open", "round": 2}.items() <= lines[-1].items()
    finally:
        root.handlers[:], root.level = saved
