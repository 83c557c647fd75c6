"""Settings: defaults, precedence, PABX targets, secrets from files, and every error's wording."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from worker.adapters.store import open_store
from worker.contract.errors import ConfigurationError
from worker.contract.settings import (
    CREDENTIALS_ENV,
    ENV_PREFIX,
    SECRET_SETTINGS,
    known_variables,
    load_settings,
)

SECRET = "s3cret-Value-7d41"
AMQP = f"amqp://pabx:{SECRET}@broker.example:5672/%2F"


pytestmark = pytest.mark.usefixtures("clean_worker_env")


def error_of(config: Path | None = None, **values: object) -> str:
    """The message of the ConfigurationError that load_settings raises; one line."""
    with pytest.raises(ConfigurationError) as caught:
        load_settings(config, **values)
    message = str(caught.value)
    assert "\n" not in message and SECRET not in message
    return message


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$CREDENTIALS_DIRECTORY`` as systemd sets it for a unit with LoadCredential=."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    monkeypatch.setenv(CREDENTIALS_ENV, str(directory))
    return directory


# --- defaults, precedence, targets -----------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    s = load_settings()
    assert s.amqp_url == "amqp://guest:guest@localhost:5672/%2F"
    assert (s.store_url, s.concurrency, s.command_ttl_s, s.http_port, s.log_format) == (
        "sqlite:///pabx-worker.sqlite3",
        32,
        120.0,
        8081,
        "json",
    )
    assert s.targets() == {}


def test_flat_variables_make_the_default_target_and_toml_adds_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "w.toml"
    config.write_text(
        'pabx_url = "http://file:1"\n'
        "[pabx.filial]\n"
        'url = "https://sp.example/cti/"\napi_key = "k2"\nchannel_id = 9\nrate_limit = 5\n'
    )
    monkeypatch.setenv("PABX_WORKER_PABX_URL", "http://env:2")
    monkeypatch.setenv("PABX_WORKER_PABX_API_KEY", "k1")
    monkeypatch.setenv("PABX_WORKER_PABX_CHANNEL_ID", "17")
    targets = load_settings(config).require_targets()
    assert targets["default"].url == "http://env:2"  # environment wins over the file
    assert targets["filial"].url == "https://sp.example/cti"
    assert (targets["filial"].channel_id, targets["filial"].rate_limit) == (9, 5)
    assert "k2" not in repr(targets["filial"])


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("devices.toml", '"1125000" = "4567"\n"7000" = "1234"\n'),
        ("devices.json", '{"1125000": "4567", "7000": "1234"}'),
    ],
)
def test_device_password_file(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    passwords = load_settings(device_passwords_file=path).device_passwords()
    assert passwords == {"1125000": "4567", "7000": "1234"}


@pytest.mark.parametrize("text", ['{"1125000": 4567}', "[1, 2]", "{not json"])
def test_bad_device_password_file_names_the_setting(tmp_path: Path, text: str) -> None:
    path = tmp_path / "devices.json"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match="PABX_WORKER_DEVICE_PASSWORDS_FILE"):
        load_settings(device_passwords_file=path).device_passwords()


# --- secrets from files: PABX_WORKER_<VAR>_FILE --------------------------------------------


@pytest.mark.parametrize("field", SECRET_SETTINGS)
def test_each_secret_setting_reads_its_file_variable(
    field: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = AMQP if field == "amqp_url" else f"redis://:{SECRET}@r:6379/0"
    value = SECRET if field == "pabx_api_key" else value
    path = write(tmp_path / field, value + "\n")
    monkeypatch.setenv(f"PABX_WORKER_{field.upper()}_FILE", str(path))
    got = getattr(load_settings(), field)
    assert (got if isinstance(got, str) else got.get_secret_value()) == value


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"{SECRET}\n", SECRET),
        (f"{SECRET}\r\n", SECRET),
        (f"{SECRET}\n\n", f"{SECRET}\n"),  # one newline, not all whitespace
        (f" {SECRET} ", f" {SECRET} "),
        (SECRET, SECRET),
    ],
)
def test_one_trailing_newline_is_stripped(
    text: str, secret: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PABX_WORKER_PABX_API_KEY_FILE", str(write(tmp_path / "key", text)))
    key = load_settings().pabx_api_key
    assert key is not None and key.get_secret_value() == secret


def test_a_value_and_its_file_variable_together_are_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PABX_WORKER_AMQP_URL", AMQP)
    monkeypatch.setenv("PABX_WORKER_AMQP_URL_FILE", str(write(tmp_path / "u", AMQP)))
    message = error_of()
    assert "PABX_WORKER_AMQP_URL and PABX_WORKER_AMQP_URL_FILE" in message


def unusable_file(kind: str, directory: Path) -> Path:
    """A path that cannot serve as a secret file, of the given kind."""
    if kind == "missing":
        return directory / "missing"
    if kind == "directory":
        return directory
    path = directory / kind
    path.write_bytes({"empty": b"", "only-a-newline": b"\n"}.get(kind, b"\xff" + SECRET.encode()))
    return path


@pytest.mark.parametrize(
    ("kind", "complaint"),
    [
        ("missing", "No such file"),
        ("directory", "Is a directory"),
        ("empty", "is empty"),
        ("only-a-newline", "is empty"),
        ("not-utf8", "UTF-8"),
    ],
)
def test_an_unusable_file_names_the_variable_and_the_path_never_the_contents(
    kind: str, complaint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = unusable_file(kind, tmp_path)
    monkeypatch.setenv("PABX_WORKER_STORE_URL_FILE", str(path))
    message = error_of()
    assert message.startswith("PABX_WORKER_STORE_URL_FILE: ") and str(path) in message
    assert complaint in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "key", SECRET)
    path.chmod(0)
    monkeypatch.setenv("PABX_WORKER_PABX_API_KEY_FILE", str(path))
    assert "Permission denied" in error_of()


def test_an_empty_file_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PABX_WORKER_AMQP_URL_FILE", "")
    assert error_of() == "PABX_WORKER_AMQP_URL_FILE: empty path"


# --- secrets in the TOML file -----------------------------------------------------------------


def test_toml_secret_file_keys_are_relative_to_the_toml_file(tmp_path: Path) -> None:
    write(tmp_path / "amqp", AMQP + "\n")
    write(tmp_path / "filial.key", SECRET + "\n")
    config = write(
        tmp_path / "w.toml",
        'amqp_url_file = "amqp"\n'
        '[pabx.filial]\nurl = "https://sp.example"\napi_key_file = "filial.key"\nchannel_id = 9\n',
    )
    settings = load_settings(config)
    assert settings.amqp_url == AMQP
    assert settings.targets()["filial"].api_key.get_secret_value() == SECRET


def test_toml_key_and_key_file_together_are_an_error(tmp_path: Path) -> None:
    key = write(tmp_path / "k", SECRET)
    config = write(
        tmp_path / "w.toml",
        '[pabx.filial]\nurl = "https://h"\nchannel_id = 9\n'
        f'api_key = "x"\napi_key_file = "{key}"\n',
    )
    message = error_of(config)
    assert message == (
        f"--config {config}: pabx.filial.api_key and pabx.filial.api_key_file: give one"
    )
    config.write_text(f'store_url = "memory://"\nstore_url_file = "{key}"\n')
    assert "store_url and" in error_of(config) and "store_url_file" in error_of(config)


def test_toml_unreadable_key_file_names_the_key_and_the_path(tmp_path: Path) -> None:
    config = write(
        tmp_path / "w.toml",
        '[pabx.filial]\nurl = "https://h"\napi_key_file = "nope.key"\nchannel_id = 9\n',
    )
    message = error_of(config)
    assert message.startswith(f"--config {config}: pabx.filial.api_key_file: cannot read ")
    assert str(tmp_path / "nope.key") in message


def test_environment_json_targets_take_api_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = write(tmp_path / "k", SECRET + "\n")
    target = {"url": "http://h:1", "channel_id": 3, "api_key_file": str(key)}
    monkeypatch.setenv("PABX_WORKER_PABX", json.dumps({"east": target}))
    assert load_settings().targets()["east"].api_key.get_secret_value() == SECRET
    monkeypatch.setenv("PABX_WORKER_PABX", json.dumps({"east": {**target, "api_key": "x"}}))
    assert error_of().startswith("PABX_WORKER_PABX: east.api_key and ")


# --- systemd credentials ---------------------------------------------------------------------


def test_credentials_are_named_after_the_variable(credentials: Path) -> None:
    write(credentials / "PABX_WORKER_AMQP_URL", AMQP + "\n")
    write(credentials / "PABX_WORKER_PABX_API_KEY", SECRET + "\n")
    write(credentials / "unrelated.toml", "whatever")
    settings = load_settings(pabx_url="http://h:1", pabx_channel_id=1)
    assert settings.amqp_url == AMQP
    assert settings.require_targets()["default"].api_key.get_secret_value() == SECRET


def test_a_credential_wins_over_the_environment_and_the_toml_file(
    credentials: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(credentials / "PABX_WORKER_STORE_URL", "redis://from-credential:6379/0\n")
    monkeypatch.setenv("PABX_WORKER_STORE_URL", "sqlite:////from/environment.db")
    config = write(tmp_path / "w.toml", 'store_url = "sqlite:///from-file.db"\n')
    assert load_settings(config).store_url == "redis://from-credential:6379/0"


def test_environment_wins_over_the_toml_file_for_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PABX_WORKER_AMQP_URL_FILE", str(write(tmp_path / "u", AMQP)))
    config = write(tmp_path / "w.toml", 'amqp_url = "amqp://file/"\n')
    assert load_settings(config).amqp_url == AMQP


def test_a_target_key_comes_from_its_credential(credentials: Path, tmp_path: Path) -> None:
    write(credentials / "PABX_WORKER_PABX_FILIAL_API_KEY", SECRET + "\n")
    config = write(tmp_path / "w.toml", '[pabx.filial]\nurl = "https://h"\nchannel_id = 9\n')
    assert load_settings(config).targets()["filial"].api_key.get_secret_value() == SECRET


def test_an_empty_credential_is_an_error(credentials: Path) -> None:
    write(credentials / "PABX_WORKER_PABX_API_KEY", "\n")
    message = error_of()
    assert message.startswith("systemd credential PABX_WORKER_PABX_API_KEY: ")
    assert str(credentials / "PABX_WORKER_PABX_API_KEY") in message and "empty" in message


def test_without_credentials_directory_nothing_is_read(tmp_path: Path) -> None:
    write(tmp_path / "PABX_WORKER_AMQP_URL", AMQP)  # not announced by $CREDENTIALS_DIRECTORY
    assert load_settings().amqp_url != AMQP


# --- unknown variables and keys ----------------------------------------------------------------


def test_unknown_variable_names_the_closest_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PABX_WORKER_CONCURENCY", "4")
    assert error_of() == (
        "PABX_WORKER_CONCURENCY: not a pabx-worker setting (did you mean PABX_WORKER_CONCURRENCY?)"
    )


def test_file_variable_of_a_setting_that_is_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PABX_WORKER_CONCURRENCY_FILE", "/run/secrets/x")
    message = error_of()
    assert message.startswith("PABX_WORKER_CONCURRENCY_FILE: only secret settings")
    assert "PABX_WORKER_STORE_URL_FILE" in message


def test_real_settings_ending_in_file_are_not_mistaken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AMQP_CA_FILE", "AMQP_CERT_FILE", "AMQP_KEY_FILE", "DEVICE_PASSWORDS_FILE"):
        monkeypatch.setenv(ENV_PREFIX + name, str(tmp_path / name.lower()))
    settings = load_settings()
    assert settings.amqp_ca_file == tmp_path / "amqp_ca_file"


def test_known_variables_are_the_settings_and_the_secret_file_variables() -> None:
    known = known_variables()
    assert {"PABX_WORKER_CONCURRENCY", "PABX_WORKER_AMQP_CA_FILE"} <= known
    assert {f"PABX_WORKER_{s.upper()}_FILE" for s in SECRET_SETTINGS} <= known
    assert "PABX_WORKER_CONCURRENCY_FILE" not in known


def test_unknown_setting_in_the_file_is_named_as_written(tmp_path: Path) -> None:
    config = write(tmp_path / "w.toml", "concurency = 4\n[pabx.a]\nratelimit = 2\n")
    assert error_of(config) == (
        f"--config {config}: unknown key 'concurency' (did you mean 'concurrency'?);"
        " unknown key 'pabx.a.ratelimit' (did you mean 'pabx.a.rate_limit'?)"
    )


def test_toml_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    config = write(tmp_path / "w.toml", 'log_format = "json"\nconcurrency = \n')
    message = error_of(config)
    assert message.startswith(f"--config {config}: invalid TOML: ")
    assert "line 2, column 15" in message


def test_missing_config_file(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.toml").startswith("--config: no such file")


# --- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("notalist", "expected a JSON list such as [1, 5, 30]"),
        ("[]", "must list at least one delay"),
        ("[5, 1]", "must be in increasing order"),
        ("[1, 1]", "must be in increasing order"),
        ("[1, -5]", "greater than 0"),
    ],
)
def test_retry_delays_are_checked(
    value: str, complaint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PABX_WORKER_RETRY_DELAYS_S", value)
    message = error_of()
    assert message.startswith("PABX_WORKER_RETRY_DELAYS_S: ") and complaint in message
    assert "Source" not in message


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("pabx.example:8443", "must start with http:// or https://"),
        ("ftp://pabx.example", "must start with http:// or https://"),
        ("http://", "names no host"),
        ("http://pabx.example:notaport", "not a valid URL"),
        ("https://pabx.example:99999", "not a valid URL"),
        ("http://pabx.example:0", "port 0"),
        ("http://pabx.example/?x=1", "no query"),
    ],
)
def test_malformed_pabx_url_names_the_variable(
    url: str, complaint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PABX_WORKER_PABX_URL", url)
    message = error_of()
    assert message.startswith("PABX_WORKER_PABX_URL: ") and complaint in message


def test_bad_values_in_the_file_name_the_file_and_key(tmp_path: Path) -> None:
    config = write(
        tmp_path / "w.toml",
        'concurrency = "many"\n[pabx.f]\nurl = "ftp://x"\napi_key = "k"\nchannel_id = 9\n',
    )
    message = error_of(config)
    assert message.startswith(f"--config {config}: ")
    assert "pabx.f.url: must start with" in message and "concurrency: Input should be" in message


def test_pabx_json_variable_that_is_not_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PABX_WORKER_PABX", '{"east": {"api_key": "' + SECRET)
    assert error_of().startswith("PABX_WORKER_PABX: expected a JSON object")


# --- store URLs, checked when the store is opened ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("sqlite:////nonexistent-dir/x.db", "no directory /nonexistent-dir"),
        ("sqlite:/x.db", "expected sqlite:///PATH"),
        ("redis://127.0.0.1:notaport/0", "not a valid URL"),
        (f"redis://:{SECRET}@127.0.0.1:99999/0", "not a valid URL"),
        ("redis://127.0.0.1:6379/db0", "database must be a number"),
        (f"postgresql://u:{SECRET}@h/db?nosuchoption=1", "invalid URI query parameter"),
        ("mysql://127.0.0.1/x", "unsupported scheme 'mysql'"),
        ("/var/lib/store.db", "unsupported scheme ''"),
    ],
)
def test_unusable_store_url_is_a_configuration_error(url: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        open_store(url)
    message = str(caught.value)
    assert message.startswith("PABX_WORKER_STORE_URL: ") and complaint in message
    assert SECRET not in message
