"""Logs: JSON or text lines, extra fields kept, secrets redacted by field, nothing else touched.

The secrets are the shortest a user could pick (``k``, ``4567``): ordinary values that happen
to contain them (``cmd-45678``, ``connected to the broker``) must stay byte for byte.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from typing import Any

import pytest

from worker.logs import MASK, batched, configure_logging, is_secret_field, redact_text

API_KEY = "k"
DEVICE_PASSWORD = "4567"
SECRETS = [API_KEY, DEVICE_PASSWORD]
ID_CHAMADA = "08/07/24 10:46:19 010A 4567/00"
ORDINARY = {
    "command_id": "cmd-45678",
    "ID_CHAMADA": ID_CHAMADA,
    "queue": "pabx.redirect",
    "broker": "localhost:5672",
    "status": "accepted",
}


@pytest.fixture(autouse=True)
def _reset_logging() -> object:
    yield None
    logging.getLogger().handlers.clear()


@pytest.fixture
def out() -> io.StringIO:
    return io.StringIO()


def _logger(out: io.StringIO, fmt: str = "json") -> logging.Logger:
    configure_logging(fmt=fmt, level="DEBUG", secrets=SECRETS, stream=out)
    return logging.getLogger("pabx_worker.test")


def _entries(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_line_with_extra_fields(out: io.StringIO) -> None:
    _logger(out).info("sent", extra={"command_id": "c-1", "ID_CHAMADA": "x", "attempt": 2})
    [entry] = _entries(out)
    assert entry["message"] == "sent" and entry["level"] == "INFO"
    assert (entry["command_id"], entry["attempt"]) == ("c-1", 2)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_ordinary_values_containing_short_secrets_stay_intact(fmt: str, out: io.StringIO) -> None:
    log = _logger(out, fmt)
    log.info("connected to the broker", extra={"broker": "localhost:5672"})
    log.info("command %s", "accepted", extra=ORDINARY)
    log.info("key %s of call %s kept", "cmd-45678", ID_CHAMADA)
    text = out.getvalue()
    assert MASK not in text
    for value in ("connected to the broker", "cmd-45678", ID_CHAMADA, "key cmd-45678 of call"):
        assert value in text
    if fmt == "json":
        entries = _entries(out)
        assert entries[0]["message"] == "connected to the broker"
        assert {k: entries[1][k] for k in ORDINARY} == ORDINARY
        assert entries[2]["message"] == f"key cmd-45678 of call {ID_CHAMADA} kept"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secret_fields_are_masked(fmt: str, out: io.StringIO) -> None:
    _logger(out, fmt).warning(
        "request",
        extra={
            "api_key": "ApiKey-long-one",
            "SENHA_DISPOSITIVO": "S3nha-x",
            "x-api-key": API_KEY,
            "headers": {"x-api-key": API_KEY, "Content-Type": "application/json"},
            "body": {"SENHA_DISPOSITIVO": DEVICE_PASSWORD, "ID_CHAMADA": ID_CHAMADA},
            "command_id": "cmd-45678",
        },
    )
    text = out.getvalue()
    for secret in ("ApiKey-long-one", "S3nha-x"):
        assert secret not in text
    assert "cmd-45678" in text and ID_CHAMADA in text
    if fmt == "json":
        [entry] = _entries(out)
        assert entry["api_key"] == entry["SENHA_DISPOSITIVO"] == entry["x-api-key"] == MASK
        assert entry["headers"] == {"x-api-key": MASK, "Content-Type": "application/json"}
        assert entry["body"] == {"SENHA_DISPOSITIVO": MASK, "ID_CHAMADA": ID_CHAMADA}
    else:
        assert f"api_key={MASK}" in text and f"x-api-key={MASK}" in text
        assert f'"SENHA_DISPOSITIVO": "{MASK}"' in text


def test_a_value_equal_to_a_known_secret_is_masked_whole(out: io.StringIO) -> None:
    _logger(out).info("using %s for %s", API_KEY, "cmd-45678", extra={"key": DEVICE_PASSWORD})
    [entry] = _entries(out)
    assert entry["message"] == f"using {MASK} for cmd-45678"
    assert entry["key"] == MASK


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_url_passwords_are_masked_in_message_fields_and_traceback(
    fmt: str, out: io.StringIO
) -> None:
    log = _logger(out, fmt)
    url = "amqp://worker:Br0ker-Pw@rabbit:5672/%2F"
    try:
        raise ConnectionError(f"cannot reach {url} for cmd-45678")
    except ConnectionError as exc:
        log.exception("failed: %s", exc, extra={"error": str(exc), "store": "redis://:k@r:6379/0"})
    text = out.getvalue()
    assert "Br0ker-Pw" not in text and ":k@" not in text
    assert f"amqp://worker:{MASK}@rabbit:5672/%2F for cmd-45678" in text
    assert f"redis://:{MASK}@r:6379/0" in text
    assert "Traceback (most recent call last)" in text
    if fmt == "json":
        [entry] = _entries(out)
        assert f"worker:{MASK}@rabbit" in entry["traceback"]
        assert (
            entry["message"]
            == f"failed: cannot reach amqp://worker:{MASK}@rabbit:5672/%2F for cmd-45678"
        )


def test_secret_fields_inside_exception_text_are_masked(out: io.StringIO) -> None:
    """A repr of headers or a body in an exception names its fields: those values go."""
    try:
        raise ValueError(
            f"bad request {{'x-api-key': '{API_KEY}', 'ID_CHAMADA': '{ID_CHAMADA}'}}"
            f' body {{"SENHA_DISPOSITIVO": "{DEVICE_PASSWORD}", "DADOS": "cmd-45678"}}'
            " conninfo host=db password=Pg-Pw user=w"
        )
    except ValueError:
        _logger(out).exception("handling failed")
    [entry] = _entries(out)
    traceback = entry["traceback"]
    assert f"'x-api-key': '{MASK}'" in traceback
    assert f'"SENHA_DISPOSITIVO": "{MASK}"' in traceback
    assert f"password={MASK} user=w" in traceback and "Pg-Pw" not in traceback
    assert f"'ID_CHAMADA': '{ID_CHAMADA}'" in traceback and '"DADOS": "cmd-45678"' in traceback


@pytest.mark.parametrize(
    "text",
    [
        "connected to the broker",
        "cmd-45678",
        ID_CHAMADA,
        "redirect.SENHA_DISPOSITIVO: required, and the device file does not know DISPOSITIVO '7'",
        "http://127.0.0.1:8080/requests/17/executa-desvio",
        "amqp://guest@localhost:5672/%2F",
        "token=abc123 claim_token=def",
        "api_key=SecretStr('**********')",
    ],
)
def test_redact_text_leaves_ordinary_text_alone(text: str) -> None:
    assert redact_text(text) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amqp://u:p@h1;amqp://v:q@h2/%2F", f"amqp://u:{MASK}@h1;amqp://v:{MASK}@h2/%2F"),
        ("redis://:p@ss@h:6379/0", f"redis://:{MASK}@h:6379/0"),
        (
            "postgresql://w@db/x?password=abc&sslmode=require",
            f"postgresql://w@db/x?password={MASK}&sslmode=require",
        ),
        ("host=db password='a b' port=5432", f"host=db password={MASK} port=5432"),
        ("X-Api-Key: k\r\nHost: pabx", f"X-Api-Key: {MASK}\r\nHost: pabx"),
        (
            "{'SENHA_DISPOSITIVO': {'value': '4567'}, 'n': 1}",
            f"{{'SENHA_DISPOSITIVO': {MASK}, 'n': 1}}",
        ),
        ("input_value={'SENHA_DISPOSITIVO': 4567}", f"input_value={{'SENHA_DISPOSITIVO': {MASK}}}"),
    ],
)
def test_redact_text_masks_urls_and_secret_fields(text: str, expected: str) -> None:
    assert redact_text(text) == expected
    assert redact_text(expected) == expected  # idempotent


def test_secret_field_names() -> None:
    for name in (
        "api_key",
        "X-Api-Key",
        "SENHA_DISPOSITIVO",
        "password",
        "amqp_password",
        "store_url",
    ):
        assert is_secret_field(name), name
    for name in ("command_id", "ID_CHAMADA", "token", "broker", "store", "at"):
        assert not is_secret_field(name), name


def test_numbers_still_format_and_bad_calls_do_not_raise(out: io.StringIO) -> None:
    log = _logger(out)
    log.info("took %.1f ms over %d attempts", 12.34, 4567)
    log.info("missing %s %s", "one")
    first, second = _entries(out)
    assert first["message"] == "took 12.3 ms over 4567 attempts"
    assert second["message"].startswith("missing %s %s")


def test_text_format_shows_extra_fields(out: io.StringIO) -> None:
    _logger(out, "text").warning("using %s", "cmd-45678", extra={"ID_CHAMADA": ID_CHAMADA})
    line = out.getvalue()
    assert "WARNING pabx_worker.test using cmd-45678" in line
    assert f'ID_CHAMADA="{ID_CHAMADA}"' in line


def test_every_secret_field_is_found_by_the_quick_scan() -> None:
    """redact_text skips text without a clue word: every secret name must contain one."""
    from worker.logs import _CLUES, _SECRET_SUFFIXES, SECRET_FIELDS

    names = [*SECRET_FIELDS, *(f"target{s}" for s in _SECRET_SUFFIXES), "X-Api-Key", "Cookie"]
    for name in names:
        folded = name.lower().replace("-", "_")
        assert any(clue in folded for clue in _CLUES), name
        assert "hunter2" not in redact_text(f"{name}=hunter2"), name


class _Writes(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_a_batch_writes_its_lines_in_order_in_one_write_when_it_ends() -> None:
    out = _Writes()
    log = _logger(out)
    with batched():
        for n in range(3):
            log.info("line %d", n, extra={"command_id": f"cmd-{n}"})
        with batched():  # nested: the outer batch writes
            log.warning("nested")
        assert out.getvalue() == "" and out.writes == 0
    assert out.writes == 1
    entries = _entries(out)
    assert [e["message"] for e in entries] == ["line 0", "line 1", "line 2", "nested"]
    assert entries[1]["command_id"] == "cmd-1"
    log.info("after")  # outside a batch: written at once, as before
    assert out.writes == 2 and _entries(out)[-1]["message"] == "after"


def test_other_threads_write_at_once_during_a_batch() -> None:
    out = _Writes()
    log = _logger(out)
    with batched():
        log.info("gathered")
        other = threading.Thread(target=lambda: log.info("other thread"))
        other.start()
        other.join()
        assert [e["message"] for e in _entries(out)] == ["other thread"]
    assert [e["message"] for e in _entries(out)] == ["other thread", "gathered"]


def test_a_batch_that_raises_still_writes_its_lines() -> None:
    out = _Writes()
    log = _logger(out)
    with pytest.raises(RuntimeError), batched():
        log.info("before the error")
        raise RuntimeError("boom")
    assert [e["message"] for e in _entries(out)] == ["before the error"]
    log.info("next")
    assert out.writes == 2


def test_batched_without_the_worker_handler_changes_nothing() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    with batched():
        logging.getLogger("pabx_worker.test").warning("plain")
        assert out.getvalue() == "plain\n"
