"""Configuration: one typed object, read from ``PABX_WORKER_*`` and an optional TOML file.

Precedence, highest first: values passed in code, environment variables,
the ``--config`` TOML file, defaults.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from worker.errors import ConfigurationError

__all__ = ["ENV_PREFIX", "PabxTarget", "Settings", "load_settings"]

#: Prefix of every environment variable.
ENV_PREFIX = "PABX_WORKER_"
#: Name of the target built from PABX_URL / PABX_API_KEY / PABX_CHANNEL_ID.
DEFAULT_TARGET = "default"

Seconds = Annotated[float, Field(gt=0)]


def _check_http_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value.rstrip("/") if value else value


class PabxTarget(BaseModel):
    """One PABX the worker can send commands to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    api_key: SecretStr
    channel_id: Annotated[int, Field(gt=0)]
    #: Requests per second sent to this PABX by the whole fleet; ``None`` for no limit.
    rate_limit: Annotated[float, Field(gt=0)] | None = None
    #: The target's name (the ``[pabx.NAME]`` table); set by :meth:`Settings.targets`.
    name: str = DEFAULT_TARGET

    _url = field_validator("url")(classmethod(lambda cls, v: _check_http_url(v)))


class Settings(BaseSettings):
    """Every setting of pabx-worker (SPEC §2); the field name is the variable without prefix."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, case_sensitive=False
    )

    amqp_url: str = "amqp://guest:guest@localhost:5672/%2F"
    pabx_url: str | None = None
    pabx_api_key: SecretStr | None = None
    pabx_channel_id: Annotated[int, Field(gt=0)] | None = None
    #: Further targets by name, from ``[pabx.NAME]`` tables of the TOML file.
    pabx: dict[str, PabxTarget] = Field(default_factory=dict)
    store_url: str = "sqlite:///pabx-worker.sqlite3"
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 32
    command_ttl_s: Seconds = 120.0
    http_port: Annotated[int, Field(ge=0, le=65535)] = 8081
    #: Address the /metrics, /healthz, /readyz endpoint listens on.
    http_host: str = "0.0.0.0"
    device_passwords_file: Path | None = None
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # PABX client
    pabx_connect_timeout_s: Seconds = 3.0
    pabx_read_timeout_s: Seconds = 5.0
    #: Longest idle time of a pooled keep-alive connection before it is reused: keep it
    #: below the PABX's own keep-alive timeout, so a request never meets a closed socket.
    pabx_idle_timeout_s: Seconds = 4.0
    #: Lease on a claimed command; renewed every third of it while the worker holds it, so
    #: it bounds how soon another worker takes over from a dead one. Unset: twice the
    #: longest request plus 10 s.
    lease_s: Seconds | None = None
    #: Resend after an ambiguous failure (read timeout, reset, 500/502/504); SPEC §5.
    retry_ambiguous: bool = False
    #: HTTP attempts inside one delivery before handing over to the retry queues.
    retry_in_process_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    #: Longest sleep between in-process attempts.
    retry_in_process_max_wait_s: Seconds = 1.0
    #: PABX attempts in all before a command is ``failed``.
    retry_max_attempts: Annotated[int, Field(ge=1, le=100)] = 12

    #: Transient PABX failures in a row that open the circuit breaker.
    circuit_threshold: Annotated[int, Field(ge=1)] = 5
    #: How long the circuit stays open before one probe request.
    circuit_reset_s: Seconds = 5.0

    # Topology
    commands_exchange: str = "pabx.commands"
    command_queue: str = "pabx.redirect"
    routing_key: str = "redirect"
    results_exchange: str = "pabx.results"
    unrouted_exchange: str = "pabx.unrouted"
    unrouted_max_length: Annotated[int, Field(ge=1)] = 100_000
    dead_exchange: str = "pabx.dead"
    parked_queue: str = "pabx.parked"
    retry_queue_prefix: str = "pabx.retry"
    #: Broker-held retry delays, one queue each.
    retry_delays_s: tuple[Seconds, ...] = (1.0, 5.0, 30.0)
    queue_type: Literal["quorum", "classic"] = "quorum"
    delivery_limit: Annotated[int, Field(ge=2, le=1000)] = 10
    heartbeat_s: Annotated[int, Field(ge=0, le=600)] = 30
    #: How long SIGTERM waits for in-flight commands.
    shutdown_timeout_s: Seconds = 30.0

    _pabx_url = field_validator("pabx_url")(classmethod(lambda cls, v: _check_http_url(v)))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    def lease_seconds(self) -> float:
        """The lease on a claimed command (``LEASE_S``, or derived from the PABX timeouts)."""
        request_s = self.pabx_connect_timeout_s + self.pabx_read_timeout_s
        return self.lease_s if self.lease_s is not None else 2 * request_s + 10.0

    def targets(self) -> dict[str, PabxTarget]:
        """Every configured PABX target by name; the flat variables make ``default``."""
        found = {name: t.model_copy(update={"name": name}) for name, t in self.pabx.items()}
        if self.pabx_url and self.pabx_api_key and self.pabx_channel_id:
            found.setdefault(
                DEFAULT_TARGET,
                PabxTarget(
                    url=self.pabx_url,
                    api_key=self.pabx_api_key,
                    channel_id=self.pabx_channel_id,
                ),
            )
        return found

    def require_targets(self) -> dict[str, PabxTarget]:
        """The targets, or a ConfigurationError naming what ``run`` is missing."""
        targets = self.targets()
        if targets:
            return targets
        missing = [
            ENV_PREFIX + name.upper()
            for name in ("pabx_url", "pabx_api_key", "pabx_channel_id")
            if getattr(self, name) is None
        ]
        raise ConfigurationError(f"{', '.join(missing)}: required to reach the PABX")

    def device_passwords(self) -> dict[str, str]:
        """Read DEVICE_PASSWORDS_FILE (TOML or JSON): DISPOSITIVO → SENHA_DISPOSITIVO."""
        path = self.device_passwords_file
        if path is None:
            return {}
        name = f"{ENV_PREFIX}DEVICE_PASSWORDS_FILE"
        try:
            raw = path.read_bytes()
            data: Any = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"{name}: cannot read {path}: {exc}") from exc
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()
        ):
            raise ConfigurationError(f"{name}: {path} must map device names to password strings")
        return data


def load_settings(config_file: Path | None = None, **values: Any) -> Settings:
    """Build the settings, turning validation errors into one ConfigurationError."""
    cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigurationError(f"--config: no such file: {config_file}")
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})
        cls = type("Settings", (Settings,), {"model_config": config})
    try:
        return cls(**values)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None
    except ValueError as exc:  # a malformed TOML file or env JSON
        raise ConfigurationError(f"configuration: {exc}") from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in error["loc"]]
        name = ENV_PREFIX + loc[0].upper() if loc else "configuration"
        where = ".".join(loc[1:])
        lines.append(f"{name}{'.' + where if where else ''}: {error['msg']}")
    return "; ".join(lines)
