"""The Krayin payload shapes of a lead request: pure functions of a ``LeadRequest`` and the settings.

The seed's choices live here: the person's name (or "Lead desde WhatsApp"), the phone digits
(never from an @lid), the placeholder email, the lead's title ("Nombre - Empresa"), description
and value (``max(volumen_mensajes * 10, 500)``), and the note added to an existing lead.
"""

from __future__ import annotations

import re
from typing import Any

from actors.settings import Settings

from .records import LeadRequest

DEFAULT_LEAD_NAME = "Lead desde WhatsApp"
MIN_LEAD_VALUE = 500


def digits(value: str) -> str:
    return re.sub(r"\D", "", value)


def lead_value(volumen_mensajes: int | None) -> int:
    """The seed's estimate: ``max(volumen_mensajes * 10, 500)``, 500 when unknown."""
    if not volumen_mensajes or volumen_mensajes < 0:
        return MIN_LEAD_VALUE
    return max(int(volumen_mensajes) * 10, MIN_LEAD_VALUE)


def lead_name(request: LeadRequest) -> str:
    return request.name.strip() or DEFAULT_LEAD_NAME


def phone_of(request: LeadRequest) -> str | None:
    """Phone digits: the request's, else the phone-number JID in ``alt_jid``; never from an @lid."""
    if request.phone and digits(request.phone):
        return digits(request.phone)
    if request.alt_jid.endswith("@s.whatsapp.net"):
        return digits(request.alt_jid.split("@", 1)[0].split(":", 1)[0]) or None
    if request.jid.endswith("@s.whatsapp.net"):
        return digits(request.jid.split("@", 1)[0].split(":", 1)[0]) or None
    return None


def email_of(request: LeadRequest, phone: str | None, settings: Settings) -> str:
    """The request's address, else a unique placeholder at ``CRM_EMAIL_DOMAIN`` (Krayin requires one)."""
    if request.email:
        return request.email
    domain = settings.crm.crm_email_domain
    if phone:
        return f"wa-{phone}@{domain}"
    local = re.sub(r"[^0-9A-Za-z]", "", request.jid.split("@", 1)[0]) or "unknown"
    return f"wa-lid-{local}@{domain}"


def person_payload(request: LeadRequest, phone: str | None, settings: Settings) -> dict[str, Any]:
    # contact_numbers is optional in Krayin and validated as numeric: an @lid chat without a known
    # phone gets none (its @lid is no phone number); its unique placeholder email identifies it.
    payload: dict[str, Any] = {
        "name": lead_name(request),
        "emails": [{"value": email_of(request, phone, settings), "label": "work"}],
    }
    if phone:
        payload["contact_numbers"] = [{"value": f"+{phone}", "label": "work"}]
    return payload


def lead_payload(request: LeadRequest, person_id: int, value: int, settings: Settings) -> dict[str, Any]:
    """``POST /leads``: Krayin derives the pipeline from the stage, so KRAYIN_PIPELINE_ID is not sent."""
    name = lead_name(request)
    title = f"{name} - {request.empresa.strip()}" if request.empresa.strip() else name
    return {
        "title": title,
        "description": description(request),
        "lead_value": value,
        "lead_source_id": settings.crm.krayin_lead_source_id,
        "lead_type_id": settings.crm.krayin_lead_type_id,
        "lead_pipeline_stage_id": settings.crm.krayin_stage_id,
        "user_id": settings.crm.krayin_user_id,
        "person": {"id": person_id},
    }


def description(request: LeadRequest) -> str:
    phone = phone_of(request)
    lines = ["Lead generado automáticamente desde WhatsApp (solicitud de reserva)."]
    if request.motivo:
        lines.append(f"Motivo: {request.motivo}")
    if request.rubro:
        lines.append(f"Rubro: {request.rubro}")
    if request.volumen_mensajes:
        lines.append(f"Volumen de mensajes: {request.volumen_mensajes}")
    lines.append(f"Teléfono: +{phone}" if phone else "Teléfono: desconocido")
    if request.jid.endswith("@lid"):
        lines.append(f"WhatsApp @lid: {request.jid} (identificador de privacidad, no es un teléfono)")
    else:
        lines.append(f"WhatsApp: {request.jid}")
    return "\n".join(lines)


def note_text(request: LeadRequest) -> str:
    text = "Nueva solicitud de reserva desde WhatsApp."
    if request.motivo:
        text += f" Motivo: {request.motivo}"
    return text
