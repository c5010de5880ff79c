"""Build a provider by name, and the error helpers the SDK adapters share.

The SDK modules are imported lazily, so a service running ``offline`` never imports them.
Every ``ProviderError`` built here carries safe text only: a status code and the API's
machine-readable error code, never the server's free text (it may quote a masked key or the prompt).
"""

from __future__ import annotations

import http
from typing import Any, Mapping

import httpx2

from runtime.retry import parse_retry_after

from ..settings import Settings
from .base import ChatMessage, ErrorKind, Prompt, Provider, ProviderError

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
OLLAMA_DEFAULT_BASE_URL = "http://127.0.0.1:11434/v1"
ANTHROPIC_DEFAULT_BASE_URL = "https://api.anthropic.com"
GEMINI_DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"


def build_provider(name: str, settings: Settings) -> Provider:
    """The provider called ``name``, configured from ``settings`` (its SDK client is created now)."""
    if name == "offline":
        from .offline import OfflineProvider

        return OfflineProvider()
    if name == "openai":
        from .openai_provider import OpenAIProvider

        return OpenAIProvider.for_openai(settings)
    if name == "ollama":
        from .openai_provider import OpenAIProvider

        return OpenAIProvider.for_ollama(settings)
    if name == "anthropic":
        from .anthropic_provider import AnthropicProvider

        return AnthropicProvider(settings)
    if name == "gemini":
        from .gemini_provider import GeminiProvider

        return GeminiProvider(settings)
    if name == "huggingface":
        from .huggingface_provider import HuggingFaceProvider

        return HuggingFaceProvider(settings)
    raise ValueError(f"unknown LLM provider {name!r}")


def chat_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """OpenAI-style chat ``messages``: the system prompt first, the summary (a second system
    message) next, then the history in order; a message with images has content parts (a ``text``
    part for its caption, an ``image_url`` part with a data URI per image: the SDK's
    ``ChatCompletionContentPart*Param`` shapes)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": prompt.system}] if prompt.system else []
    if prompt.summary:
        messages.append({"role": "system", "content": prompt.summary})
    messages.extend(_chat_message(m) for m in prompt.messages)
    return messages


def _chat_message(message: ChatMessage) -> dict[str, Any]:
    if not message.images:
        return {"role": message.role, "content": message.content}
    parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
    parts.extend({"type": "image_url", "image_url": {"url": image.data_uri()}} for image in message.images)
    return {"role": message.role, "content": parts}


def kind_for_status(status: int) -> ErrorKind:
    """The ErrorKind of an HTTP error status.

    A 404 (no such model or endpoint) fails every request alike, so it is the provider's fault; any
    other 4xx (400, 413, 422: e.g. a context too long) is about the one request that got it.
    """
    if status == 429:
        return ErrorKind.RATE_LIMIT
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 408:
        return ErrorKind.TIMEOUT
    if status == 404:
        return ErrorKind.UNAVAILABLE
    if status >= 500:
        return ErrorKind.SERVER
    if 400 <= status < 500:
        return ErrorKind.BAD_REQUEST
    return ErrorKind.OTHER


def status_error(status: int, code: Any = None, headers: Mapping[str, str] | None = None,
                 retry_after: float | None = None) -> ProviderError:
    """A ProviderError for an HTTP error answer: ``"429 rate_limit_exceeded"`` and the like."""
    label = str(code) if isinstance(code, (str, int)) and str(code) else _phrase(status)
    if retry_after is None:
        retry_after = parse_retry_after(headers)
    return ProviderError(kind_for_status(status), f"{status} {label}"[:120], retry_after=retry_after)


def transport_error(exc: BaseException, timeout: float) -> ProviderError:
    """A ProviderError for a network-level failure (timeouts first: they are transport errors too)."""
    if isinstance(exc, (httpx2.TimeoutException, TimeoutError)):
        return ProviderError(ErrorKind.TIMEOUT, f"timeout after {timeout:g}s")
    return ProviderError(ErrorKind.CONNECTION, f"connection error ({type(exc).__name__})")


def unexpected_error(exc: BaseException) -> ProviderError:
    """A ProviderError for anything the adapter did not expect; only the exception's type is kept."""
    return ProviderError(ErrorKind.OTHER, f"unexpected error ({type(exc).__name__})")


def missing_key(name: str) -> ProviderError:
    return ProviderError(ErrorKind.UNAVAILABLE, f"{name}: no API key configured")


def empty_reply(detail: str = "", *, blocked: bool = False) -> ProviderError:
    """A 200 answer without text: ``blocked`` by a safety filter or refusal, else just empty."""
    kind, what = (ErrorKind.BLOCKED, "blocked reply") if blocked else (ErrorKind.EMPTY, "empty reply")
    return ProviderError(kind, f"{what}{f' ({detail})' if detail else ''}"[:120])


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "error"
