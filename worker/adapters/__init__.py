"""The adapters to the outside: the PABX's HTTP API, the idempotency store, the broker."""
