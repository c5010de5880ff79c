"""Configuration: config.toml defaults < .env < process environment; clear errors naming the variable."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest

from actors.settings import PROJECT_ROOT, SECTIONS, ConfigError, load_settings, read_dotenv, setting_fields
from actors.settings.loading import dotenv_path

from tests.procs import free_port


def test_defaults_come_from_config_toml() -> None:
    s = load_settings({}, dotenv_file=None)
    assert (s.conversation.max_messages, s.conversation.mailbox_size, s.conversation.actor_idle_ttl,
            s.server.port) == (50, 100, 86400.0, 5000)
    assert s.llm.llm_provider == "offline" and s.llm.provider_order == ("offline",)
    assert s.security.admin_token == "" and not s.crm.crm_enabled


def test_precedence_environment_over_dotenv_over_toml(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("MAX_MESSAGES=30\nPORT=6000\nOPENAI_API_KEY='sk-from-dotenv'\n")
    s = load_settings({"MAX_MESSAGES": "40"}, dotenv_file=dotenv)
    assert s.conversation.max_messages == 40   # environment wins
    assert s.server.port == 6000               # .env beats config.toml
    assert s.llm.openai_api_key == "sk-from-dotenv"
    assert s.conversation.mailbox_size == 100  # config.toml default


def test_durations_accept_decimals_and_dirs_are_paths() -> None:
    s = load_settings({"ACTOR_IDLE_TTL": "2.5", "DEBOUNCE_SECONDS": "0.75", "DATA_DIR": "/tmp/x"}, dotenv_file=None)
    assert s.conversation.actor_idle_ttl == 2.5 and s.conversation.debounce_seconds == 0.75
    assert s.storage.data_dir == Path("/tmp/x")


def test_fallback_list_never_repeats_a_provider() -> None:
    s = load_settings({"LLM_PROVIDER": "Gemini", "LLM_PROVIDER_FALLBACK": "openai, gemini,openai,anthropic"}, dotenv_file=None)
    assert s.llm.provider_order == ("gemini", "openai", "anthropic")


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


def test_secrets_are_listed_for_redaction_and_never_shown() -> None:
    s = load_settings({"OPENAI_API_KEY": "sk-live-123456", "ADMIN_TOKEN": "tok-abcdef"}, dotenv_file=None)
    assert "sk-live-123456" not in repr(s) and "tok-abcdef" not in repr(s)
    assert set(s.secret_values()) == {"sk-live-123456", "tok-abcdef"}


def test_env_file_names_the_dotenv_read_and_empty_reads_none(tmp_path: Path) -> None:
    """ENV_FILE (a loader knob from the environment) picks the .env; empty reads none, so the test
    suite and its service processes never pick up a developer's .env beside config.toml."""
    dotenv = tmp_path / "other.env"
    dotenv.write_text("MAX_MESSAGES=7\nOPENAI_API_KEY=sk-from-other-env\n")
    chosen = load_settings({"ENV_FILE": str(dotenv)})
    assert chosen.conversation.max_messages == 7 and chosen.llm.openai_api_key == "sk-from-other-env"
    assert load_settings({"ENV_FILE": str(dotenv), "MAX_MESSAGES": "9"}).conversation.max_messages == 9
    assert load_settings({"ENV_FILE": ""}).conversation.max_messages == 50
    assert dotenv_path({}) == PROJECT_ROOT / ".env" and dotenv_path({"ENV_FILE": ""}) is None
    assert os.environ["ENV_FILE"] == ""   # the suite's own pin (tests/conftest.py)


def test_env_example_documents_every_setting_and_loads() -> None:
    example = read_dotenv(PROJECT_ROOT / ".env.example")
    assert set(example) == {f.name.upper() for _, f in setting_fields()}
    load_settings(example, dotenv_file=None)


@pytest.mark.parametrize("workers", ["1", "0", "3"])
def test_service_refuses_to_start_with_one_clear_line(tmp_path: Path, workers: str) -> None:
    """hypercorn stops by itself with the line on stderr and a non-zero exit status: 2 with ``--workers 0``;
    with worker processes, whose failure hypercorn 0.18's parent reports as 0, a worker ends the parent
    and its siblings (actors/exposure.py), and the line is printed once however many workers refuse."""
    env = {**os.environ, "MAX_MESSAGES": "abc", "LOG_DIR": str(tmp_path)}
    hypercorn = Path(sys.executable).parent / "hypercorn"
    result = subprocess.run(
        [str(hypercorn), "--worker-class", "trio", "--workers", workers, "--bind", "127.0.0.1:0", "app:app"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.stderr.strip().splitlines() == ["Configuration error: MAX_MESSAGES: invalid value 'abc' (expected int)"]
    assert result.returncode == (2 if workers == "0" else -9)


def test_several_workers_on_sqlite_refuse_in_one_line_and_leave_nothing_serving(tmp_path: Path) -> None:
    """``hypercorn --workers 2`` on the SQLite default: one line naming STORE_URL, and no worker left
    running (before, the second worker's lock failure killed the parent and the first went on serving)."""
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "LOG_DIR": str(tmp_path / "logs"), "STORE_URL": "",
           "DATABASE_URL": ""}
    hypercorn = Path(sys.executable).parent / "hypercorn"
    result = subprocess.run(
        [str(hypercorn), "--worker-class", "trio", "--workers", "2", "--bind", f"127.0.0.1:{port}", "app:app"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.stderr.strip().splitlines() == [
        "Configuration error: STORE_URL: hypercorn --workers 2 runs 2 processes, and one SQLite file serves one "
        "process: several workers need STORE_URL=postgresql://… (README, Running several nodes)"]
    assert result.returncode == -9
    with socket.socket() as probe:   # nothing serves the port any more
        assert probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize(
    ("env", "line"),
    [
        # server
        ({"HOST": " "}, "HOST: must not be empty"),
        ({"PORT": "0"}, "PORT: must be between 1 and 65535"),
        ({"MAX_BODY_BYTES": "0"}, "MAX_BODY_BYTES: must be at least 1"),
        ({"HTTP_TIMEOUT": "-5"}, "HTTP_TIMEOUT: must be positive"),
        ({"SHUTDOWN_GRACE_SECONDS": "inf"}, "SHUTDOWN_GRACE_SECONDS: invalid value 'inf' (expected float)"),
        # security
        ({"ADMIN_SESSION_MINUTES": "0"}, "ADMIN_SESSION_MINUTES: must be positive"),
        ({"ADMIN_LOOPBACK_ONLY": "2"}, "ADMIN_LOOPBACK_ONLY: invalid value '2' (expected bool)"),
        ({"UNKNOWN_INSTANCES": "all"}, "UNKNOWN_INSTANCES: must be ignore or serve (or empty: the default)"),
        # storage
        ({"STORE": "postgres"}, "STORE: must be sqlite, memory or postgresql"),
        ({"STORE": "postgresql"}, "STORE_URL: required when STORE=postgresql"),
        ({"STORE_URL": "mysql://u:p@h/db"}, "STORE_URL: must be a PostgreSQL URL starting with postgresql://"),
        ({"DATABASE_URL": "sqlite:///x"}, "DATABASE_URL: must be a PostgreSQL URL starting with postgresql://"),
        # logging
        ({"LOG_MAX_BYTES": "0"}, "LOG_MAX_BYTES: must be at least 1"),
        ({"LOG_BACKUP_COUNT": "-1"}, "LOG_BACKUP_COUNT: must be 0 or more"),
        ({"LOG_FILE": ""}, "LOG_FILE: must not be empty"),
        ({"LOG_JSON": "json"}, "LOG_JSON: invalid value 'json' (expected bool)"),
        # conversation
        ({"MAX_MESSAGES": "1"}, "MAX_MESSAGES: must be at least 2"),
        ({"MAX_WINDOW_CHARS": "500"}, "MAX_WINDOW_CHARS: must be at least MAX_MESSAGE_CHARS"),
        ({"DEBOUNCE_SECONDS": "-0.5"}, "DEBOUNCE_SECONDS: must be 0 or more"),
        ({"RESTART_PERIOD": "0"}, "RESTART_PERIOD: must be positive"),
        ({"TAKEOVER_KEYWORD": ""}, "TAKEOVER_KEYWORD: must not be empty"),
        ({"GOOGLE_BOOKING_URL": "calendar.app.google/x"}, "GOOGLE_BOOKING_URL: must start with http:// or https://"),
        ({"LANGUAGE": "fr"}, "LANGUAGE: must be es or en"),
        # llm
        ({"LLM_TIMEOUT": "-1"}, "LLM_TIMEOUT: must be positive"),
        ({"LLM_MAX_TOKENS": "0"}, "LLM_MAX_TOKENS: must be at least 1"),
        ({"CIRCUIT_FAILURE_THRESHOLD": "0"}, "CIRCUIT_FAILURE_THRESHOLD: must be at least 1"),
        ({"TURN_DEADLINE_SECONDS": "0"}, "TURN_DEADLINE_SECONDS: must be positive"),
        ({"OPENAI_BASE_URL": "localhost:8080/v1"}, "OPENAI_BASE_URL: must start with http:// or https://"),
        ({"OLLAMA_BASE_URL": "http://"}, "OLLAMA_BASE_URL: must name a host (http://host[:port][/path])"),
        ({"GEMINI_BASE_URL": "https://gen ai.local"}, "GEMINI_BASE_URL: must not contain spaces"),
        # outbound
        ({"EVOLUTION_API_URL": "http://evolution:99999"}, "EVOLUTION_API_URL: is not a valid URL"),
        ({"OUTBOUND_MAX_ATTEMPTS": "0"}, "OUTBOUND_MAX_ATTEMPTS: must be at least 1"),
        ({"OUTBOUND_RATE_PER_INSTANCE": "-1"}, "OUTBOUND_RATE_PER_INSTANCE: must be 0 or more"),
        ({"SPLIT_MAX_CHARS": "50"}, "SPLIT_MAX_CHARS: must be at least 100"),
        # crm
        ({"KRAYIN_API_URL": "krayin.local/api"}, "KRAYIN_API_URL: must start with http:// or https://"),
        ({"KRAYIN_STAGE_ID": "0"}, "KRAYIN_STAGE_ID: must be at least 1"),
        ({"KRAYIN_PIPELINE_ID": "one"}, "KRAYIN_PIPELINE_ID: invalid value 'one' (expected int)"),
        ({"CRM_EMAIL_DOMAIN": "me@example.com"}, "CRM_EMAIL_DOMAIN: must be a domain name such as example.invalid"),
        ({"CRM_GIVE_UP_SECONDS": "-1"}, "CRM_GIVE_UP_SECONDS: must be 0 or more"),
    ],
)
def test_each_section_refuses_bad_values_in_one_line(env: dict[str, str], line: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env, dotenv_file=None)
    assert str(info.value) == line


def test_every_setting_has_a_check_and_a_default_in_its_own_section() -> None:
    document = tomllib.loads((PROJECT_ROOT / "config.toml").read_text(encoding="utf-8"))
    assert list(document) == list(SECTIONS)
    for section, f in setting_fields():
        assert f.validator is not None, f.name
        assert (f.name in document[section]) != f.metadata["secret"], f.name


def test_checks_run_on_evolve_too() -> None:
    """A section built in code (as a per-instance override will be) is checked like one loaded from text."""
    s = load_settings({}, dotenv_file=None)
    assert attrs.evolve(s.conversation, max_messages=7).max_messages == 7
    with pytest.raises(ConfigError, match=r"^MAX_MESSAGES: must be at least 2$"):
        attrs.evolve(s.conversation, max_messages=1)
    with pytest.raises(ConfigError, match=r"^MAX_MESSAGES: expected int, got str$"):
        attrs.evolve(s.conversation, max_messages="7")
    with pytest.raises(ConfigError, match=r"^LLM_PROVIDER_FALLBACK: unknown provider 'nope'"):
        attrs.evolve(s.llm, llm_provider_fallback=("openai", "nope"))
    assert attrs.evolve(s.llm, llm_provider=" OpenAI ").llm_provider == "openai"


def test_per_instance_settings_are_the_conversation_level_ones() -> None:
    marked = {f.name for _, f in setting_fields() if f.metadata["per_instance"]}
    assert marked == {
        "agent_instruction", "language", "unknown_message_text", "google_booking_url",
        "llm_provider", "llm_provider_fallback",
        "openai_model", "anthropic_model", "gemini_model", "hf_model", "ollama_model",
        "openai_base_url", "anthropic_base_url", "gemini_base_url", "hf_base_url", "ollama_base_url",
        "openai_api_key", "anthropic_api_key", "gemini_api_key", "huggingface_api_key", "ollama_api_key",
        "max_messages", "debounce_seconds", "flood_max_per_minute", "human_takeover_minutes", "takeover_keyword",
        "reset_keywords", "ignore_jids", "allow_jids", "groups_enabled",
        "outbound_min_gap_seconds", "outbound_rate_per_instance", "split_max_chars", "evolution_api_key",
        "crm_auto_register", "krayin_pipeline_id", "krayin_stage_id", "krayin_user_id", "krayin_lead_source_id",
        "krayin_lead_type_id",
        "media_max_bytes", "transcribe_provider", "memory_summary", "summary_chunk",
        "openai_vision", "anthropic_vision", "gemini_vision", "hf_vision", "ollama_vision", "openai_transcribe_model",
    }
    process_wide = {"server", "security", "storage", "logging"}
    assert not {f.name for section, f in setting_fields() if section in process_wide and f.metadata["per_instance"]}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[llm]\nmax_messages = 10\n", "'max_messages' belongs under [conversation], not [llm]"),
        ("[crm]\nkrayin_api_token = 'tok'\n", "'krayin_api_token' is a secret; set KRAYIN_API_TOKEN in the environment or .env"),
        ("[extras]\n", "unknown section [extras] (one of server, security, storage, logging, conversation, llm, outbound, crm)"),
        ("[server]\nlisten = 1\n", "unknown setting 'listen'"),
    ],
)
def test_config_toml_keys_sit_under_their_own_section(tmp_path: Path, extra: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(extra)
    with pytest.raises(ConfigError) as info:
        load_settings({}, config_file=config, dotenv_file=None)
    assert str(info.value) == f"config file {config}: {message}"


def test_config_toml_key_outside_any_section_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("max_messages = 10\n" + (PROJECT_ROOT / "config.toml").read_text())
    with pytest.raises(ConfigError, match=r"'max_messages' belongs under \[conversation\], not no section$"):
        load_settings({}, config_file=config, dotenv_file=None)


def test_a_setting_the_logs_refuse_stops_start_up_in_one_line(tmp_path: Path) -> None:
    """LOG_MAX_BYTES=0 used to pass the settings and fail later in the logging set-up, with a traceback."""
    env = {**os.environ, "LOG_MAX_BYTES": "0", "LOG_DIR": str(tmp_path)}
    hypercorn = Path(sys.executable).parent / "hypercorn"
    result = subprocess.run(
        [str(hypercorn), "--worker-class", "trio", "--workers", "0", "--bind", "127.0.0.1:0", "app:app"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.stderr.strip().splitlines() == ["Configuration error: LOG_MAX_BYTES: must be at least 1"]
    assert result.returncode == 2


def test_a_store_url_selects_postgresql_and_is_a_secret() -> None:
    url = "postgresql://agent:pw-0123456789@db:5432/agent"
    for name in ("STORE_URL", "DATABASE_URL"):
        s = load_settings({name: url}, dotenv_file=None)
        assert s.storage.kind == "postgresql" and s.storage.postgres_url == url
        assert url in s.secret_values() and "pw-0123456789" not in repr(s)
    assert load_settings({}, dotenv_file=None).storage.kind == "sqlite"


@pytest.mark.parametrize(("default", "value", "line"), [
    ("max_messages = 50", "max_messages = 3.5", "MAX_MESSAGES: invalid value '3.5' (expected int)"),
    ('agent_instruction = ""', "agent_instruction = 5", "AGENT_INSTRUCTION: invalid value '5' (expected str)"),
])
def test_a_toml_value_of_another_type_is_refused_not_bent(tmp_path: Path, default: str, value: str, line: str) -> None:
    """3.5 used to become 3 and 5 the text "5" without a word (the instances file reads values the same way)."""
    config = tmp_path / "config.toml"
    text = (PROJECT_ROOT / "config.toml").read_text()
    assert default in text
    config.write_text(text.replace(default, value, 1))
    with pytest.raises(ConfigError) as info:
        load_settings({}, config_file=config, dotenv_file=None)
    assert str(info.value) == line
