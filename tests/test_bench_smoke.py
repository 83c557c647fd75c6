"""A tiny run of ``python -m bench --quick`` so the bench does not rot (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_quick_bench_gives_every_command_an_outcome(amqp_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PABX_WORKER_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--quiet",
            "--probe",
            "--amqp-url",
            amqp_url,
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    drains = doc["drains"]
    assert {d["kind"] for d in drains} == {"worker", "pika", "faststream"}
    for run in drains + doc["paced"]:
        assert run["complete"], run
        assert run["outcomes"] == run["commands"]
        assert run["statuses"] == {"accepted": run["commands"]}
        assert run["pabx_requests"] == run["commands"]
        assert run["latency_ms"]["publish_to_pabx"]["n"] == run["commands"]
    for run in doc["paced"]:  # --probe: the same commands also reached the bare consumer
        assert run["latency_ms"]["publish_to_probe"]["n"] == run["commands"]
        assert all(slow["probe_ms"] >= 0 for slow in run["slowest_publish_to_pabx"])
    worker = next(d for d in drains if d["kind"] == "worker")
    assert worker["throughput"] > 0
    assert doc["idle"]["rss_mb"]["worker"] > 0
    assert doc["batch"]["rate"] > 0 and "error" not in doc["batch"]
    assert {t["target"] for t in doc["targets"]} >= {"idle RSS", "batch publish with confirms"}

    plots = {p.name for p in tmp_path.glob("*.png")}  # no --scale: no scaling plot
    assert plots >= {"bench-throughput.png", "bench-latency.png"}
    assert "bench-scaling.png" not in plots
    for name in plots:
        assert f"plot written to {tmp_path / name}" in proc.stdout
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
