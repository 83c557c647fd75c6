"""Idempotency stores, chosen by ``STORE_URL``."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from worker.errors import ConfigurationError
from worker.store.base import RETENTION_S, Claim, ClaimState, Store

__all__ = ["RETENTION_S", "Claim", "ClaimState", "Store", "open_store", "redact_url"]


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}{port}"))
    except ValueError:
        return "<unparsable url>"


def open_store(url: str) -> Store:
    """Open the store a ``STORE_URL`` names: ``sqlite:///path``, ``memory://``, …"""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from worker.store.sqlite import SqliteStore

        path = url.removeprefix("sqlite:///")
        if not path or path == url:
            raise ConfigurationError(f"PABX_WORKER_STORE_URL: expected sqlite:///PATH, got {url!r}")
        return SqliteStore(path)
    if scheme == "memory":
        from worker.store.memory import MemoryStore

        return MemoryStore()
    if scheme in ("redis", "rediss"):
        from worker.store.redis import RedisStore

        return RedisStore.from_url(url)
    if scheme in ("postgresql", "postgres"):
        from worker.store.postgres import PostgresStore

        return PostgresStore.from_url(url)
    raise ConfigurationError(
        f"PABX_WORKER_STORE_URL: unsupported scheme {scheme!r} (sqlite, redis, postgresql)"
    )
