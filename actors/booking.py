"""The booking action: read from a model's answer (the booking JSON, bare, fenced or embedded, or
plain text; docs/behaviour.md §3.5), and what it leads to: the booking link reply and the CRM lead request."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import attrs

from .crm import LeadRequest
from .privacy import log_text
from .prompts import Texts
from .settings import Settings
from .state import LeadInfo

log = logging.getLogger(__name__)

_FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL | re.IGNORECASE)
_DECODER = json.JSONDecoder()


@attrs.frozen
class BookingAction:
    motivo: str = ""


def _candidate_objects(text: str) -> list[Any]:
    found: list[Any] = []
    for match in _FENCE.finditer(text):
        try:
            found.append(json.loads(match.group(1)))
        except ValueError:
            pass  # a fenced block that is not JSON is plain text; other candidates are tried
    index = text.find("{")
    while index != -1:
        try:
            obj, _ = _DECODER.raw_decode(text, index)
            found.append(obj)
        except ValueError:
            pass  # not JSON at this brace: keep scanning
        index = text.find("{", index + 1)
    return found


def parse_answer(text: str) -> BookingAction | str:
    """A BookingAction when the answer holds ``{"accion": "reserva", ...}``, else the text unchanged."""
    if "{" not in text:
        return text
    for obj in _candidate_objects(text):
        if isinstance(obj, dict) and str(obj.get("accion", "")).strip().lower() == "reserva":
            motivo = obj.get("motivo")
            return BookingAction(motivo=motivo.strip()[:300] if isinstance(motivo, str) else "")
    return text


def booking_reply(settings: Settings, texts: Texts, action: BookingAction) -> str:
    """The booking link message, or the text saying it cannot be sent (no GOOGLE_BOOKING_URL)."""
    log.info("[BOOKING] Generando link de reserva - Motivo: %s",
             log_text(action.motivo, settings.security.log_customer_text) if action.motivo else "(sin motivo)")
    url = settings.conversation.google_booking_url
    if not url:
        log.warning("[BOOKING] GOOGLE_BOOKING_URL no configurada: no se puede enviar el link de reserva")
        return texts.booking_unavailable
    log.info("[BOOKING] Link de reserva generado exitosamente")
    return texts.booking_message.format(url=url)


def lead_request(jid: str, lead: LeadInfo, action: BookingAction, key: str = "") -> LeadRequest:
    """The CRM job for a booking: the lead as known from the chat so far (``key``: the conversation's)."""
    return LeadRequest(
        key=key,
        jid=jid,
        name=lead.nombre or "Lead desde WhatsApp",
        phone=lead.telefono or None,
        motivo=action.motivo,
        lead_id=lead.lead_id,
        alt_jid=lead.alt_jid,
    )
