"""Fakes of the adapters, for fast tests of the pipeline (real ones: pabx.py, store/*)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from worker.contract.errors import PabxError, error_for_status
from worker.contract.settings import PabxTarget

__all__ = ["FakePabx", "SentRequest"]


@dataclass(frozen=True)
class SentRequest:
    target: str
    channel_id: int
    body: dict[str, str]


class FakePabx:
    """Answers from a script of statuses (or errors), then 200; records every request."""

    def __init__(self, script: Iterable[int | PabxError] = ()) -> None:
        self._script = list(script)
        self._lock = threading.Lock()
        self.requests: list[SentRequest] = []

    def redirect(self, target: PabxTarget, channel_id: int, body: Mapping[str, str]) -> int:
        with self._lock:
            self.requests.append(SentRequest(target.url, channel_id, dict(body)))
            answer = self._script.pop(0) if self._script else 200
        if isinstance(answer, PabxError):
            raise answer
        if answer != 200:
            raise error_for_status(answer)
        return answer

    def close(self) -> None:
        return None
