"""Decoding AMQP deliveries into commands, and the ids derived from them (SPEC §4, §5)."""

from __future__ import annotations

import copy
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from worker.contract.errors import InvalidCommand
from worker.contract.messages import (
    Delivery,
    decode_command,
    event_id_for,
    fingerprint,
    raw_event_id,
    readable_command_id,
)
from worker.contract.models import MAX_COMMAND_BYTES, RedirectCommand

SPEC_EXAMPLE = Path(__file__).resolve().parent.parent / "schemas/examples/valid/spec-example.json"


def command_dict(**top: Any) -> dict[str, Any]:
    """The SPEC example as a dict; keyword arguments replace top-level fields."""
    data: dict[str, Any] = json.loads(SPEC_EXAMPLE.read_text(encoding="utf-8"))
    data.update(top)
    return data


def body_of(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode()


def delivery(data: Any = None, **properties: Any) -> Delivery:
    body = data if isinstance(data, bytes) else body_of(command_dict() if data is None else data)
    return Delivery(body=body, **properties)


def decoded(data: dict[str, Any]) -> RedirectCommand:
    return decode_command(delivery(data))


def padded_body(size: int) -> bytes:
    """The SPEC example padded with JSON whitespace inside the object to exactly ``size`` bytes."""
    body = body_of(command_dict())
    assert body.startswith(b"{")
    return b"{" + b" " * (size - len(body)) + body[1:]


# -- envelope: content type, encoding, size --------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "", "application/json", "application/json; charset=utf-8", "Application/JSON"],
)
def test_accepted_content_types(content_type: str | None) -> None:
    command = decode_command(delivery(content_type=content_type))
    assert command.command_id == "5f0c7d1e-2b1a-4f53-9d55-0b7e1c9a4e21"


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml"])
def test_rejected_content_types_are_named(content_type: str) -> None:
    with pytest.raises(InvalidCommand, match=re.escape(content_type)):
        decode_command(delivery(content_type=content_type))


@pytest.mark.parametrize("encoding", [None, "utf-8", "UTF8"])
def test_accepted_content_encodings(encoding: str | None) -> None:
    decode_command(delivery(content_encoding=encoding))


def test_gzip_content_encoding_is_rejected() -> None:
    with pytest.raises(InvalidCommand, match="gzip"):
        decode_command(delivery(content_encoding="gzip"))


def test_body_of_exactly_the_limit_passes() -> None:
    body = padded_body(MAX_COMMAND_BYTES)
    assert len(body) == MAX_COMMAND_BYTES == 64 * 1024
    command = decode_command(Delivery(body=body, content_type="application/json"))
    assert command.command_id == "5f0c7d1e-2b1a-4f53-9d55-0b7e1c9a4e21"


def test_body_one_byte_over_the_limit_is_rejected() -> None:
    body = padded_body(MAX_COMMAND_BYTES + 1)
    assert len(body) == 64 * 1024 + 1
    json.loads(body)  # still a perfectly good command, only too big
    with pytest.raises(InvalidCommand, match=str(MAX_COMMAND_BYTES)):
        decode_command(Delivery(body=body, content_type="application/json"))


# -- body: UTF-8, JSON, an object -------------------------------------------------------------


def test_body_not_utf8_is_rejected() -> None:
    body = body_of(command_dict()).replace(b"Fulano", "Jo\u00e3o".encode("latin-1"))
    with pytest.raises(InvalidCommand, match="not UTF-8"):
        decode_command(delivery(body))


def test_unicode_body_passes() -> None:
    data = command_dict()
    data["redirect"]["DADOS"] = "Jo\u00e3o;A\u00e7\u00e3o"
    assert decoded(data).redirect.DADOS == "João;Ação"


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b'{"command_id": "a"', b'{"a": 1} {"b": 2}', b"{'type': 'redirect'}"],
    ids=["empty", "text", "truncated", "two-documents", "single-quotes"],
)
def test_body_not_json_is_rejected(body: bytes) -> None:
    with pytest.raises(InvalidCommand, match="not JSON"):
        decode_command(delivery(body))


@pytest.mark.parametrize(
    ("body", "kind"),
    [(b"[]", "list"), (b'"redirect"', "str"), (b"42", "int"), (b"null", "NoneType")],
)
def test_body_not_an_object_is_rejected(body: bytes, kind: str) -> None:
    with pytest.raises(InvalidCommand, match=f"JSON {kind}, not an object"):
        decode_command(delivery(body))


def test_json_array_of_a_valid_command_is_rejected() -> None:
    with pytest.raises(InvalidCommand, match="list"):
        decode_command(delivery(body_of([command_dict()])))


def test_duplicate_command_id_key_is_rejected() -> None:
    body = b'{"command_id": "first", ' + body_of(command_dict())[1:]
    assert json.loads(body)["command_id"] != "first"  # a plain parser silently takes the last
    with pytest.raises(InvalidCommand, match="duplicate JSON key 'command_id'"):
        decode_command(delivery(body))


def test_duplicate_key_inside_redirect_is_rejected() -> None:
    body = body_of(command_dict()).replace(
        b'"PRIORIDADE": "0"', b'"PRIORIDADE": "0", "PRIORIDADE": "19"'
    )
    with pytest.raises(InvalidCommand, match="duplicate JSON key 'PRIORIDADE'"):
        decode_command(delivery(body))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_numbers_are_rejected(constant: str) -> None:
    body = body_of(command_dict()).replace(
        b'"channel_id": 17', f'"channel_id": {constant}'.encode()
    )
    assert constant.encode() in body
    with pytest.raises(InvalidCommand, match=re.escape(constant)):
        decode_command(delivery(body))


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 30_000 + b"]" * 30_000],
    ids=["arrays", "objects", "closed-arrays"],
)
def test_deep_nesting_is_rejected_without_crashing(body: bytes) -> None:
    small = body[: MAX_COMMAND_BYTES - 1]  # under the size limit: reaches the parser
    # CPython 3.11 stops at its recursion limit; a version with a deeper limit still fails
    # on the truncated or non-object body, never with an uncaught RecursionError.
    with pytest.raises(InvalidCommand, match=r"nested too deeply|not JSON|not an object"):
        decode_command(delivery(small))
    assert readable_command_id(delivery(small, message_id="m-1")) == "m-1"
    if len(body) > MAX_COMMAND_BYTES:  # over it: refused before parsing
        with pytest.raises(InvalidCommand, match="exceeds"):
            decode_command(delivery(body))
        assert readable_command_id(delivery(body, message_id="m-1")) == "m-1"


def test_model_errors_become_invalid_command() -> None:
    data = command_dict()
    data["redirect"]["PRIORIDADE"] = "20"
    with pytest.raises(InvalidCommand, match=r"redirect\.PRIORIDADE"):
        decoded(data)


def test_decoded_numbers_are_strings() -> None:
    data = command_dict()
    data["redirect"]["PRIORIDADE"] = 5
    data["redirect"]["TEMPO_FILA"] = 0
    command = decoded(data)
    assert command.redirect.PRIORIDADE == "5"
    assert command.redirect.TEMPO_FILA == "0"


# -- command id: body, else AMQP message_id ---------------------------------------------------


def test_missing_command_id_takes_the_message_id() -> None:
    data = command_dict()
    del data["command_id"]
    command = decode_command(delivery(data, message_id="amqp-0001"))
    assert command.command_id == "amqp-0001"


def test_null_command_id_takes_the_message_id() -> None:
    command = decode_command(delivery(command_dict(command_id=None), message_id="amqp-0002"))
    assert command.command_id == "amqp-0002"


def test_command_id_wins_over_the_message_id() -> None:
    command = decode_command(delivery(message_id="amqp-0003"))
    assert command.command_id == "5f0c7d1e-2b1a-4f53-9d55-0b7e1c9a4e21"


def test_command_id_and_message_id_both_missing_is_rejected() -> None:
    data = command_dict()
    del data["command_id"]
    with pytest.raises(InvalidCommand, match="command_id"):
        decode_command(delivery(data))


@pytest.mark.parametrize(
    "message_id", ["", "has space", "x" * 129, "pedido/991", "caf\u00e9", "abc\n"]
)
def test_message_id_that_is_not_a_command_id_is_rejected(message_id: str) -> None:
    data = command_dict()
    del data["command_id"]
    with pytest.raises(InvalidCommand, match="message_id"):
        decode_command(delivery(data, message_id=message_id))


def test_message_id_of_128_chars_is_usable() -> None:
    data = command_dict()
    del data["command_id"]
    message_id = "A-z0.9:_" * 16
    assert len(message_id) == 128
    assert decode_command(delivery(data, message_id=message_id)).command_id == message_id


# -- fingerprint and event ids ------------------------------------------------------------------


def with_redirect(**fields: Any) -> dict[str, Any]:
    data = command_dict()
    data["redirect"].update(fields)
    return data


def test_fingerprint_ignores_timestamps() -> None:
    base = fingerprint(decoded(command_dict()))
    later = command_dict(issued_at="2026-11-29T17:00:00Z", expires_at="2026-11-29T17:05:00+01:00")
    without = command_dict()
    del without["issued_at"], without["expires_at"]
    assert fingerprint(decoded(later)) == base
    assert fingerprint(decoded(without)) == base


def test_fingerprint_ignores_the_password() -> None:
    base = fingerprint(decoded(command_dict()))
    assert fingerprint(decoded(with_redirect(SENHA_DISPOSITIVO="9999"))) == base
    without = command_dict()
    del without["redirect"]["SENHA_DISPOSITIVO"]
    assert fingerprint(decoded(without)) == base


def test_fingerprint_does_not_reveal_the_password() -> None:
    assert "4567" not in fingerprint(decoded(command_dict()))


def test_fingerprint_ignores_the_command_id() -> None:
    assert fingerprint(decoded(command_dict(command_id="other"))) == fingerprint(
        decoded(command_dict())
    )


def test_fingerprint_treats_integer_and_string_numbers_alike() -> None:
    as_int = fingerprint(decoded(with_redirect(PRIORIDADE=5, TEMPO_FILA=23)))
    as_str = fingerprint(decoded(with_redirect(PRIORIDADE="5", TEMPO_FILA="23")))
    assert as_int == as_str


def test_fingerprint_does_not_depend_on_key_order() -> None:
    data = command_dict()
    reordered = dict(reversed(list(data.items())))
    reordered["redirect"] = dict(reversed(list(data["redirect"].items())))
    assert fingerprint(decoded(reordered)) == fingerprint(decoded(data))


@pytest.mark.parametrize(
    "change",
    [
        {"redirect": {"DISPOSITIVO_DESTINO": "1132001"}},
        {"redirect": {"PRIORIDADE": "1"}},
        {"redirect": {"DADOS": "111222333-44;Beltrano"}},
        {"redirect": {"TEMPO_FILA": None}},
        {"channel_id": 18},
        {"pabx": "other"},
    ],
    ids=["destination", "priority", "dados", "no-tempo-fila", "channel", "pabx"],
)
def test_fingerprint_changes_with_what_is_asked(change: dict[str, Any]) -> None:
    data = copy.deepcopy(command_dict())
    for key, value in change.items():
        if key == "redirect":
            data["redirect"].update(value)
            data["redirect"] = {k: v for k, v in data["redirect"].items() if v is not None}
        else:
            data[key] = value
    assert fingerprint(decoded(data)) != fingerprint(decoded(command_dict()))


def test_fingerprint_is_a_sha256_hex_digest() -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint(decoded(command_dict())))


def test_event_id_for_is_deterministic() -> None:
    command = decoded(command_dict())
    assert command.command_id is not None
    first = event_id_for(command.command_id, fingerprint(command))
    again = decoded(command_dict())
    assert again.command_id is not None
    assert event_id_for(again.command_id, fingerprint(again)) == first
    assert uuid.UUID(first).version == 5


def test_event_id_for_differs_per_fingerprint_and_command_id() -> None:
    base = event_id_for("cmd-1", "a" * 64)
    assert event_id_for("cmd-1", "b" * 64) != base
    assert event_id_for("cmd-2", "a" * 64) != base


def test_event_id_for_differs_for_another_destination() -> None:
    one = decoded(command_dict())
    two = decoded(with_redirect(DISPOSITIVO_DESTINO="1132001"))
    assert one.command_id is not None and two.command_id is not None
    assert event_id_for(one.command_id, fingerprint(one)) != event_id_for(
        two.command_id, fingerprint(two)
    )


def test_raw_event_id_is_deterministic_for_the_same_bytes() -> None:
    body = b"\x00garbage\xff"
    assert raw_event_id(body) == raw_event_id(bytes(body))
    assert raw_event_id(body, "cmd-1") == raw_event_id(body, "cmd-1")
    assert uuid.UUID(raw_event_id(body)).version == 5


def test_raw_event_id_differs_for_other_bytes_or_command_id() -> None:
    body = b'{"command_id": "cmd-1"'
    assert raw_event_id(body) != raw_event_id(body + b" ")
    assert raw_event_id(body) != raw_event_id(body, "cmd-1")
    assert raw_event_id(body, "cmd-1") != raw_event_id(body, "cmd-2")


def test_raw_event_id_never_equals_a_command_event_id() -> None:
    command = decoded(command_dict())
    assert command.command_id is not None
    body = body_of(command_dict())
    assert raw_event_id(body, command.command_id) != event_id_for(
        command.command_id, fingerprint(command)
    )


# -- readable_command_id: best effort for invalid commands --------------------------------------


def test_readable_command_id_reads_it_from_an_invalid_command() -> None:
    data = with_redirect(PRIORIDADE="20")
    with pytest.raises(InvalidCommand):
        decoded(data)
    assert readable_command_id(delivery(data)) == "5f0c7d1e-2b1a-4f53-9d55-0b7e1c9a4e21"
    assert readable_command_id(delivery(data, message_id="m-1")) == (
        "5f0c7d1e-2b1a-4f53-9d55-0b7e1c9a4e21"
    )


@pytest.mark.parametrize(
    "body",
    [
        body_of(command_dict(command_id="not a valid id")),
        body_of(command_dict(command_id=12345)),
        body_of({"no": "command id"}),
        body_of([{"command_id": "in-a-list"}]),
        b"not json",
        b"\xff\xfe",
    ],
    ids=["invalid-id", "number-id", "no-id", "array", "not-json", "not-utf8"],
)
def test_readable_command_id_falls_back_to_the_message_id(body: bytes) -> None:
    assert readable_command_id(Delivery(body=body, message_id="amqp-77")) == "amqp-77"
    assert readable_command_id(Delivery(body=body)) is None
    assert readable_command_id(Delivery(body=body, message_id="bad id")) is None


def test_readable_command_id_ignores_an_oversized_body() -> None:
    body = padded_body(MAX_COMMAND_BYTES + 1)
    assert readable_command_id(Delivery(body=body, message_id="amqp-78")) == "amqp-78"
