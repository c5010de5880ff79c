"""The fallback chain: the shared supervisor every conversation actor asks for an answer.

Tries LLM_PROVIDER, then each LLM_PROVIDER_FALLBACK in order, then the polite error text.
"""

from __future__ import annotations

import logging
from typing import Sequence

import attrs
import trio

from .base import Prompt, Provider, ProviderError

log = logging.getLogger("python-agent")


@attrs.frozen
class Answer:
    """The chain's result. ``provider`` is None when every provider failed (``text`` is the polite text)."""

    text: str
    provider: str | None
    fallback_used: bool = False

    @property
    def failed(self) -> bool:
        return self.provider is None


class ProviderChain:
    """Asks providers in order; never raises for a provider failure."""

    def __init__(self, providers: Sequence[Provider], *, polite_text: str, timeout: float) -> None:
        self._providers = list(providers)
        self._polite_text = polite_text
        self._timeout = timeout

    async def ask(self, prompt: Prompt) -> Answer:
        """The first successful provider's text, or the polite text when all fail."""
        for index, provider in enumerate(self._providers):
            if index > 0:
                log.warning("⚠️ Intentando con proveedor de respaldo: %s", provider.name)
            try:
                with trio.fail_after(self._timeout):
                    text = await provider.complete(prompt)
            except (ProviderError, trio.TooSlowError) as exc:
                reason = exc if isinstance(exc, ProviderError) else "timeout"
                if index == 0:
                    log.error("Error con LLM provider principal (%s): %s", provider.name, reason)
                else:
                    log.error("❌ Error también con proveedor de respaldo (%s): %s", provider.name, reason)
                continue
            if index > 0:
                log.info("✅ Respuesta exitosa con proveedor de respaldo: %s", provider.name)
            return Answer(text=text, provider=provider.name, fallback_used=index > 0)
        return Answer(text=self._polite_text, provider=None)

    async def aclose(self) -> None:
        for provider in self._providers:
            await provider.aclose()
