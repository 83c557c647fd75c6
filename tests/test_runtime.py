"""Process-wide settings pabx-worker run makes before it consumes."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator

import pytest

from worker.runtime import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_what_exists_and_collects_young_objects_less_often() -> None:
    kept = [object() for _ in range(100)]
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] > 700  # fewer young collections than CPython's default
    assert gc.get_freeze_count() >= len(kept)


def test_a_child_knows_whether_its_supervisor_is_still_its_parent() -> None:
    # In a process of its own: the death signal it asks for stays there.
    code = (
        "import os; from worker.runtime import end_with_supervisor as e;"
        " print(e(os.getppid()), e(os.getppid() + 1))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "False"], out.stderr
