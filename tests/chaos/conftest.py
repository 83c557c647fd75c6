"""Fixtures of the chaos scenarios: one :class:`Rig` (simulator + private topology) per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.chaos.harness import Rig


@pytest.fixture
def make_rig(amqp_url: str) -> Iterator[Callable[..., Rig]]:
    """Build rigs with settings overrides; every rig is torn down (queues deleted) at the end."""
    rigs: list[Rig] = []

    def make(**settings: Any) -> Rig:
        rig = Rig(amqp_url, **settings)
        rigs.append(rig)
        return rig

    yield make
    for rig in reversed(rigs):
        rig.close()
