"""OpenAI (and Ollama, an OpenAI-compatible server) through the official ``openai`` SDK."""

from __future__ import annotations

from typing import Any

import openai
from openai.types.chat import ChatCompletion

from ..settings import Settings
from .base import Prompt, ProviderError
from .http_pool import LLM_HTTP_LIMITS
from .prompt_cache import CacheUsage, record_openai
from .providers import (
    OLLAMA_DEFAULT_BASE_URL,
    OPENAI_DEFAULT_BASE_URL,
    chat_messages,
    empty_reply,
    missing_key,
    status_error,
    transport_error,
    unexpected_error,
)

OLLAMA_DUMMY_KEY = "ollama"  # the SDK needs a non-empty key; Ollama ignores it


def map_openai_error(exc: BaseException, timeout: float) -> ProviderError:
    """The ProviderError for an ``openai`` SDK exception (timeouts are connection errors too: first)."""
    if isinstance(exc, openai.APITimeoutError):
        return transport_error(TimeoutError(), timeout)
    if isinstance(exc, openai.APIConnectionError):
        return transport_error(exc, timeout)
    if isinstance(exc, openai.APIStatusError):
        return status_error(exc.status_code, exc.code or exc.type, exc.response.headers)
    return unexpected_error(exc)


class OpenAIProvider:
    """Chat completions through one ``AsyncOpenAI`` client, created once and closed in ``aclose``."""

    def __init__(self, name: str, *, model: str, base_url: str, api_key: str, timeout: float,
                 max_tokens: int, tokens_field: str = "max_completion_tokens", cache_key: bool = False) -> None:
        self.name = name
        self.cache_usage = CacheUsage()
        self._cache_key = cache_key   # send the chat's prompt_cache_key (OpenAI's API; not Ollama's)
        self._model = model
        self._timeout = timeout
        self._max_tokens = max_tokens
        self._tokens_field = tokens_field
        self._client: openai.AsyncOpenAI | None = None
        if api_key:
            self._client = openai.AsyncOpenAI(
                api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0,
                http_client=openai.DefaultAsyncHttpxClient(limits=LLM_HTTP_LIMITS),
            )

    @classmethod
    def for_openai(cls, settings: Settings) -> OpenAIProvider:
        return cls(
            "openai",
            model=settings.llm.openai_model,
            base_url=settings.llm.openai_base_url or OPENAI_DEFAULT_BASE_URL,
            api_key=settings.llm.openai_api_key,
            timeout=settings.llm.llm_timeout,
            max_tokens=settings.llm.llm_max_tokens,
            cache_key=True,
        )

    @classmethod
    def for_ollama(cls, settings: Settings) -> OpenAIProvider:
        """Ollama needs no key; local servers take ``max_tokens`` rather than ``max_completion_tokens``."""
        return cls(
            "ollama",
            model=settings.llm.ollama_model,
            base_url=settings.llm.ollama_base_url or OLLAMA_DEFAULT_BASE_URL,
            api_key=settings.llm.ollama_api_key or OLLAMA_DUMMY_KEY,
            timeout=settings.llm.llm_timeout,
            max_tokens=settings.llm.llm_max_tokens,
            tokens_field="max_tokens",
        )

    @property
    def available(self) -> bool:
        return self._client is not None

    async def complete(self, prompt: Prompt, model: str | None = None) -> str:
        if self._client is None:
            raise missing_key(self.name)
        body: dict[str, Any] = {"model": model or self._model, "messages": chat_messages(prompt),
                                self._tokens_field: self._max_tokens}
        if self._cache_key and prompt.cache_key:
            body["prompt_cache_key"] = prompt.cache_key   # a create() parameter since openai 1.97
        try:
            # The SDK's own request path (transport, bearer auth, error classes, ChatCompletion model),
            # as ``chat.completions.create`` takes it, minus create()'s generic parameter transform,
            # which walks every message with typing introspection: 7.5 ms of CPU per call with a
            # 50-message window, against 1.0 ms this way (bench/client_cost.py). The body is plain
            # JSON (strings, and the content-part dicts of an image), for which that transform changes nothing.
            response = await self._client.post(
                "/chat/completions", body=body, cast_to=ChatCompletion,
                options={"security": {"bearer_auth": True}},
            )
        except openai.OpenAIError as exc:
            raise map_openai_error(exc, self._timeout) from None
        except Exception as exc:  # a malformed answer, an SDK bug: still a provider failure
            raise unexpected_error(exc) from None
        record_openai(self.cache_usage, response.usage)
        choice = response.choices[0] if response.choices else None
        text = choice.message.content if choice is not None else None
        if not text:
            if choice is None:
                raise empty_reply("no choices")
            blocked = choice.finish_reason == "content_filter" or bool(choice.message.refusal)
            raise empty_reply(str(choice.finish_reason), blocked=blocked)
        return text

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
