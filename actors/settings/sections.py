"""The settings, in sections: one frozen attrs class per ``config.toml`` section, held by :class:`Settings`.

Each field's environment variable is its name in upper case (``conversation.max_messages`` is
``MAX_MESSAGES``); its ``config.toml`` key is the name itself, under its section's header. Each field has
a check (actors/settings/fields.py), so a section that exists holds only valid values.

Secrets (``metadata["secret"]``) live in the section that uses them; they are read from the environment
or ``.env`` only, never from ``config.toml``, and are left out of ``repr``.

Per instance (``metadata["per_instance"]``): what one Evolution instance (one WhatsApp number) may
override for its own conversations: the system prompt, language and texts, booking URL, groups,
ignore/allow lists, window length, debounce, flood limit, takeover minutes and keyword, reset keywords
(``conversation``); the provider, fallback list, models, base URLs and API keys (``llm``); pacing, split
limit and the Evolution API key (``outbound``); the CRM switch and the Krayin ids (``crm``). A per-instance
secret is named by the environment variable that holds it, never given in a file. Everything else is
process-wide: ``server``, ``security``, ``storage`` and ``logging`` entirely, and in the other sections
the bounds one process shares (mailbox size, idle TTL, restart intensity, memory and prompt bounds,
LLM concurrency and circuits, retries, timeouts, the Evolution and Krayin servers).
"""

from __future__ import annotations

import os
import socket
import typing
from pathlib import Path
from typing import Iterator

import attrs

from .fields import ConfigError, at_least_setting, domain, integer, names, number, of_type, secret, setting, text, url

PROVIDERS = ("offline", "huggingface", "anthropic", "openai", "gemini", "ollama")


def _unknown_provider(name: str) -> str:
    return f"unknown provider {name!r} (one of {', '.join(PROVIDERS)})"


@attrs.frozen(kw_only=True)
class ServerSettings:
    """The HTTP server and the process's HTTP client. Process-wide."""

    host: str = setting(text(required=True))     # the manager script's bind
    port: int = setting(integer(1, 65535))
    max_body_bytes: int = setting(integer(1))    # /webhook bodies above this get 413
    shutdown_grace_seconds: float = setting(number())
    http_timeout: float = setting(number(positive=True))   # per Evolution / Krayin request
    intake_max_in_flight: int = setting(integer(1))   # webhooks storing at once; past it 503 at once


@attrs.frozen(kw_only=True)
class SecuritySettings:
    """Who may reach what (docs/security.md), and what customer text the logs may hold. Process-wide."""

    allow_open_webhook: bool = setting(of_type(bool))
    admin_loopback_only: bool = setting(of_type(bool))
    unknown_instances: str = setting(
        text("", "ignore", "serve", why=lambda _: "must be ignore or serve (or empty: the default)"), lower=True)
    new_chats_per_minute: int = setting(integer(0))
    log_customer_text: str = setting(text("full", "truncated", "off"), lower=True)
    admin_session_minutes: float = setting(number(positive=True))
    admin_token: str = secret()
    webhook_secret: str = secret()


@attrs.frozen(kw_only=True)
class StorageSettings:
    """Where conversations are kept. Process-wide. (Named as its config.toml header: ``store`` is a field.)

    ``STORE_URL`` (or ``DATABASE_URL``, the name many hosts set) selects PostgreSQL whatever ``STORE``
    says; it holds the database password, so it is a secret (environment or .env only, never shown)."""

    data_dir: Path = setting(of_type(Path))
    store: str = setting(text("sqlite", "memory", "postgresql"))
    store_pool_size: int = setting(integer(1, 100))   # PostgreSQL connections (and store threads) at once
    store_url: str = secret()
    database_url: str = secret()
    # several nodes on one PostgreSQL database (runtime/shards.py); ignored by SQLite and memory
    node_id: str = setting(text())                           # this process's name ("": hostname:pid)
    node_address: str = setting(text())                      # where admins reach it ("": its hypercorn bind)
    shards: int = setting(integer(1, 65536))                 # fixed for the life of a database
    shard_lease_seconds: float = setting(number(positive=True))   # a dead node's chats wait this long
    inbox_poll_seconds: float = setting(number(positive=True))    # how often a node reads its shards' inbox

    @property
    def node(self) -> str:
        """NODE_ID, else ``hostname:pid`` (unique per process, also for several workers on one machine)."""
        return self.node_id.strip() or f"{socket.gethostname()}:{os.getpid()}"

    def __attrs_post_init__(self) -> None:
        url = self.postgres_url
        if url and not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"{'STORE_URL' if self.store_url else 'DATABASE_URL'}: "
                              "must be a PostgreSQL URL starting with postgresql://")
        if self.store == "postgresql" and not url:
            raise ConfigError("STORE_URL: required when STORE=postgresql")

    @property
    def postgres_url(self) -> str:
        """STORE_URL, else DATABASE_URL ("" when neither is set)."""
        return self.store_url or self.database_url

    @property
    def kind(self) -> str:
        """The store in use: postgresql when a URL is set, else STORE."""
        return "postgresql" if self.postgres_url else self.store


@attrs.frozen(kw_only=True)
class LoggingSettings:
    """The log files and their format. Process-wide."""

    log_dir: Path = setting(of_type(Path))
    log_level: str = setting(text("DEBUG", "INFO", "WARNING", "ERROR", upper=True))
    log_file: str = setting(text(required=True))
    log_max_bytes: int = setting(integer(1))
    log_backup_count: int = setting(integer(0))
    log_json: bool = setting(of_type(bool))
    log_stderr: bool = setting(of_type(bool))


@attrs.frozen(kw_only=True)
class ConversationSettings:
    """One chat's window, batching, filters, takeover and texts."""

    max_messages: int = setting(integer(2), per_instance=True)
    max_message_chars: int = setting(integer(100))
    max_window_chars: int = setting(at_least_setting(100, "max_message_chars"))
    prompt_max_chars: int = setting(integer(1000))
    # the actor runtime's bounds, the same for every chat of the process
    mailbox_size: int = setting(integer(1))
    actor_idle_ttl: float = setting(number(positive=True))
    restart_intensity: int = setting(integer(0))
    restart_period: float = setting(number(positive=True))
    debounce_seconds: float = setting(number(), per_instance=True)
    reorder_delay_seconds: float = setting(number())
    flood_max_per_minute: int = setting(integer(0), per_instance=True)
    groups_enabled: bool = setting(of_type(bool), per_instance=True)
    ignore_jids: tuple[str, ...] = setting(names(), per_instance=True)
    allow_jids: tuple[str, ...] = setting(names(), per_instance=True)
    human_takeover_minutes: float = setting(number(), per_instance=True)
    takeover_keyword: str = setting(text(required=True), per_instance=True)
    reset_keywords: tuple[str, ...] = setting(names(), per_instance=True)
    unknown_message_text: str = setting(text(), per_instance=True)
    google_booking_url: str = setting(url(), per_instance=True)
    language: str = setting(text("es", "en"), per_instance=True)
    agent_instruction: str = setting(text(), per_instance=True)
    # media and memory (docs/behaviour.md §3.6, §3.7)
    media_max_bytes: int = setting(integer(1), per_instance=True)   # images (and voice notes) above it: the caption alone
    transcribe_provider: str = setting(text("off", "openai", "gemini"), per_instance=True, lower=True)
    memory_summary: bool = setting(of_type(bool), per_instance=True)   # fold the oldest messages into a summary
    summary_chunk: int = setting(integer(1), per_instance=True)   # messages folded at once (and the trim step)


@attrs.frozen(kw_only=True)
class LLMSettings:
    """The providers, their order, and the supervisor's bounds and circuits."""

    llm_provider: str = setting(text(*PROVIDERS, why=_unknown_provider), per_instance=True, lower=True)
    llm_provider_fallback: tuple[str, ...] = setting(names(*PROVIDERS, why=_unknown_provider),
                                                     per_instance=True, lower=True)
    llm_timeout: float = setting(number(positive=True))
    llm_max_tokens: int = setting(integer(1))
    llm_concurrency: int = setting(integer(1))
    llm_hedge_factor: float = setting(number())
    llm_retry_after_budget: float = setting(number())
    turn_deadline_seconds: float = setting(number(positive=True))
    circuit_failure_threshold: int = setting(integer(1))
    circuit_cooldown_seconds: float = setting(number())
    circuit_stall_seconds: float = setting(number())
    openai_model: str = setting(text(), per_instance=True)
    openai_base_url: str = setting(url(), per_instance=True)
    anthropic_model: str = setting(text(), per_instance=True)
    anthropic_base_url: str = setting(url(), per_instance=True)
    gemini_model: str = setting(text(), per_instance=True)
    gemini_base_url: str = setting(url(), per_instance=True)
    hf_model: str = setting(text(), per_instance=True)
    hf_base_url: str = setting(url(), per_instance=True)
    ollama_model: str = setting(text(), per_instance=True)
    ollama_base_url: str = setting(url(), per_instance=True)
    # whether each provider's configured model takes images (false: it gets the caption alone)
    openai_vision: bool = setting(of_type(bool), per_instance=True)
    anthropic_vision: bool = setting(of_type(bool), per_instance=True)
    gemini_vision: bool = setting(of_type(bool), per_instance=True)
    hf_vision: bool = setting(of_type(bool), per_instance=True)
    ollama_vision: bool = setting(of_type(bool), per_instance=True)
    openai_transcribe_model: str = setting(text(required=True), per_instance=True)
    openai_api_key: str = secret(per_instance=True)
    anthropic_api_key: str = secret(per_instance=True)
    gemini_api_key: str = secret(per_instance=True)
    huggingface_api_key: str = secret(per_instance=True)
    ollama_api_key: str = secret(per_instance=True)

    def vision(self, provider: str) -> bool:
        """Whether ``provider``'s configured model may be sent images (offline: never)."""
        return bool(getattr(self, f"{'hf' if provider == 'huggingface' else provider}_vision", False))

    @property
    def provider_order(self) -> tuple[str, ...]:
        """LLM_PROVIDER then each fallback, never the same provider twice."""
        order: list[str] = []
        for name in (self.llm_provider, *self.llm_provider_fallback):
            if name not in order:
                order.append(name)
        return tuple(order)


@attrs.frozen(kw_only=True)
class OutboundSettings:
    """The Evolution API server, the instances this deployment names, and how replies are paced and retried."""

    evolution_api_url: str = setting(url())   # empty: replies go to the in-process outbox
    evolution_instance: str = setting(text())
    evolution_instance_id: str = setting(text())
    # the per-instance settings file (actors/settings/instances.py); empty: instances.toml beside config.toml, if any
    instances_file: str = setting(text())
    outbound_min_gap_seconds: float = setting(number(), per_instance=True)
    outbound_rate_per_instance: float = setting(number(), per_instance=True)
    outbound_max_attempts: int = setting(integer(1))
    outbound_max_retry_seconds: float = setting(number())
    split_max_chars: int = setting(integer(100), per_instance=True)
    typing_presence: bool = setting(of_type(bool))
    outbound_max_backlog: int = setting(integer(1))   # unsettled replies; past it /webhook refuses new turns
    evolution_api_key: str = secret(per_instance=True)

    @property
    def names_instances(self) -> bool:
        """Whether EVOLUTION_INSTANCE or EVOLUTION_INSTANCE_ID names an instance (an instances file
        names more: ``Tenants.names_instances``)."""
        return bool(self.evolution_instance or self.evolution_instance_id)


@attrs.frozen(kw_only=True)
class CRMSettings:
    """Krayin lead registration."""

    crm_auto_register: bool = setting(of_type(bool), per_instance=True)
    krayin_api_url: str = setting(url())
    krayin_pipeline_id: int = setting(integer(1), per_instance=True)
    krayin_stage_id: int = setting(integer(1), per_instance=True)
    krayin_user_id: int = setting(integer(1), per_instance=True)
    krayin_lead_source_id: int = setting(integer(1), per_instance=True)
    krayin_lead_type_id: int = setting(integer(1), per_instance=True)
    crm_email_domain: str = setting(domain())
    crm_give_up_seconds: float = setting(number())
    krayin_api_token: str = secret()

    @property
    def crm_enabled(self) -> bool:
        return self.crm_auto_register and bool(self.krayin_api_url and self.krayin_api_token)


@attrs.frozen(kw_only=True)
class Settings:
    """Every knob of the service, by section. Durations are seconds; empty strings mean "not set"."""

    server: ServerSettings
    security: SecuritySettings
    storage: StorageSettings
    logging: LoggingSettings
    conversation: ConversationSettings
    llm: LLMSettings
    outbound: OutboundSettings
    crm: CRMSettings

    def secret_values(self) -> list[str]:
        """The values of every secret that is set (for the log redaction filter)."""
        return [value for section, f in setting_fields() if f.metadata["secret"]
                and (value := getattr(getattr(self, section), f.name))]


SECTIONS: dict[str, type] = typing.get_type_hints(Settings)   # section name -> its class, in order


def setting_fields() -> Iterator[tuple[str, attrs.Attribute]]:   # type: ignore[type-arg]
    """(section name, field) for every setting, in declaration order."""
    for section, cls in SECTIONS.items():
        for f in attrs.fields(cls):
            yield section, f
