"""Bad input: a corpus of malformed messages, plus generated ones, against the consumer path.

Each malformed message must yield exactly one ``rejected`` event (``invalid_command``),
correlated by its command id when one can be read, else by the AMQP ``message_id`` /
``correlation_id`` it carried, else by its deterministic event id (from the raw bytes), and a
parked copy of the producer's bytes whose headers are bounded. The worker must never crash
and never block the queue.

Two levels:

* in process (no servers): each message is encoded by pika as a producer would, decoded by
  py-amqp as the worker's connection does (``inbound_header``), then carried through
  ``to_delivery`` → ``Processor.prepare``/``execute`` → ``fate_of``; every
  publication must be encodable again within the broker's frame size;
* through a running worker, once on the in-memory broker and once on RabbitMQ
  (``integration``): the whole corpus, then hypothesis-generated batches; a valid command
  sent last must still be accepted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from amqp import Message
from amqp.serialization import dumps
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tests.chaos.harness import size
from tests.integration.conftest import (
    API_KEY,
    BACKENDS,
    AnyPeer,
    RunningWorker,
    open_peer,
    private_settings,
    through_the_wire,
    url_for,
)
from worker.adapters.store.memory import MemoryStore
from worker.consume.fate import MAX_COPIED_HEADER_BYTES, MAX_REASON_CHARS, fate_of
from worker.consume.inbound import to_delivery
from worker.consume.pipeline import Decision, Finish, Policy, Prepared, Processor
from worker.contract.errors import InvalidCommand
from worker.contract.messages import Delivery, decode_command, raw_event_id, readable_command_id
from worker.contract.models import OutcomeEvent
from worker.contract.settings import PabxTarget, Settings
from worker.contract.topology import Topology
from worker.tools.fakes import FakePabx
from worker.tools.simulator import REQUIRED_FIELDS, SimulatorThread

#: The broker's frame size (RabbitMQ's default ``frame_max``): a copy's header must fit.
FRAME_MAX = 131_072
ABSENT = object()

# -- the corpus -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    body: bytes
    props: dict[str, Any] = field(default_factory=dict)


def _cid(tag: str) -> str:
    return f"bad-{tag}-{hashlib.sha1(tag.encode()).hexdigest()[:8]}"


def valid(tag: str, **changes: Any) -> dict[str, Any]:
    """A valid command, unique per ``tag``; ``changes`` override (ABSENT removes a key)."""
    redirect: dict[str, Any] = {
        "DISPOSITIVO": "1125000",
        "SENHA_DISPOSITIVO": "4567",
        "DISPOSITIVO_DESTINO": "1132000",
        "ID_CHAMADA": f"call-{tag}",
        "PRIORIDADE": "0",
        "DADOS": "111222333-44;Fulano",
    }
    redirect_changes = changes.pop("redirect") if isinstance(changes.get("redirect"), dict) else {}
    for key, value in redirect_changes.items():
        if value is ABSENT:
            redirect.pop(key, None)
        else:
            redirect[key] = value
    cmd: dict[str, Any] = {
        "command_id": _cid(tag),
        "type": "redirect",
        "version": 1,
        "redirect": redirect,
    }
    for key, value in changes.items():
        if value is ABSENT:
            cmd.pop(key, None)
        else:
            cmd[key] = value
    return cmd


def enc(doc: Any, **kwargs: Any) -> bytes:
    return json.dumps(doc, **kwargs).encode()


def _not_json() -> Iterator[Case]:
    good = enc(valid("not-json"))
    bodies = [
        b"",
        b" ",
        b"\n\t ",
        b"garbage",
        b"{",
        b"}",
        b"[",
        b"{'command_id': 'x', 'type': 'redirect'}",
        b"{command_id: 1}",
        b'{"type": "redirect",}',
        b'{"a": 1} {"b": 2}',
        b'{"a": 1}garbage',
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b'{"version": NaN}',
        b'{"version": Infinity}',
        b"undefined",
        b"<command><type>redirect</type></command>",
        b"---\ntype: redirect\nversion: 1\n",
        b"command_id,type\nx,redirect\n",
        b"/* comment */ {}",
        b'{"a": 1 // comment\n}',
        b"\x00",
        b"\x00{}",
        b'"unterminated',
        b"tru",
        b"nul",
        b"0x10",
        b"01",
        b"1e",
        base64.b64encode(good),
        b"\x1b[31mred\x1b[0m",
        good + b"\x00",
        good[:-1],
        good[: len(good) // 2],
        b"\xef\xbb\xbf" + enc(valid("bom")),
        good.replace(b":", b"=", 1),
        b"{" * 3 + b"}" * 2,
        b'{"command_id": "x" "type": "redirect"}',
    ]
    for i, body in enumerate(bodies):
        yield Case(f"not-json-{i:02d}", "not json", body)


def _bad_utf8() -> Iterator[Case]:
    sequences = {
        "ff": b"\xff",
        "fe-ff": b"\xfe\xff",
        "overlong-slash": b"\xc0\xaf",
        "surrogate": b"\xed\xa0\x80",
        "five-bytes": b"\xf8\x88\x80\x80\x80",
        "lone-continuation": b"\x80",
        "truncated": b"\xe2\x82",
        "above-max": b"\xf4\x90\x80\x80",
    }
    for name, seq in sequences.items():
        yield Case(f"utf8-bare-{name}", "bad utf-8", seq + b"-" + name.encode())
        body = enc(valid(f"utf8-{name}", redirect={"DADOS": "@@"})).replace(b"@@", seq)
        yield Case(f"utf8-in-dados-{name}", "bad utf-8", body)
    latin = json.dumps(valid("latin1", redirect={"DADOS": "São Paulo"}), ensure_ascii=False)
    yield Case("utf8-latin-1", "bad utf-8", latin.encode("latin-1"))
    yield Case("utf8-cp1252", "bad utf-8", latin.replace("São", "Sã€o").encode("cp1252"))
    for codec in ("utf-16", "utf-16-le", "utf-16-be", "utf-32"):
        yield Case(f"utf8-{codec}", "bad utf-8", json.dumps(valid(codec)).encode(codec))
    yield Case(
        "utf8-overlong-quote", "bad utf-8", enc(valid("overlong")).replace(b'"', b"\xc0\xa2", 2)
    )


def _content_types() -> Iterator[Case]:
    types = [
        "text/plain",
        "application/xml",
        "application/octet-stream",
        "text/json",
        "application/json; charset=latin-1",
        "application/json; charset=utf-16",
        "application/cloudevents+json",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "json",
        "application/jsonx",
        " x",
        "*/*",
        "application/json, text/plain",
    ]
    for i, content_type in enumerate(types):
        body = enc(valid(f"ctype-{i}"))
        yield Case(f"content-type-{i:02d}", "content type", body, {"content_type": content_type})
    for encoding in ("gzip", "deflate", "br", "base64", "latin-1", "utf-16", "binary"):
        body = enc(valid(f"cenc-{encoding}"))
        yield Case(
            f"content-encoding-{encoding}", "content type", body, {"content_encoding": encoding}
        )
    yield Case(
        "content-type-not-utf8",
        "content type",
        enc(valid("ctype-bytes")),
        {"content_type": b"application/\xffjson"},
    )


def _sizes() -> Iterator[Case]:
    big = valid("ten-mb", redirect={"DADOS": "x" * (10 * 1024 * 1024)})
    yield Case("size-10mb", "size", enc(big))
    padded = enc(valid("padded"))
    yield Case("size-64kib-plus-1", "size", padded + b" " * (64 * 1024 + 1 - len(padded)))
    yield Case("size-1mb-brackets", "size", b"[" * (1024 * 1024))
    yield Case("size-200kb-string", "size", enc("s" * 200_000))


def _nesting() -> Iterator[Case]:
    def nest(depth: int) -> Any:
        doc: Any = "bottom"
        for _ in range(depth):
            doc = [doc]
        return doc

    yield Case("nest-open-100k", "deep nesting", b"[" * 60_000)
    yield Case("nest-closed-5k", "deep nesting", b"[" * 5000 + b"]" * 5000)
    yield Case("nest-objects-3k", "deep nesting", b'{"a":' * 3000 + b"1" + b"}" * 3000)
    yield Case(
        "nest-in-dados-50", "deep nesting", enc(valid("nest-dados", redirect={"DADOS": nest(50)}))
    )
    yield Case("nest-extra-500", "deep nesting", enc(valid("nest-extra", extra=nest(500))))
    yield Case("nest-command-id", "deep nesting", enc(valid("nest-cid", command_id=nest(100))))
    yield Case("nest-version", "deep nesting", enc(valid("nest-version", version=nest(200))))
    yield Case("nest-redirect-900", "deep nesting", enc(valid("nest-redirect", redirect=nest(900))))
    yield Case(
        "nest-redirect-5k",
        "deep nesting",
        enc(valid("nest-redirect2")).replace(
            b'"redirect": {', b'"redirect": ' + b"[" * 5000 + b"{", 1
        ),
    )


WRONG_TYPES: dict[str, list[Any]] = {
    "command_id": [1, 1.5, True, [], {}, ["x"]],
    "type": [1, True, [], {}, "REDIRECT", "redirect ", "", "transfer"],
    "version": ["1", True, 2, 0, 1.5, -1, [1], {}],
    "issued_at": [1700000000, "yesterday", "30", "2026-13-01T00:00:00Z", "2026-11-29", True, []],
    "expires_at": [1700000000, "2026-11-29T16:00:00", "tomorrow", False, {}],
    "pabx": [1, "", "no-such-pabx", "a" * 65, "default!", []],
    "channel_id": [0, -1, "17", 1.5, True, 2**64, [], {}],
    "redirect": [[], "x", 1, True],
}
WRONG_REDIRECT: dict[str, list[Any]] = {
    "DISPOSITIVO": [1125000, "", [], {}, True],
    "SENHA_DISPOSITIVO": [4567, "", [], True],
    "DISPOSITIVO_DESTINO": [1132000, "", []],
    "ID_CHAMADA": [1, "", []],
    "PRIORIDADE": [20, -1, "20", "abc", "1.5", 1.5, True, "", " 1", "01", 19.5],
    "DADOS": [1, [], {}, True],
    "FONTE_MUSICA": ["abc", -1, "1234567890", 1.5, True, ""],
    "TEMPO_FILA": ["x", -5, "1e3", 1e12],
    "DISPOSITIVO_DESTINO_APOS_FINALIZACAO_CHAMADA": ["", 1, []],
    "TEMPO_POS_ATENDIMENTO": ["-1", "abc"],
}


def _wrong_types() -> Iterator[Case]:
    for key, values in WRONG_TYPES.items():
        for i, value in enumerate(values):
            tag = f"type-{key}-{i}"
            yield Case(tag, "wrong type", enc(valid(tag, **{key: value})))
    for key, values in WRONG_REDIRECT.items():
        for i, value in enumerate(values):
            tag = f"type-redirect-{key}-{i}"
            yield Case(tag, "wrong type", enc(valid(tag, redirect={key: value})))


def _missing_and_extra() -> Iterator[Case]:
    for key in ("type", "version", "redirect"):
        yield Case(f"missing-{key}", "missing field", enc(valid(f"missing-{key}", **{key: ABSENT})))
    for key in REQUIRED_FIELDS:
        tag = f"missing-redirect-{key}"
        yield Case(tag, "missing field", enc(valid(tag, redirect={key: ABSENT})))
    no_id = valid("missing-id", command_id=ABSENT)
    yield Case("missing-command-id-and-message-id", "missing field", enc(no_id))
    yield Case(
        "missing-command-id-bad-message-id",
        "missing field",
        enc(valid("missing-id2", command_id=ABSENT)),
        {"message_id": "has space"},
    )
    yield Case("missing-everything", "missing field", b"{}")
    empty = valid("empty-redirect")
    empty["redirect"] = {}
    yield Case("missing-redirect-fields", "missing field", enc(empty))
    for i, key in enumerate(
        [
            "priority",
            "Command_ID",
            "commandId",
            "reply_to",
            "correlation_id",
            "redirect2",
            "x" * 200,
        ]
    ):
        tag = f"extra-top-{i}"
        yield Case(tag, "extra field", enc(valid(tag, **{key: "1"})))
    yield Case("extra-top-null", "extra field", enc(valid("extra-null", extra=None)))
    for i, key in enumerate(
        ["PRIORIDAD", "senha_dispositivo", "DADOS ", "ID_CHAMADA\u200b", "EXTRA", "dispositivo"]
    ):
        tag = f"extra-redirect-{i}"
        yield Case(tag, "extra field", enc(valid(tag, redirect={key: "1"})))


def _command_ids() -> Iterator[Case]:
    ids = [
        "",
        " ",
        "a" * 129,
        "has space",
        "tab\there",
        "new\nline",
        "ç",
        "é-accent",
        "ü",
        "/",
        "a/b",
        "../x",
        "id#1",
        "id@x",
        "%20",
        "*",
        "🙂",
        "\u0661\u0662\u0663",
        "\uff21\uff22\uff23",
        "nul\u0000",
        "zero\u200bwidth",
        "-" * 129,
        "x" * 1000,
        "e\u0301",
    ]
    for i, command_id in enumerate(ids):
        yield Case(
            f"command-id-{i:02d}", "command_id", enc(valid(f"cid-{i}", command_id=command_id))
        )


def _dados() -> Iterator[Case]:
    texts = ["x" * 101, "ç" * 101, "🙂" * 101, "a" * 1000, "a" * 60_000, "e\u0301" * 51]
    for i, text in enumerate(texts):
        tag = f"dados-{i}"
        yield Case(tag, "DADOS over 100", enc(valid(tag, redirect={"DADOS": text})))


def _unicode() -> Iterator[Case]:
    variants: list[dict[str, Any]] = [
        {"type": "r\u0435direct"},  # Cyrillic ie
        {"type": "redirect\u200b"},
        {"type": "\uff52\uff45\uff44\uff49\uff52\uff45\uff43\uff54"},
        {"redirect": {"PRIORIDADE": "\u0661"}},
        {"redirect": {"PRIORIDADE": "\uff11"}},
        {"redirect": {"TEMPO_FILA": "²"}},
        {"redirect": {"PRIORIDADÉ": "1"}},
        {"pabx": "default\u202e"},
        {"pabx": "🙂"},
        {"channel_id": "\uff11\uff17"},
        {"version": "\u0661"},
        {"redirect": {"FONTE_MUSICA": "\u0663"}},
    ]
    for i, changes in enumerate(variants):
        tag = f"unicode-{i:02d}"
        yield Case(tag, "unicode", enc(valid(tag, **changes), ensure_ascii=i % 2 == 0))


def _nulls() -> Iterator[Case]:
    yield Case("null-body", "nulls", b"null")
    for key in ("type", "version", "redirect", "pabx", "command_id"):
        yield Case(f"null-{key}", "nulls", enc(valid(f"null-{key}", **{key: None})))
    for key in (
        "DISPOSITIVO",
        "SENHA_DISPOSITIVO",
        "DISPOSITIVO_DESTINO",
        "ID_CHAMADA",
        "PRIORIDADE",
        "DADOS",
    ):
        yield Case(
            f"null-redirect-{key}", "nulls", enc(valid(f"null-r-{key}", redirect={key: None}))
        )


def _duplicate_keys() -> Iterator[Case]:
    for i, (old, new) in enumerate(
        [
            ('"command_id": ', '"command_id": "dup-same", "command_id": '),
            ('"type": "redirect"', '"type": "redirect", "type": "redirect"'),
            ('"type": "redirect"', '"type": "transfer", "type": "redirect"'),
            ('"version": 1', '"version": 1, "version": 1'),
            ('"redirect": {', '"redirect": {}, "redirect": {'),
            ('"PRIORIDADE": "0"', '"PRIORIDADE": "19", "PRIORIDADE": "0"'),
            (
                '"SENHA_DISPOSITIVO": "4567"',
                '"SENHA_DISPOSITIVO": "x", "SENHA_DISPOSITIVO": "4567"',
            ),
            ('"DADOS": ', '"DADOS": "a", "DADOS": '),
            ('"redirect": {', '"extra": {"k": 1, "k": 2}, "redirect": {'),
        ]
    ):
        text = json.dumps(valid(f"dup-{i}"))
        assert old in text
        yield Case(f"duplicate-key-{i}", "duplicate keys", text.replace(old, new, 1).encode())


def _not_objects() -> Iterator[Case]:
    for i, doc in enumerate([[], [valid("in-list")], "string", 123, -1, True, False, 1.5, "{}"]):
        yield Case(f"top-level-{i}", "not an object", enc(doc))


def _amqp_oddities() -> Iterator[Case]:
    def junk(tag: str) -> bytes:
        return f"junk {tag}".encode()

    yield Case("amqp-timestamp-2^62", "amqp", junk("ts62"), {"timestamp": 2**62})
    yield Case("amqp-timestamp-max", "amqp", junk("tsmax"), {"timestamp": 2**64 - 1})
    yield Case("amqp-timestamp-0", "amqp", junk("ts0"), {"timestamp": 0})
    for i, value in enumerate(["abc", -3, "", {"nested": 1}, [1, 2]]):
        yield Case(
            f"amqp-delivery-count-{i}",
            "amqp",
            junk(f"dc{i}"),
            {"headers": {"x-delivery-count": value}},
        )
    yield Case(
        "amqp-retries-garbage", "amqp", junk("retries"), {"headers": {"x-pabx-retries": "x"}}
    )
    yield Case("amqp-correlation-not-utf8", "amqp", junk("corr"), {"correlation_id": b"\xff\xfe"})
    yield Case("amqp-message-id-not-utf8", "amqp", junk("mid"), {"message_id": b"m\xc3"})
    yield Case("amqp-header-key-not-utf8", "amqp", junk("hkey"), {"headers": {b"\xff\xfe": "v"}})
    yield Case("amqp-header-value-bytes", "amqp", junk("hval"), {"headers": {"v": b"\x00\xff"}})
    yield Case(
        "amqp-header-types",
        "amqp",
        junk("htypes"),
        {"headers": {"n": None, "b": True, "i": 2**40, "l": [1, "x", None], "d": {"x": {"y": 1}}}},
    )
    yield Case("amqp-header-100kb", "amqp", junk("h100k"), {"headers": {"h": "x" * 100_000}})
    yield Case(
        "amqp-header-near-frame-max", "amqp", junk("hmax"), {"headers": {"h": "x" * 130_800}}
    )
    yield Case(
        "amqp-headers-1000",
        "amqp",
        junk("h1000"),
        {"headers": {f"h{i:04d}": "y" * 20 for i in range(1000)}},
    )
    yield Case("amqp-message-id-is-command-id", "amqp", junk("midok"), {"message_id": "bad-mid-ok"})
    yield Case("amqp-message-id-invalid", "amqp", junk("midbad"), {"message_id": "has space"})
    yield Case("amqp-no-properties", "amqp", junk("noprops"), {"content_type": None})
    yield Case("amqp-no-ids", "amqp", junk("noids"), {"content_type": None, "correlation_id": None})
    yield Case(
        "amqp-reply-to-nowhere", "amqp", junk("reply"), {"reply_to": f"nowhere-{uuid.uuid4().hex}"}
    )
    yield Case(
        "amqp-type-and-app-id", "amqp", junk("app"), {"type": "x" * 255, "app_id": "é" * 100}
    )


def corpus() -> list[Case]:
    cases: list[Case] = []
    for part in (
        _not_json,
        _bad_utf8,
        _content_types,
        _sizes,
        _nesting,
        _wrong_types,
        _missing_and_extra,
        _command_ids,
        _dados,
        _unicode,
        _nulls,
        _duplicate_keys,
        _not_objects,
        _amqp_oddities,
    ):
        cases.extend(part())
    return cases


CORPUS = corpus()

# -- the wire, as producer and worker see it ------------------------------------------------


def amqp_properties(case: Case, correlation_id: str | None) -> dict[str, Any]:
    props: dict[str, Any] = {"content_type": "application/json", "delivery_mode": 2}
    if correlation_id is not None:
        props["correlation_id"] = correlation_id
    props.update(case.props)
    return {k: v for k, v in props.items() if v is not None}


TARGET = PabxTarget(url="http://pabx.invalid", api_key="k", channel_id=17)


@pytest.fixture(scope="module")
def unit_settings() -> Settings:
    return private_settings("amqp://guest:guest@127.0.0.1:1/%2F", "http://pabx.invalid")


def new_processor(pabx: FakePabx) -> Processor:
    return Processor(pabx=pabx, store=MemoryStore(), targets={"default": TARGET}, policy=Policy())


def run_in_process(
    settings_: Settings, body: bytes, props: dict[str, Any]
) -> tuple[Prepared, Decision, FakePabx, list[Any]]:
    """The consumer path without a broker: decode, prepare, execute, build publications."""
    message = through_the_wire(body, props)
    delivery = to_delivery(message)
    pabx = FakePabx()
    processor = new_processor(pabx)
    prepared = processor.prepare(delivery)
    decision = processor.execute(prepared)
    fate = fate_of(settings_, Topology.from_settings(settings_), prepared, decision)
    return prepared, decision, pabx, list(fate.publications)


def check_rejected_and_parked(
    settings_: Settings, body: bytes, props: dict[str, Any]
) -> dict[str, Any]:
    prepared, decision, pabx, publications = run_in_process(settings_, body, props)
    assert isinstance(decision, Finish)
    assert decision.status.value == "rejected", decision
    assert decision.error is not None and decision.error.code == "invalid_command"
    assert pabx.requests == []
    event = json.loads(decision.event)
    OutcomeEvent.model_validate(event)
    assert event["id"] == prepared.event_id
    data = event["data"]
    delivery = prepared.delivery
    if data["command_id"] is None:  # correlated by the AMQP properties it carried
        assert data["amqp"] == {
            "message_id": delivery.message_id,
            "correlation_id": delivery.correlation_id,
        }
        assert event["id"] == raw_event_id(delivery.body, readable_command_id(delivery))
    results = [p for p in publications if p.exchange == settings_.results_exchange]
    parked = [p for p in publications if p.exchange == settings_.dead_exchange]
    assert len(results) == 1 and len(parked) == 1
    copy = parked[0]
    assert copy.body == body  # the producer's bytes: replayable
    headers = copy.properties["application_headers"]
    assert headers["x-pabx-error-code"] == "invalid_command"
    assert headers["x-pabx-attempts"] == 0
    assert 0 < len(headers["x-pabx-error"]) <= MAX_REASON_CHARS
    assert len(dumps("F", [headers])) <= MAX_COPIED_HEADER_BYTES + 2 * MAX_REASON_CHARS * 4 + 512
    for publication in publications:  # each can be published again, within one frame
        header = Message(publication.body, **publication.properties)._serialize_properties()
        assert len(header) < FRAME_MAX - 64
    return event


# -- in process: the corpus -----------------------------------------------------------------


def test_the_corpus_has_200_distinct_malformed_messages() -> None:
    assert len(CORPUS) >= 200
    assert len({c.name for c in CORPUS}) == len(CORPUS)
    assert len({c.body for c in CORPUS}) == len(CORPUS)  # told apart by event id alone
    assert {c.category for c in CORPUS} >= {
        "not json",
        "bad utf-8",
        "content type",
        "size",
        "deep nesting",
        "wrong type",
        "missing field",
        "extra field",
        "command_id",
        "DADOS over 100",
        "unicode",
        "nulls",
        "duplicate keys",
    }


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_malformed_message_is_rejected_and_parked_in_process(
    unit_settings: Settings, case: Case
) -> None:
    check_rejected_and_parked(unit_settings, case.body, amqp_properties(case, f"corr-{case.name}"))


def test_an_over_long_integer_is_rejected_not_raised(unit_settings: Settings) -> None:
    # json.loads raises a plain ValueError (not JSONDecodeError) past 4300 digits.
    body = b'{"command_id": "big-int", "version": ' + b"1" * 5000 + b"}"
    event = check_rejected_and_parked(unit_settings, body, {"content_type": "application/json"})
    assert event["data"]["command_id"] == "big-int" or event["data"]["command_id"] is None


# -- in process: generated messages -----------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
TOP_KEYS = [
    "command_id",
    "type",
    "version",
    "issued_at",
    "expires_at",
    "pabx",
    "channel_id",
    "redirect",
]
REDIRECT_KEYS = [
    "DISPOSITIVO",
    "SENHA_DISPOSITIVO",
    "DISPOSITIVO_DESTINO",
    "ID_CHAMADA",
    "PRIORIDADE",
    "DADOS",
    "FONTE_MUSICA",
    "TEMPO_FILA",
    "DISPOSITIVO_DESTINO_APOS_FINALIZACAO_CHAMADA",
    "TEMPO_POS_ATENDIMENTO",
]
HEADER_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
SHORT = st.text(max_size=40)
PROPS = st.fixed_dictionaries(
    {},
    optional={
        "content_type": st.sampled_from(
            ["application/json", "text/plain", "application/json; charset=utf-8", ""]
        )
        | SHORT,
        "content_encoding": st.sampled_from(["utf-8", "gzip", "latin-1", "UTF8"]) | SHORT,
        "message_id": st.from_regex(r"[A-Za-z0-9._:-]{1,40}", fullmatch=True) | SHORT,
        "correlation_id": SHORT,
        "reply_to": st.just("amq.rabbitmq.reply-to.nowhere") | st.none(),
        "timestamp": st.integers(0, 2**64 - 1),
        "headers": st.dictionaries(
            st.text(min_size=1, max_size=20).filter(lambda k: k != "x-delivery-count"),
            HEADER_VALUES,
            max_size=4,
        ),
    },
)


@st.composite
def mutated_commands(draw: st.DrawFn) -> bytes:
    """A valid command with one to three things changed; it may still be valid."""
    cmd = valid(f"hyp-{draw(st.integers(0, 10**9))}")
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "set", "add", "drop-r", "set-r", "add-r"]))
        where = cmd if not op.endswith("-r") else cmd.get("redirect")
        if not isinstance(where, dict):
            continue
        keys = TOP_KEYS if where is cmd else REDIRECT_KEYS
        if op.startswith("drop"):
            where.pop(draw(st.sampled_from(keys)), None)
        elif op.startswith("set"):
            where[draw(st.sampled_from(keys))] = draw(JSON)
        else:
            where[draw(st.text(min_size=1, max_size=12))] = draw(JSON)
    text = json.dumps(cmd, ensure_ascii=draw(st.booleans()))
    tweak = draw(st.sampled_from(["none", "none", "truncate", "duplicate", "insert"]))
    if tweak == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif tweak == "duplicate":
        key = draw(st.sampled_from(['"type"', '"DADOS"', '"command_id"']))
        text = text.replace(key + ":", f"{key}: null, {key}:", 1)
    elif tweak == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(min_size=1, max_size=3)) + text[at:]
    return text.encode()


BODIES = (
    mutated_commands()
    | st.binary(max_size=300)
    | JSON.map(lambda doc: json.dumps(doc).encode())
    | st.text(max_size=200).map(str.encode)
)


def _is_valid(body: bytes, props: dict[str, Any]) -> bool:
    delivery = to_delivery(through_the_wire(body, props))
    try:
        command = decode_command(delivery)
    except (InvalidCommand, ValueError):
        return False
    return command.pabx == "default" and command.redirect.SENHA_DISPOSITIVO is not None


@settings(max_examples=size(300, 2000), deadline=None)
@given(body=BODIES, props=PROPS)
@example(body=b"", props={"content_encoding": "\x00"})  # once raised out of the consumer
def test_generated_messages_get_one_clear_outcome_in_process(
    unit_settings: Settings, body: bytes, props: dict[str, Any]
) -> None:
    props = {"delivery_mode": 2, **props}
    if _is_valid(body, props):
        _, decision, pabx, publications = run_in_process(unit_settings, body, props)
        assert isinstance(decision, Finish), decision
        assert decision.status.value in ("accepted", "expired")
        assert len(pabx.requests) <= 1
        assert all(isinstance(v, str) for r in pabx.requests for v in r.body.values())
        for publication in publications:
            Message(publication.body, **publication.properties)._serialize_properties()
    else:
        check_rejected_and_parked(unit_settings, body, props)


# -- through a running worker, on the in-memory broker and on RabbitMQ -------------------------


@dataclass
class LiveWorker:
    peer: AnyPeer
    running: RunningWorker


@pytest.fixture(scope="module", params=BACKENDS)
def live(request: pytest.FixtureRequest) -> Iterator[LiveWorker]:
    with SimulatorThread(api_key=API_KEY) as sim:
        settings_ = private_settings(url_for(request.param, request), sim.url, concurrency=8)
        with open_peer(settings_) as peer:
            running = RunningWorker(settings_, peer.connect)
            try:
                yield LiveWorker(peer, running)
            finally:
                running.stop()
    assert running.error is None


def expected_event_id(body: bytes, props: dict[str, Any]) -> str:
    delivery: Delivery = to_delivery(through_the_wire(body, props))
    return new_processor(FakePabx()).prepare(delivery).event_id


def publish_and_collect(
    live: LiveWorker, messages: list[tuple[str, bytes, dict[str, Any]]], timeout: float
) -> dict[str, list[dict[str, Any]]]:
    """Publish; returns the outcome events per message name, matched by event id."""
    peer = live.peer
    wanted = {expected_event_id(body, props): name for name, body, props in messages}
    assert len(wanted) == len(messages), "two messages would share an event id"
    for _, body, props in messages:
        peer.send(body, props)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = peer.events(len(peer.seen) + 1, timeout=0.2)
        if wanted.keys() <= {event["id"] for _, event in seen}:
            break
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in wanted.values()}
    for _, event in peer.seen:
        name = wanted.get(event["id"])
        if name is not None:
            found[name].append(event)
    return found


def assert_alive_and_flowing(live: LiveWorker) -> None:
    """The worker never crashed or reconnected, and a valid command still goes through."""
    peer, running = live.peer, live.running
    sentinel = valid(f"sentinel-{uuid.uuid4().hex}")
    peer.publish(sentinel)
    deadline = time.monotonic() + 20
    outcome: list[dict[str, Any]] = []
    while not outcome and time.monotonic() < deadline:
        seen = peer.events(len(peer.seen) + 1, timeout=0.2)
        outcome = [e for _, e in seen if e["data"]["command_id"] == sentinel["command_id"]]
    assert outcome and outcome[0]["data"]["status"] == "accepted"
    assert running.thread.is_alive() and running.error is None
    assert running.worker.state.sessions == 1
    assert peer.queue_length(peer.settings.command_queue) == 0


@pytest.mark.timeout(120)
def test_the_corpus_through_the_worker(live: LiveWorker) -> None:
    messages = [(c.name, c.body, amqp_properties(c, f"corr-{c.name}")) for c in CORPUS]
    found = publish_and_collect(live, messages, timeout=60)
    missing = sorted(name for name, events in found.items() if not events)
    assert missing == []
    for name, events in found.items():
        assert len({event["id"] for event in events}) == 1, name
        data = events[0]["data"]
        assert (data["status"], data["error"]["code"]) == ("rejected", "invalid_command"), name
    parked = live.peer.drain(live.peer.settings.parked_queue, len(CORPUS))
    by_body = {hashlib.sha256(c.body).digest(): c for c in CORPUS}
    assert sorted(by_body[hashlib.sha256(body).digest()].name for _, body in parked) == sorted(
        c.name for c in CORPUS
    )
    for props, _ in parked:
        headers = props.headers
        assert headers["x-pabx-error-code"] == "invalid_command"
        assert len(headers["x-pabx-error"]) <= MAX_REASON_CHARS
    assert_alive_and_flowing(live)


@pytest.mark.timeout(size(120, 600))
@settings(
    max_examples=size(15, 100),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(batch=st.lists(st.tuples(BODIES, PROPS), min_size=1, max_size=8))
def test_generated_messages_through_the_worker(
    live: LiveWorker, batch: list[tuple[bytes, dict[str, Any]]]
) -> None:
    live.peer.seen.clear()
    messages: list[tuple[str, bytes, dict[str, Any]]] = []
    ids: set[str] = set()
    for i, (body, props) in enumerate(batch):
        props = {"delivery_mode": 2, **props}
        props.pop("reply_to", None)
        event_id = expected_event_id(body, props)
        if event_id not in ids and not _is_valid(body, props):
            ids.add(event_id)
            messages.append((f"gen-{i}", body, props))
    assume(messages)
    found = publish_and_collect(live, messages, timeout=30)
    for name, events in found.items():
        assert events, f"no outcome for {name}: {messages}"
        assert len({event["id"] for event in events}) == 1
        assert events[0]["data"]["status"] == "rejected"
    parked = live.peer.drain(live.peer.settings.parked_queue, len(messages))
    assert len(parked) == len(messages)
    assert live.running.thread.is_alive() and live.running.worker.state.sessions == 1


def test_a_message_whose_properties_cannot_be_read_is_rejected_not_fatal() -> None:
    class Unreadable(dict[str, Any]):
        def get(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a property py-amqp decoded into something unexpected")

    class Message:
        def __init__(self) -> None:
            self.properties = Unreadable()
            self.body = b'{"command_id": "c1"}'
            self.delivery_info: dict[str, Any] = {}

    delivery = to_delivery(Message())
    assert delivery == Delivery(body=b'{"command_id": "c1"}')
    decision = new_processor(FakePabx()).execute(new_processor(FakePabx()).prepare(delivery))
    assert isinstance(decision, Finish) and decision.status.value == "rejected"
