"""One-minute campaigns with fixed seeds: the checker must find no violation.

Each runs three worker processes on a different shared store (a private Redis, a private
PostgreSQL server, one SQLite file), so the delivery guarantees are checked on each store
with several processes and slow, trickling and hanging answers. Besides the first seed,
each seed here once made a 10-minute campaign fail, and is kept as a regression case (the
faults a seed picks replay; their timing against the load does not).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.kit.processes import ROOT

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SEEDS = [
    # Also an overlap: a newer command for a call went out 3 ms after the worker gave up on
    # an unanswered request, before the PABX had noticed (fixed: the call stays held for
    # the read timeout after a request that got no answer).
    pytest.param(12012, "redis", id="12012-redis"),
    # An overlap of 32 ms after a read timeout: the simulator noticed the worker giving up
    # on a hung request only every 50 ms (fixed: it polls every 10 ms).
    pytest.param(457630, "postgres", id="457630-hang-poll-postgres"),
    # Rate-limit windows over the limit: a kill racing a rolling restart left an orphaned
    # worker pacing at the old rate (fixed: one worker process per place in the runner).
    pytest.param(313066, "sqlite", id="313066-orphan-rate-sqlite"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("seed", "store"), SEEDS)
def test_one_minute_campaign_has_no_violation(
    amqp_url: str, tmp_path: Path, seed: int, store: str
) -> None:
    history = tmp_path / f"campaign-{seed}.jsonl"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "tests.campaign", "--minutes", "1", "--seed", str(seed)),
            *("--store", store, "--history", str(history), "--drain", "60"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    print(done.stdout[-6000:], done.stderr[-3000:])
    assert history.is_file(), done.stderr[-3000:]
    assert done.returncode == 0, done.stdout[-6000:]
