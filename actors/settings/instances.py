"""The instances file: one table per Evolution instance (one WhatsApp number) with its own settings.

::

    [instances."acme-bot"]
    agent_instruction = "Eres el asistente de Acme..."
    max_messages = 30
    evolution_api_key_env = "ACME_EVOLUTION_API_KEY"   # the NAME of an environment variable

Each key is a setting's name in lower case, as in ``config.toml`` but without its section; only the
settings marked ``per_instance`` (actors/settings/sections.py) may be given. An instance's effective
settings are the process's own (config.toml < .env < environment) with its table's values applied
through ``attrs.evolve``, so every value passes the same checks as at start-up. A secret never sits in
the file: ``<setting>_env = "VAR"`` names the environment variable (process environment, then
``.env``) that holds it. Anything wrong is a :class:`ConfigError` of one line naming its place:
``INSTANCES_FILE [instances."acme-bot"].max_messages: invalid value 'abc' (expected int)``.

No ``INSTANCES_FILE`` and no ``instances.toml`` beside ``config.toml``: no instances file, and the
service is single-tenant exactly as before.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
import unicodedata
from pathlib import Path
from typing import Any, Mapping

import attrs

from .fields import ConfigError
from .loading import DEFAULT_CONFIG_FILE, Dotenv, convert, read_dotenv, resolve_dotenv
from .sections import SECTIONS, Settings, setting_fields

FILE_SETTING = "INSTANCES_FILE"
DEFAULT_NAME = "instances.toml"    # looked for beside config.toml when INSTANCES_FILE is unset
SECRET_SUFFIX = "_env"
MAX_NAME_CHARS = 100
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def instances_path(settings: Settings, config_file: Path = DEFAULT_CONFIG_FILE) -> Path | None:
    """The instances file to read: INSTANCES_FILE (relative to config.toml's directory), else
    ``instances.toml`` beside ``config_file`` when it exists; None: single-tenant."""
    named = settings.outbound.instances_file.strip()
    if named:
        path = Path(named).expanduser()
        return path if path.is_absolute() else config_file.parent / path
    beside = config_file.parent / DEFAULT_NAME
    return beside if beside.is_file() else None


def configured_instances(settings: Settings, *, config_file: Path = DEFAULT_CONFIG_FILE,
                         environ: Mapping[str, str] | None = None,
                         dotenv_file: Dotenv = ...) -> dict[str, Settings]:
    """Every instance's effective settings from the configured file; ``{}`` when there is none.
    What start-up (actors/lifecycle.py) and a reload call; raises ConfigError."""
    path = instances_path(settings, config_file)
    return {} if path is None else load_instances(settings, path, environ, dotenv_file=dotenv_file)


def load_instances(base: Settings, path: Path, environ: Mapping[str, str] | None = None, *,
                   dotenv_file: Dotenv = ...) -> dict[str, Settings]:
    """Each instance of the file at ``path``, by name in file order, with its effective settings:
    ``base`` with the instance's values applied. Secrets named by ``<setting>_env`` are read from
    ``environ`` (default ``os.environ``), then from ``dotenv_file``. Raises ConfigError (one line)."""
    environ = os.environ if environ is None else environ
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({type(exc).__name__})", subject=FILE_SETTING) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})", subject=FILE_SETTING) from None
    for key, value in document.items():
        if key != "instances":
            if isinstance(value, dict):
                raise ConfigError("unknown table: the file holds [instances.\"<name>\"] tables only",
                                  subject=f"{FILE_SETTING} [{_bare_or_quoted(key)}]")
            raise ConfigError("a key outside any table: settings go under [instances.\"<name>\"]",
                              subject=f"{FILE_SETTING} {_bare_or_quoted(key)}")
    tables = document.get("instances", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"expected [instances.\"<name>\"] tables, got {_toml_type(tables)}",
                          subject=f"{FILE_SETTING} instances")
    secrets = _SecretSource(environ, resolve_dotenv(dotenv_file, environ))
    return {name: _instance(base, name, table, secrets) for name, table in tables.items()}


@attrs.define
class _SecretSource:
    """The process environment, then ``.env`` (read once, only when a secret is not in the environment)."""

    environ: Mapping[str, str]
    dotenv_file: Path | None
    _dotenv: dict[str, str] | None = None

    def get(self, variable: str) -> str | None:
        if variable in self.environ:
            return self.environ[variable]
        if self._dotenv is None:
            path = self.dotenv_file
            try:
                self._dotenv = read_dotenv(path) if path is not None and path.exists() else {}
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f".env file {path}: cannot be read ({exc.__class__.__name__})") from None
        return self._dotenv.get(variable)


def _instance(base: Settings, name: Any, table: Any, secrets: _SecretSource) -> Settings:
    """``base`` with the values of instance ``name``'s ``table`` applied."""
    where = f"{FILE_SETTING} [instances.{_quoted(name)}]"
    if (why := _bad_name(name)) is not None:
        raise ConfigError(why, subject=where)
    if not isinstance(table, dict):
        raise ConfigError(f"expected a table of settings, got {_toml_type(table)}", subject=where)
    fields = {f.name: (section, f) for section, f in setting_fields()}
    overrides: dict[str, dict[str, Any]] = {}
    given: dict[str, str] = {}   # field name -> the key that gave it (for the error of a failed check)
    for key, raw in table.items():
        subject = f"{where}.{_bare_or_quoted(key)}"
        setting, is_reference = _setting_of(key, fields)
        if setting is None:
            raise ConfigError(_unknown(key, raw, fields), subject=subject)
        section, f = fields[setting]
        if not f.metadata["per_instance"]:
            raise ConfigError("a process-wide setting, not per instance: set it in config.toml, .env or "
                              "the environment", subject=subject)
        if f.metadata["secret"] and not is_reference:
            raise ConfigError(f"a secret never goes in this file: name the environment variable that holds "
                              f"it instead, {key}{SECRET_SUFFIX} = \"VAR\"", subject=subject)
        if is_reference and not f.metadata["secret"]:
            raise ConfigError(f"not a secret, so its value goes in the file: {setting} = ...", subject=subject)
        if isinstance(raw, dict):
            raise ConfigError("expected a value, got a table", subject=subject)
        if is_reference:
            value: Any = _secret(raw, secrets, subject)
        else:
            try:
                value = convert(setting, f.type, raw)
            except ConfigError as exc:
                raise ConfigError(_reason(exc), subject=subject) from None
        overrides.setdefault(section, {})[setting] = value
        given[setting] = key
    sections: dict[str, Any] = {}
    for section, values in overrides.items():
        try:
            sections[section] = attrs.evolve(getattr(base, section), **values)
        except ConfigError as exc:   # a field's check: its message names the field's variable
            failed = str(exc).partition(":")[0].lower()
            key = given.get(failed, failed)
            raise ConfigError(_reason(exc), subject=f"{where}.{_bare_or_quoted(key)}") from None
    return attrs.evolve(base, **sections)


def _setting_of(key: Any, fields: Mapping[str, Any]) -> tuple[str | None, bool]:
    """The setting ``key`` gives, and whether it gives it as ``<setting>_env`` (a variable's name)."""
    if not isinstance(key, str):
        return None, False
    if key in fields:
        return key, False
    if key.endswith(SECRET_SUFFIX) and key[: -len(SECRET_SUFFIX)] in fields:
        return key[: -len(SECRET_SUFFIX)], True
    return None, False


def _unknown(key: str, raw: Any, fields: Mapping[str, Any]) -> str:
    """Why ``key`` is refused: a section header where settings go flat, or an unknown setting."""
    if key in SECTIONS and isinstance(raw, dict):
        return f"sections are not used here: write the settings of [{key}] directly under the instance's table"
    close = difflib.get_close_matches(key, list(fields), n=1)
    return f"unknown setting {key!r}" + (f" (did you mean {close[0]}?)" if close else "")


def _secret(reference: Any, secrets: _SecretSource, subject: str) -> str:
    """The value of the environment variable ``reference`` names."""
    if not isinstance(reference, str) or not _ENV_NAME.fullmatch(reference):
        raise ConfigError("expected the name of an environment variable, e.g. \"ACME_EVOLUTION_API_KEY\"",
                          subject=subject)
    value = secrets.get(reference)
    if value is None:
        raise ConfigError(f"environment variable {reference} is not set (neither in the environment nor in .env)",
                          subject=subject)
    if not value.strip():
        raise ConfigError(f"environment variable {reference} is empty", subject=subject)
    return value.strip()


def _reason(error: ConfigError) -> str:
    """A field's ConfigError without its ``VARIABLE: `` prefix (the instances file names the key instead)."""
    return str(error).partition(": ")[2] or str(error)


def _bad_name(name: Any) -> str | None:
    if not isinstance(name, str) or not name.strip():
        return "an instance name must not be empty"
    if len(name) > MAX_NAME_CHARS:
        return f"an instance name has at most {MAX_NAME_CHARS} characters (this one has {len(name)})"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        return "an instance name must not contain control characters"
    return None


def _quoted(name: Any) -> str:
    """``name`` as a TOML basic string (control characters escaped; a long name cut)."""
    text = str(name)
    shown = text if len(text) <= 60 else text[:57] + "..."
    return json.dumps(shown, ensure_ascii=False)


def _bare_or_quoted(key: str) -> str:
    """A TOML key as written: bare when it can be, else quoted."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _quoted(key)


def _toml_type(value: Any) -> str:
    """A TOML value's type, as the file's author knows it."""
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)
