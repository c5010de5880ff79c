"""The ``offline`` provider: deterministic, no network, the embedded default.

It still exercises the real booking path: a text that asks to book gets the booking JSON.
"""

from __future__ import annotations

import json
import re
import unicodedata

from ..memory_summary import REQUEST_HEADER as SUMMARY_REQUEST
from .base import Prompt

_BOOKING_WORDS = re.compile(
    r"\b(agend\w*|reserv\w*|cita\w*|turno\w*|book\w*|appointment\w*|schedul\w*)\b"
)
_ENGLISH_HINTS = re.compile(r"\b(hello|hi|hey|the|what|how|please|thanks|thank you|can|i|you|is|are|do)\b")
_SPANISH_HINTS = re.compile(r"\b(hola|que|como|por|para|gracias|quiero|necesito|puedo|tienen|el|la|los|las|es|un|una)\b")


SUMMARY_CHARS = 1200


def _extractive_summary(request: str) -> str:
    """MEMORY_SUMMARY offline: the previous summary, then what the customer said, cut to SUMMARY_CHARS
    (the oldest facts first, so a name said at the start is kept)."""
    previous, _, messages = request[len(SUMMARY_REQUEST):].partition("\nMESSAGES:\n")
    kept = [] if previous.strip() in ("", "(none)") else [previous.strip()]
    kept += [line[len("[customer] "):] for line in messages.splitlines() if line.startswith("[customer] ")]
    return " | ".join(kept)[:SUMMARY_CHARS] or "(nothing to remember)"


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _is_english(folded: str) -> bool:
    return len(_ENGLISH_HINTS.findall(folded)) > len(_SPANISH_HINTS.findall(folded))


class OfflineProvider:
    """Answers from rules: booking JSON for booking requests, otherwise a short helpful reply."""

    name = "offline"
    available = True

    async def complete(self, prompt: Prompt, model: str | None = None) -> str:
        last = prompt.messages[-1].content if prompt.messages else ""
        if last.startswith(SUMMARY_REQUEST):
            return _extractive_summary(last)
        folded = _fold(last)
        booking = _BOOKING_WORDS.search(folded)
        if booking:
            return json.dumps({"accion": "reserva", "motivo": last.strip()[:120]}, ensure_ascii=False)
        earlier = sum(1 for m in prompt.messages[:-1] if m.role == "user")
        if _is_english(folded):
            return (
                f"Thanks for your message! I am the virtual assistant (offline mode). "
                f"You said: \"{last.strip()}\". I can help with information or book an appointment for you."
                + (f" (We have exchanged {earlier} earlier messages.)" if earlier else "")
            )
        return (
            f"¡Gracias por tu mensaje! Soy el asistente virtual (modo sin conexión). "
            f"Recibí: \"{last.strip()}\". Puedo ayudarte con información o agendar una cita."
            + (f" (Llevamos {earlier} mensajes anteriores.)" if earlier else "")
        )

    async def aclose(self) -> None:
        return None
