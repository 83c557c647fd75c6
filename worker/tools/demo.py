"""``pabx-worker demo``: simulator + worker + sample commands on the local broker."""

from __future__ import annotations

import json
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from rich.console import Console
from rich.table import Table

from worker.consume.consumer import Worker
from worker.contract.errors import BrokerError
from worker.contract.settings import load_settings
from worker.produce.producer import Producer
from worker.runtime import build_processor
from worker.tools.example import VENDOR_EXAMPLE, redirect_command
from worker.tools.simulator import SimulatorThread

__all__ = ["run_demo", "sample_commands"]


def _command(command_id: str, call: str, **changes: Any) -> dict[str, Any]:
    redirect = {**VENDOR_EXAMPLE, "ID_CHAMADA": call, **changes.pop("redirect", {})}
    return redirect_command(command_id, redirect, **changes)


def sample_commands(run: str) -> list[tuple[str, str, bytes]]:
    """``(description, expected status, body)`` for each demo command."""
    ok_id, call = f"demo-{run}-1", f"08/07/24 10:46:19 010A {run[:4]}/00"
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()

    def dump(value: Any) -> bytes:
        return json.dumps(value).encode()

    return [
        ("valid redirect", "accepted", dump(_command(ok_id, call))),
        ("same command re-sent", "accepted", dump(_command(ok_id, call))),
        (
            "same id, other destination",
            "rejected",
            dump(_command(ok_id, call, redirect={"DISPOSITIVO_DESTINO": "1199000"})),
        ),
        (
            "PRIORIDADE 25",
            "rejected",
            dump(_command(f"demo-{run}-4", call + "b", redirect={"PRIORIDADE": 25})),
        ),
        (
            "typo: PRIORIDAD",
            "rejected",
            dump(
                _command(f"demo-{run}-5", call + "c")
                | {
                    "redirect": {
                        **{k: v for k, v in VENDOR_EXAMPLE.items() if k != "PRIORIDADE"},
                        "PRIORIDAD": "1",
                    }
                }
            ),
        ),
        (
            "deadline already passed",
            "expired",
            dump(_command(f"demo-{run}-6", call + "d", expires_at=past)),
        ),
        (
            "PABX refuses the API key",
            "failed",
            dump(_command(f"demo-{run}-7", call + "e", pabx="locked")),
        ),
        ("not JSON", "rejected", b"redirect 1125000 -> 1132000 please"),
    ]


def run_demo(config: Path | None = None, *, console: Console | None = None) -> int:
    """Run the demo; 0 when every sample got the outcome it should."""
    console = console or Console(width=None if sys.stdout.isatty() else 120)
    api_key = f"demo-{uuid.uuid4().hex}"
    with SimulatorThread(api_key=api_key) as sim:
        settings = load_settings(
            config,
            pabx_url=sim.url,
            pabx_api_key=api_key,
            pabx_channel_id=17,
            pabx={"locked": {"url": sim.url, "api_key": "wrong-key", "channel_id": 17}},
            http_port=0,
            concurrency=8,
            log_level="WARNING",
        )
        console.print(f"PABX simulator on {sim.url}; broker {_safe_url(settings.amqp_url)}")
        with build_processor(settings) as processor:
            worker = Worker(settings, processor)
            thread = threading.Thread(target=worker.run, name="demo-worker", daemon=True)
            thread.start()
            try:
                if not worker.ready.wait(15):
                    raise BrokerError("the worker did not start consuming within 15 s")
                rows = _exchange(settings, sample_commands(uuid.uuid4().hex[:8]))
            finally:
                worker.stop()
                thread.join(30)
        seen = requests.get(f"{sim.url}/_sim/requests", timeout=5).json()["requests"]
        console.print(_table(rows, sim_requests=len(seen)))
    return (
        0
        if all(row[1] == row[2]["status"] for row in rows if row[2]) and all(row[2] for row in rows)
        else 1
    )


def _exchange(settings: Any, samples: list[tuple[str, str, bytes]]) -> list[Any]:
    ids = [f"demo-msg-{i}-{uuid.uuid4().hex[:6]}" for i in range(len(samples))]
    with Producer(settings) as producer:
        producer.publish(
            ((body, cid) for (_, _, body), cid in zip(samples, ids, strict=True)), reply=True
        )
        outcomes = producer.wait_outcomes(set(ids), timeout=30)
    return [
        (what, want, outcomes.get(cid, {}).get("data"))
        for (what, want, _), cid in zip(samples, ids, strict=True)
    ]


def _table(rows: list[Any], *, sim_requests: int) -> Table:
    table = Table(title=f"demo outcomes ({sim_requests} requests reached the PABX simulator)")
    for column in ("command", "expected", "status", "error", "attempts", "duplicate", "id"):
        table.add_column(column)
    for what, want, data in rows:
        if data is None:
            table.add_row(what, want, "[red]no outcome[/red]", "", "", "", "")
            continue
        error = (data.get("error") or {}).get("code", "")
        colour = "green" if data["status"] == want else "red"
        table.add_row(
            what,
            want,
            f"[{colour}]{data['status']}[/{colour}]",
            error,
            str(data["attempts"]),
            str(data["duplicate"]).lower(),
            data["command_id"] or "-",
        )
    return table


def _safe_url(url: str) -> str:
    """The broker URL without its password."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))
