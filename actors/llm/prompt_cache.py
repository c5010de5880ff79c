"""Prompt caching: the markers a provider needs to reuse a repeated prompt prefix, and the count of
what its caches saved.

Providers discount a prompt prefix they saw recently: OpenAI caches prefixes of 1,024 tokens and
more on its own (``prompt_cache_key`` routes one chat's requests to the same cache), Anthropic at
the ``cache_control`` breakpoints a request sets, Gemini implicitly. The conversation orders every
prompt for that (system prompt, summary, window oldest first, the new text last: turn_prompt.py);
each adapter reports its API's usage fields here, and ``/supervisors`` and ``/metrics`` show them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import attrs

EPHEMERAL: dict[str, str] = {"type": "ephemeral"}   # Anthropic's cache_control (5-minute cache)


def chat_cache_key(chat: str) -> str:
    """A chat's ``prompt_cache_key``: stable per chat, and not its phone number (a hash of its key)."""
    return "chat-" + hashlib.sha256(chat.encode()).hexdigest()[:32]


@attrs.define
class CacheUsage:
    """One provider's prompt tokens since start-up: all of them (``prompt_tokens``, cached ones
    included), those read from its cache, and those written to it (Anthropic bills writes apart)."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    def record(self, *, prompt: int, cached: int = 0, written: int = 0) -> None:
        self.requests += 1
        self.prompt_tokens += max(0, prompt)
        self.cached_tokens += max(0, cached)
        self.cache_write_tokens += max(0, written)

    def snapshot(self) -> dict[str, Any]:
        """The counters and the cached share of the prompt tokens (None before any)."""
        share = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None
        return {**attrs.asdict(self), "cached_share": None if share is None else round(share, 4)}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def record_openai(usage: CacheUsage, reported: Any) -> None:
    """OpenAI's ``usage``: ``prompt_tokens`` (cached included), ``prompt_tokens_details.cached_tokens``."""
    if reported is None:
        return
    details = getattr(reported, "prompt_tokens_details", None)
    usage.record(prompt=_int(getattr(reported, "prompt_tokens", 0)),
                 cached=_int(getattr(details, "cached_tokens", 0)) if details is not None else 0)


def record_anthropic(usage: CacheUsage, reported: Any) -> None:
    """Anthropic's ``usage``: ``input_tokens`` (after the last breakpoint), ``cache_read_input_tokens``,
    ``cache_creation_input_tokens``; the prompt is their sum."""
    if reported is None:
        return
    read = _int(getattr(reported, "cache_read_input_tokens", 0))
    written = _int(getattr(reported, "cache_creation_input_tokens", 0))
    usage.record(prompt=_int(getattr(reported, "input_tokens", 0)) + read + written, cached=read, written=written)


def record_gemini(usage: CacheUsage, reported: Any) -> None:
    """Gemini's ``usage_metadata``: ``prompt_token_count`` (cached included), ``cached_content_token_count``."""
    if reported is None:
        return
    usage.record(prompt=_int(getattr(reported, "prompt_token_count", 0)),
                 cached=_int(getattr(reported, "cached_content_token_count", 0)))
