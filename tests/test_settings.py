"""Settings from ``KVSTORE_*`` variables."""

import dataclasses
from pathlib import Path

import pytest

from kvstore.settings import Settings, SettingsError, env_name, mask_url


def test_defaults_work_without_environment() -> None:
    settings = Settings.from_env({})

    assert settings.bind == "127.0.0.1:5000"
    assert settings.workers == 1
    assert settings.redis_url is None
    assert settings.key_prefix == "kvstore:"
    assert settings.max_key_bytes == 1024
    assert settings.max_value_bytes == 1024 * 1024
    assert settings.max_body_bytes == 8 * 1024 * 1024
    assert settings.max_pairs == 10_000


def test_variables_are_parsed_by_type() -> None:
    settings = Settings.from_env(
        {
            "KVSTORE_BIND": "0.0.0.0:8080",
            "KVSTORE_WORKERS": "4",
            "KVSTORE_REDIS_URL": "redis://db:6379/2",
            "KVSTORE_DATA_DIR": "/var/lib/kv",
            "KVSTORE_REDIS_TIMEOUT": "0.5",
            "KVSTORE_ACCESS_LOG": "off",
            "KVSTORE_MAX_PAIRS": "1_000",
            "KVSTORE_LOG_FORMAT": "text",
            "UNRELATED": "ignored",
        }
    )

    assert settings.bind == "0.0.0.0:8080"
    assert settings.workers == 4
    assert settings.redis_url == "redis://db:6379/2"
    assert settings.data_dir == Path("/var/lib/kv")
    assert settings.redis_timeout == 0.5
    assert settings.access_log is False
    assert settings.max_pairs == 1000
    assert settings.log_format == "text"


def test_empty_variables_keep_defaults() -> None:
    settings = Settings.from_env({"KVSTORE_WORKERS": "", "KVSTORE_REDIS_URL": " "})

    assert settings.workers == 1
    assert settings.redis_url is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("KVSTORE_WORKERS", "two", "KVSTORE_WORKERS='two'"),
        ("KVSTORE_WORKERS", "0", "must be at least 1"),
        ("KVSTORE_REDIS_TIMEOUT", "-1", "must be above zero"),
        ("KVSTORE_ACCESS_LOG", "maybe", "true or false"),
        ("KVSTORE_LOG_FORMAT", "xml", "must be one of"),
        ("KVSTORE_LOG_LEVEL", "LOUD", "must be one of"),
        ("KVSTORE_BIND", "5000", "HOST:PORT"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as raised:
        Settings.from_env({variable: value})

    assert variable in str(raised.value)


def test_env_name_of_a_field() -> None:
    assert env_name("max_value_bytes") == "KVSTORE_MAX_VALUE_BYTES"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:secret@db:6379/0", "redis://***@db:6379/0"),
        ("redis://:secret@db:6379", "redis://***@db:6379"),
        ("redis://db:6379", "redis://db:6379"),
        (None, None),
    ],
)
def test_public_settings_mask_credentials(url: str | None, shown: str | None) -> None:
    assert mask_url(url) == shown
    assert Settings(redis_url=url).public()["redis_url"] == shown


def test_metrics_listener_and_directory_are_read() -> None:
    settings = Settings.from_env(
        {"KVSTORE_METRICS_BIND": "0.0.0.0:9100", "KVSTORE_METRICS_DIR": "/run/kv"}
    )

    assert settings.metrics_bind == "0.0.0.0:9100"
    assert settings.metrics_dir == Path("/run/kv")
    assert Settings.from_env({}).metrics_bind is None
    assert Settings.from_env({}).metrics_dir is None


@pytest.mark.parametrize(
    ("metrics_bind", "reason"),
    [
        ("unix:/tmp/metrics.sock", "HOST:PORT"),
        ("9100", "HOST:PORT"),
        ("0.0.0.0:http", "HOST:PORT"),
        ("0.0.0.0:70000", "HOST:PORT"),
        ("0.0.0.0:5000", "another port"),
    ],
)
def test_metrics_listener_needs_a_tcp_port_of_its_own(
    metrics_bind: str, reason: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {"KVSTORE_BIND": "127.0.0.1:5000", "KVSTORE_METRICS_BIND": metrics_bind}
        )

    assert "KVSTORE_METRICS_BIND" in str(caught.value)
    assert reason in str(caught.value)


def test_metrics_directory_must_leave_room_for_socket_names() -> None:
    with pytest.raises(SettingsError, match="KVSTORE_METRICS_DIR"):
        Settings.from_env({"KVSTORE_METRICS_DIR": "/" + "d" * 100})


def test_metrics_listener_needs_hypercorn() -> None:
    with pytest.raises(SettingsError, match="KVSTORE_SERVER=hypercorn"):
        Settings.from_env(
            {"KVSTORE_SERVER": "uvicorn", "KVSTORE_METRICS_BIND": "127.0.0.1:9100"}
        )


def test_readme_settings_table_lists_every_setting() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("## Settings") : readme.index("## Running it")]

    missing = [
        env_name(field.name)
        for field in dataclasses.fields(Settings)
        if f"| `{env_name(field.name)}` |" not in table
    ]

    assert missing == []
