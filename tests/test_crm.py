"""actors.crm: lead registration in Krayin, against a fake Krayin over real HTTP on 127.0.0.1."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

import httpx
import pytest
import trio

from actors.crm import CONCURRENT_JOBS, LEAD_RECORD_TIMEOUT_SECONDS, CrmSupervisor, LeadRequest
from actors.settings import Settings, load_settings
from tests.fakes.krayin import FakeKrayin
from tests.fakes.server import running_server

TOKEN = "krayin-secret-token-8841"
JID = "5491131376731@s.whatsapp.net"
PHONE = "5491131376731"


def make_settings(url: str, **env: str) -> Settings:
    values = {"CRM_AUTO_REGISTER": "true", "KRAYIN_API_URL": url, "KRAYIN_API_TOKEN": TOKEN, "HTTP_TIMEOUT": "5"}
    values.update(env)
    return load_settings(values, dotenv_file=None)


class Events:
    """on_lead / on_done callbacks that a test can wait on."""

    def __init__(self) -> None:
        self.leads: list[tuple[str, int]] = []
        self.done: list[tuple[LeadRequest, str]] = []
        self._changed = trio.Event()

    async def on_lead(self, jid: str, lead_id: int) -> None:
        self.leads.append((jid, lead_id))

    async def on_done(self, request: LeadRequest, outcome: str) -> None:
        self.done.append((request, outcome))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_done(self, count: int, timeout: float = 600) -> None:
        with trio.fail_after(timeout):
            while len(self.done) < count:
                await self._changed.wait()


@asynccontextmanager
async def crm_for(fake: FakeKrayin, **env: str) -> AsyncIterator[tuple[CrmSupervisor, Events]]:
    async with running_server(fake) as url:
        events = Events()
        crm = CrmSupervisor(make_settings(url + "/api/v1", **env), on_lead=events.on_lead, on_done=events.on_done)
        async with trio.open_nursery() as nursery:
            await nursery.start(crm.run)
            yield crm, events
            nursery.cancel_scope.cancel()


def _headers_ok(fake: FakeKrayin) -> None:
    for call in fake.calls:
        assert call.headers["authorization"] == f"Bearer {TOKEN}"
        assert call.headers["accept"] == "application/json"
        if call.method != "GET":
            assert call.headers["content-type"] == "application/json"


async def test_new_person_and_lead(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeKrayin(token=TOKEN)
    async with crm_for(fake) as (crm, events):
        crm.submit(LeadRequest(JID, "Juan", PHONE, motivo="consulta proyecto", job_id=11))
        await events.wait_done(1)
        stats = crm.statistics()
    assert [(c.method, c.path, c.status) for c in fake.calls] == [
        ("GET", "/contacts/persons/search", 200),
        ("POST", "/contacts/persons", 200),
        ("POST", "/leads", 200),
    ]
    assert fake.calls[0].query == {"search": PHONE, "searchFields": "contact_numbers:like"}
    assert fake.calls[1].json == {
        "name": "Juan",
        "emails": [{"value": f"wa-{PHONE}@whatsapp.invalid", "label": "work"}],
        "contact_numbers": [{"value": f"+{PHONE}", "label": "work"}],
    }
    lead = fake.calls[2].json
    description = lead.pop("description")
    assert lead == {"title": "Juan", "lead_value": 500, "lead_source_id": 5, "lead_type_id": 1,
                    "lead_pipeline_stage_id": 1, "user_id": 1, "person": {"id": 45}}
    assert "Motivo: consulta proyecto" in description and f"+{PHONE}" in description
    _headers_ok(fake)
    assert events.leads == [(JID, 123)]
    assert [(r.job_id, outcome) for r, outcome in events.done] == [(11, "created")]
    assert (stats.leads_created, stats.failed, stats.running, stats.queued) == (1, 0, 0, 0)
    text = caplog.text
    for phrase in (
        f"[CRM] Iniciando registro de lead para user_id={JID}, telefono={PHONE}",
        "[CRM] Persona creada exitosamente - person_id=45",
        "[CRM] Lead creado exitosamente - lead_id=123, valor=$500",
        "[CRM] ✅ Lead creado en Krayin CRM (ID: 123, Valor: $500)",
    ):
        assert phrase in text
    assert all(r.getMessage().startswith("[CRM]") for r in caplog.records if r.name.startswith("actors.crm"))
    assert TOKEN not in text and TOKEN not in repr(stats)


async def test_title_value_and_company() -> None:
    fake = FakeKrayin(token=TOKEN)
    async with crm_for(fake) as (crm, events):
        crm.submit(LeadRequest(JID, "Ana", PHONE, empresa="Panadería Sol", volumen_mensajes=120))
        await events.wait_done(1)
    [lead] = fake.calls_to("POST", "/leads")
    assert (lead.json["title"], lead.json["lead_value"]) == ("Ana - Panadería Sol", 1200)


@pytest.mark.parametrize("lid", [False, True], ids=["by-phone", "lid-chat-by-email"])
async def test_existing_person_is_reused(lid: bool) -> None:
    fake = FakeKrayin(token=TOKEN)
    if lid:   # an @lid chat without a known phone: its person has no contact number, only our email
        jid, phone = "123456789012345@lid", None
        person = fake.add_person("Eva", None, "wa-lid-123456789012345@whatsapp.invalid")
    else:
        jid, phone = JID, PHONE
        fake.add_person("Otro", f"+1{PHONE}", "otro@example.com")  # "like" matches it too: not the same number
        person = fake.add_person("Juan Pérez", f"+{PHONE}", "juan@example.com")
    async with crm_for(fake) as (crm, events):
        crm.submit(LeadRequest(jid, "Juan", phone))
        await events.wait_done(1)
    assert fake.calls_to("POST", "/contacts/persons") == []
    [lead] = fake.calls_to("POST", "/leads")
    assert lead.json["person"] == {"id": person}
    assert events.leads == [(jid, 123)]


async def test_duplicate_422_searches_and_reuses(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeKrayin(token=TOKEN)
    # Same placeholder email, but the phone was typed differently, so the phone search misses it.
    existing = fake.add_person("Juan", "54 9 11 3137-6731", f"WA-{PHONE}@whatsapp.invalid")
    async with crm_for(fake) as (crm, events):
        crm.submit(LeadRequest(JID, "Juan", PHONE))
        await events.wait_done(1)
    creates = fake.calls_to("POST", "/contacts/persons")
    assert [c.status for c in creates] == [422]
    searches = fake.calls_to("GET", "/contacts/persons/search")
    fields = [c.query["searchFields"] for c in searches]
    assert fields == ["contact_numbers:like", "contact_numbers:like", "emails:like"]
    assert searches[-1].query["search"] == f"wa-{PHONE}@whatsapp.invalid"
    assert fake.calls_to("POST", "/leads")[0].json["person"] == {"id": existing}
    assert len(fake.persons) == 1
    assert "[CRM] Persona existente reutilizada - person_id=45" in caplog.text


async def test_never_two_leads_for_one_jid() -> None:
    fake = FakeKrayin(token=TOKEN)
    async with crm_for(fake) as (crm, events):
        crm.submit(LeadRequest(JID, "Juan", PHONE, motivo="corte"))
        crm.submit(LeadRequest(JID, "Juan", PHONE, motivo="otra consulta"))  # while the first is in flight
        crm.submit(LeadRequest(JID, "Juan", PHONE))
        await events.wait_done(3)
        stats = crm.statistics()
    assert len(fake.calls_to("POST", "/leads")) == 1
    assert [outcome for _, outcome in events.done] == ["created", "noted", "skipped"]
    [note] = fake.activities
    assert (note["type"], note["lead_id"]) == ("note", 123)
    assert "otra consulta" in note["comment"]
    assert (stats.leads_created, stats.notes_added, stats.skipped) == (1, 1, 1)


async def test_request_with_lead_id_adds_a_note() -> None:
    fake = FakeKrayin(token=TOKEN)
    async with crm_for(fake) as (crm, events):
        crm.submit(LeadRequest(JID, "Juan", PHONE, motivo="reprogramar", lead_id=77))
        await events.wait_done(1)
    [call] = fake.calls
    assert (call.method, call.path) == ("POST", "/activities")
    assert call.json == {"type": "note", "comment": "Nueva solicitud de reserva desde WhatsApp. Motivo: reprogramar",
                         "lead_id": 77}
    _headers_ok(fake)
    assert events.leads == []


async def test_krayin_down_then_back_creates_the_lead_later(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeKrayin(token=TOKEN)
    fake.down_for(120)
    async with crm_for(fake) as (crm, events):
        start = trio.current_time()
        crm.submit(LeadRequest(JID, "Juan", PHONE))
        await trio.sleep(60)
        during = crm.statistics()
        await events.wait_done(1)
    assert events.leads == [(JID, 123)]
    assert (during.running, during.leads_created) == (1, 0)
    [pending] = during.pending
    assert pending.jid == JID and pending.attempts >= 3 and "503" in pending.last_error
    ok = [c for c in fake.calls if c.status == 200]
    assert ok and min(c.at for c in ok) >= start + 120
    assert len(fake.calls_to("POST", "/leads")) == 1


async def test_progress_survives_a_retry(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeKrayin(token=TOKEN, fail_every=3)  # search, create person, then the lead fails once
    async with crm_for(fake) as (crm, events):
        crm.submit(LeadRequest(JID, "Juan", PHONE))
        await events.wait_done(1)
    assert [c.status for c in fake.calls_to("POST", "/leads")] == [500, 200]
    assert len(fake.calls_to("POST", "/contacts/persons")) == 1  # the person was not created twice
    assert events.leads == [(JID, 123)]


async def test_a_lead_whose_creation_answer_was_lost_is_not_created_again(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    """Krayin inserted the lead but answered 500 (or the answer timed out): the retry finds the
    person's lead with this job's title and description instead of creating a second one."""
    fake = FakeKrayin(token=TOKEN, lose_lead_answers=1)
    caplog.set_level(logging.INFO)
    async with crm_for(fake) as (crm, events):
        crm.submit(LeadRequest(JID, "Juan", PHONE, motivo="turno el sábado"))
        await events.wait_done(1)
    assert [c.status for c in fake.calls_to("POST", "/leads")] == [500]
    assert list(fake.leads) == [123] and events.leads == [(JID, 123)] and events.done[0][1] == "created"
    [search] = fake.calls_to("GET", "/leads/search")
    assert search.query == {"search": "person_id:45", "searchFields": "person_id:="}
    assert "Lead ya creado en un intento anterior - lead_id=123" in caplog.text


async def test_a_job_recovered_after_a_crash_adopts_the_lead_it_created_before() -> None:
    """The process died after Krayin created the lead and before its id was recorded: the job comes
    back from the store (``recovered``) to a supervisor that knows nothing, and finds that lead; a
    recovered job whose lead was never created creates it, once."""
    fake = FakeKrayin(token=TOKEN)
    async with crm_for(fake) as (crm, events):
        crm.submit(LeadRequest(JID, "Juan", PHONE, motivo="turno"))
        await events.wait_done(1)
    async with crm_for(fake) as (crm, events):   # after the restart: nothing in memory
        crm.submit(LeadRequest(JID, "Juan", PHONE, motivo="turno", recovered=True))
        other = "5491100000777@s.whatsapp.net"
        crm.submit(LeadRequest(other, "Ana", "5491100000777", motivo="turno", recovered=True))
        await events.wait_done(2)
    assert sorted(events.leads) == sorted([(JID, 123), (other, 124)])
    assert len(fake.leads) == 2 and len(fake.calls_to("POST", "/leads")) == 2
    assert len(fake.calls_to("GET", "/leads/search")) == 2


@pytest.mark.parametrize("as_500", [False, True])
async def test_bad_token_is_reported_and_given_up(autojump_clock: trio.testing.MockClock, as_500: bool,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeKrayin(token="the-real-token", auth_as_500=as_500)
    async with crm_for(fake, CRM_GIVE_UP_SECONDS="120") as (crm, events):
        crm.submit(LeadRequest(JID, "Juan", PHONE, job_id=5))
        await trio.sleep(30)
        assert crm.statistics().auth_failing
        await events.wait_done(1)
        stats = crm.statistics()
    assert [outcome for _, outcome in events.done] == ["failed"]
    assert len(fake.calls) >= 4 and all(c.status == (500 if as_500 else 401) for c in fake.calls)
    token_errors = [r for r in caplog.records if "KRAYIN_API_TOKEN" in r.getMessage()]
    assert len(token_errors) == 1 and token_errors[0].levelno == logging.ERROR
    [failure] = stats.failures
    assert (failure.jid, failure.job_id, stats.failed) == (JID, 5, 1)
    assert TOKEN not in caplog.text and TOKEN not in repr(stats)


async def test_permanent_error_is_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeKrayin(token=TOKEN, stages={2})  # the configured stage 1 does not exist
    async with crm_for(fake) as (crm, events):
        crm.submit(LeadRequest(JID, "Juan", PHONE))
        await events.wait_done(1)
    assert [c.status for c in fake.calls_to("POST", "/leads")] == [404]
    assert [outcome for _, outcome in events.done] == ["failed"]
    assert "[CRM] Error al crear lead: status=404" in caplog.text


async def test_lid_chat_never_gets_a_phone_number(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeKrayin(token=TOKEN)   # validates contact_numbers.*.value as numeric, like Krayin
    lid = "123456789012345@lid"
    async with crm_for(fake) as (crm, events):
        crm.submit(LeadRequest(lid, "", None))
        crm.submit(LeadRequest("99887766@lid", "Eva", None, alt_jid=f"{PHONE}@s.whatsapp.net"))
        await events.wait_done(2)
    creates = {c.json["name"]: c for c in fake.calls_to("POST", "/contacts/persons")}   # the two run concurrently
    assert creates["Lead desde WhatsApp"].json == {   # no contact number at all: an @lid is not a phone number
        "name": "Lead desde WhatsApp",
        "emails": [{"value": "wa-lid-123456789012345@whatsapp.invalid", "label": "work"}],
    }
    assert creates["Eva"].json["contact_numbers"] == [{"value": f"+{PHONE}", "label": "work"}]  # from remoteJidAlt
    assert [c.status for c in creates.values()] == [200, 200]
    searches = fake.calls_to("GET", "/contacts/persons/search")
    # the chat without a phone is looked up by its placeholder email, the other by its phone
    assert sorted((c.query["search"], c.query["searchFields"]) for c in searches) == [
        (PHONE, "contact_numbers:like"), ("wa-lid-123456789012345@whatsapp.invalid", "emails:like")]
    leads = fake.calls_to("POST", "/leads")
    assert [c.status for c in leads] == [200, 200]
    assert any(lid in c.json["description"] and "no es un teléfono" in c.json["description"] for c in leads)
    assert f"[CRM] Iniciando registro de lead para user_id={lid}, telefono=-" in caplog.text
    assert [outcome for _, outcome in events.done] == ["created", "created"]
    assert {jid for jid, _ in events.leads} == {lid, "99887766@lid"}


async def test_fake_krayin_refuses_a_contact_number_that_is_not_numeric() -> None:
    fake = FakeKrayin(token=TOKEN)
    async with running_server(fake) as url:
        async with httpx.AsyncClient(base_url=url + "/api/v1", headers={
                "Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}) as http:
            refused = await http.post("/contacts/persons", json={
                "name": "X", "emails": [{"value": "x@whatsapp.invalid", "label": "work"}],
                "contact_numbers": [{"value": "123@lid", "label": "work"}]})
            accepted = await http.post("/contacts/persons", json={
                "name": "Y", "emails": [{"value": "y@whatsapp.invalid", "label": "work"}],
                "contact_numbers": [{"value": f"+{PHONE}", "label": "work"}]})
    assert refused.status_code == 422
    assert refused.json() == {"message": "The contact numbers.0.value field must be a number.",
                              "errors": {"contact_numbers.0.value": ["The contact numbers.0.value field must be a number."]}}
    assert accepted.status_code == 200


async def test_a_stuck_on_lead_holds_no_slot_and_the_lead_stays_known(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeKrayin(token=TOKEN)
    stuck = trio.Event()   # never set: the chat's mailbox does not take the lead id

    async def on_lead(jid: str, lead_id: int) -> None:
        await stuck.wait()

    async with running_server(fake) as url:
        events = Events()
        crm = CrmSupervisor(make_settings(url + "/api/v1"), on_lead=on_lead, on_done=events.on_done)
        async with trio.open_nursery() as nursery:
            await nursery.start(crm.run)
            jids = [f"54911000000{i:02d}@s.whatsapp.net" for i in range(CONCURRENT_JOBS + 4)]
            for jid in jids:
                crm.submit(LeadRequest(jid, "Juan", None))
            with trio.fail_after(LEAD_RECORD_TIMEOUT_SECONDS / 2):   # more chats than slots: none waits
                while len(fake.calls_to("POST", "/leads")) < len(jids):
                    await trio.sleep(0.01)
            await events.wait_done(len(jids), timeout=2 * LEAD_RECORD_TIMEOUT_SECONDS)   # carries on
            crm.submit(LeadRequest(jids[0], "Juan", None))   # the lead id is still remembered
            await events.wait_done(len(jids) + 1)
            nursery.cancel_scope.cancel()
    assert [outcome for _, outcome in events.done] == ["created"] * len(jids) + ["skipped"]
    assert len(fake.calls_to("POST", "/leads")) == len(jids)
    assert caplog.text.count("[CRM] Lead id not recorded in the chat within") == len(jids)


async def test_disabled_crm_logs_once_and_ignores_requests(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = load_settings({"CRM_AUTO_REGISTER": "true", "KRAYIN_API_URL": "http://127.0.0.1:9/api/v1"},
                             dotenv_file=None)
    crm = CrmSupervisor(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(crm.run)
        crm.submit(LeadRequest(JID, "Juan", PHONE))
        stats = crm.statistics()
        nursery.cancel_scope.cancel()
    assert not stats.enabled and stats.queued == 0 and stats.running == 0
    off = [r for r in caplog.records if "desactivado" in r.getMessage() and r.levelno == logging.INFO]
    assert len(off) == 1 and "KRAYIN_API_TOKEN" in off[0].getMessage()
