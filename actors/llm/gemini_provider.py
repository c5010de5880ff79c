"""Gemini through the official ``google-genai`` SDK (``client.aio``).

Under trio the SDK's own async HTTP client fails (it keys connection pools on the asyncio loop), so
the provider hands it an ``httpx2.AsyncClient`` of its own, and closes that client itself.
"""

from __future__ import annotations

import re
from typing import Any

import httpx2
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from runtime.retry import parse_retry_after

from ..settings import Settings
from .base import ChatMessage, ErrorKind, Prompt, ProviderError, history_roles_alternate
from .http_pool import LLM_HTTP_LIMITS
from .prompt_cache import CacheUsage, record_gemini
from .providers import (
    GEMINI_DEFAULT_BASE_URL,
    empty_reply,
    missing_key,
    status_error,
    transport_error,
    unexpected_error,
)

_SECONDS = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
# finishReason values that mean a filter stopped the answer (types.FinishReason)
_BLOCKED_FINISH = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
                             "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "MODEL_ARMOR"})


def gemini_contents(prompt: Prompt) -> list[types.Content]:
    """The history as Gemini turns: roles ``user``/``model``, alternating, starting with the user; an
    image is an ``inline_data`` part (``Part.from_bytes``) after the message's text."""
    return [
        types.Content(role="model" if m.role == "assistant" else "user", parts=_parts(m))
        for m in history_roles_alternate(prompt.messages)
    ]


def _parts(message: ChatMessage) -> list[types.Part]:
    parts = [types.Part(text=message.content)] if message.content or not message.images else []
    parts.extend(types.Part.from_bytes(data=image.data, mime_type=image.mime) for image in message.images)
    return parts


def gemini_system(prompt: Prompt) -> types.Content | None:
    """The system instruction: the system prompt, then the chat's summary, as parts of one content."""
    parts = [types.Part(text=text) for text in (prompt.system, prompt.summary) if text]
    return types.Content(parts=parts) if parts else None


def _details(exc: genai_errors.APIError) -> list[dict[str, Any]]:
    body = exc.details if isinstance(exc.details, dict) else {}
    error = body.get("error", body)
    details = error.get("details") if isinstance(error, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _retry_delay(exc: genai_errors.APIError) -> float | None:
    """Retry-After if the server sent it, else the ``google.rpc.RetryInfo`` delay (``"37s"``)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    seconds = parse_retry_after(headers) if headers is not None else None
    if seconds is not None:
        return seconds
    for detail in _details(exc):
        if str(detail.get("@type", "")).endswith("RetryInfo"):
            match = _SECONDS.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def map_gemini_error(exc: BaseException, timeout: float) -> ProviderError:
    """The ProviderError for a genai exception or a raw ``httpx2`` error."""
    if isinstance(exc, genai_errors.APIError):
        code = int(exc.code) if isinstance(exc.code, int) else 0
        status = exc.status if isinstance(exc.status, str) else None
        if any(d.get("reason") == "API_KEY_INVALID" for d in _details(exc)):
            # Gemini answers a wrong key with 400 INVALID_ARGUMENT; it is an auth failure all the same.
            return ProviderError(ErrorKind.AUTH, f"{code} API_KEY_INVALID")
        if status == "FAILED_PRECONDITION":
            # 400 for every request alike: e.g. the API is not available in the server's region, or billing is off
            return ProviderError(ErrorKind.UNAVAILABLE, f"{code} FAILED_PRECONDITION")
        return status_error(code, status, retry_after=_retry_delay(exc))
    if isinstance(exc, httpx2.HTTPError):
        return transport_error(exc, timeout)
    return unexpected_error(exc)


class GeminiProvider:
    """generateContent through one genai client whose HTTP client this provider owns."""

    name = "gemini"

    def __init__(self, settings: Settings) -> None:
        self._model = settings.llm.gemini_model
        self._timeout = settings.llm.llm_timeout
        self._max_tokens = settings.llm.llm_max_tokens
        self._http: httpx2.AsyncClient | None = None
        self._client: genai.Client | None = None
        self.cache_usage = CacheUsage()
        if settings.llm.gemini_api_key:
            self._http = httpx2.AsyncClient(timeout=settings.llm.llm_timeout, limits=LLM_HTTP_LIMITS)
            self._client = genai.Client(
                api_key=settings.llm.gemini_api_key,
                vertexai=False,
                http_options=types.HttpOptions(
                    base_url=settings.llm.gemini_base_url or GEMINI_DEFAULT_BASE_URL,
                    timeout=max(1, int(settings.llm.llm_timeout * 1000)),
                    httpx_async_client=self._http,
                ),
            )

    @property
    def available(self) -> bool:
        return self._client is not None

    async def complete(self, prompt: Prompt, model: str | None = None) -> str:
        if self._client is None:
            raise missing_key(self.name)
        contents = gemini_contents(prompt)
        if not contents:
            raise ProviderError(ErrorKind.BAD_REQUEST, "no user message to send")
        config = types.GenerateContentConfig(
            system_instruction=gemini_system(prompt), max_output_tokens=self._max_tokens
        )
        try:
            response = await self._client.aio.models.generate_content(
                model=model or self._model, contents=contents, config=config  # type: ignore[arg-type]
            )
        except (genai_errors.APIError, httpx2.HTTPError) as exc:
            raise map_gemini_error(exc, self._timeout) from None
        except Exception as exc:  # a malformed answer, an SDK bug: still a provider failure
            raise unexpected_error(exc) from None
        record_gemini(self.cache_usage, response.usage_metadata)
        candidate = response.candidates[0] if response.candidates else None
        parts = candidate.content.parts if candidate is not None and candidate.content else None
        text = "".join(p.text for p in parts or () if p.text and not p.thought)
        if not text:
            feedback = response.prompt_feedback
            reason = candidate.finish_reason if candidate is not None else (feedback.block_reason if feedback else None)
            detail = str(getattr(reason, "value", reason) or "no candidates")
            blocked = (feedback is not None and feedback.block_reason is not None) or detail in _BLOCKED_FINISH
            raise empty_reply(detail, blocked=blocked)
        return text

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aio.aclose()
            self._client.close()
        if self._http is not None:
            await self._http.aclose()
