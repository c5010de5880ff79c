"""Reading the settings: ``config.toml`` defaults, overridden by ``.env``, overridden by the process environment.

The ``.env`` read is the one beside ``config.toml``, or the file ``ENV_FILE`` names (empty: none):
a loader knob from the environment, not a setting, so a test run or a second deployment in the same
checkout never picks up a developer's ``.env``.

``config.toml`` has one table per section (actors/settings/sections.py) and each key is a setting's
name in lower case; a key outside its own section's table is an error that names the right one, so the
file always reads as the sections it configures. Secrets are refused there.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from types import EllipsisType
from typing import Any, Mapping

import attrs

from .fields import ConfigError
from .sections import SECTIONS, Settings, setting_fields

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_FILE = PROJECT_ROOT / "config.toml"

# A ``dotenv_file`` argument: a path, None for no .env, or ``...`` for ``dotenv_path()``'s.
Dotenv = Path | None | EllipsisType


def dotenv_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The ``.env`` file to read: ``ENV_FILE`` when set (empty: none), else ``.env`` beside config.toml."""
    value = (os.environ if environ is None else environ).get("ENV_FILE")
    if value is None:
        return PROJECT_ROOT / ".env"
    return Path(value) if value.strip() else None


def resolve_dotenv(dotenv_file: Dotenv, environ: Mapping[str, str] | None = None) -> Path | None:
    return dotenv_path(environ) if dotenv_file is ... else dotenv_file


# An unquoted value's comment: a "#" at its start or after a space, followed by a space or the end.
_INLINE_COMMENT = re.compile(r"(?:^|\s)#(?:\s.*)?$")


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=value`` lines, ``#`` comments, optional quotes, ``export``."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"{path}:{number}: expected KEY=value")
        value = value.strip()
        if value[:1] in ("'", '"') and value.find(value[0], 1) > 0:
            value = value[1 : value.find(value[0], 1)]
        else:
            value = _INLINE_COMMENT.sub("", value).strip()
        values[key] = value
    return values


def convert(name: str, kind: Any, raw: Any) -> Any:
    """``raw`` (text from the environment, or a TOML value) as the field's type ``kind``. A TOML value
    of another type is refused rather than bent: ``3.5`` is no int, ``5`` no text."""
    env_name = name.upper()
    text = raw if isinstance(raw, str) else None
    try:
        if kind == "str":
            if text is None:
                raise ValueError
            return text
        if kind == "int":
            if isinstance(raw, bool) or isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(text.strip()) if text is not None else int(raw)
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            value = float(text.strip()) if text is not None else float(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError
            return value
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind == "Path":
            return Path(str(raw))
        if kind == "tuple[str, ...]":
            items = raw if isinstance(raw, list) else str(raw).split(",")
            return tuple(item.strip() for item in items if str(item).strip())
    except (TypeError, ValueError):
        raise ConfigError(f"{env_name}: invalid value {str(raw)[:60]!r} (expected {kind})") from None
    raise ConfigError(f"{env_name}: unsupported setting type {kind}")


def _read_config(config_file: Path) -> dict[str, Any]:
    """The defaults in ``config_file``, by setting name; each key must sit under its own section."""
    try:
        document = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {config_file}: {exc}") from None
    home = {f.name: section for section, f in setting_fields()}
    secrets = {f.name for _, f in setting_fields() if f.metadata["secret"]}
    defaults: dict[str, Any] = {}
    for table, entries in document.items():
        if not isinstance(entries, dict):
            table, entries = "", {table: entries}
        for key, value in entries.items():
            if key in secrets:
                raise ConfigError(f"config file {config_file}: {key!r} is a secret; "
                                  f"set {key.upper()} in the environment or .env")
            if key not in home:
                raise ConfigError(f"config file {config_file}: unknown setting {key!r}")
            if home[key] != table:
                where = f"[{table}]" if table else "no section"
                raise ConfigError(f"config file {config_file}: {key!r} belongs under [{home[key]}], not {where}")
            defaults[key] = value
        if table and table not in SECTIONS:
            raise ConfigError(f"config file {config_file}: unknown section [{table}] "
                              f"(one of {', '.join(SECTIONS)})")
    return defaults


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    config_file: Path = DEFAULT_CONFIG_FILE,
    dotenv_file: Dotenv = ...,
) -> Settings:
    """Build the settings; raises ConfigError naming the first bad variable.

    ``environ`` defaults to ``os.environ``; tests pass their own mapping (and ``dotenv_file=None``).
    ``dotenv_file``: ``...`` reads ``dotenv_path(environ)``.
    """
    environ = os.environ if environ is None else environ
    dotenv_file = resolve_dotenv(dotenv_file, environ)
    defaults = _read_config(config_file)
    try:
        dotenv = read_dotenv(dotenv_file) if dotenv_file is not None and dotenv_file.exists() else {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f".env file {dotenv_file}: cannot be read ({exc.__class__.__name__})") from None

    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values: dict[str, Any] = {}
        for f in attrs.fields(cls):
            env_name = f.name.upper()
            if env_name in environ:
                raw: Any = environ[env_name]
            elif env_name in dotenv:
                raw = dotenv[env_name]
            elif f.name in defaults:
                raw = defaults[f.name]
            elif f.default is not attrs.NOTHING:
                continue
            else:
                raise ConfigError(f"{env_name}: missing (no default in {config_file.name})")
            values[f.name] = convert(f.name, f.type, raw)
        sections[section] = cls(**values)
    return Settings(**sections)
