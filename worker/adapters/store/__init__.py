"""Idempotency stores, chosen by ``STORE_URL``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import SplitResult, urlsplit, urlunsplit

from worker.adapters.store.base import RETENTION_S, Claim, ClaimState, Store
from worker.contract.errors import ConfigurationError

__all__ = ["RETENTION_S", "Claim", "ClaimState", "Store", "open_store", "redact_url"]

#: The setting every error about the store URL names.
SETTING = "PABX_WORKER_STORE_URL"
#: What a store URL looks like, for error messages.
EXPECTED = "expected sqlite:///PATH, redis://HOST[:PORT][/DB] or postgresql://HOST[:PORT]/DB"


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
    """Open the store a ``STORE_URL`` names; an unusable URL is a ConfigurationError."""
    parts = _split(url)
    if parts.scheme == "sqlite":
        return _open_sqlite(url)
    if parts.scheme == "memory":
        from worker.adapters.store.memory import MemoryStore

        return MemoryStore()
    if parts.scheme in ("redis", "rediss"):
        from worker.adapters.store.redis import RedisStore

        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise ConfigurationError(f"{SETTING}: the Redis database must be a number (/0)")

        return RedisStore.from_url(url)
    if parts.scheme in ("postgresql", "postgres"):
        from worker.adapters.store.postgres import PostgresStore

        return PostgresStore.from_url(url)
    raise ConfigurationError(f"{SETTING}: unsupported scheme {parts.scheme!r}; {EXPECTED}")


def _split(url: str) -> SplitResult:
    """``url`` split, with its port checked (never echoing the URL: it may hold a password)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"{SETTING}: not a valid URL ({exc}); {EXPECTED}") from None
    if port == 0:
        raise ConfigurationError(f"{SETTING}: port 0 is not a port; {EXPECTED}")
    return parts


def _open_sqlite(url: str) -> Store:
    from worker.adapters.store.sqlite import SqliteStore
    from worker.contract.errors import StoreError

    path = url.removeprefix("sqlite:///")
    if not path or path == url:
        raise ConfigurationError(f"{SETTING}: expected sqlite:///PATH (sqlite:////ABSOLUTE/PATH)")
    directory = Path(path).parent
    if not directory.is_dir():
        raise ConfigurationError(f"{SETTING}: cannot open {path}: no directory {directory}")
    try:
        return SqliteStore(path)
    except StoreError as exc:  # a file we cannot open or that is no database
        raise ConfigurationError(f"{SETTING}: {exc}") from exc
