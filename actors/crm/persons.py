"""Person reuse: the Krayin person of a chat is found (by phone, else by our placeholder email) before
one is created, and a 422 duplicate on create is searched for and reused, so retries and repeated
requests never make a second person."""

from __future__ import annotations

import logging

from actors.privacy import log_text
from actors.settings import Settings

from .krayin import KrayinClient, KrayinError, id_of
from .payloads import digits, email_of, person_payload, phone_of
from .records import LeadRequest

log = logging.getLogger(__name__)


async def find_or_create_person(client: KrayinClient, request: LeadRequest, settings: Settings) -> int:
    """The id of the request's person in Krayin, created when none exists; raises ``KrayinError``."""
    phone = phone_of(request)
    # By phone when known (a 422 duplicate then searches by email too); else by the placeholder email.
    person_id = await find_person(client, request, phone, settings, by_email=not phone)
    if person_id is not None:
        log.info("[CRM] Persona existente encontrada - person_id=%s", person_id)
        return person_id
    payload = person_payload(request, phone, settings)
    mode = settings.security.log_customer_text
    log.info("[CRM] Creando persona - Nombre: %s, Telefono: %s", log_text(str(payload["name"]), mode), phone or "-")
    log.debug("[CRM] Datos de persona: %s", log_text(str(payload), mode))
    try:
        data = await client.create_person(payload)
    except KrayinError as exc:
        if not exc.duplicate:
            raise
        log.info("[CRM] La persona ya existe en Krayin (422): se busca para reutilizarla")
        person_id = await find_person(client, request, phone, settings)
        if person_id is None:
            raise KrayinError(422, f"duplicate person for {request.jid} not found by search "
                                   f"(is it owned by another Krayin user?)", body=exc.body) from None
        log.info("[CRM] Persona existente reutilizada - person_id=%s", person_id)
        return person_id
    person_id = id_of(data, "person")
    log.info("[CRM] Persona creada exitosamente - person_id=%s", person_id)
    return person_id


async def find_person(client: KrayinClient, request: LeadRequest, phone: str | None, settings: Settings, *,
                      by_email: bool = True) -> int | None:
    """An existing person whose phone has exactly these digits, else (``by_email``) whose email is ours."""
    if phone:
        for person in await client.search_persons(phone, "contact_numbers"):
            numbers = person.get("contact_numbers") or []
            if any(isinstance(n, dict) and digits(str(n.get("value", ""))) == phone for n in numbers):
                return id_of(person, "person")
    if not by_email:
        return None
    email = email_of(request, phone, settings)
    for person in await client.search_persons(email, "emails"):
        emails = person.get("emails") or []
        if any(isinstance(e, dict) and str(e.get("value", "")).lower() == email.lower() for e in emails):
            return id_of(person, "person")
    return None
