"""``pabx-worker batch`` and the Producer API on the real broker, with a worker running."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.kit.events import Peer
from tests.kit.processes import CLI, RunningWorker, env_for, set_faults, sim_requests
from tests.kit.samples import VENDOR_EXAMPLE
from tests.kit.topology import private_settings
from worker.contract.settings import Settings
from worker.produce.producer import Outgoing, Producer
from worker.tools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

#: Rows in the large-file run; PABX_BATCH_ROWS overrides it (the issue asks for 10,000).
LARGE_ROWS = int(os.environ.get("PABX_BATCH_ROWS", "10000"))
COLUMNS = ["command_id", *VENDOR_EXAMPLE, "channel_id"]


def rows(count: int, tag: str | None = None) -> list[dict[str, str]]:
    """Valid CSV rows, one call each, without command ids (they are derived)."""
    tag = tag or uuid.uuid4().hex[:8]
    return [
        {
            **VENDOR_EXAMPLE,
            "ID_CHAMADA": f"{tag}-{i:05d}",
            "DADOS": f"row {i};Fulano",
            "channel_id": "17",
        }
        for i in range(count)
    ]


def write_csv(path: Path, records: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=columns or COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(records)
    return path


def run_batch(
    settings: Settings, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "batch", *args],
        env=env_for(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_results(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as source:
        return list(csv.DictReader(source))


def calls(sim: SimulatorThread) -> Counter[str]:
    """PABX requests by ID_CHAMADA."""
    return Counter(r["body"]["ID_CHAMADA"] for r in sim_requests(sim))


def test_csv_batch_waits_for_outcomes_and_writes_results(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread, tmp_path: Path
) -> None:
    records = rows(20)
    records[3]["command_id"] = "explicit-id-3"
    source = write_csv(tmp_path / "calls.csv", records)
    out = tmp_path / "results.csv"
    done = run_batch(settings, str(source), "--wait", "60", "--results", str(out))
    assert done.returncode == 0, done.stderr
    assert "published 20 of 20" in done.stdout and "accepted 20" in done.stdout
    results = read_results(out)
    assert list(results[0]) == ["command_id", "status", "error_code", "attempts"]
    assert len(results) == 20
    assert {r["status"] for r in results} == {"accepted"}
    assert {r["attempts"] for r in results} == {"1"}
    assert "explicit-id-3" in {r["command_id"] for r in results}
    derived = [r["command_id"] for r in results if r["command_id"] != "explicit-id-3"]
    assert all(cid.startswith("batch-") and len(cid) == 38 for cid in derived)
    assert calls(sim) == Counter({r["ID_CHAMADA"]: 1 for r in records})
    body = next(r["body"] for r in sim_requests(sim) if r["body"]["ID_CHAMADA"].endswith("00003"))
    assert body["PRIORIDADE"] == "0" and body["DADOS"] == "row 3;Fulano"


def test_rerunning_the_file_or_an_edited_copy_redirects_no_call_twice(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread, tmp_path: Path
) -> None:
    records = rows(10)
    first = write_csv(tmp_path / "first.csv", records)
    assert run_batch(settings, str(first), "--wait", "60").returncode == 0
    again = run_batch(settings, str(first), "--wait", "60", "--results", str(tmp_path / "r.csv"))
    assert again.returncode == 0, again.stderr
    assert {r["status"] for r in read_results(tmp_path / "r.csv")} == {"accepted"}
    edited = [*reversed(records[:9]), {**records[9], "DISPOSITIVO_DESTINO": "1199000"}]
    edited += [{**records[0], "ID_CHAMADA": "new-call", "DADOS": "new"}]
    second = write_csv(tmp_path / "edited.csv", edited)
    assert run_batch(settings, str(second), "--wait", "60").returncode == 0
    sent = calls(sim)
    # one request per call, except the edited row (a new command) and the added one
    assert sent == Counter({**{r["ID_CHAMADA"]: 1 for r in records[:9]},
                            records[9]["ID_CHAMADA"]: 2, "new-call": 1})  # fmt: skip


def test_identical_rows_are_one_command(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread, tmp_path: Path
) -> None:
    records = rows(3)
    source = write_csv(tmp_path / "dup.csv", [*records, records[1], records[1]])
    out = tmp_path / "r.csv"
    done = run_batch(settings, str(source), "--wait", "60", "--results", str(out))
    assert done.returncode == 0, done.stderr
    assert "5 rows, 3 commands, 2 duplicate rows merged" in done.stdout
    assert len(read_results(out)) == 3
    assert sorted(calls(sim).values()) == [1, 1, 1]


def test_invalid_rows_publish_nothing_and_name_line_and_field(
    settings: Settings, peer: Peer, tmp_path: Path
) -> None:
    records: list[dict[str, Any]] = rows(4)
    records[1]["PRIORIDADE"] = "25"
    records[2]["channel_id"] = "seventeen"
    source = write_csv(tmp_path / "bad.csv", records)
    done = run_batch(settings, str(source))
    assert done.returncode == 2
    assert "line 3: PRIORIDADE" in done.stderr and "line 4: channel_id" in done.stderr
    assert "nothing was published" in done.stderr and "Traceback" not in done.stderr
    assert peer.queue_length(settings.command_queue) == 0


def test_skip_invalid_publishes_the_good_rows(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread, tmp_path: Path
) -> None:
    lines = [
        json.dumps(
            {
                "type": "redirect",
                "version": 1,
                "redirect": {**VENDOR_EXAMPLE, "ID_CHAMADA": f"j-{i}"},
            }
        )
        for i in range(3)
    ]
    lines.insert(1, '{"type": "redirect", "version": 1, "redirect": {"PRIORIDAD": "1"}}')
    lines.insert(2, "not json")
    source = tmp_path / "calls.jsonl"
    source.write_text("\n".join(lines) + "\n")
    done = run_batch(settings, str(source), "--wait", "60", "--skip-invalid")
    assert done.returncode == 0, done.stderr
    assert "line 2: redirect.PRIORIDAD" in done.stderr and "line 3: not JSON" in done.stderr
    assert "2 invalid rows skipped" in done.stdout and "accepted 3" in done.stdout
    assert calls(sim) == Counter({"j-0": 1, "j-1": 1, "j-2": 1})


def test_a_rejected_outcome_makes_the_exit_status_1(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread, tmp_path: Path
) -> None:
    set_faults(sim, fail_next=1, fail_status=400)
    source = write_csv(tmp_path / "calls.csv", rows(3))
    out = tmp_path / "r.csv"
    done = run_batch(settings, str(source), "--wait", "60", "--results", str(out))
    assert done.returncode == 1
    results = read_results(out)
    assert Counter(r["status"] for r in results) == Counter({"accepted": 2, "rejected": 1})
    assert {r["error_code"] for r in results if r["status"] == "rejected"} == {"pabx_bad_request"}


def test_json_summary_for_scripts(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread, tmp_path: Path
) -> None:
    set_faults(sim, fail_next=1, fail_status=400)
    records = rows(3)
    source = write_csv(tmp_path / "calls.csv", [*records, records[0], {"channel_id": "x"}])
    done = run_batch(settings, str(source), "--wait", "60", "--skip-invalid", "--json")
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)  # stdout holds the JSON alone
    assert summary == {
        "file": str(source),
        "rows": 5,
        "commands": 3,
        "merged_rows": 1,
        "invalid_rows": 1,
        "published": 3,
        "outcomes": {"accepted": 2, "rejected": 1},
        "error": None,
        "exit_code": 1,
    }


def test_without_wait_commands_are_queued_with_confirms(
    settings: Settings, peer: Peer, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "calls.csv", rows(5))
    out = tmp_path / "r.csv"
    done = run_batch(settings, str(source), "--results", str(out))
    assert done.returncode == 0, done.stderr
    assert {r["status"] for r in read_results(out)} == {"published"}
    queued = peer.drain(settings.command_queue, 5)
    assert len(queued) == 5
    for props, body in queued:
        command = json.loads(body)
        assert props.message_id == props.correlation_id == command["command_id"]
        assert props.content_type == "application/json" and props.delivery_mode == 2
        assert command["channel_id"] == 17 and command["redirect"]["PRIORIDADE"] == "0"


def test_outcomes_that_never_come_are_reported(
    settings: Settings, peer: Peer, tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "calls.csv", rows(2))
    out = tmp_path / "r.csv"
    done = run_batch(settings, str(source), "--wait", "1", "--results", str(out))
    assert done.returncode == 1
    assert {r["status"] for r in read_results(out)} == {"no_outcome"}
    assert "no_outcome 2" in done.stdout


def test_a_batch_killed_midway_can_simply_be_run_again(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread, tmp_path: Path
) -> None:
    records = rows(2000)
    source = write_csv(tmp_path / "calls.csv", records)
    proc = subprocess.Popen(
        [*CLI, "batch", str(source), "--wait", "120"],
        env=env_for(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not sim_requests(sim) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    out = tmp_path / "r.csv"
    done = run_batch(settings, str(source), "--wait", "240", "--results", str(out), timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {r["status"] for r in read_results(out)} == {"accepted"}
    assert calls(sim) == Counter({r["ID_CHAMADA"]: 1 for r in records})


@pytest.mark.timeout(300)
def test_a_large_file_runs_end_to_end(amqp_url: str, sim: SimulatorThread, tmp_path: Path) -> None:
    settings = private_settings(amqp_url, sim.url, concurrency=64, command_ttl_s=600)
    running = RunningWorker(settings)
    records = rows(LARGE_ROWS)
    source = write_csv(tmp_path / "large.csv", records)
    out = tmp_path / "r.csv"
    try:
        started = time.monotonic()
        done = run_batch(settings, str(source), "--wait", "280", "--results", str(out), timeout=290)
        elapsed = time.monotonic() - started
    finally:
        running.stop()
        _delete_topology(settings)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = read_results(out)
    assert len(results) == LARGE_ROWS and {r["status"] for r in results} == {"accepted"}
    assert len(calls(sim)) == LARGE_ROWS
    print(f"\n{LARGE_ROWS} rows end to end in {elapsed:.1f} s")  # for the record, not asserted


def _delete_topology(settings: Settings) -> None:
    import pika

    from worker.contract.topology import Topology

    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = connection.channel()
    topology = Topology.from_settings(settings)
    for queue in topology.queues:
        channel.queue_delete(queue.name)
    for exchange in topology.exchanges:
        channel.exchange_delete(exchange.name)
    connection.close()


# -- the Producer API ------------------------------------------------------------------


def test_producer_reports_unroutable_messages_per_message(settings: Settings, peer: Peer) -> None:
    with Producer(settings) as producer:
        peer.channel.queue_unbind(
            settings.command_queue, settings.commands_exchange, settings.routing_key
        )
        settled: list[tuple[str, bool]] = []
        report = producer.publish_messages(
            [Outgoing.command(b"{}", "lost-1"), Outgoing.command(b"{}", "lost-2")],
            on_settled=lambda m, ok, _: settled.append((m.properties["message_id"], ok)),
        )
    assert not report.ok and report.confirmed == []
    assert {m.correlation_id for m, _ in report.failed} == {"lost-1", "lost-2"}
    assert all("unroutable" in reason for _, reason in report.failed)
    assert sorted(settled) == [("lost-1", False), ("lost-2", False)]


def test_producer_pipelines_many_and_collects_outcomes(
    settings: Settings, peer: Peer, worker: RunningWorker
) -> None:
    ids = [f"api-{uuid.uuid4().hex}" for _ in range(50)]
    messages = [
        Outgoing.command(
            json.dumps(
                {
                    "command_id": cid,
                    "type": "redirect",
                    "version": 1,
                    "redirect": {**VENDOR_EXAMPLE, "ID_CHAMADA": cid},
                }
            ).encode(),
            cid,
        )
        for cid in ids
    ]
    seen: list[int] = []
    with Producer(settings) as producer:
        report = producer.publish_messages(messages, reply=True, window=8)
        outcomes = producer.wait_for(ids, 60, progress=seen.append)
    assert report.ok and len(report.confirmed) == 50
    assert set(outcomes) == set(ids)
    assert {o["data"]["status"] for o in outcomes.values()} == {"accepted"}
    assert seen[-1] == 50
