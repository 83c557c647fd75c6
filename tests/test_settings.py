"""Settings: defaults, precedence, PABX targets from TOML, the device password file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.errors import ConfigurationError
from worker.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PABX_WORKER_"):
            monkeypatch.delenv(name)


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


def test_unknown_setting_in_the_file_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text("concurency = 4\n")
    with pytest.raises(ConfigurationError, match="CONCURENCY"):
        load_settings(config)
