"""Configuration: one typed object, read from ``PABX_WORKER_*``, secret files and a TOML file.

Where a value comes from, highest first (README "Configuration", "Secrets from files"):

1. values passed in code;
2. a systemd credential (``LoadCredential=``) named after the variable,
   ``$CREDENTIALS_DIRECTORY/PABX_WORKER_AMQP_URL``; a target's key:
   ``PABX_WORKER_PABX_<NAME>_API_KEY`` (secret settings only);
3. the environment: ``PABX_WORKER_<VAR>``, or for a secret ``PABX_WORKER_<VAR>_FILE`` (a path),
   never both;
4. the ``--config`` TOML file: ``<var>``, or for a secret ``<var>_file``, never both (a target
   table: ``api_key`` or ``api_key_file``);
5. the defaults below.

Every mistake becomes one :class:`ConfigurationError` naming the variable, the credential or
the file and key as written there.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from worker.contract.errors import ConfigurationError

__all__ = [
    "CREDENTIALS_ENV",
    "ENV_PREFIX",
    "FILE_SUFFIX",
    "SECRET_SETTINGS",
    "PabxTarget",
    "Settings",
    "known_variables",
    "load_settings",
    "read_secret_file",
]

#: Prefix of every environment variable.
ENV_PREFIX = "PABX_WORKER_"
#: Name of the target built from PABX_URL / PABX_API_KEY / PABX_CHANNEL_ID.
DEFAULT_TARGET = "default"
#: Settings that are secrets: each may also come from a file (SPEC §9).
SECRET_SETTINGS = ("amqp_url", "pabx_api_key", "store_url")
#: ``PABX_WORKER_<VAR>_FILE`` (TOML: ``<var>_file``) names a file that holds a secret setting.
FILE_SUFFIX = "_FILE"
#: The variable systemd sets to the directory of the service's credentials.
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
#: What a JSON-valued variable should look like, for its error message.
JSON_EXAMPLES = {
    "retry_delays_s": "a JSON list such as [1, 5, 30]",
    "pabx": 'a JSON object such as {"NAME": {"url": "https://…", "channel_id": 17, …}}',
}

Seconds = Annotated[float, Field(gt=0)]


def _check_http_url(value: str | None) -> str | None:
    """``http(s)://host[:port][/prefix]``, without a trailing slash."""
    if value is None:
        return None
    shape = "expected http(s)://host:port[/prefix]"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc}); {shape}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must start with http:// or https://; {shape}")
    if not parts.hostname:
        raise ValueError(f"names no host; {shape}")
    if port == 0:
        raise ValueError(f"port 0 is not a port; {shape}")
    if parts.query or parts.fragment:
        raise ValueError(f"must have no query or fragment; {shape}")
    return value.rstrip("/")


class PabxTarget(BaseModel):
    """One PABX the worker can send commands to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    api_key: SecretStr
    channel_id: Annotated[int, Field(gt=0)]
    #: Requests per second sent to this PABX by the whole fleet; ``None`` for no limit.
    rate_limit: Annotated[float, Field(gt=0)] | None = None
    #: CA bundle that verifies an ``https://`` target (default: the system CAs).
    ca_file: Path | None = None
    #: Client certificate and key for mutual TLS.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Verify the target's certificate; ``false`` only when set explicitly (warned at start).
    verify: bool = True
    #: AMQP user names (the ``user_id`` property) allowed to command this target; unset: anyone.
    allowed_producers: tuple[str, ...] | None = None
    #: The target's name (the ``[pabx.NAME]`` table); set by :meth:`Settings.targets`.
    name: str = DEFAULT_TARGET

    _url = field_validator("url")(classmethod(lambda cls, v: _check_http_url(v)))


class Settings(BaseSettings):
    """Every setting of pabx-worker (SPEC §2); the field name is the variable without prefix."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, case_sensitive=False
    )

    amqp_url: str = "amqp://guest:guest@localhost:5672/%2F"
    #: CA bundle that verifies an ``amqps://`` broker (default: the system CAs).
    amqp_ca_file: Path | None = None
    #: Client certificate and key for an ``amqps://`` broker that asks for one.
    amqp_cert_file: Path | None = None
    amqp_key_file: Path | None = None
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
    #: CloudEvents ``source`` of outcomes: name the site (``<source>/<target>`` on the wire).
    event_source: Annotated[str, Field(pattern=r"^[^\s]+$")] = "pabx-worker"

    _pabx_url = field_validator("pabx_url")(classmethod(lambda cls, v: _check_http_url(v)))

    @field_validator("retry_delays_s")
    @classmethod
    def _increasing(cls, delays: tuple[float, ...]) -> tuple[float, ...]:
        if not delays:
            raise ValueError("must list at least one delay, e.g. [1, 5, 30]")
        if any(later <= earlier for earlier, later in pairwise(delays)):
            raise ValueError("must be in increasing order, each delay once, e.g. [1, 5, 30]")
        return delays

    @model_validator(mode="before")
    @classmethod
    def _target_credentials(cls, data: Any) -> Any:
        """A target's key from the credential ``PABX_WORKER_PABX_<NAME>_API_KEY``, if any."""
        targets = data.get("pabx") if isinstance(data, dict) else None
        if not isinstance(targets, dict):
            return data
        found = {}
        for name, table in targets.items():
            key = _read_credential(_target_credential(str(name)))
            found[name] = {**table, "api_key": key} if key and isinstance(table, dict) else table
        return {**data, "pabx": found}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            _CredentialsSource(settings_cls),
            _EnvSource(settings_cls),
            _TomlSource(settings_cls),
        )

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
    """Build the settings; any mistake in them is one ConfigurationError naming the setting."""
    _check_environment(os.environ)
    cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigurationError(f"--config: no such file: {config_file}")
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})
        cls = type("Settings", (Settings,), {"model_config": config})
    try:
        return cls(**values)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc, config_file)) from None
    except ValueError as exc:  # a source pydantic-settings wraps; ours raise ConfigurationError
        raise ConfigurationError(f"configuration: {exc.__cause__ or exc}") from None


def known_variables() -> frozenset[str]:
    """Every ``PABX_WORKER_*`` variable the worker reads, ``*_FILE`` ones included."""
    plain = {_variable(name) for name in Settings.model_fields}
    return frozenset(plain | {_variable(name) + FILE_SUFFIX for name in SECRET_SETTINGS})


# --- secrets from files --------------------------------------------------------------------


def read_secret_file(path: str | Path, name: str) -> str:
    """The text of ``path`` without one trailing newline; errors name ``name`` and the path."""
    if not str(path).strip():
        raise ConfigurationError(f"{name}: empty path")
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{name}: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode()
    except UnicodeDecodeError:  # not chained: the exception would carry the file's bytes
        raise ConfigurationError(f"{name}: {path} is not UTF-8 text") from None
    text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
    if not text:
        raise ConfigurationError(f"{name}: {path} is empty")
    return text


def _target_credential(target: str) -> str:
    """The systemd credential that holds the API key of target ``target``."""
    return f"{ENV_PREFIX}PABX_{target.upper()}_API_KEY"


def _read_credential(name: str) -> str | None:
    """The systemd credential ``name`` (``$CREDENTIALS_DIRECTORY/name``), or None."""
    directory = os.environ.get(CREDENTIALS_ENV)
    if not directory:
        return None
    path = Path(directory) / name
    if not os.path.lexists(path):
        return None
    return read_secret_file(path, f"systemd credential {name}")


def _resolve_key_files(
    data: dict[str, Any], secrets: Iterable[str], where: str, base: Path | None, table: str = ""
) -> dict[str, Any]:
    """``data`` with each ``<secret>_file`` key replaced by ``<secret>``, read from the file.

    ``where`` names the variable or file, ``table`` the keys' table (``pabx.NAME.``).
    """
    resolved = dict(data)
    suffix = FILE_SUFFIX.lower()
    for key in secrets:
        path = resolved.pop(key + suffix, None)
        if path is None:
            continue
        label = f"{where}{table}{key}{suffix}"
        if key in resolved:
            raise ConfigurationError(f"{where}{table}{key} and {table}{key}{suffix}: give one")
        if not isinstance(path, str):
            raise ConfigurationError(f"{label}: must be a path (a string)")
        resolved[key] = read_secret_file(base / path if base else path, label)
    return resolved


def _resolve_targets(targets: Any, where: str, base: Path | None, table: str = "") -> Any:
    """Target tables with ``api_key_file`` read; anything else is left to validation."""
    if not isinstance(targets, dict):
        return targets
    return {
        name: _resolve_key_files(conf, ["api_key"], where, base, f"{table}{name}.")
        if isinstance(conf, dict)
        else conf
        for name, conf in targets.items()
    }


class _CredentialsSource(PydanticBaseSettingsSource):
    """Secret settings handed over by systemd: ``$CREDENTIALS_DIRECTORY/PABX_WORKER_<VAR>``."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        secret = field_name in SECRET_SETTINGS
        return _read_credential(_variable(field_name)) if secret else None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found = {name: _read_credential(_variable(name)) for name in SECRET_SETTINGS}
        return {name: value for name, value in found.items() if value is not None}


class _EnvSource(EnvSettingsSource):
    """``PABX_WORKER_*`` variables; a secret's ``PABX_WORKER_<VAR>_FILE`` is read here."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = dict(super()._load_env_vars())
        for name in SECRET_SETTINGS:
            plain = _variable(name)
            path = env.get(self._apply_case_sensitive(plain + FILE_SUFFIX))
            if path is None:
                continue
            if self._apply_case_sensitive(plain) in env:
                raise ConfigurationError(f"{plain} and {plain}{FILE_SUFFIX} are both set: set one")
            env[self._apply_case_sensitive(plain)] = read_secret_file(path, plain + FILE_SUFFIX)
        return env

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        name = _variable(field_name)
        try:
            prepared = super().prepare_field_value(field_name, field, value, value_is_complex)
        except ValueError as exc:  # the JSON error says where, never what the value was
            expected = JSON_EXAMPLES.get(field_name, "JSON")
            raise ConfigurationError(f"{name}: expected {expected}: {exc}") from None
        if field_name == "pabx":
            return _resolve_targets(prepared, f"{name}: ", None)
        return prepared


class _TomlSource(TomlConfigSettingsSource):
    """The ``--config`` file: syntax, key names and ``*_file`` keys checked as it is read."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        path = Path(file_path)
        where = f"--config {path}: "
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{where}cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:  # says line and column
            raise ConfigurationError(f"{where}invalid TOML: {exc}") from None
        _check_toml_keys(data, where)
        data = _resolve_key_files(data, SECRET_SETTINGS, where, path.parent)
        if "pabx" in data:
            data["pabx"] = _resolve_targets(data["pabx"], where, path.parent, "pabx.")
        return data


# --- error messages ------------------------------------------------------------------------


def _variable(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _closest(word: str, choices: Iterable[str], prefix: str = "") -> str | None:
    """The choice closest to ``word`` (compared without ``prefix``), if any is close."""
    stems = {choice.removeprefix(prefix).lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.removeprefix(prefix).lower(), stems, n=1, cutoff=0.6)
    return stems[close[0]] if close else None


def _check_environment(environ: Mapping[str, str]) -> None:
    """Every ``PABX_WORKER_*`` variable must be one the worker reads: a typo is an error."""
    known = known_variables()
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        stem = upper.removesuffix(FILE_SUFFIX)
        if stem != upper and stem in known:
            secrets = ", ".join(_variable(s) + FILE_SUFFIX for s in SECRET_SETTINGS)
            problems.append(f"{name}: only secret settings are read from files ({secrets})")
        else:
            close = _closest(upper, known, ENV_PREFIX)
            hint = f" (did you mean {close}?)" if close else ""
            problems.append(f"{name}: not a pabx-worker setting{hint}")
    if problems:
        raise ConfigurationError("; ".join(problems))


def _check_toml_keys(data: dict[str, Any], where: str) -> None:
    """Unknown keys of the TOML file, named as written there, with the closest real one."""
    suffix = FILE_SUFFIX.lower()
    allowed = set(Settings.model_fields) | {name + suffix for name in SECRET_SETTINGS}
    target_keys = (set(PabxTarget.model_fields) - {"name"}) | {"api_key" + suffix}
    problems = [_unknown_key(key, allowed) for key in data if key not in allowed]
    targets = data.get("pabx")
    for name, table in targets.items() if isinstance(targets, dict) else ():
        for key in table if isinstance(table, dict) else ():
            if key not in target_keys:
                problems.append(_unknown_key(key, target_keys, f"pabx.{name}."))
    if problems:
        raise ConfigurationError(where + "; ".join(problems))


def _unknown_key(key: str, allowed: Iterable[str], table: str = "") -> str:
    close = _closest(key, allowed)
    return f"unknown key '{table}{key}'" + (f" (did you mean '{table}{close}'?)" if close else "")


def _describe(exc: ValidationError, config_file: Path | None) -> str:
    """One line for every validation error, each naming where the bad value came from."""
    by_origin: dict[str, list[str]] = {}
    for error in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in error["loc"]]
        message = error["msg"].removeprefix("Value error, ")
        if not loc:
            by_origin.setdefault("configuration", []).append(message)
            continue
        origin = _origin(loc[0], config_file)
        # A file names the key as written there; a variable names what is inside it.
        key = ".".join(loc if origin.startswith("--config") else loc[1:])
        by_origin.setdefault(origin, []).append(f"{key}: {message}" if key else message)
    return "; ".join(f"{origin}: {'; '.join(found)}" for origin, found in by_origin.items())


def _origin(field: str, config_file: Path | None) -> str:
    """Where ``field`` was set, by the precedence of the sources."""
    name = _variable(field)
    if field in SECRET_SETTINGS and _read_credential(name) is not None:
        return f"systemd credential {name}"
    environ = {key.upper() for key in os.environ}
    if field in SECRET_SETTINGS and name + FILE_SUFFIX in environ:
        return name + FILE_SUFFIX
    if name in environ or config_file is None:
        return name
    try:
        in_file = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        in_file = {}
    if field in in_file or field + FILE_SUFFIX.lower() in in_file:
        return f"--config {config_file}"
    return name
