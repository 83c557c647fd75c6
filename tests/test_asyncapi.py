"""``schemas/asyncapi.yaml``: AsyncAPI 3.0 structure, references, and agreement with the code."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.interop.node import HERE as INTEROP
from tests.interop.node import node_with
from worker.contract.models import ErrorCode, Status
from worker.contract.schemas import SCHEMA_FILES
from worker.contract.settings import Settings

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
DOCUMENT = SCHEMAS / "asyncapi.yaml"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def defaults() -> Settings:
    return Settings.model_construct()  # the defaults, whatever the environment says


def refs(node: Any, path: str = "") -> list[tuple[str, str]]:
    """Every ``$ref`` in the document: (where, target)."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                found.append((path, value))
            else:
                found += refs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += refs(value, f"{path}/{index}")
    return found


def pointer(document: Any, fragment: str) -> Any:
    """Resolve a JSON pointer such as ``/components/messages/X``."""
    node = document
    for raw in fragment.lstrip("/").split("/") if fragment.strip("/") else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def resolve(doc: dict[str, Any], ref: str) -> Any:
    file_part, _, fragment = ref.partition("#")
    target: Any = doc
    if file_part:
        path = (SCHEMAS / file_part).resolve()
        assert path.is_file(), f"$ref {ref!r}: no such file {path}"
        text = path.read_text(encoding="utf-8")
        target = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return pointer(target, fragment)


# -- AsyncAPI 3.0 structure ------------------------------------------------------------


def test_it_is_an_asyncapi_3_0_document(doc: dict[str, Any]) -> None:
    assert re.fullmatch(r"3\.0\.\d+", str(doc["asyncapi"]))
    assert doc["info"]["title"] and doc["info"]["version"]
    allowed = {
        "asyncapi", "id", "info", "servers", "defaultContentType", "channels", "operations",
        "components",
    }  # fmt: skip
    assert set(doc) <= allowed


def test_servers_have_host_and_protocol(doc: dict[str, Any]) -> None:
    assert doc["servers"]
    for server in doc["servers"].values():
        assert server["host"] and server["protocol"] in {"amqp", "amqps"}
        assert "://" not in server["host"]  # 3.0: host, not url


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    found = refs(doc)
    assert len(found) > 10
    for where, ref in found:
        try:
            assert resolve(doc, ref) is not None, where
        except (KeyError, IndexError) as exc:
            raise AssertionError(f"{where}: $ref {ref!r} does not resolve ({exc})") from None


def test_both_json_schemas_are_the_message_payloads(doc: dict[str, Any]) -> None:
    payload_files = {
        message["payload"]["$ref"].lstrip("./")
        for message in doc["components"]["messages"].values()
    }
    assert payload_files == set(SCHEMA_FILES)


def test_channels(doc: dict[str, Any]) -> None:
    for name, channel in doc["channels"].items():
        assert "address" in channel, name  # a string, or null for a dynamic one
        declared = set(channel.get("parameters", {}))
        used = set(re.findall(r"{([^}]+)}", channel["address"] or ""))
        assert used == declared, name
        assert channel["messages"], name
        amqp = channel["bindings"]["amqp"]
        assert amqp["is"] in {"routingKey", "queue"} and amqp["bindingVersion"] == "0.3.0"


def test_operations_use_their_channels_messages(doc: dict[str, Any]) -> None:
    for name, operation in doc["operations"].items():
        assert operation["action"] in {"send", "receive"}, name
        channel_ref = operation["channel"]["$ref"]
        assert channel_ref.startswith("#/channels/")
        for message in operation.get("messages", []):
            assert message["$ref"].startswith(channel_ref + "/messages/"), name
        reply = operation.get("reply")
        if reply:
            assert reply["address"]["location"].startswith("$message.")
            for message in reply.get("messages", []):
                assert message["$ref"].startswith(reply["channel"]["$ref"] + "/messages/")


def test_messages_have_content_types_and_correlation(doc: dict[str, Any]) -> None:
    messages = doc["components"]["messages"]
    assert messages["RedirectCommand"]["contentType"] == "application/json"
    assert messages["RedirectOutcome"]["contentType"] == "application/cloudevents+json"
    for name in ("RedirectCommand", "RedirectOutcome"):
        correlation = resolve(doc, messages[name]["correlationId"]["$ref"])
        assert correlation["location"] == "$message.header#/correlation_id"


# -- agreement with the code ------------------------------------------------------------


def test_channels_name_the_default_topology(doc: dict[str, Any], defaults: Settings) -> None:
    channels = doc["channels"]
    commands = channels["commands"]
    assert commands["address"] == defaults.routing_key
    assert commands["bindings"]["amqp"]["exchange"]["name"] == defaults.commands_exchange
    outcomes = channels["outcomes"]
    assert outcomes["address"] == "redirect.{status}"
    assert outcomes["bindings"]["amqp"]["exchange"]["name"] == defaults.results_exchange
    assert outcomes["parameters"]["status"]["enum"] == [s.value for s in Status]
    parked = channels["parked"]
    assert parked["address"] == parked["bindings"]["amqp"]["queue"]["name"]
    assert parked["address"] == defaults.parked_queue


def test_parked_headers_match_the_worker(doc: dict[str, Any]) -> None:
    headers = doc["components"]["schemas"]["ParkedHeaders"]["properties"]
    # Expired and superseded commands are not parked: there is nothing for an operator to do.
    codes = {code.value for code in ErrorCode} - {"expired", "superseded"}
    assert set(headers["x-pabx-error-code"]["enum"]) == codes
    assert headers["x-pabx-status"]["enum"] == ["rejected", "failed"]
    assert headers["x-pabx-error"]["maxLength"] == 512
    from worker.consume.fate import MAX_REASON_CHARS

    assert MAX_REASON_CHARS == 512


# -- the AsyncAPI parser itself (Node) -------------------------------------------------


@pytest.mark.timeout(300)
def test_the_asyncapi_parser_accepts_it() -> None:
    directory = INTEROP / "asyncapi"
    node = node_with("@asyncapi/parser", directory)
    done = subprocess.run(
        [node, str(directory / "check.mjs"), str(DOCUMENT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["channels"]) == {"commands", "outcomes", "replies", "parked"}
    assert "redirect" in summary["payloads"]["RedirectCommand"]  # the file $ref was followed
    assert "data" in summary["payloads"]["RedirectOutcome"]
    assert not [line for line in done.stdout.splitlines() if line.startswith("error")]
