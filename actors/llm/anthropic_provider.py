"""Anthropic through the official ``anthropic`` SDK: ``system=`` plus alternating user/assistant turns."""

from __future__ import annotations

from typing import Any

import anthropic
from anthropic.types import ImageBlockParam, MessageParam, TextBlockParam

from ..settings import Settings
from .base import ChatMessage, ErrorKind, Prompt, ProviderError, history_roles_alternate
from .http_pool import LLM_HTTP_LIMITS
from .prompt_cache import EPHEMERAL, CacheUsage, record_anthropic
from .providers import (
    ANTHROPIC_DEFAULT_BASE_URL,
    empty_reply,
    missing_key,
    status_error,
    transport_error,
    unexpected_error,
)


def anthropic_messages(prompt: Prompt) -> list[MessageParam]:
    """The Messages API turns: consecutive same-role messages merged, starting with the user; a
    message with images has an ``image`` block (base64 source) per image after its text. The last
    message's last block carries ``cache_control``: the whole prompt is a cache breakpoint, which the
    next turn (the same prefix plus two messages) reads."""
    messages: list[MessageParam] = [{"role": m.role, "content": _blocks(m)}  # type: ignore[typeddict-item]
                                    for m in history_roles_alternate(prompt.messages)]
    if messages:
        last = messages[-1]["content"]
        assert isinstance(last, list)
        last[-1] = {**last[-1], "cache_control": EPHEMERAL}  # type: ignore[typeddict-unknown-key]
    return messages


def _blocks(message: ChatMessage) -> list[TextBlockParam | ImageBlockParam]:
    blocks: list[TextBlockParam | ImageBlockParam] = []
    if message.content or not message.images:
        blocks.append({"type": "text", "text": message.content})
    for image in message.images:
        blocks.append({"type": "image", "source": {"type": "base64", "media_type": image.mime,  # type: ignore[typeddict-item]
                                                   "data": image.base64()}})
    return blocks


def anthropic_system(prompt: Prompt) -> list[TextBlockParam]:
    """``system`` as text blocks, each a cache breakpoint: the system prompt (shared by every chat),
    then the chat's summary (stable for SUMMARY_CHUNK turns)."""
    return [{"type": "text", "text": text, "cache_control": EPHEMERAL}  # type: ignore[typeddict-item]
            for text in (prompt.system, prompt.summary) if text]


def map_anthropic_error(exc: BaseException, timeout: float) -> ProviderError:
    """The ProviderError for an ``anthropic`` SDK exception (timeouts before connection errors)."""
    if isinstance(exc, anthropic.APITimeoutError):
        return transport_error(TimeoutError(), timeout)
    if isinstance(exc, anthropic.APIConnectionError):
        return transport_error(exc, timeout)
    if isinstance(exc, anthropic.APIStatusError):
        body: Any = exc.body
        code = body.get("error", {}).get("type") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
        return status_error(exc.status_code, code, exc.response.headers)
    return unexpected_error(exc)


class AnthropicProvider:
    """Messages through one ``AsyncAnthropic`` client, created once and closed in ``aclose``."""

    name = "anthropic"

    def __init__(self, settings: Settings) -> None:
        self._model = settings.llm.anthropic_model
        self._timeout = settings.llm.llm_timeout
        self._max_tokens = settings.llm.llm_max_tokens
        self._client: anthropic.AsyncAnthropic | None = None
        self.cache_usage = CacheUsage()
        if settings.llm.anthropic_api_key:
            self._client = anthropic.AsyncAnthropic(
                api_key=settings.llm.anthropic_api_key,
                base_url=settings.llm.anthropic_base_url or ANTHROPIC_DEFAULT_BASE_URL,
                timeout=settings.llm.llm_timeout,
                max_retries=0,
                http_client=anthropic.DefaultAsyncHttpxClient(limits=LLM_HTTP_LIMITS),
            )

    @property
    def available(self) -> bool:
        return self._client is not None

    async def complete(self, prompt: Prompt, model: str | None = None) -> str:
        if self._client is None:
            raise missing_key(self.name)
        messages = anthropic_messages(prompt)
        if not messages:
            raise ProviderError(ErrorKind.BAD_REQUEST, "no user message to send")
        system = anthropic_system(prompt)
        extra: dict[str, Any] = {"system": system} if system else {}
        try:
            response = await self._client.messages.create(
                model=model or self._model, max_tokens=self._max_tokens, messages=messages, **extra  # type: ignore[arg-type]
            )
        except anthropic.AnthropicError as exc:
            raise map_anthropic_error(exc, self._timeout) from None
        except Exception as exc:  # a malformed answer, an SDK bug: still a provider failure
            raise unexpected_error(exc) from None
        record_anthropic(self.cache_usage, response.usage)
        text = "".join(getattr(block, "text", "") for block in response.content if block.type == "text")
        if not text:
            raise empty_reply(str(response.stop_reason), blocked=response.stop_reason == "refusal")
        return text

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
