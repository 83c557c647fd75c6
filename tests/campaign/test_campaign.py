"""A one-minute campaign with a fixed seed: the checker must find no violation."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kit.processes import ROOT

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

SEED = 12012


@pytest.mark.timeout(300)
def test_one_minute_campaign_has_no_violation(amqp_url: str, tmp_path: Path) -> None:
    if importlib.util.find_spec("tests.campaign.checker") is None:
        pytest.skip("the history checker (tests/campaign/checker.py) is not there yet")
    history = tmp_path / f"campaign-{SEED}.jsonl"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "tests.campaign", "--minutes", "1", "--seed", str(SEED)),
            *("--history", str(history), "--drain", "60"),
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
