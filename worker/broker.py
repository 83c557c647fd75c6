"""Broker connections: failover across several URLs, and one place that maps AMQP errors."""

from __future__ import annotations

from typing import Any

from kombu import Connection

from worker.errors import BrokerError

__all__ = ["broker_call", "connect", "where"]


def broker_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a broker operation, mapping connection failures to BrokerError."""
    from amqp.exceptions import ConnectionError as AmqpConnectionError
    from amqp.exceptions import NotFound, RecoverableChannelError, RecoverableConnectionError

    try:
        return fn(*args, **kwargs)
    except (
        OSError,
        AmqpConnectionError,
        RecoverableConnectionError,
        RecoverableChannelError,
    ) as exc:
        raise BrokerError(f"{type(exc).__name__}: {exc}") from exc
    except NotFound as exc:
        if "home node" not in str(exc):  # a classic queue whose cluster node is down
            raise
        raise BrokerError(f"{type(exc).__name__}: {exc}") from exc


def connect(url: str, *, start: int = 0, heartbeat: int = 0) -> Connection:
    """Connect to the first broker that answers of ``url`` (``;``-separated), from ``start``.

    Each reconnection starts one further along the list, so a worker whose node went away
    moves to the next one instead of waiting for it.
    """
    urls = [u for u in url.split(";") if u.strip()]
    first = start % len(urls)
    connection = Connection(
        ";".join(urls[first:] + urls[:first]),
        heartbeat=heartbeat,
        connect_timeout=5,
        failover_strategy="round-robin",
        transport_options={"confirm_publish": False},
    )
    broker_call(
        connection.ensure_connection,
        max_retries=len(urls) - 1,
        interval_start=0,
        interval_step=0,
        reraise_as_library_errors=False,
    )
    return connection


def where(connection: Connection) -> str:
    """host:port of a connection, never its credentials."""
    info = connection.info()
    return f"{info.get('hostname')}:{info.get('port')}"
