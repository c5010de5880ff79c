"""Settings: ``config.toml`` defaults, overridden by ``.env``, overridden by the process environment.

Every setting's environment variable is its field name in upper case (``MAX_MESSAGES``).
Secrets (``metadata={"secret": True}``) are never read from ``config.toml`` and never shown.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

import attrs

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = PROJECT_ROOT / "config.toml"

PROVIDERS = ("offline", "huggingface", "anthropic", "openai", "gemini", "ollama")


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable and is one line."""


def _secret() -> Any:
    return attrs.field(default="", metadata={"secret": True})


@attrs.frozen
class Settings:
    """Every knob of the service. Durations are seconds; empty strings mean "not set"."""

    # server
    host: str
    port: int
    max_body_bytes: int
    shutdown_grace_seconds: float
    # exposure (docs/security.md)
    allow_open_webhook: bool
    admin_loopback_only: bool
    unknown_instances: str
    new_chats_per_minute: int
    log_customer_text: str
    admin_session_minutes: float
    # storage
    data_dir: Path
    store: str
    # logging
    log_dir: Path
    log_level: str
    log_file: str
    log_max_bytes: int
    log_backup_count: int
    log_json: bool
    log_stderr: bool
    # conversation
    max_messages: int
    max_message_chars: int
    max_window_chars: int
    prompt_max_chars: int
    mailbox_size: int
    actor_idle_ttl: float
    restart_intensity: int
    restart_period: float
    turn_deadline_seconds: float
    debounce_seconds: float
    reorder_delay_seconds: float
    flood_max_per_minute: int
    groups_enabled: bool
    ignore_jids: tuple[str, ...]
    allow_jids: tuple[str, ...]
    human_takeover_minutes: float
    takeover_keyword: str
    reset_keywords: tuple[str, ...]
    unknown_message_text: str
    google_booking_url: str
    language: str
    agent_instruction: str
    # llm
    llm_provider: str
    llm_provider_fallback: tuple[str, ...]
    llm_timeout: float
    llm_max_tokens: int
    llm_concurrency: int
    llm_retry_after_budget: float
    circuit_failure_threshold: int
    circuit_cooldown_seconds: float
    circuit_stall_seconds: float
    openai_model: str
    openai_base_url: str
    anthropic_model: str
    anthropic_base_url: str
    gemini_model: str
    gemini_base_url: str
    hf_model: str
    hf_base_url: str
    ollama_model: str
    ollama_base_url: str
    # evolution
    evolution_api_url: str
    evolution_instance: str
    evolution_instance_id: str
    http_timeout: float
    outbound_min_gap_seconds: float
    outbound_rate_per_instance: float
    outbound_max_attempts: int
    outbound_max_retry_seconds: float
    split_max_chars: int
    typing_presence: bool
    # crm
    crm_auto_register: bool
    krayin_api_url: str
    krayin_pipeline_id: int
    krayin_stage_id: int
    krayin_user_id: int
    krayin_lead_source_id: int
    krayin_lead_type_id: int
    crm_email_domain: str
    crm_give_up_seconds: float
    # secrets: environment or .env only
    openai_api_key: str = _secret()
    anthropic_api_key: str = _secret()
    gemini_api_key: str = _secret()
    huggingface_api_key: str = _secret()
    ollama_api_key: str = _secret()
    evolution_api_key: str = _secret()
    krayin_api_token: str = _secret()
    admin_token: str = _secret()
    webhook_secret: str = _secret()

    @property
    def provider_order(self) -> tuple[str, ...]:
        """LLM_PROVIDER then each fallback, never the same provider twice."""
        order: list[str] = []
        for name in (self.llm_provider, *self.llm_provider_fallback):
            if name not in order:
                order.append(name)
        return tuple(order)

    @property
    def names_instances(self) -> bool:
        """Whether the deployment names the Evolution instances it serves."""
        return bool(self.evolution_instance or self.evolution_instance_id)

    @property
    def serves_unknown_instances(self) -> bool:
        """UNKNOWN_INSTANCES, resolved: empty means ignore when instances are named, serve when none are."""
        if self.unknown_instances:
            return self.unknown_instances == "serve"
        return not self.names_instances

    @property
    def crm_enabled(self) -> bool:
        return self.crm_auto_register and bool(self.krayin_api_url and self.krayin_api_token)

    def secret_values(self) -> list[str]:
        """The values of every secret that is set (for the log redaction filter)."""
        return [
            getattr(self, f.name)
            for f in attrs.fields(Settings)
            if f.metadata.get("secret") and getattr(self, f.name)
        ]

    def public_view(self) -> dict[str, Any]:
        """Every setting with secrets replaced by whether they are set."""
        view: dict[str, Any] = {}
        for f in attrs.fields(Settings):
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                view[f.name] = "set" if value else "unset"
            else:
                view[f.name] = str(value) if isinstance(value, Path) else value
        return view


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


def _convert(name: str, kind: Any, raw: Any) -> Any:
    env_name = name.upper()
    text = raw if isinstance(raw, str) else None
    try:
        if kind in ("str", str):
            return str(raw)
        if kind in ("int", int):
            if isinstance(raw, bool):
                raise ValueError
            return int(text.strip()) if text is not None else int(raw)
        if kind in ("float", float):
            if isinstance(raw, bool):
                raise ValueError
            value = float(text.strip()) if text is not None else float(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError
            return value
        if kind in ("bool", bool):
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind in ("Path", Path):
            return Path(str(raw))
        if kind in ("tuple[str, ...]",):
            items = raw if isinstance(raw, list) else str(raw).split(",")
            return tuple(item.strip() for item in items if str(item).strip())
    except (TypeError, ValueError):
        raise ConfigError(f"{env_name}: invalid value {str(raw)[:60]!r} (expected {kind})") from None
    raise ConfigError(f"{env_name}: unsupported setting type {kind}")


def _validate(s: Settings) -> None:
    def require(ok: bool, name: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{name.upper()}: {why}")

    require(s.llm_provider in PROVIDERS, "llm_provider", f"unknown provider {s.llm_provider!r} (one of {', '.join(PROVIDERS)})")
    for name in s.llm_provider_fallback:
        require(name in PROVIDERS, "llm_provider_fallback", f"unknown provider {name!r} (one of {', '.join(PROVIDERS)})")
    require(1 <= s.port <= 65535, "port", "must be between 1 and 65535")
    require(s.max_messages >= 2, "max_messages", "must be at least 2")
    require(s.max_message_chars >= 100, "max_message_chars", "must be at least 100")
    require(s.max_window_chars >= s.max_message_chars, "max_window_chars", "must be at least MAX_MESSAGE_CHARS")
    require(s.prompt_max_chars >= 1000, "prompt_max_chars", "must be at least 1000")
    require(s.mailbox_size >= 1, "mailbox_size", "must be at least 1")
    require(s.actor_idle_ttl > 0, "actor_idle_ttl", "must be positive")
    require(s.restart_intensity >= 0, "restart_intensity", "must be 0 or more")
    require(s.restart_period > 0, "restart_period", "must be positive")
    require(s.llm_timeout > 0, "llm_timeout", "must be positive")
    require(s.admin_session_minutes > 0, "admin_session_minutes", "must be positive")
    require(s.llm_concurrency >= 1, "llm_concurrency", "must be at least 1")
    require(s.circuit_stall_seconds >= 0, "circuit_stall_seconds", "must be 0 or more")
    require(s.turn_deadline_seconds > 0, "turn_deadline_seconds", "must be positive")
    require(s.split_max_chars >= 100, "split_max_chars", "must be at least 100")
    require(s.store in ("sqlite", "memory"), "store", "must be sqlite or memory")
    require(s.language in ("es", "en"), "language", "must be es or en")
    require(s.unknown_instances in ("", "ignore", "serve"), "unknown_instances",
            "must be ignore or serve (or empty: the default)")
    require(s.new_chats_per_minute >= 0, "new_chats_per_minute", "must be 0 or more")
    require(s.log_customer_text in ("full", "truncated", "off"), "log_customer_text", "must be full, truncated or off")
    require(s.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level", "must be DEBUG, INFO, WARNING or ERROR")
    for name in ("debounce_seconds", "reorder_delay_seconds", "outbound_min_gap_seconds", "outbound_rate_per_instance",
                 "flood_max_per_minute", "shutdown_grace_seconds", "human_takeover_minutes"):
        require(getattr(s, name) >= 0, name, "must be 0 or more")
    for name in ("evolution_api_url", "krayin_api_url", "google_booking_url", "openai_base_url",
                 "anthropic_base_url", "gemini_base_url", "hf_base_url", "ollama_base_url"):
        value = getattr(s, name)
        require(not value or value.startswith(("http://", "https://")), name, "must start with http:// or https://")


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    config_file: Path = DEFAULT_CONFIG_FILE,
    dotenv_file: Path | None = PROJECT_ROOT / ".env",
) -> Settings:
    """Build the settings; raises ConfigError naming the first bad variable.

    ``environ`` defaults to ``os.environ``; tests pass their own mapping (and ``dotenv_file=None``).
    """
    environ = os.environ if environ is None else environ
    try:
        document = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {config_file}: {exc}") from None
    defaults: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            defaults.update(value)
        else:
            defaults[key] = value
    try:
        dotenv = read_dotenv(dotenv_file) if dotenv_file is not None and dotenv_file.exists() else {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f".env file {dotenv_file}: cannot be read ({exc.__class__.__name__})") from None

    fields = {f.name: f for f in attrs.fields(Settings)}
    for key in defaults:
        if key not in fields:
            raise ConfigError(f"config file {config_file}: unknown setting {key!r}")
        if fields[key].metadata.get("secret"):
            raise ConfigError(f"config file {config_file}: {key!r} is a secret; set {key.upper()} in the environment or .env")

    values: dict[str, Any] = {}
    for name, f in fields.items():
        env_name = name.upper()
        if env_name in environ:
            raw: Any = environ[env_name]
        elif env_name in dotenv:
            raw = dotenv[env_name]
        elif name in defaults:
            raw = defaults[name]
        elif f.default is not attrs.NOTHING:
            continue
        else:
            raise ConfigError(f"{env_name}: missing (no default in {config_file.name})")
        values[name] = _convert(name, f.type, raw)
    values["llm_provider"] = values["llm_provider"].strip().lower()
    values["llm_provider_fallback"] = tuple(p.lower() for p in values["llm_provider_fallback"])
    for name in ("unknown_instances", "log_customer_text"):
        values[name] = values[name].strip().lower()
    settings = Settings(**values)
    _validate(settings)
    return settings
