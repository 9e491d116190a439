from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import Settings, SettingsError, load_settings


def test_defaults_without_any_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={}) == Settings()


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('port = 7000\nhost = "0.0.0.0"\nsubject_prefix = "lab"\n')
    env = {"COMFYAUTOMATE_PORT": "7100", "COMFYAUTOMATE_HOST": "10.0.0.1"}
    settings = load_settings({"port": 7200, "host": None}, config_file=file, environ=env)
    assert settings.port == 7200  # flag
    assert settings.host == "10.0.0.1"  # environment, since the flag was not given
    assert settings.subject_prefix == "lab"  # file


def test_environment_names_the_config_file(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("[comfyautomate]\nembedded_nats = false\n")
    assert not load_settings(environ={"COMFYAUTOMATE_CONFIG": str(file)}).embedded_nats


def test_environment_values_are_typed(tmp_path: Path) -> None:
    env = {
        "COMFYAUTOMATE_EMBEDDED_NATS": "false",
        "COMFYAUTOMATE_HEARTBEAT_INTERVAL_S": "0.25",
        "COMFYAUTOMATE_API_KEYS": "k1, k2",
    }
    settings = load_settings(config_file=_empty(tmp_path), environ=env)
    assert settings.embedded_nats is False
    assert settings.heartbeat_interval_s == 0.25
    assert settings.api_keys == ["k1", "k2"]
    json_env = {"COMFYAUTOMATE_API_KEYS": '["a,b"]'}
    assert load_settings(config_file=_empty(tmp_path), environ=json_env).api_keys == ["a,b"]


def test_a_misspelt_key_is_an_error(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="prot"):
        load_settings(config_file=file, environ={})


def test_a_bad_value_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="port"):
        load_settings(config_file=_empty(tmp_path), environ={"COMFYAUTOMATE_PORT": "eighty"})


def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(config_file=tmp_path / "missing.toml", environ={})


def _empty(tmp_path: Path) -> Path:
    file = tmp_path / "empty.toml"
    file.write_text("")
    return file


def test_retentions_take_seconds_and_refuse_a_negative(tmp_path: Path) -> None:
    env = {"COMFYAUTOMATE_LOGS_RETENTION_S": "86400"}
    settings = load_settings(config_file=_empty(tmp_path), environ=env)
    assert settings.logs_retention_s == 86400.0
    # An ended record lives as long as the events it came from, by default.
    assert settings.job_records_retention_s == 30 * 24 * 3600
    with pytest.raises(SettingsError, match="job_records_retention_s"):
        load_settings(
            config_file=_empty(tmp_path), environ={"COMFYAUTOMATE_JOB_RECORDS_RETENTION_S": "-1"}
        )


def test_nats_replicas_is_a_count_or_auto(tmp_path: Path) -> None:
    file = _empty(tmp_path)
    assert load_settings(config_file=file, environ={}).nats_replicas == 1
    env = {"COMFYAUTOMATE_NATS_REPLICAS": "3"}
    assert load_settings(config_file=file, environ=env).nats_replicas == 3
    assert load_settings({"nats_replicas": "auto"}, config_file=file).nats_replicas == "auto"
    for bad in ("0", "6", "three"):
        with pytest.raises(SettingsError, match="nats_replicas"):
            load_settings(config_file=file, environ={"COMFYAUTOMATE_NATS_REPLICAS": bad})
