"""The PABX client: ``POST {url}/requests/{channelID}/executa-desvio`` over a pooled session.

Only this module knows ``requests``; its exceptions and non-200 answers are
mapped here to :mod:`worker.errors`.
"""

from __future__ import annotations

from collections.abc import Mapping

import requests
from requests.adapters import HTTPAdapter

from worker.errors import PabxUnreachable, error_for_status
from worker.settings import PabxTarget

__all__ = ["OPERATION", "HttpPabx"]

#: The vendor operation relayed today.
OPERATION = "executa-desvio"


class HttpPabx:
    """A :class:`~worker.pipeline.PabxClient` over ``requests``, pooled and kept alive."""

    def __init__(self, *, pool_size: int, connect_timeout_s: float, read_timeout_s: float) -> None:
        self._timeout = (connect_timeout_s, read_timeout_s)
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def redirect(self, target: PabxTarget, channel_id: int, body: Mapping[str, str]) -> int:
        url = f"{target.url}/requests/{channel_id}/{OPERATION}"
        headers = {"x-api-key": target.api_key.get_secret_value()}
        try:
            response = self._session.post(url, json=body, headers=headers, timeout=self._timeout)
        except requests.Timeout as exc:
            raise PabxUnreachable(f"PABX timed out: {type(exc).__name__}") from exc
        except requests.RequestException as exc:
            raise PabxUnreachable(f"PABX unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise error_for_status(response.status_code)
        return response.status_code

    def close(self) -> None:
        self._session.close()
