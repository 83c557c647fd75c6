"""The PABX client: ``POST {url}/requests/{channelID}/executa-desvio`` over pooled keep-alive.

Only this module knows the HTTP library (urllib3: a fraction of the CPU per call that
``requests`` spends, which bounds a worker's throughput); its exceptions and non-200
answers are mapped here to :mod:`worker.errors`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError, TimeoutError

from worker.errors import PabxUnreachable, error_for_status
from worker.settings import PabxTarget

__all__ = ["OPERATION", "HttpPabx"]

#: The vendor operation relayed today.
OPERATION = "executa-desvio"


class HttpPabx:
    """A :class:`~worker.pipeline.PabxClient` over urllib3, pooled and kept alive."""

    def __init__(self, *, pool_size: int, connect_timeout_s: float, read_timeout_s: float) -> None:
        self._pool = urllib3.PoolManager(
            num_pools=8,
            maxsize=pool_size,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
        )

    def redirect(self, target: PabxTarget, channel_id: int, body: Mapping[str, str]) -> int:
        url = f"{target.url}/requests/{channel_id}/{OPERATION}"
        headers = {
            "x-api-key": target.api_key.get_secret_value(),
            "Content-Type": "application/json",
        }
        payload = json.dumps(body, ensure_ascii=False).encode()
        try:
            response = self._pool.request("POST", url, body=payload, headers=headers)
        except NewConnectionError as exc:  # a ConnectTimeoutError subclass, oddly
            raise PabxUnreachable(f"PABX unreachable: {type(exc).__name__}") from exc
        except TimeoutError as exc:
            raise PabxUnreachable(f"PABX timed out: {type(exc).__name__}") from exc
        except HTTPError as exc:
            raise PabxUnreachable(f"PABX unreachable: {type(exc).__name__}") from exc
        if response.status != 200:
            raise error_for_status(response.status)
        return int(response.status)

    def close(self) -> None:
        self._pool.clear()
