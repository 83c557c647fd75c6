"""The official CloudEvents SDK reads every outcome example off a RabbitMQ message.

Live outcomes are read by the same SDK in the test kit's peers and in
``tests/integration/test_cloudevents_interop.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.kit.official_sdk import parse, read_outcome
from worker.contract.outcomes import CONTENT_TYPE

OUTCOMES = sorted(
    (Path(__file__).resolve().parents[1] / "schemas/examples/outcomes").glob("*.json")
)


@pytest.mark.parametrize("path", OUTCOMES, ids=[p.stem for p in OUTCOMES])
def test_the_sdk_reads_the_example(path: Path) -> None:
    body = path.read_bytes()
    event = read_outcome(body, CONTENT_TYPE, {"x-unrelated": 1})
    assert event == json.loads(body)


def test_an_event_without_a_command_id_has_no_subject_for_the_sdk() -> None:
    body = (path := Path(OUTCOMES[0]).parent / "rejected-invalid-command.json").read_bytes()
    assert path.is_file()
    event = parse(body, CONTENT_TYPE)
    assert event.get_subject() is None
    assert event.get_source() == "pabx-worker"


def test_the_sdk_refuses_a_null_attribute() -> None:
    """Why ``subject`` is left out rather than null: the SDK rejects ``"subject": null``."""
    event = json.loads((Path(OUTCOMES[0]).parent / "rejected-invalid-command.json").read_text())
    with pytest.raises(Exception, match="subject"):
        parse(json.dumps({**event, "subject": None}).encode(), CONTENT_TYPE)
