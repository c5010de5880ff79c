"""Secure intake through the real ASGI app: unknown instances, the new-chat bound, bounded labels,
unpaired surrogates, and what of a customer's text reaches the real log file (docs/security.md)."""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest

from app import create_app
from runtime import logs
from runtime.store import StateMeta
from tests.conftest import LoopbackClient, key_of, make_settings, wait_for
from tests.fakes.evolution import FakeEvolution
from tests.fakes.server import running_server
from tests.payloads import upsert

JID = "5491131376731@s.whatsapp.net"
CONFIGURED = "prueba-py-agent"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The app's start-up installs the root logger's handlers: remove them afterwards."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    for name in logs.NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)


@asynccontextmanager
async def client_for(tmp_path: Path, **env: Any) -> AsyncIterator[Any]:
    app = create_app(make_settings(tmp_path, **env))
    app.test_client_class = LoopbackClient
    async with app.test_app() as test_app:
        yield app, test_app.test_client()


async def test_unknown_instance_is_ignored_and_nothing_stored(tmp_path: Path) -> None:
    async with client_for(tmp_path, EVOLUTION_INSTANCE=CONFIGURED) as (app, client):
        for instance in ("attacker-instance", ""):
            response = await client.post("/webhook", json=upsert("hola", instance=instance))
            assert response.status_code == 200
            assert await response.get_json() == {"status": "ignored", "reason": "unknown_instance"}
        assert await (await client.get("/memory")).get_json() == {}
        assert (await (await client.get("/actors")).get_json())["actors"] == []
        service = app.extensions["service"]
        assert await service.store.pending_inbox() == [] and service.outbound.outbox_entries() == []
        known = await client.post("/webhook", json=upsert("hola", instance=CONFIGURED))
        assert (await known.get_json())["status"] == "accepted"


async def test_senders_are_the_configured_instance_or_with_serve_the_webhooks_own(tmp_path: Path) -> None:
    """A known instance answers through the configured name only (not the payload's instanceId); with
    UNKNOWN_INSTANCES=serve an unknown one answers through its own id and name, never the configured one."""
    fake = FakeEvolution(api_key="k")   # every instance exists: only the candidate order decides
    async with running_server(fake) as evo_url, client_for(
            tmp_path, EVOLUTION_API_URL=evo_url, EVOLUTION_API_KEY="k", EVOLUTION_INSTANCE=CONFIGURED,
            UNKNOWN_INSTANCES="serve") as (app, client):
        await client.post("/webhook", json=upsert("uno", instance=CONFIGURED))
        stranger = upsert("dos", instance="stranger", jid="5491100000002@s.whatsapp.net")
        stranger["data"]["instanceId"] = "stranger-uuid"
        await client.post("/webhook", json=stranger)
        await wait_for(lambda: len(fake.texts()) == 2)
        # An operator's reply from the console goes through the same senders as the bot's.
        order = await app.extensions["service"].command(JID, "reply", "Hola, soy Ana")
        assert order.applied
        await wait_for(lambda: len(fake.texts()) == 3)
    senders = {(jid, text): instance for instance, jid, text in fake.texts()}
    assert set(senders.values()) == {CONFIGURED, "stranger-uuid"}
    assert senders[(JID, "Hola, soy Ana")] == CONFIGURED
    assert {jid: instance for (jid, _), instance in senders.items()} == {
        JID: CONFIGURED, "5491100000002@s.whatsapp.net": "stranger-uuid"}
    assert not any(c.path.endswith("/b6b7c0de-0000-4000-8000-000000000001") for c in fake.calls("/message/"))


async def test_new_chats_per_minute_answers_429_before_storing(tmp_path: Path) -> None:
    async with client_for(tmp_path, NEW_CHATS_PER_MINUTE=3) as (app, client):
        for n in range(3):
            response = await client.post("/webhook", json=upsert("hola", jid=f"54911000000{n}@s.whatsapp.net"))
            assert response.status_code == 200
        refused = await client.post("/webhook", json=upsert("hola", jid="549110000009@s.whatsapp.net"))
        assert refused.status_code == 429 and "error" in await refused.get_json()
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        again = await client.post("/webhook", json=upsert("otra vez", jid="549110000000@s.whatsapp.net"))
        assert again.status_code == 200          # an existing chat is not a new one
        other = await client.post("/webhook", json=upsert("hola", jid="549110000009@s.whatsapp.net", instance="b"))
        assert other.status_code == 200          # counted per instance
        await wait_for(lambda: len(app.extensions["service"].outbound.outbox_entries()) == 5)
        sizes = await (await client.get("/memory")).get_json()   # two instances: {instance: {jid: count}}
        assert sorted(sizes) == ["b", "prueba-py-agent"] and sum(map(len, sizes.values())) == 4
        assert (await (await client.get("/supervisors")).get_json())["intake"]["new_chats_refused"] == 1
        assert "agent_new_chats_refused_total 1.0" in await (await client.get("/metrics")).get_data(as_text=True)


async def test_ten_thousand_event_names_leave_metrics_bounded(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async with client_for(tmp_path) as (app, client):
        service = app.extensions["service"]
        for n in range(10_000):
            assert (await service.intake({"event": f"evil.{n}", "data": {}})).status == 200
        await client.post("/webhook", json=upsert(jid="status@broadcast"))
        text = await (await client.get("/metrics")).get_data(as_text=True)
        supervisors = await (await client.get("/supervisors")).get_json()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "agent_messages_ignored_total"]
    assert len(samples) <= 20 and len(text) < 20_000
    counted = {s.labels["reason"]: s.value for s in samples}
    assert sum(counted.values()) == 10_001 and counted["broadcast"] == 1 and counted["other"] > 9_000
    assert len(supervisors["intake"]["ignored"]) <= 20


async def test_outbound_maps_keyed_by_instance_are_bounded(tmp_path: Path) -> None:
    """UNKNOWN_INSTANCES=serve with no instance named: 300 instance names, 65 entries at most."""
    fake = FakeEvolution(api_key="k")
    async with running_server(fake) as evo_url, client_for(
            tmp_path, EVOLUTION_API_URL=evo_url, EVOLUTION_API_KEY="k",
            OUTBOUND_RATE_PER_INSTANCE=1000) as (app, client):
        for n in range(300):
            payload = upsert("hola", instance=f"inst-{n}", jid=f"5491100{n:05d}@s.whatsapp.net")
            payload["data"].pop("instanceId")
            assert (await client.post("/webhook", json=payload)).status_code == 200
        await wait_for(lambda: len(fake.texts()) == 300, timeout=30)
        outbound = app.extensions["service"].outbound
        assert len(outbound.statistics().preferred_candidates) <= 65
        assert len(outbound._pacer._next) <= 65


async def test_escaped_lone_surrogate_is_replaced_and_raw_invalid_utf8_is_400(tmp_path: Path) -> None:
    """The real SQLite store: a lone ``\\ud800`` (valid JSON, not valid Unicode) is accepted as U+FFFD;
    raw bytes ED A0 80 (not valid UTF-8) are a 400 with a JSON reason; neither is ever a 500."""
    async with client_for(tmp_path, STORE="sqlite") as (app, client):
        text = json.dumps(upsert("hola \ud800 chau", push_name="J\udfffuan"))
        assert "\\ud800" in text
        escaped = await client.post("/webhook", data=text.encode(), headers={"Content-Type": "application/json"})
        assert escaped.status_code == 200, await escaped.get_data(as_text=True)
        await wait_for(lambda: len(app.extensions["service"].outbound.outbox_entries(jid=JID)) == 1)
        detail = await (await client.get(f"/memory/{JID}")).get_json()
        assert detail["messages"][0]["content"] == "hola \ufffd chau"
        raw = json.dumps(upsert("hola X chau")).encode().replace(b"X", b"\xed\xa0\x80")
        response = await client.post("/webhook", data=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        assert "UTF-8" in (await response.get_json())["error"]
        bom = b"\xef\xbb\xbf" + json.dumps(upsert("con BOM")).encode()
        response = await client.post("/webhook", data=bom, headers={"Content-Type": "application/json"})
        assert response.status_code == 200
        assert await (await client.get("/health")).get_json() == {"status": "ok"}


CUSTOMER = "Hola, soy Juan, mi número es +54 9 11 3137-6731 y quiero saber el precio del plan anual completo"


@pytest.mark.parametrize("mode", ["full", "truncated", "off"])
async def test_log_customer_text_modes_in_the_real_log_file(tmp_path: Path, mode: str) -> None:
    async with client_for(tmp_path, LOG_CUSTOMER_TEXT=mode, LOG_STDERR="false") as (app, client):
        assert (await client.post("/webhook", json=upsert(CUSTOMER))).status_code == 200
        await wait_for(lambda: len(app.extensions["service"].outbound.outbox_entries(jid=JID)) == 1)
        detail = await (await client.get(f"/memory/{JID}")).get_json()
        assert detail["messages"][0]["content"] == CUSTOMER       # admin still shows the whole window
    log = (tmp_path / "logs" / "agent.log").read_text(encoding="utf-8")
    lines = [line for line in log.splitlines()
             if "Processing message from" in line or "[RESPUESTA DEL LLM]" in line or "[OUTBOX]" in line]
    assert len(lines) == 3, log
    processing = next(line for line in lines if "Processing message from" in line)
    if mode == "full":
        assert processing.endswith(f"Processing message from {JID}: {CUSTOMER} [{key_of(JID)}]")
    elif mode == "truncated":
        assert processing.endswith(f"Processing message from {JID}: Hola, soy Juan, mi número es +** * ** **… [{key_of(JID)}]")
    else:
        assert processing.endswith(f"Processing message from {JID}: [{len(CUSTOMER)} characters withheld] [{key_of(JID)}]")
    if mode != "full":
        for line in lines:
            assert "3137-6731" not in line and "precio" not in line, line


async def test_admin_without_token_serves_loopback_peers_only(tmp_path: Path) -> None:
    async with client_for(tmp_path) as (app, client):
        for peer, status in (("127.0.0.1", 200), ("127.3.4.5", 200), ("::1", 200), ("::ffff:127.0.0.1", 200),
                             ("<local>", 403), ("10.0.0.1", 403), ("::ffff:10.0.0.1", 403)):
            response = await client.get("/supervisors", scope_base={"client": (peer, 1)})
            assert response.status_code == status, peer
            assert response.headers["Cache-Control"] == "no-store"
        for header in ("Forwarded", "X-Forwarded-For", "X-Real-IP", "x-forwarded-for"):
            response = await client.get("/memory", headers={header: "127.0.0.1"})
            assert response.status_code == 403 and "error" in await response.get_json(), header


async def test_a_stored_chat_coming_back_is_never_refused_as_new(tmp_path: Path) -> None:
    """Within the limit no store lookup is made; past it, a chat that is stored (e.g. after a restart)
    is still served, and only truly new ones get the 429."""
    async with client_for(tmp_path, NEW_CHATS_PER_MINUTE=2) as (app, client):
        service = app.extensions["service"]
        await service.store.commit(key_of("549110000077@s.whatsapp.net"), b'{"window":[],"last_activity":1.0}',
                                   StateMeta(last_activity=1.0))
        for n in range(2):
            response = await client.post("/webhook", json=upsert("hola", jid=f"54911000000{n}@s.whatsapp.net"))
            assert response.status_code == 200
        back = await client.post("/webhook", json=upsert("volví", jid="549110000077@s.whatsapp.net"))
        assert back.status_code == 200 and (await back.get_json())["status"] == "accepted"
        new = await client.post("/webhook", json=upsert("hola", jid="549110000078@s.whatsapp.net"))
        assert new.status_code == 429
