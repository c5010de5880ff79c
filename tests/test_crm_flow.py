"""Booking → Krayin lead through the whole service: the reply never waits for the CRM, the lead id is
kept in the conversation's state (and store), and one chat never gets two leads."""

from __future__ import annotations

import json

import trio

from tests.conftest import key_of, make_settings, running_service, wait_for
from tests.doubles import ScriptedProvider
from tests.fakes.krayin import FakeKrayin
from tests.fakes.server import running_server
from tests.payloads import upsert

JID = "5491131376731@s.whatsapp.net"


def booking_model() -> ScriptedProvider:
    return ScriptedProvider(lambda p: '{"accion": "reserva", "motivo": "corte"}' if "cita" in p.messages[-1].content
                            else f"re: {p.messages[-1].content}")


async def test_booking_registers_one_lead_and_keeps_its_id(tmp_path) -> None:  # type: ignore[no-untyped-def]
    krayin = FakeKrayin(token="krayin-token-123")
    async with running_server(krayin) as url:
        settings = make_settings(tmp_path, STORE="sqlite", CRM_AUTO_REGISTER="true", KRAYIN_API_URL=url + "/api/v1",
                                 KRAYIN_API_TOKEN="krayin-token-123", GOOGLE_BOOKING_URL="https://calendar.app.google/x")
        async with running_service(settings, booking_model()) as service:
            await service.intake(upsert("quiero una cita", push_name="Juan Pérez"))
            actor_state = lambda: service.registry.actor(key_of(JID)).state  # noqa: E731  # type: ignore[union-attr]
            await wait_for(lambda: service.registry.actor(key_of(JID)) is not None and actor_state().lead.lead_id is not None)  # type: ignore[union-attr]
            lead_id = actor_state().lead.lead_id
            saved = await service.store.load(key_of(JID))
            assert saved is not None and json.loads(saved)["lead"]["lead_id"] == lead_id
            person = krayin.calls_to("POST", "/contacts/persons")[0].json
            assert person["name"] == "Juan Pérez"
            assert person["contact_numbers"][0]["value"] == "+5491131376731"
            lead = krayin.calls_to("POST", "/leads")[0].json
            assert lead["title"].startswith("Juan Pérez") and lead["lead_value"] == 500
            with trio.fail_after(5):   # the CRM job is settled once on_lead returned (the id comes first)
                while await service.store.pending_outbox():
                    await trio.sleep(0.01)

            await service.intake(upsert("¿puedo cambiar la fecha?"))
            await service.intake(upsert("mejor otra cita"))
            await wait_for(lambda: len(krayin.calls_to("POST", "/activities")) == 1)
            assert len(krayin.calls_to("POST", "/leads")) == 1                # a note, never a second lead


async def test_krayin_down_never_delays_the_reply(tmp_path) -> None:  # type: ignore[no-untyped-def]
    krayin = FakeKrayin(token="krayin-token-123")
    async with running_server(krayin) as url:
        settings = make_settings(tmp_path, CRM_AUTO_REGISTER="true", KRAYIN_API_URL=url + "/api/v1",
                                 KRAYIN_API_TOKEN="krayin-token-123", GOOGLE_BOOKING_URL="https://calendar.app.google/x")
        krayin.down_for(3)
        async with running_service(settings, booking_model()) as service:
            start = trio.current_time()
            await service.intake(upsert("quiero una cita"))
            await wait_for(lambda: len(service.outbound.outbox_entries(jid=JID)) == 1)  # type: ignore[union-attr]
            assert trio.current_time() - start < 1.0
            assert service.crm.statistics().leads_created == 0                       # type: ignore[union-attr]
            await wait_for(lambda: service.crm.statistics().leads_created == 1, timeout=20)  # type: ignore[union-attr]
            await wait_for(lambda: service.registry.actor(key_of(JID)).state.lead.lead_id is not None)  # type: ignore[union-attr]
