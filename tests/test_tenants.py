"""Many WhatsApp numbers in one deployment: a conversation is (instance, chat), each instance answers
with its own settings, and nothing crosses from one instance to another (docs/behaviour.md §1.1).

Everything goes through real HTTP: the app's webhook and admin endpoints, the real OpenAI SDK against
the fake LLM, the real httpx transport against the fake Evolution API and Krayin."""

from __future__ import annotations

import json
import sqlite3
import time
from collections import defaultdict
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
import trio

from actors.conversation_key import ConversationKey
from actors.service import Service
from actors.settings import Settings
from actors.state import ConversationState, WindowEntry
from app import create_app
from runtime.sqlite_engine import SqliteEngine
from runtime.sqlite_store import MIGRATIONS, SqliteStore
from runtime.store import StateMeta
from tests.conftest import LoopbackClient, make_settings, wait_for
from tests.fakes.evolution import FakeEvolution
from tests.fakes.krayin import FakeKrayin
from tests.fakes.llm import OpenAIFake, RecordedRequest, Reply
from tests.fakes.server import running_server
from tests.payloads import upsert
from tests.procs import ServiceProcess

JID = "5491131376731@s.whatsapp.net"
ACME, BETA = "acme-bot", "beta-shop"
INSTANCE_IDS = {ACME: "a0000000-0000-4000-8000-00000000acme", BETA: "b0000000-0000-4000-8000-00000000beta"}
KEYS = {ACME: "acme-evolution-key", BETA: "beta-evolution-key"}
PROMPTS = {ACME: "Eres el asistente de Acme, una tienda de bicicletas.", BETA: "You are Beta Shop's assistant."}
BOOKING = {ACME: "https://calendar.app.google/acme", BETA: "https://calendar.app.google/beta"}
KRAYIN_TOKEN = "krayin-token-123"


def model(request: RecordedRequest) -> Reply:
    """Books on "cita"/"book", else echoes the last message."""
    last = request.json["messages"][-1]["content"]
    if "cita" in last or "book" in last:
        return Reply('{"accion": "reserva", "motivo": "demo"}')
    return Reply(f"re: {last}")


def webhook(text: str, instance: str, jid: str = JID, **kw: Any) -> dict[str, Any]:
    """A messages.upsert for ``instance`` carrying that instance's own id."""
    payload = upsert(text, jid=jid, instance=instance, **kw)
    payload["data"]["instanceId"] = INSTANCE_IDS.get(instance, f"id-{instance}")
    return payload


def two_tenants(tmp_path: Path, llm_url: str, evo_url: str, krayin_url: str,
                **env: Any) -> tuple[Settings, dict[str, Settings]]:
    """The global settings and the effective settings of acme-bot and beta-shop (what the instances
    file's loader gives: the global ones with each instance's overrides)."""
    common = dict(LLM_PROVIDER="openai", OPENAI_API_KEY="sk-test-tenants", OPENAI_BASE_URL=llm_url + "/v1",
                  EVOLUTION_API_URL=evo_url, EVOLUTION_API_KEY="global-key", CRM_AUTO_REGISTER="true",
                  KRAYIN_API_URL=krayin_url + "/api/v1", KRAYIN_API_TOKEN=KRAYIN_TOKEN, **env)
    base = make_settings(tmp_path, **common)
    acme = make_settings(tmp_path, **{**common, "AGENT_INSTRUCTION": PROMPTS[ACME], "GOOGLE_BOOKING_URL": BOOKING[ACME],
                                      "EVOLUTION_API_KEY": KEYS[ACME], "LANGUAGE": "es", "KRAYIN_STAGE_ID": "3"})
    beta = make_settings(tmp_path, **{**common, "AGENT_INSTRUCTION": PROMPTS[BETA], "GOOGLE_BOOKING_URL": BOOKING[BETA],
                                      "EVOLUTION_API_KEY": KEYS[BETA], "LANGUAGE": "en", "KRAYIN_STAGE_ID": "2"})
    return base, {ACME: acme, BETA: beta}


@asynccontextmanager
async def serving(settings: Settings, instances: dict[str, Settings]) -> AsyncIterator[tuple[Service, Any]]:
    """The app around a Service with these instances; yields (service, loopback test client)."""
    service = Service(settings, instances=instances)
    app = create_app(settings, service)
    app.test_client_class = LoopbackClient
    async with app.test_app() as test_app:
        yield service, test_app.test_client()


async def get(client: Any, path: str, **query: str) -> tuple[int, Any]:
    response = await client.get(path, query_string=query)
    return response.status_code, await response.get_json()


async def test_same_customer_two_instances_two_independent_conversations(tmp_path: Path) -> None:
    llm = OpenAIFake(default=model)
    evolution = FakeEvolution(api_key="global-key", instances={ACME, BETA}, instance_keys=KEYS)
    krayin = FakeKrayin(token=KRAYIN_TOKEN)
    async with running_server(llm) as llm_url, running_server(evolution) as evo_url, \
            running_server(krayin) as krayin_url:
        base, instances = two_tenants(tmp_path, llm_url, evo_url, krayin_url)
        async with serving(base, instances) as (service, client):
            for text, instance in (("hola acme", ACME), ("hello beta", BETA)):
                response = await client.post("/webhook", json=webhook(text, instance))
                assert await response.get_json() == {"status": "accepted", "jid": JID, "instance": instance}
            await wait_for(lambda: len(evolution.sent) == 2)
            for text, instance in (("quiero una cita", ACME), ("I want to book", BETA)):
                await client.post("/webhook", json=webhook(text, instance))
            await wait_for(lambda: len(evolution.sent) == 4 and len(krayin.calls_to("POST", "/leads")) == 2)

            # each model request carries its own instance's system prompt, and only its own history
            by_text = {r.json["messages"][-1]["content"]: r.json["messages"] for r in llm.requests}
            for text, instance in (("hola acme", ACME), ("quiero una cita", ACME),
                                   ("hello beta", BETA), ("I want to book", BETA)):
                messages = by_text[text]
                assert messages[0] == {"role": "system", "content": PROMPTS[instance]}
                other = BETA if instance == ACME else ACME
                assert not any("beta" in m["content"] if other == BETA else "acme" in m["content"]
                               for m in messages[1:]), messages
            # every reply went out through its own instance, with its own API key
            for sent in evolution.sent:
                assert sent.path == f"/message/sendText/{sent.instance}"
                assert sent.headers["apikey"] == KEYS[sent.instance]
                assert sent.json["number"] == JID
            texts = defaultdict(list)
            for instance, _, text in evolution.texts():
                texts[instance].append(text)
            assert texts[ACME][0] == "re: hola acme" and BOOKING[ACME] in texts[ACME][1]
            assert texts[BETA][0] == "re: hello beta" and BOOKING[BETA] in texts[BETA][1]
            assert "reserve" in texts[BETA][1].lower() or "book" in texts[BETA][1].lower()   # English texts
            assert not any(BOOKING[BETA] in t for t in texts[ACME]) and not any(BOOKING[ACME] in t for t in texts[BETA])
            # no send ever tried the other tenant's instance (not even as a failing candidate)
            for call in evolution.calls("/message/sendText/"):
                assert call.instance in (INSTANCE_IDS[ACME], INSTANCE_IDS[BETA], ACME, BETA)
                owner = ACME if call.instance in (ACME, INSTANCE_IDS[ACME]) else BETA
                assert call.json["text"] in texts[owner]

            # two leads, one per conversation, each with its instance's Krayin stage
            leads = [c.json for c in krayin.calls_to("POST", "/leads")]
            assert sorted(lead["lead_pipeline_stage_id"] for lead in leads) == [2, 3]
            assert await wait_for_leads(service) == {ACME, BETA}

            # the admin view: two conversations for one JID
            status, body = await get(client, f"/actors/{JID}")
            assert status == 409 and body["instances"] == [ACME, BETA]
            status, body = await get(client, f"/memory/{JID}")
            assert status == 409 and body["instances"] == [ACME, BETA]
            for instance in (ACME, BETA):
                status, body = await get(client, f"/actors/{JID}", instance=instance)
                assert status == 200 and body["state"]["booking_sent"] is True and body["state"]["window_size"] == 4
                assert body["state"]["jid"] == JID and body["state"]["instance"] == instance
            status, body = await get(client, f"/admin/api/chats/{JID}")
            assert status == 409 and body["instances"] == [ACME, BETA]
            status, body = await get(client, f"/admin/api/chats/{JID}", instance=BETA)
            assert status == 200 and body["instance"] == BETA and body["booking_sent"] is True
            assert (await get(client, f"/actors/{JID}", instance="gamma-store"))[0] == 404
            status, memory = await get(client, "/memory")
            assert memory == {ACME: {JID: 4}, BETA: {JID: 4}}
            assert (await get(client, "/memory", instance=ACME))[1] == {JID: 4}
            status, page = await get(client, "/actors", instance=BETA)
            assert [(r["jid"], r["instance"]) for r in page["actors"]] == [(JID, BETA)]

            # resetting acme's conversation leaves beta's alone
            response = await client.post(f"/actors/{JID}/reset", query_string={"instance": ACME})
            assert response.status_code == 200, await response.get_json()
            assert (await get(client, "/memory"))[1] == {ACME: {JID: 0}, BETA: {JID: 4}}
            # pausing beta's leaves acme answering
            response = await client.post(f"/actors/{JID}/pause", query_string={"instance": BETA})
            assert response.status_code == 200
            await client.post("/webhook", json=webhook("sigo aqui", ACME))
            await client.post("/webhook", json=webhook("still there", BETA))
            await wait_for(lambda: len(evolution.sent) == 5)
            await wait_for(lambda: service.registry.statistics().running_actors == 0)   # type: ignore[union-attr]
            await trio.sleep(0.2)
            assert [t for i, _, t in evolution.texts()][4:] == ["re: sigo aqui"]
            assert (await get(client, "/actors", instance=BETA))[1]["actors"][0]["window_size"] == 5


async def test_one_deployment_without_instances_file_keeps_two_numbers_apart(tmp_path: Path) -> None:
    """No instances named (every webhook served): the same customer writing to two numbers still has
    two conversations. Regression: with the chat JID as the key, the second number's prompt held
    the first number's conversation (seen failing before conversations were keyed by instance)."""
    from tests.conftest import running_service
    from tests.doubles import ScriptedProvider

    provider = ScriptedProvider()
    async with running_service(make_settings(tmp_path), provider) as service:
        assert (await service.intake(webhook("hola acme", ACME))).status == 200
        await wait_for(lambda: len(provider.prompts) == 1)
        assert (await service.intake(webhook("hello beta", BETA))).status == 200
        await wait_for(lambda: len(provider.prompts) == 2)
        assert [m.content for m in provider.prompts[1].messages] == ["hello beta"]
        assert await service.memory() == {ACME: {JID: 2}, BETA: {JID: 2}}
        assert await service.memory(ACME) == {JID: 2}


async def test_per_instance_conversation_settings(tmp_path: Path) -> None:
    """The window length and the split limit are the instance's own; an unconfigured instance
    served with UNKNOWN_INSTANCES=serve has the global ones (local outbox mode)."""
    from tests.conftest import chain_of
    from tests.doubles import ScriptedProvider

    long = "x" * 150 + ". " + "y" * 150
    provider = ScriptedProvider(lambda p: long)
    base = make_settings(tmp_path, UNKNOWN_INSTANCES="serve")
    acme = make_settings(tmp_path, UNKNOWN_INSTANCES="serve", SPLIT_MAX_CHARS="100", MAX_MESSAGES="2")
    service = Service(base, instances={ACME: acme}, chain=chain_of(base, provider))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        for n in range(3):
            for instance in (ACME, BETA):
                assert (await service.intake(webhook(f"m{n}", instance))).status == 200
        outbound = service.outbound
        assert outbound is not None
        await wait_for(lambda: service.per_instance.get(ACME, [0, 0])[1] == 3
                       and service.per_instance.get("other", [0, 0])[1] == 3)
        lengths = sorted(len(e.text) for e in outbound.outbox_entries(jid=JID, limit=1000))
        assert lengths.count(len(long)) == 3                                   # beta: whole replies
        parts = [n for n in lengths if n != len(long)]
        assert len(parts) > 3 and max(parts) <= 100 and sum(parts) == 3 * (len(long) - 1)   # acme: split at 100
        assert await service.memory() == {ACME: {JID: 2}, BETA: {JID: 6}}     # MAX_MESSAGES 2 vs 50
        nursery.cancel_scope.cancel()


async def wait_for_leads(service: Service) -> set[str]:
    """The instances whose conversation with JID recorded its lead id."""
    found: set[str] = set()

    def recorded() -> bool:
        for instance in (ACME, BETA):
            actor = service.registry.actor(ConversationKey(instance, JID).key)  # type: ignore[union-attr]
            if actor is not None and actor.state.lead.lead_id is not None:  # type: ignore[attr-defined]
                found.add(instance)
        return len(found) == 2

    await wait_for(recorded)
    return found


async def test_unknown_instance_is_ignored_and_nothing_stored(tmp_path: Path) -> None:
    llm = OpenAIFake(default=model)
    evolution = FakeEvolution(api_key="global-key", instance_keys=KEYS)
    krayin = FakeKrayin(token=KRAYIN_TOKEN)
    async with running_server(llm) as llm_url, running_server(evolution) as evo_url, \
            running_server(krayin) as krayin_url:
        base, instances = two_tenants(tmp_path, llm_url, evo_url, krayin_url, UNKNOWN_INSTANCES="ignore")
        async with serving(base, instances) as (service, client):
            response = await client.post("/webhook", json=webhook("hola", "gamma-store"))
            assert response.status_code == 200
            assert await response.get_json() == {"status": "ignored", "reason": "unknown_instance"}
            assert (await get(client, "/memory"))[1] == {}
            assert (await service.store.listing(now=time.time(), limit=10)).total == 0
            assert await service.store.pending_inbox() == [] and len(service.registry) == 0  # type: ignore[arg-type]
            assert llm.requests == [] and evolution.requests == []


async def test_unknown_instance_served_through_its_own_instance_only(tmp_path: Path) -> None:
    """UNKNOWN_INSTANCES=serve: the global settings answer, through the webhook's own instance only."""
    llm = OpenAIFake(default=model)
    evolution = FakeEvolution(api_key="global-key", instance_keys=KEYS)
    krayin = FakeKrayin(token=KRAYIN_TOKEN)
    async with running_server(llm) as llm_url, running_server(evolution) as evo_url, \
            running_server(krayin) as krayin_url:
        base, instances = two_tenants(tmp_path, llm_url, evo_url, krayin_url, UNKNOWN_INSTANCES="serve")
        async with serving(base, instances) as (service, client):
            await client.post("/webhook", json=webhook("hola", "gamma-store"))
            await wait_for(lambda: len(evolution.sent) == 1)
            assert {c.instance for c in evolution.calls("/message/sendText/")} <= {"gamma-store", "id-gamma-store"}
            assert evolution.sent[0].headers["apikey"] == "global-key"
            assert llm.requests[0].json["messages"][0]["content"] != PROMPTS[ACME]
            await client.post("/webhook", json=webhook("hola", ACME))
            await wait_for(lambda: len(evolution.sent) == 2)
            # a reply is counted once its send is settled, just after Evolution received it
            replied = 'agent_instance_replies_out_total{instance="acme-bot"} 1.0'
            with trio.fail_after(10):
                while replied not in (metrics := await (await client.get("/metrics")).get_data(as_text=True)):
                    await trio.sleep(0.02)
            # the instance label: configured instances by name, the rest "other" (bounded)
            assert 'agent_instance_messages_in_total{instance="other"} 1.0' in metrics
            assert 'agent_instance_replies_out_total{instance="acme-bot"} 1.0' in metrics
            assert 'agent_instance_turns_total{instance="other"} 1.0' in metrics
            assert "gamma-store" not in metrics


async def test_tenants_replace_takes_effect_from_the_next_turn(tmp_path: Path) -> None:
    llm = OpenAIFake(default=model)
    evolution = FakeEvolution(api_key="global-key", instances={ACME, BETA}, instance_keys=KEYS)
    krayin = FakeKrayin(token=KRAYIN_TOKEN)
    async with running_server(llm) as llm_url, running_server(evolution) as evo_url, \
            running_server(krayin) as krayin_url:
        base, instances = two_tenants(tmp_path, llm_url, evo_url, krayin_url)
        async with serving(base, instances) as (service, client):
            await client.post("/webhook", json=webhook("uno", ACME))
            await wait_for(lambda: len(evolution.sent) == 1)
            changed = make_settings(tmp_path, **{**_env_of(instances[ACME]), "AGENT_INSTRUCTION": "Nuevo prompt de Acme"})
            service.tenants.replace({**instances, ACME: changed})
            await client.post("/webhook", json=webhook("dos", ACME))
            await wait_for(lambda: len(evolution.sent) == 2)
            assert [r.json["messages"][0]["content"] for r in llm.requests] == [PROMPTS[ACME], "Nuevo prompt de Acme"]


def _env_of(settings: Settings) -> dict[str, str]:
    """The environment that gives ``settings``' LLM, outbound and CRM connection (for a variant)."""
    return {"LLM_PROVIDER": "openai", "OPENAI_API_KEY": settings.llm.openai_api_key,
            "OPENAI_BASE_URL": settings.llm.openai_base_url, "EVOLUTION_API_URL": settings.outbound.evolution_api_url,
            "EVOLUTION_API_KEY": settings.outbound.evolution_api_key, "CRM_AUTO_REGISTER": "true",
            "KRAYIN_API_URL": settings.crm.krayin_api_url, "KRAYIN_API_TOKEN": settings.crm.krayin_api_token,
            "GOOGLE_BOOKING_URL": settings.conversation.google_booking_url}


# -- migration -------------------------------------------------------------------------------------

class SchemaFiveStore(SqliteStore):
    """The store as schema version 5 wrote it: the same statements, keys being JIDs."""

    def __init__(self, path: Path) -> None:
        SqliteEngine.__init__(self, path, migrations={n: MIGRATIONS[n] for n in range(1, 6)}, kind="an agent store")
        self.dedupe_ttl = 86400.0


async def write_schema_five(path: Path) -> list[str]:
    """Three chats (one with its booking link sent) and a pending inbox row, written by schema 5."""
    store = SchemaFiveStore(path)
    await store.open()
    jids = [f"54911000000{i}@s.whatsapp.net" for i in range(3)]
    for i, jid in enumerate(jids):
        state = ConversationState()
        for n in range(i + 2):
            state.window.append(WindowEntry("user" if n % 2 == 0 else "assistant", f"m{n}", 1769000000.0 + n))
        state.booking_sent = i == 1
        state.instance = "prueba-py-agent"
        state.last_activity = time.time()
        await store.commit(jid, state.to_bytes(), StateMeta(last_activity=state.last_activity, size=len(state.window),
                                                            scope="prueba-py-agent"))
    await store.close()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (5,)
    return jids


async def test_schema_five_database_keeps_every_chat_under_the_default_instance(tmp_path: Path) -> None:
    path = tmp_path / "data" / "agent.sqlite3"
    jids = await write_schema_five(path)
    store = SqliteStore(path, legacy_key_prefix="default/", legacy_scope="default")
    await store.open()
    try:
        assert sorted(await store.sizes()) == sorted(f"default/{j}" for j in jids)
        assert json.loads(await store.load(f"default/{jids[1]}") or b"{}")["booking_sent"] is True
        page = await store.listing(now=time.time(), scope="default", search="default/5491100")
        assert page.total == 3 and page.scopes == ["default"]
    finally:
        await store.close()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (6,)


@pytest.mark.slow
async def test_schema_five_database_through_real_restarts(tmp_path: Path) -> None:
    """A real process opens a schema-5 database: every chat keeps its window and booking flag under
    the default instance, answers go on in the same conversation, and so after a restart."""
    jids = await write_schema_five(tmp_path / "data" / "agent.sqlite3")
    llm = OpenAIFake(default=model)
    evolution = FakeEvolution(api_key="k")
    async with running_server(llm) as llm_url, running_server(evolution) as evo_url:
        env = {
            "LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm_url + "/v1",
            "EVOLUTION_API_URL": evo_url, "EVOLUTION_API_KEY": "k", "STORE": "sqlite",
            "DATA_DIR": str(tmp_path / "data"), "LOG_DIR": str(tmp_path / "logs"), "TYPING_PRESENCE": "false",
            "OUTBOUND_MIN_GAP_SECONDS": "0", "OUTBOUND_RATE_PER_INSTANCE": "0", "REORDER_DELAY_SECONDS": "0",
        }
        for run in range(2):
            with ServiceProcess(env, tmp_path / f"service{run}.log") as service:
                service.start()
                await service.wait_ready()
                async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
                    memory = (await client.get("/memory")).json()
                    assert memory == {jid: i + 2 + 2 * run for i, jid in enumerate(jids)}
                    for i, jid in enumerate(jids):
                        body = (await client.get(f"/actors/{jid}")).json()
                        assert body["state"]["instance"] == "default"
                        assert body["state"]["booking_sent"] is (i == 1 and run == 0)
                    for i, jid in enumerate(jids):
                        payload = upsert(f"pregunta {run}", jid=jid, instance="default")
                        if i == 1:   # a webhook naming no instance is the default instance's
                            del payload["instance"]
                        assert (await client.post("/webhook", json=payload)).json() == {
                            "status": "accepted", "jid": jid, "instance": "default"}
                    await _wait_http(lambda: len(evolution.sent) == 3 * (run + 1))
                assert await service.terminate() == 0
        assert sorted(r.json["number"] for r in evolution.sent) == sorted(jids * 2)


async def _wait_http(condition: Any, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


# -- load ------------------------------------------------------------------------------------------

@pytest.mark.slow   # 16 s measured on the shared 2-core machine (load 4.6); 30 s once under more load
async def test_twenty_instances_each_reply_once_to_its_own_instance_in_order(tmp_path: Path) -> None:
    """20 instances × 25 chats (the same 25 customers in every instance) × 4 messages, posted at once:
    every reply exactly once, through its own instance with its own key, with its own system
    prompt, in per-chat order."""
    from tests.conftest import chain_of
    from tests.doubles import ScriptedProvider

    names = [f"shop-{i:02d}" for i in range(20)]
    jids = [f"54911{j:08d}@s.whatsapp.net" for j in range(25)]
    keys = {name: f"key-{name}" for name in names}
    evolution = FakeEvolution(api_key="global-key", instances=set(names), instance_keys=keys)
    provider = ScriptedProvider(lambda p: f"{p.system}|{p.messages[-1].content}", latency=lambda p: 0.01)
    async with running_server(evolution) as evo_url:
        # a generous HTTP timeout: on a loaded machine a slow send must not be retried into a duplicate
        common = {"EVOLUTION_API_URL": evo_url, "EVOLUTION_API_KEY": "global-key", "STORE": "sqlite",
                  "HTTP_TIMEOUT": "60"}
        base = make_settings(tmp_path, **common)
        instances = {name: make_settings(tmp_path, **{**common, "AGENT_INSTRUCTION": f"prompt of {name}",
                                                      "EVOLUTION_API_KEY": keys[name]}) for name in names}
        service = Service(base, instances=instances, chain=chain_of(base, provider))
        app = create_app(base, service)
        app.test_client_class = LoopbackClient
        async with app.test_app() as test_app:
            client = test_app.test_client()
            statuses: list[int] = []

            async def chat(name: str, jid: str) -> None:
                for n in range(4):   # one chat's messages in order, every chat at once
                    payload = webhook(f"{name}:{jid}:m{n}", name, jid=jid, timestamp=1769000000 + n)
                    statuses.append((await client.post("/webhook", json=payload)).status_code)

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for name in names:
                    for jid in jids:
                        nursery.start_soon(chat, name, jid)
            total = len(names) * len(jids) * 4
            await wait_for(lambda: len(evolution.sent) >= total, timeout=60)
            elapsed = time.perf_counter() - started
            print(f"\nload: {len(names)} instances x {len(jids)} chats x 4 messages = {total} messages, "
                  f"every reply sent in {elapsed:.2f} s ({total / elapsed:.0f} msg/s)")
            await trio.sleep(0.2)
    assert statuses == [200] * total
    assert len(evolution.sent) == total                                  # each reply once
    per_chat: dict[tuple[str, str], list[str]] = defaultdict(list)
    for sent in evolution.sent:
        name = sent.instance
        assert sent.path == f"/message/sendText/{name}" and sent.headers["apikey"] == keys[name]
        system, _, text = sent.json["text"].partition("|")
        assert system == f"prompt of {name}" and text.startswith(f"{name}:{sent.json['number']}:")
        per_chat[(name, sent.json["number"])].append(text.rsplit(":", 1)[1])
    assert len(per_chat) == len(names) * len(jids)
    assert all(order == ["m0", "m1", "m2", "m3"] for order in per_chat.values())
    # no send ever tried another instance (not even as a failing candidate)
    for call in evolution.calls("/message/sendText/"):
        assert call.json["text"].startswith(f"prompt of {call.instance}|") or call.instance.startswith("id-")


async def test_a_reload_naming_new_llm_settings_starts_its_chain(tmp_path: Path) -> None:
    """Chains are one per distinct LLM section, run by Tenants.run (a reload's new one too) until it ends."""
    from actors.llm.accounts import ChainPool
    from actors.tenants import Tenants

    base = make_settings(tmp_path)
    same_llm = make_settings(tmp_path, AGENT_INSTRUCTION="otro prompt")
    other_llm = make_settings(tmp_path, LLM_PROVIDER_FALLBACK="offline", LLM_PROVIDER="ollama")
    pool = ChainPool()
    tenants = Tenants(base, {ACME: same_llm}, chain_factory=lambda s: pool.chain_for(s, "polite"))
    assert tenants.for_instance(ACME).chain is tenants.default.chain          # same LLM section: shared
    assert tenants.for_instance("gamma").configured is False and tenants.for_instance("gamma").settings is base
    async with trio.open_nursery() as nursery:
        await nursery.start(tenants.run)
        tenants.replace({ACME: same_llm, BETA: other_llm})
        beta = tenants.for_instance(BETA).chain
        assert beta is not tenants.default.chain and len(tenants.chains()) == 2
        await wait_for(lambda: beta._nursery is not None)                   # started by the reload
        nursery.cancel_scope.cancel()
    assert beta._nursery is None                                              # stopped with Tenants.run


async def test_the_crm_switch_is_each_instances(tmp_path: Path) -> None:
    """CRM_AUTO_REGISTER on for acme-bot only: its booking registers a lead, beta-shop's does not."""
    from tests.conftest import chain_of
    from tests.doubles import ScriptedProvider

    krayin = FakeKrayin(token=KRAYIN_TOKEN)
    provider = ScriptedProvider(lambda p: '{"accion": "reserva", "motivo": "demo"}')
    async with running_server(krayin) as krayin_url:
        common = {"KRAYIN_API_URL": krayin_url + "/api/v1", "KRAYIN_API_TOKEN": KRAYIN_TOKEN,
                  "GOOGLE_BOOKING_URL": "https://calendar.app.google/x"}
        base = make_settings(tmp_path, **common, CRM_AUTO_REGISTER="false")
        instances = {ACME: make_settings(tmp_path, **common, CRM_AUTO_REGISTER="true"), BETA: base}
        service = Service(base, instances=instances, chain=chain_of(base, provider))
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            for instance in (ACME, BETA):
                assert (await service.intake(webhook("quiero una cita", instance))).status == 200
            await wait_for(lambda: service.per_instance.get(ACME, [0, 0])[1] == 1
                           and service.per_instance.get(BETA, [0, 0])[1] == 1)
            await wait_for(lambda: len(krayin.calls_to("POST", "/leads")) == 1)
            await trio.sleep(0.2)
            assert len(krayin.calls_to("POST", "/leads")) == 1
            registry = service.registry
            assert registry is not None
            lead_of = lambda instance: registry.actor(ConversationKey(instance, JID).key).state.lead.lead_id  # noqa: E731
            await wait_for(lambda: lead_of(ACME) is not None)   # type: ignore[union-attr]
            assert lead_of(BETA) is None                         # type: ignore[union-attr]
            nursery.cancel_scope.cancel()
