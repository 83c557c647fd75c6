"""Token-bucket pacing per PABX target, measured on the real clock against the simulator."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from worker.pabx import HttpPabx
from worker.ratelimit import RateLimitedPabx, TokenBucket
from worker.settings import PabxTarget
from worker.simulator import SimulatorThread

BODY = {
    "DISPOSITIVO": "1125000",
    "SENHA_DISPOSITIVO": "4567",
    "DISPOSITIVO_DESTINO": "1132000",
    "ID_CHAMADA": "x",
    "PRIORIDADE": "0",
    "DADOS": "d",
}


def test_bucket_paces_on_a_fake_clock() -> None:
    now = [0.0]
    waits: list[float] = []
    bucket = TokenBucket(10, clock=lambda: now[0], sleep=waits.append)
    for _ in range(5):
        bucket.acquire()
    assert waits == [0.1, 0.2, 0.30000000000000004, 0.4]


def test_limited_target_stays_within_ten_percent_of_its_rate() -> None:
    with SimulatorThread(api_key="k") as sim:
        limited = PabxTarget(url=sim.url, api_key="k", channel_id=1, rate_limit=50)
        free = PabxTarget(url=sim.url + "/", api_key="k", channel_id=1)
        http = HttpPabx(pool_size=8, connect_timeout_s=2, read_timeout_s=2)
        pabx = RateLimitedPabx(http, {"a": limited, "b": free})
        count = 60
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: pabx.redirect(limited, 1, BODY), range(5)))  # warm up
            requests.delete(f"{sim.url}/_sim/requests", timeout=5)
            list(pool.map(lambda _: pabx.redirect(limited, 1, BODY), range(count)))
        stamps = [
            r["received_at"]
            for r in requests.get(f"{sim.url}/_sim/requests", timeout=5).json()["requests"]
        ]
        http.close()
    from datetime import datetime

    times = sorted(datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() for s in stamps)
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 45 <= rate <= 55, rate


def test_only_targets_with_a_limit_are_paced(monkeypatch: pytest.MonkeyPatch) -> None:
    acquired: list[float] = []
    monkeypatch.setattr(TokenBucket, "acquire", lambda self: acquired.append(0.0) or 0.0)

    class Fake:
        def redirect(self, target: PabxTarget, channel_id: int, body: object) -> int:
            return 200

    free = PabxTarget(url="http://free", api_key="k", channel_id=1)
    paced = PabxTarget(url="http://paced", api_key="k", channel_id=1, rate_limit=5)
    pabx = RateLimitedPabx(Fake(), {"free": free, "paced": paced})
    for _ in range(10):
        pabx.redirect(free, 1, BODY)
    for _ in range(3):
        pabx.redirect(paced, 1, BODY)
    assert len(acquired) == 3
