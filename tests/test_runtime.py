"""Process-wide settings pabx-worker run makes before it consumes."""

from __future__ import annotations

import gc
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
