"""Settings: flag > env > config file > default, and errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from localllm.errors import SettingsError
from localllm.settings import Settings, default_config_path, load_settings, setting_sources


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No LOCALLLM_* from the caller, and no system or user config file of this machine."""
    for name in list(os.environ):
        if name.startswith("LOCALLLM_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr("localllm.settings.SYSTEM_CONFIG", tmp_path / "etc" / "config.toml")
    monkeypatch.setattr("localllm.settings.USER_CONFIG", tmp_path / "user" / "config.toml")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- Precedence ---------------------------------------------------------------------------------


def test_precedence_flag_env_config_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = write(tmp_path / "c.toml", "port = 9000\nparallel = 2\nqueue_size = 3\n")
    monkeypatch.setenv("LOCALLLM_PORT", "9001")
    monkeypatch.setenv("LOCALLLM_PARALLEL", "5")
    settings = load_settings(config, port=9002)
    assert settings.port == 9002  # flag over env and config
    assert settings.parallel == 5  # env over config
    assert settings.queue_size == 3  # config over default
    assert settings.n_batch == 2048  # default
    assert setting_sources(config, {"port"}) == {
        **{name: "default" for name in Settings.model_fields},
        "port": "flag",
        "parallel": "env",
        "queue_size": "config",
    }


def test_flags_given_as_none_are_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALLLM_PORT", "9001")
    assert load_settings(None, port=None, n_ctx=None).port == 9001


def test_config_from_env_and_default_locations(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert default_config_path() is None
    assert load_settings(None).port == 8080
    user = write(tmp_path / "user" / "config.toml", "port = 7001\n")
    assert default_config_path() == user
    system = write(tmp_path / "etc" / "config.toml", "port = 7002\n")
    assert default_config_path() == system  # the service's file wins over the user's
    assert load_settings(None).port == 7002
    named = write(tmp_path / "named.toml", "port = 7003\n")
    # LOCALLLM_CONFIG names the file; it is not mistaken for an unknown setting.
    monkeypatch.setenv("LOCALLLM_CONFIG", str(named))
    assert load_settings(None).port == 7003
    assert load_settings(user).port == 7001  # an explicit --config beats them all


def test_settings_are_frozen() -> None:
    settings = load_settings(None)
    with pytest.raises(Exception, match="frozen"):
        settings.port = 1  # type: ignore[misc]


# --- Errors name the key ------------------------------------------------------------------------


def test_unknown_key_in_config_is_rejected_by_name(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", "port = 9000\nprot = 9001\n")
    with pytest.raises(SettingsError, match=r"unknown setting 'prot'") as info:
        load_settings(config)
    assert str(config) in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("port = 70000", "port"),
        ('port = "eighty"', "port"),
        ('type_k = "q5_1"', "type_k"),
        ("parallel = 0", "parallel"),
        ('log_level = "loud"', "log_level"),
        ("n_ctx = 100", "n_ctx"),
    ],
)
def test_bad_value_in_config_is_rejected_by_name(tmp_path: Path, text: str, key: str) -> None:
    config = write(tmp_path / "c.toml", text + "\n")
    with pytest.raises(SettingsError, match=rf"setting '{key}'"):
        load_settings(config)


def test_bad_env_value_is_rejected_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALLLM_PORT", "http")
    with pytest.raises(SettingsError, match=r"^LOCALLLM_PORT=http: "):
        load_settings(None)


def test_bad_flag_value_is_rejected_by_name() -> None:
    with pytest.raises(SettingsError, match=r"^--n-ubatch 0: "):
        load_settings(None, n_ubatch=0)
    with pytest.raises(SettingsError, match=r"^--ubatch-size 0: "):
        load_settings(None, {"n_ubatch": "--ubatch-size"}, n_ubatch=0)


def test_sizes_and_cards_are_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match=r"^--vram 1.2.3GiB: cannot read the size"):
        load_settings(None, vram="1.2.3GiB")
    monkeypatch.setenv("LOCALLLM_GPU", "64xrtx4090")
    with pytest.raises(SettingsError, match=r"^LOCALLLM_GPU=64xrtx4090: .*at most 16"):
        load_settings(None)
    monkeypatch.setenv("LOCALLLM_GPU", "rtx4090x2")
    assert load_settings(None).gpu == "rtx4090x2"


def test_misspelled_env_vars_are_found() -> None:
    from localllm.settings import unknown_env_vars

    environ = {"LOCALLLM_N_CTX": "1", "LOCALLLM_NCTX": "1", "LOCALLLM_CONFIG": "x", "HOME": "/"}
    assert unknown_env_vars(environ) == [("LOCALLLM_NCTX", "LOCALLLM_N_CTX")]


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", "port = = 1\n")
    with pytest.raises(SettingsError, match=str(config)):
        load_settings(config)


# --- API keys -----------------------------------------------------------------------------------


def test_api_key_file(tmp_path: Path) -> None:
    keys = write(tmp_path / "keys", "# clients\nsk-one\n\n  sk-two  \n#sk-disabled\n")
    settings = load_settings(None, api_keys=["sk-inline"], api_key_file=keys)
    assert settings.all_api_keys() == ["sk-inline", "sk-one", "sk-two"]


def test_api_key_file_from_config(tmp_path: Path) -> None:
    keys = write(tmp_path / "keys", "sk-one\n")
    config = write(tmp_path / "c.toml", f'api_key_file = "{keys}"\n')
    assert load_settings(config).all_api_keys() == ["sk-one"]


def test_missing_api_key_file_names_it(tmp_path: Path) -> None:
    settings = load_settings(None, api_key_file=tmp_path / "gone")
    with pytest.raises(SettingsError, match=r"api_key_file .*gone"):
        settings.all_api_keys()


def test_api_key_file_indented_comment(tmp_path: Path) -> None:
    keys = write(tmp_path / "keys", "sk-one\n  # rotated out: sk-old\n")
    assert load_settings(None, api_key_file=keys).all_api_keys() == ["sk-one"]


# --- Lists from the environment -----------------------------------------------------------------


def test_lists_in_config_and_flags(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", 'cors_origins = ["http://a.test", "http://b.test"]\n')
    assert load_settings(config).cors_origins == ["http://a.test", "http://b.test"]
    assert load_settings(None, api_keys=["k1"]).api_keys == ["k1"]


def test_json_env_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALLLM_API_KEYS", '["k1", "k2"]')
    assert load_settings(None).api_keys == ["k1", "k2"]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("API_KEYS", "k1,k2", ["k1", "k2"]),
        ("API_KEYS", " k1 , ,k2 ", ["k1", "k2"]),
        ("CORS_ORIGINS", "http://a.test,http://b.test", ["http://a.test", "http://b.test"]),
    ],
)
def test_csv_env_lists(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("LOCALLLM_" + name, value)
    assert getattr(load_settings(None), name.lower()) == expected
