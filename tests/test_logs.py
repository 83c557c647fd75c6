"""Logs: JSON lines, extra fields kept, secrets redacted everywhere (tracebacks included)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from worker.logs import configure_logging

SECRET = "s3cr3t-api-key"


@pytest.fixture
def out() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def logger(out: io.StringIO) -> logging.Logger:
    configure_logging(fmt="json", level="DEBUG", secrets=[SECRET, "4567"], stream=out)
    return logging.getLogger("pabx_worker.test")


def test_json_line_with_extra_fields(logger: logging.Logger, out: io.StringIO) -> None:
    logger.info("sent", extra={"command_id": "c-1", "ID_CHAMADA": "x", "attempt": 2})
    [entry] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert entry["message"] == "sent" and entry["level"] == "INFO"
    assert (entry["command_id"], entry["attempt"]) == ("c-1", 2)


def test_secrets_are_redacted_in_message_args_extra_and_traceback(
    logger: logging.Logger, out: io.StringIO
) -> None:
    try:
        raise ValueError(f"key was {SECRET}")
    except ValueError:
        logger.exception("failed with %s", SECRET, extra={"body": "SENHA 4567"})
    text = out.getvalue()
    assert SECRET not in text and "4567" not in text
    [entry] = [json.loads(line) for line in text.splitlines()]
    assert "***" in str(entry["traceback"]) and entry["body"] == "SENHA ***"


def test_text_format(out: io.StringIO) -> None:
    configure_logging(fmt="text", level="INFO", secrets=[SECRET], stream=out)
    logging.getLogger("pabx_worker.test").warning("using %s", SECRET)
    err = out.getvalue()
    assert "WARNING" in err and SECRET not in err


@pytest.fixture(autouse=True)
def _reset_logging() -> object:
    yield None
    logging.getLogger().handlers.clear()
