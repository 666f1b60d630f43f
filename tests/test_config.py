"""Settings: defaults, TOML file, environment precedence and a clear error for each bad value."""

from pathlib import Path

import pytest

from config import ConfigError, Destination, load_settings


def test_defaults_serve_the_embedded_mode(tmp_path: Path) -> None:
    settings = load_settings(env={}, data_dir=tmp_path)
    assert settings.ae_title == "DICOM_TRIAGE"
    assert settings.allowed_calling_aes == ()
    assert settings.series_quiet_seconds == 5.0
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'triage.sqlite3'}"
    assert settings.effective_broker_url.startswith("filesystem://")
    assert {rule.task for rule in settings.routing_rules} == {"brain-tumor", "covid-ct"}


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    config = tmp_path / "triage.toml"
    config.write_text(
        'ae_title = "FROM_FILE"\n'
        "dicom_port = 4242\n"
        'allowed_calling_aes = ["PACS1", "PACS2"]\n'
        'sr_destinations = ["ORTHANC@127.0.0.1:4242"]\n'
        "[[routing_rules]]\n"
        'task = "covid-ct"\n'
        'modalities = ["CT"]\n'
        "min_slices = 3\n"
    )
    env = {"DICOM_TRIAGE_DICOM_PORT": "5555", "DICOM_TRIAGE_ALLOWED_CALLING_AES": "A,B"}
    settings = load_settings(config, env=env, data_dir=tmp_path, ae_title="FROM_CLI")
    assert settings.ae_title == "FROM_CLI"
    assert settings.dicom_port == 5555
    assert settings.allowed_calling_aes == ("A", "B")
    assert settings.sr_destinations == (Destination(ae_title="ORTHANC", host="127.0.0.1", port=4242),)
    assert len(settings.routing_rules) == 1 and settings.routing_rules[0].min_slices == 3


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"DICOM_TRIAGE_DICOM_PORT": "70000"}, "dicom_port [from DICOM_TRIAGE_DICOM_PORT]"),
        ({"DICOM_TRIAGE_DICOM_PORT": "eleven"}, "dicom_port"),
        ({"DICOM_TRIAGE_AE_TITLE": "WAY_TOO_LONG_AE_TITLE"}, "not a valid AE title"),
        ({"DICOM_TRIAGE_SERIES_QUIET_SECONDS": "-1"}, "series_quiet_seconds"),
        ({"DICOM_TRIAGE_DATABASE_URL": "mysql://x"}, "not a sqlite:// or postgresql:// URL"),
        ({"DICOM_TRIAGE_BROKER_URL": "kafka://x"}, "broker URL"),
        ({"DICOM_TRIAGE_SR_DESTINATIONS": "ORTHANC@host"}, "AE@HOST:PORT"),
        ({"DICOM_TRIAGE_NO_SUCH_THING": "1"}, "unknown setting"),
        ({"DICOM_TRIAGE_DECODE_PROCESSES": "-1"}, "decode_processes [from DICOM_TRIAGE_DECODE_PROCESSES]"),
        ({"DICOM_TRIAGE_DECODE_FRAMES_IN_FLIGHT": "0"}, "decode_frames_in_flight"),
        ({"DICOM_TRIAGE_BACKFILL_RETRIEVE": "fetch"}, "backfill_retrieve [from DICOM_TRIAGE_BACKFILL_RETRIEVE]"),
        ({"DICOM_TRIAGE_BACKFILL_PAUSE_LIVE_SERIES": "-1"}, "backfill_pause_live_series"),
        ({"DICOM_TRIAGE_BACKFILL_RETRIEVE_TIMEOUT_SECONDS": "0"}, "backfill_retrieve_timeout_seconds"),
        ({"DICOM_TRIAGE_BACKFILL_MAX_MATCHES": "0"}, "backfill_max_matches"),
        ({"DICOM_TRIAGE_WEB_TLS_CLIENT_CA": "/etc/ca.pem"}, "web_tls_client_ca needs web_tls_cert and web_tls_key"),
    ],
)
def test_bad_environment_values_are_named(env: dict[str, str], fragment: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env, data_dir=tmp_path)
    assert fragment in str(info.value)


def test_every_bad_value_is_reported_at_once(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('dicom_port = 0\nmax_associations = 0\nunknown_key = 1\n[[routing_rules]]\ntask = "x"\nseries_description = "(("\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    message = str(info.value)
    for name in ("dicom_port", "max_associations", "unknown_key", "routing_rules.0.series_description"):
        assert name in message
    assert f"[from {config}]" in message


def test_a_routing_rule_with_a_misspelt_key_or_a_bad_uid_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "rules.toml"
    config.write_text('[[routing_rules]]\ntask = "covid-ct"\nexclude_sop_class = ["1.2.840.10008.5.1.4.1.1.7"]\n'
                      '[[routing_rules]]\ntask = "covid-ct"\nexclude_sop_classes = ["Secondary Capture"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    message = str(info.value)
    assert "routing_rules.0.exclude_sop_class" in message
    assert "routing_rules.1.exclude_sop_classes" in message and "not a UID: 'Secondary Capture'" in message


def test_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken, env={})


@pytest.mark.parametrize("name,default,good,bad", [
    ("archive_files_ahead", 4, 0, ("-1", "65", "four")),
    ("listen_processes", 1, 4, ("0", "-1", "two")),
])
def test_integer_setting_default_environment_and_bounds(
    name: str, default: int, good: int, bad: tuple[str, ...], tmp_path: Path
) -> None:
    variable = f"DICOM_TRIAGE_{name.upper()}"
    assert getattr(load_settings(env={}, data_dir=tmp_path), name) == default
    assert getattr(load_settings(env={variable: str(good)}, data_dir=tmp_path), name) == good
    for value in bad:
        with pytest.raises(ConfigError, match=rf"{name} \[from {variable}\]"):
            load_settings(env={variable: value}, data_dir=tmp_path)
