"""Hugging Face through the official ``huggingface_hub`` SDK: ``AsyncInferenceClient.chat_completion``.

With ``HF_BASE_URL`` (a TGI server, an Inference Endpoint) the client posts to
``{base}/v1/chat/completions``; without it, to the HF router (server-side provider choice).
Only ``chat_completion`` is used: other tasks call ``asyncio.to_thread`` and fail under trio.
"""

from __future__ import annotations

import httpx2
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError

from ..settings import Settings
from .base import Prompt, ProviderError
from .providers import chat_messages, empty_reply, missing_key, status_error, transport_error, unexpected_error


def map_huggingface_error(exc: BaseException, timeout: float) -> ProviderError:
    """The ProviderError for a huggingface_hub exception (its timeout error first) or a raw httpx2 error."""
    if isinstance(exc, InferenceTimeoutError):
        return transport_error(TimeoutError(), timeout)
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return status_error(exc.response.status_code, None, exc.response.headers)
    if isinstance(exc, httpx2.HTTPError):
        return transport_error(exc, timeout)
    return unexpected_error(exc)


class HuggingFaceProvider:
    """Chat completions through one ``AsyncInferenceClient``, created once and closed in ``aclose``."""

    name = "huggingface"

    def __init__(self, settings: Settings) -> None:
        self._model = settings.llm.hf_model
        self._timeout = settings.llm.llm_timeout
        self._max_tokens = settings.llm.llm_max_tokens
        self._client: AsyncInferenceClient | None = None
        if settings.llm.huggingface_api_key:
            self._client = AsyncInferenceClient(
                base_url=settings.llm.hf_base_url or None,
                provider=None if settings.llm.hf_base_url else "auto",
                api_key=settings.llm.huggingface_api_key,
                timeout=settings.llm.llm_timeout,
            )

    @property
    def available(self) -> bool:
        return self._client is not None

    async def complete(self, prompt: Prompt, model: str | None = None) -> str:
        if self._client is None:
            raise missing_key(self.name)
        try:
            response = await self._client.chat_completion(
                chat_messages(prompt), model=model or self._model, max_tokens=self._max_tokens
            )
        except httpx2.HTTPError as exc:  # HfHubHTTPError and InferenceTimeoutError derive from it
            raise map_huggingface_error(exc, self._timeout) from None
        except Exception as exc:  # a malformed answer, an SDK bug: still a provider failure
            raise unexpected_error(exc) from None
        choice = response.choices[0] if response.choices else None
        text = choice.message.content if choice is not None else None
        if not text:
            if choice is None:
                raise empty_reply("no choices")
            blocked = choice.finish_reason == "content_filter" or bool(getattr(choice.message, "refusal", None))
            raise empty_reply(str(choice.finish_reason), blocked=blocked)
        return text

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
