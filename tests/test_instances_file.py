"""The instances file (actors/settings/instances.py): per-instance settings over the process's own.

A malformed file stops start-up with one line naming the place (``INSTANCES_FILE [instances."x"].key``),
in-process and through a real hypercorn process; a good file overrides what it names and inherits the
rest; its absence is the single-tenant service as before.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from actors.lifecycle import Lifecycle, _shown
from actors.settings import (PROJECT_ROOT, ConfigError, Settings, configured_instances, instances_path, load_instances,
                             load_settings, setting_fields)
from tests.conftest import make_settings
from tests.procs import HYPERCORN, ServiceProcess

ACME = '[instances."acme-bot"]\n'


def base_settings(**env: str) -> Settings:
    return load_settings(env, dotenv_file=None)


def write(tmp_path: Path, text: str, name: str = "instances.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refusal(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    """The one line start-up prints for the instances file ``text`` (without ``Configuration error: ``)."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_instances(base_settings(), path, environ or {}, dotenv_file=None)
    return _shown(info.value)


# -- malformed files: one clear line each --------------------------------------------------------

@pytest.mark.parametrize(("text", "line"), [
    # unknown key (with the near miss named)
    (ACME + "max_mesages = 30\n",
     'INSTANCES_FILE [instances."acme-bot"].max_mesages: unknown setting \'max_mesages\' (did you mean max_messages?)'),
    # process-wide keys
    (ACME + "mailbox_size = 5\n",
     'INSTANCES_FILE [instances."acme-bot"].mailbox_size: a process-wide setting, not per instance: set it in '
     'config.toml, .env or the environment'),
    (ACME + 'data_dir = "/tmp/elsewhere"\n',
     'INSTANCES_FILE [instances."acme-bot"].data_dir: a process-wide setting, not per instance: set it in '
     'config.toml, .env or the environment'),
    # wrong type (the issue's own example)
    (ACME + 'max_messages = "abc"\n',
     'INSTANCES_FILE [instances."acme-bot"].max_messages: invalid value \'abc\' (expected int)'),
    (ACME + "max_messages = 3.5\n",
     'INSTANCES_FILE [instances."acme-bot"].max_messages: invalid value \'3.5\' (expected int)'),
    (ACME + "agent_instruction = 5\n",
     'INSTANCES_FILE [instances."acme-bot"].agent_instruction: invalid value \'5\' (expected str)'),
    (ACME + 'groups_enabled = "maybe"\n',
     'INSTANCES_FILE [instances."acme-bot"].groups_enabled: invalid value \'maybe\' (expected bool)'),
    # a secret reference to a variable that is not set
    (ACME + 'evolution_api_key_env = "ACME_EVOLUTION_API_KEY"\n',
     'INSTANCES_FILE [instances."acme-bot"].evolution_api_key_env: environment variable ACME_EVOLUTION_API_KEY is '
     'not set (neither in the environment nor in .env)'),
    # a secret reference that is no variable name
    (ACME + 'openai_api_key_env = "sk-live 123"\n',
     'INSTANCES_FILE [instances."acme-bot"].openai_api_key_env: expected the name of an environment variable, '
     'e.g. "ACME_EVOLUTION_API_KEY"'),
    # a secret given inline: refused, and never echoed
    (ACME + 'openai_api_key = "sk-live-0123456789"\n',
     'INSTANCES_FILE [instances."acme-bot"].openai_api_key: a secret never goes in this file: name the environment '
     'variable that holds it instead, openai_api_key_env = "VAR"'),
    # a reference to a setting that is no secret
    (ACME + 'max_messages_env = "MAX"\n',
     'INSTANCES_FILE [instances."acme-bot"].max_messages_env: not a secret, so its value goes in the file: '
     'max_messages = ...'),
    # TOML syntax
    ('[instances."acme-bot"\nmax_messages = 3\n', None),
    # an instance that is not a table
    ('[instances]\nacme-bot = "max_messages=3"\n',
     'INSTANCES_FILE [instances."acme-bot"]: expected a table of settings, got a string'),
    ('instances = 3\n', 'INSTANCES_FILE instances: expected [instances."<name>"] tables, got an integer'),
    # bad enum, bad URL, negative numbers, a value below its minimum
    (ACME + 'language = "fr"\n', 'INSTANCES_FILE [instances."acme-bot"].language: must be es or en'),
    (ACME + 'llm_provider = "gpt5"\n',
     'INSTANCES_FILE [instances."acme-bot"].llm_provider: unknown provider \'gpt5\' '
     '(one of offline, huggingface, anthropic, openai, gemini, ollama)'),
    (ACME + 'google_booking_url = "calendar.app.google/acme"\n',
     'INSTANCES_FILE [instances."acme-bot"].google_booking_url: must start with http:// or https://'),
    (ACME + 'debounce_seconds = -1\n', 'INSTANCES_FILE [instances."acme-bot"].debounce_seconds: must be 0 or more'),
    (ACME + 'krayin_stage_id = -7\n', 'INSTANCES_FILE [instances."acme-bot"].krayin_stage_id: must be at least 1'),
    (ACME + 'max_messages = 1\n', 'INSTANCES_FILE [instances."acme-bot"].max_messages: must be at least 2'),
    # unknown sections: config.toml's headers do not apply here, nor any other top-level table or key
    ('[instances."acme-bot".llm]\nllm_provider = "openai"\n',
     'INSTANCES_FILE [instances."acme-bot"].llm: sections are not used here: write the settings of [llm] directly '
     'under the instance\'s table'),
    ('[defaults]\nmax_messages = 3\n',
     'INSTANCES_FILE [defaults]: unknown table: the file holds [instances."<name>"] tables only'),
    ('max_messages = 3\n' + ACME,
     'INSTANCES_FILE max_messages: a key outside any table: settings go under [instances."<name>"]'),
    # instance names
    ('[instances.""]\nmax_messages = 3\n', 'INSTANCES_FILE [instances.""]: an instance name must not be empty'),
    ('[instances."acme\\u0007bot"]\n',
     'INSTANCES_FILE [instances."acme\\u0007bot"]: an instance name must not contain control characters'),
    (f'[instances."{"x" * 101}"]\n',
     f'INSTANCES_FILE [instances."{"x" * 57}..."]: an instance name has at most 100 characters (this one has 101)'),
], ids=lambda value: None if value is None or "\n" not in value else value.splitlines()[-1][:40])
def test_a_malformed_file_is_one_clear_line(tmp_path: Path, text: str, line: str | None) -> None:
    shown = refusal(tmp_path, text)
    assert "\n" not in shown and "Traceback" not in shown
    if line is None:   # TOML's own message names where the syntax broke
        path = tmp_path / "instances.toml"
        assert shown.startswith(f"INSTANCES_FILE: {path}: not valid TOML (") and "line 1" in shown, shown
    else:
        assert shown == line


def test_the_refusal_of_an_inline_secret_never_shows_it(tmp_path: Path) -> None:
    shown = refusal(tmp_path, ACME + 'evolution_api_key = "B6D711FCDE4D4FD5936544120E713976"\n')
    assert "B6D711FCDE4D4FD5936544120E713976" not in shown and "evolution_api_key_env" in shown


def test_an_empty_secret_variable_is_refused(tmp_path: Path) -> None:
    shown = refusal(tmp_path, ACME + 'evolution_api_key_env = "ACME_KEY"\n', {"ACME_KEY": " "})
    assert shown == 'INSTANCES_FILE [instances."acme-bot"].evolution_api_key_env: environment variable ACME_KEY is empty'


def test_a_named_file_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    settings = base_settings(INSTANCES_FILE=str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError) as info:
        configured_instances(settings, dotenv_file=None)
    assert _shown(info.value) == f"INSTANCES_FILE: {tmp_path / 'missing.toml'}: cannot be read (FileNotFoundError)"


# -- through a real process: one line on stderr, a non-zero exit, nothing served ----------------------

@pytest.mark.parametrize(("text", "line"), [
    (ACME + 'max_messages = "abc"\n',
     'Configuration error: INSTANCES_FILE [instances."acme-bot"].max_messages: invalid value \'abc\' (expected int)'),
    (ACME + "mailbox_size = 5\n",
     'Configuration error: INSTANCES_FILE [instances."acme-bot"].mailbox_size: a process-wide setting, not per '
     'instance: set it in config.toml, .env or the environment'),
    (ACME + 'evolution_api_key_env = "ACME_EVOLUTION_API_KEY"\n',
     'Configuration error: INSTANCES_FILE [instances."acme-bot"].evolution_api_key_env: environment variable '
     'ACME_EVOLUTION_API_KEY is not set (neither in the environment nor in .env)'),
    ('[instances."acme-bot"\n', None),
], ids=["wrong-type", "process-wide", "missing-secret", "toml-syntax"])
def test_a_malformed_file_stops_a_real_process_before_serving(tmp_path: Path, text: str, line: str | None) -> None:
    path = write(tmp_path, text)
    env = {k: v for k, v in os.environ.items() if k != "ACME_EVOLUTION_API_KEY"}
    env.update(INSTANCES_FILE=str(path), LOG_DIR=str(tmp_path / "logs"), DATA_DIR=str(tmp_path / "data"))
    result = subprocess.run([HYPERCORN, "--worker-class", "trio", "--bind", "127.0.0.1:0", "app:app"],
                            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    if line is None:
        assert lines[0].startswith(f"Configuration error: INSTANCES_FILE: {path}: not valid TOML ("), lines
    else:
        assert lines[0] == line
    assert not (tmp_path / "data" / "agent.sqlite3").exists()   # refused before the store was opened


async def test_a_real_process_starts_with_a_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, ACME + 'agent_instruction = "Eres el asistente de Acme."\n'
                                  'evolution_api_key_env = "ACME_EVOLUTION_API_KEY"\n')
    env = {"INSTANCES_FILE": str(path), "ACME_EVOLUTION_API_KEY": "acme-evo-key-123456",
           "LOG_DIR": str(tmp_path / "logs"), "DATA_DIR": str(tmp_path / "data"), "STORE": "memory"}
    with ServiceProcess(env, tmp_path / "service.out") as service:
        service.start()
        await service.wait_ready()
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            assert (await client.get("/health")).json() == {"status": "ok"}
        assert await service.terminate() == 0


# -- good files ------------------------------------------------------------------------------------

def test_overrides_apply_and_everything_else_is_inherited(tmp_path: Path) -> None:
    base = base_settings(MAX_MESSAGES="40", OPENAI_API_KEY="sk-base-1111", EVOLUTION_API_KEY="evo-base-2222")
    path = write(tmp_path, ACME + 'agent_instruction = "Eres el asistente de Acme."\n'
                                  'language = "en"\nmax_messages = 12\ndebounce_seconds = 1.5\n'
                                  'llm_provider = "OpenAI"\nllm_provider_fallback = "anthropic, gemini"\n'
                                  'reset_keywords = ["empezar", "Reset"]\nignore_jids = "@g.us"\n'
                                  'krayin_stage_id = 7\ncrm_auto_register = true\n'
                                  'google_booking_url = "https://calendar.app.google/acme"\n'
                                  '\n[instances."beta-shop"]\n')
    instances = load_instances(base, path, {}, dotenv_file=None)
    assert list(instances) == ["acme-bot", "beta-shop"]
    acme, beta = instances["acme-bot"], instances["beta-shop"]
    assert beta == base   # an empty table: the process's own settings
    changed = {"agent_instruction": "Eres el asistente de Acme.", "language": "en", "max_messages": 12,
               "debounce_seconds": 1.5, "llm_provider": "openai", "llm_provider_fallback": ("anthropic", "gemini"),
               "reset_keywords": ("empezar", "Reset"), "ignore_jids": ("@g.us",), "krayin_stage_id": 7,
               "crm_auto_register": True, "google_booking_url": "https://calendar.app.google/acme"}
    for section, f in setting_fields():
        value = getattr(getattr(acme, section), f.name)
        assert value == changed.get(f.name, getattr(getattr(base, section), f.name)), f.name
    assert acme.llm.provider_order == ("openai", "anthropic", "gemini")
    assert acme.llm.openai_api_key == "sk-base-1111" and acme.outbound.evolution_api_key == "evo-base-2222"


def test_secrets_come_from_the_environment_then_dotenv(tmp_path: Path) -> None:
    dotenv = write(tmp_path, "ACME_EVO=evo-from-dotenv-1111\nACME_OPENAI=sk-from-dotenv-2222\n", ".env")
    path = write(tmp_path, ACME + 'evolution_api_key_env = "ACME_EVO"\nopenai_api_key_env = "ACME_OPENAI"\n')
    acme = load_instances(base_settings(), path, {"ACME_OPENAI": "sk-from-env-3333"}, dotenv_file=dotenv)["acme-bot"]
    assert acme.outbound.evolution_api_key == "evo-from-dotenv-1111"   # only in .env
    assert acme.llm.openai_api_key == "sk-from-env-3333"               # the environment wins
    assert "sk-from-env-3333" not in repr(acme) and "sk-from-env-3333" in acme.secret_values()


def test_no_file_is_the_single_tenant_service(tmp_path: Path) -> None:
    config = write(tmp_path, (PROJECT_ROOT / "config.toml").read_text(), "config.toml")
    settings = load_settings({}, config_file=config, dotenv_file=None)
    assert instances_path(settings, config) is None
    assert configured_instances(settings, config_file=config, dotenv_file=None) == {}
    life = Lifecycle(make_settings(tmp_path), instances=configured_instances(settings, config_file=config))
    assert life.instances == {} and life.service.tenants.names == ()


def test_instances_toml_beside_config_is_found_and_instances_file_names_another(tmp_path: Path) -> None:
    config = write(tmp_path, (PROJECT_ROOT / "config.toml").read_text(), "config.toml")
    beside = write(tmp_path, ACME + "max_messages = 9\n")
    settings = load_settings({}, config_file=config, dotenv_file=None)
    assert instances_path(settings, config) == beside
    assert configured_instances(settings, config_file=config)["acme-bot"].conversation.max_messages == 9
    (tmp_path / "conf.d").mkdir()
    other = write(tmp_path / "conf.d", '[instances."beta-shop"]\nlanguage = "en"\n', "numbers.toml")
    named = load_settings({"INSTANCES_FILE": "conf.d/numbers.toml"}, config_file=config, dotenv_file=None)
    assert instances_path(named, config) == other   # relative to config.toml's directory, not the cwd
    assert list(configured_instances(named, config_file=config)) == ["beta-shop"]


def test_the_example_file_loads(tmp_path: Path) -> None:
    """As shipped, with no variable set (a newcomer's first start); with its commented lines, acme-bot's
    own provider and keys."""
    example = (PROJECT_ROOT / "instances.example.toml").read_text(encoding="utf-8")
    instances = load_instances(base_settings(), write(tmp_path, example), {}, dotenv_file=None)
    acme, beta = instances["acme-bot"], instances["beta-shop"]
    assert acme.llm.provider_order == ("offline",) and acme.crm.krayin_stage_id == 7
    assert (acme.conversation.language, beta.conversation.language) == ("es", "en")
    assert acme.conversation.google_booking_url != beta.conversation.google_booking_url
    assert beta.conversation.max_messages == 30
    assert acme.conversation.agent_instruction != beta.conversation.agent_instruction
    uncommented = re.sub(r"(?m)^# ((?:llm_provider|llm_provider_fallback|\w+_env) = )", r"\1", example)
    environ = {"ACME_ANTHROPIC_API_KEY": "sk-ant-acme-1111", "ACME_EVOLUTION_API_KEY": "acme-evo-2222"}
    acme = load_instances(base_settings(), write(tmp_path, uncommented), environ, dotenv_file=None)["acme-bot"]
    assert acme.llm.provider_order == ("anthropic", "openai") and acme.llm.anthropic_api_key == "sk-ant-acme-1111"
    assert acme.outbound.evolution_api_key == "acme-evo-2222"


def test_lifecycle_loads_the_file_and_registers_its_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, ACME + 'evolution_api_key_env = "ACME_EVOLUTION_API_KEY"\n')
    os.environ["ACME_EVOLUTION_API_KEY"] = "acme-evo-key-987654"
    try:
        life = Lifecycle(make_settings(tmp_path, INSTANCES_FILE=str(path)))
    finally:
        del os.environ["ACME_EVOLUTION_API_KEY"]
    assert list(life.instances) == ["acme-bot"] and life.service.tenants.names == ("acme-bot",)
    assert "acme-evo-key-987654" in life.secret_values()   # redacted from the logs like the process's own
    broken = write(tmp_path, ACME + "max_messages = 1\n", "broken.toml")
    with pytest.raises(ConfigError, match=r'^INSTANCES_FILE \[instances."acme-bot"\].max_messages: must be at least 2$'):
        Lifecycle(make_settings(tmp_path, INSTANCES_FILE=str(broken)))


def test_only_per_instance_settings_and_their_secret_references_are_accepted(tmp_path: Path) -> None:
    """Every per-instance setting can be given (secrets by reference), and every other one is refused."""
    base = base_settings()
    for section, f in setting_fields():
        if f.metadata["secret"]:
            text, environ = f'{f.name}_env = "X_{f.name.upper()}"\n', {f"X_{f.name.upper()}": "secret-value-1234"}
        else:
            value = getattr(getattr(base, section), f.name)
            text, environ = f"{f.name} = {_toml(value)}\n", {}
        path = write(tmp_path, ACME + text)
        if f.metadata["per_instance"]:
            assert load_instances(base, path, environ, dotenv_file=None)["acme-bot"] is not None
        else:
            with pytest.raises(ConfigError, match="process-wide"):
                load_instances(base, path, environ, dotenv_file=None)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{item}"' for item in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_settings_built_in_code_are_checked_like_a_file(tmp_path: Path) -> None:
    """An instance's Settings is an attrs.evolve of the process's: the frozen sections stay checked."""
    acme = load_instances(base_settings(), write(tmp_path, ACME + "max_messages = 5\n"), {}, dotenv_file=None)["acme-bot"]
    with pytest.raises(ConfigError):
        attrs.evolve(acme.conversation, max_messages=0)


# -- checking before a restart, and SIGHUP ----------------------------------------------------------

def check_config(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "LOG_DIR": str(tmp_path / "logs"), **env}
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "check_config.py")], cwd=tmp_path,
                          env=environ, capture_output=True, text=True, timeout=60)


def test_the_check_script_reads_the_file_as_start_up_does(tmp_path: Path) -> None:
    good = write(tmp_path, ACME + 'evolution_api_key_env = "ACME_EVOLUTION_API_KEY"\n[instances."beta-shop"]\n')
    result = check_config(tmp_path, INSTANCES_FILE=str(good), ACME_EVOLUTION_API_KEY="acme-evo-key-123456")
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"Configuration OK: {good}: 2 instance(s): acme-bot, beta-shop\n", "")
    bad = write(tmp_path, ACME + 'max_messages = "abc"\n', "bad.toml")
    result = check_config(tmp_path, INSTANCES_FILE=str(bad))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ('Configuration error: INSTANCES_FILE [instances."acme-bot"].max_messages: '
                             "invalid value 'abc' (expected int)\n")


def _count(service: ServiceProcess, text: str) -> int:
    return service.log_path.read_text(errors="replace").count(text)


async def test_sighup_restarts_the_worker_which_reads_the_file_anew(tmp_path: Path) -> None:
    """hypercorn's parent answers SIGHUP by stopping its worker (an orderly shutdown) and starting a new
    one, which loads the instances file again: a good file serves on, a broken one ends the process
    with the one line (so check it first: scripts/check_config.py)."""
    path = write(tmp_path, ACME + "max_messages = 10\n")
    env = {"INSTANCES_FILE": str(path), "LOG_DIR": str(tmp_path / "logs"), "DATA_DIR": str(tmp_path / "data"),
           "STORE": "sqlite"}
    with ServiceProcess(env, tmp_path / "service.out") as service:
        service.start()
        await service.wait_ready()
        assert service.proc is not None
        path.write_text(ACME + "max_messages = 20\n" + '[instances."beta-shop"]\n')
        service.proc.send_signal(signal.SIGHUP)
        with trio.fail_after(30):
            while _count(service, "Service ready") < 2:
                assert service.proc.poll() is None, service.output()
                await trio.sleep(0.05)
        await service.wait_ready()
        path.write_text(ACME + 'max_messages = "abc"\n')
        service.proc.send_signal(signal.SIGHUP)
        with trio.fail_after(30):
            while service.proc.poll() is None:
                await trio.sleep(0.05)
        assert service.proc.returncode != 0
        out = service.output()
        assert ('Configuration error: INSTANCES_FILE [instances."acme-bot"].max_messages: invalid value \'abc\' '
                '(expected int)') in out and "Traceback" not in out
