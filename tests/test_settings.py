"""Configuration: config.toml defaults < .env < process environment; clear errors naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from actors.settings import PROJECT_ROOT, ConfigError, Settings, load_settings, read_dotenv


def test_defaults_come_from_config_toml() -> None:
    s = load_settings({}, dotenv_file=None)
    assert (s.max_messages, s.mailbox_size, s.actor_idle_ttl, s.port) == (50, 100, 86400.0, 5000)
    assert s.llm_provider == "offline" and s.provider_order == ("offline",)
    assert s.admin_token == "" and not s.crm_enabled


def test_precedence_environment_over_dotenv_over_toml(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("MAX_MESSAGES=30\nPORT=6000\nOPENAI_API_KEY='sk-from-dotenv'\n")
    s = load_settings({"MAX_MESSAGES": "40"}, dotenv_file=dotenv)
    assert s.max_messages == 40          # environment wins
    assert s.port == 6000                # .env beats config.toml
    assert s.openai_api_key == "sk-from-dotenv"
    assert s.mailbox_size == 100         # config.toml default


def test_durations_accept_decimals_and_dirs_are_paths() -> None:
    s = load_settings({"ACTOR_IDLE_TTL": "2.5", "DEBOUNCE_SECONDS": "0.75", "DATA_DIR": "/tmp/x"}, dotenv_file=None)
    assert s.actor_idle_ttl == 2.5 and s.debounce_seconds == 0.75 and s.data_dir == Path("/tmp/x")


def test_fallback_list_never_repeats_a_provider() -> None:
    s = load_settings({"LLM_PROVIDER": "Gemini", "LLM_PROVIDER_FALLBACK": "openai, gemini,openai,anthropic"}, dotenv_file=None)
    assert s.provider_order == ("gemini", "openai", "anthropic")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MAX_MESSAGES": "abc"}, "MAX_MESSAGES"),
        ({"LLM_PROVIDER": "gpt5"}, "LLM_PROVIDER"),
        ({"LLM_PROVIDER_FALLBACK": "openai,nope"}, "LLM_PROVIDER_FALLBACK"),
        ({"PORT": "99999"}, "PORT"),
        ({"ACTOR_IDLE_TTL": "-1"}, "ACTOR_IDLE_TTL"),
        ({"ACTOR_IDLE_TTL": "nan"}, "ACTOR_IDLE_TTL"),
        ({"CRM_AUTO_REGISTER": "maybe"}, "CRM_AUTO_REGISTER"),
        ({"EVOLUTION_API_URL": "evolution.local"}, "EVOLUTION_API_URL"),
        ({"MAILBOX_SIZE": "0"}, "MAILBOX_SIZE"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"UNKNOWN_INSTANCES": "maybe"}, "UNKNOWN_INSTANCES"),
        ({"LOG_CUSTOMER_TEXT": "some"}, "LOG_CUSTOMER_TEXT"),
        ({"NEW_CHATS_PER_MINUTE": "-1"}, "NEW_CHATS_PER_MINUTE"),
        ({"ALLOW_OPEN_WEBHOOK": "perhaps"}, "ALLOW_OPEN_WEBHOOK"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env, dotenv_file=None)
    message = str(info.value)
    assert message.startswith(variable + ":") and "\n" not in message


def test_secrets_are_refused_in_config_toml(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text((PROJECT_ROOT / "config.toml").read_text() + '\n[extra]\nopenai_api_key = "sk-oops"\n')
    with pytest.raises(ConfigError, match="secret"):
        load_settings({}, config_file=config, dotenv_file=None)


def test_public_view_hides_secrets() -> None:
    s = load_settings({"OPENAI_API_KEY": "sk-live-123456", "ADMIN_TOKEN": "tok-abcdef"}, dotenv_file=None)
    view = s.public_view()
    assert view["openai_api_key"] == "set" and view["admin_token"] == "set" and view["gemini_api_key"] == "unset"
    assert "sk-live-123456" not in str(view)
    assert set(s.secret_values()) == {"sk-live-123456", "tok-abcdef"}


def test_env_example_documents_every_setting_and_loads() -> None:
    example = read_dotenv(PROJECT_ROOT / ".env.example")
    assert set(example) == {f.name.upper() for f in attrs.fields(Settings)}
    load_settings(example, dotenv_file=None)


@pytest.mark.parametrize("workers", ["1", "0"])
def test_service_refuses_to_start_with_one_clear_line(tmp_path: Path, workers: str) -> None:
    """hypercorn stops by itself with the line on stderr and a non-zero exit status: 2 with ``--workers 0``;
    with its default worker process, whose failure hypercorn 0.18's parent reports as 0, the worker ends
    the parent (actors/exposure.py)."""
    env = {**os.environ, "MAX_MESSAGES": "abc", "LOG_DIR": str(tmp_path)}
    hypercorn = Path(sys.executable).parent / "hypercorn"
    result = subprocess.run(
        [str(hypercorn), "--worker-class", "trio", "--workers", workers, "--bind", "127.0.0.1:0", "app:app"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.stderr.strip().splitlines() == ["Configuration error: MAX_MESSAGES: invalid value 'abc' (expected int)"]
    assert result.returncode == (2 if workers == "0" else -9)
