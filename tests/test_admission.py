"""Admission at the webhook (docs/behaviour.md §2.9): past INTAKE_MAX_IN_FLIGHT webhooks waiting for
the store, or past OUTBOUND_MAX_BACKLOG replies waiting to go out, a webhook is answered 503 with
Retry-After at once, before anything is reserved or stored; what was acked is answered exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from actors.service import BACKLOG_RETRY_AFTER, BUSY_RETRY_AFTER, IntakeResult, Service
from app import create_app
from runtime.memory_store import MemoryStore
from tests.conftest import LoopbackClient, chain_of, make_settings, wait_for
from tests.doubles import ScriptedProvider
from tests.fakes.evolution import FakeEvolution
from tests.fakes.server import running_server
from tests.payloads import upsert

KEY = "evo-secret-key-4711"
INSTANCE = "prueba-py-agent"


def chat(n: int) -> str:
    return f"54911{n:08d}@s.whatsapp.net"


class SlowStore(MemoryStore):
    """A MemoryStore whose accepts wait for ``gate`` (a disk that cannot keep up)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.entered: list[str] = []

    async def accept(self, key: str, dedupe_id: str, payload: dict[str, Any]) -> int | None:
        self.entered.append(dedupe_id)
        await self.gate.wait()
        return await super().accept(key, dedupe_id, payload)


async def test_webhooks_past_the_in_flight_bound_get_503_at_once_and_nothing_changes(tmp_path: Path) -> None:
    store = SlowStore()
    settings = make_settings(tmp_path, INTAKE_MAX_IN_FLIGHT=4)
    service = Service(settings, store=store, chain=chain_of(settings, ScriptedProvider()))
    answers: dict[int, IntakeResult] = {}

    async def post(n: int) -> None:
        answers[n] = await service.intake(upsert(f"hola {n}", jid=chat(n), message_id=f"M{n}"))

    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        assert service.registry is not None
        for n in range(4):
            nursery.start_soon(post, n)
        await wait_for(lambda: len(store.entered) == 4)   # four webhooks wait for the store
        with trio.fail_after(0.5):                         # the excess is answered without waiting
            excess = [await service.intake(upsert(f"hola {n}", jid=chat(n), message_id=f"M{n}")) for n in range(4, 7)]
        assert [(r.status, r.body, r.retry_after) for r in excess] == [(503, {"error": "busy"}, BUSY_RETRY_AFTER)] * 3
        assert len(store.entered) == 4                     # nothing of theirs reached the store ...
        assert all(chat(n) not in service.registry for n in range(4, 7))   # ... nor reserved a slot
        assert service.intake_refused == {"busy": 3, "backlog": 0} and service.storing == 4
        store.gate.set()
        await wait_for(lambda: len(answers) == 4)
        assert all(r.status == 200 and r.body["status"] == "accepted" for r in answers.values())
        for n in range(4, 7):                              # Evolution's retry is accepted, once
            assert (await service.intake(upsert(f"hola {n}", jid=chat(n), message_id=f"M{n}"))).body["status"] == "accepted"
        again = await service.intake(upsert("hola 0", jid=chat(0), message_id="M0"))
        assert again.body == {"status": "ignored", "reason": "duplicate"}
        assert service.outbound is not None
        await wait_for(lambda: len(service.outbound.outbox_entries(limit=100)) == 7)
        # idle: no turn running and no reply left to send, so no later reply can come
        await wait_for(lambda: service.outbound.backlog == 0 and service.registry.statistics().running_actors == 0)
        sent = Counter(e.jid for e in service.outbound.outbox_entries(limit=100))
        assert sent == {chat(n): 1 for n in range(7)}     # every acked message answered exactly once
        assert await store.pending_inbox() == [] and service.storing == 0
        nursery.cancel_scope.cancel()


async def test_a_full_outbound_backlog_refuses_new_messages_and_answers_the_accepted(tmp_path: Path) -> None:
    fake = FakeEvolution(api_key=KEY, instances={INSTANCE})
    async with running_server(fake) as url:
        settings = make_settings(tmp_path, EVOLUTION_API_URL=url, EVOLUTION_API_KEY=KEY, EVOLUTION_INSTANCE=INSTANCE,
                                 OUTBOUND_RATE_PER_INSTANCE="0.5", OUTBOUND_MAX_BACKLOG="2")
        app = create_app(settings)
        app.test_client_class = LoopbackClient
        async with app.test_app() as test_app:
            client = test_app.test_client()
            svc: Service = app.extensions["service"]
            assert svc.outbound is not None
            for n in range(3):   # the first reply takes the pacing slot at once, the next two wait 2 and 4 s
                response = await client.post("/webhook", json=upsert(f"hola {n}", jid=chat(n)))
                assert (await response.get_json())["status"] == "accepted"
            await wait_for(lambda: svc.outbound.backlog == 2 and len(fake.sent) == 1)
            refused = await client.post("/webhook", json=upsert("hola 3", jid=chat(3), message_id="LATE"))
            assert refused.status_code == 503 and refused.headers["Retry-After"] == str(BACKLOG_RETRY_AFTER)
            assert await refused.get_json() == {"error": "outbound backlog full"}
            assert chat(3) not in svc.registry and svc.intake_refused["backlog"] == 1

            outbound = (await (await client.get("/supervisors")).get_json())["outbound"]
            assert outbound["backlog"] == 2 and outbound["pacing_waiting"] >= 1
            assert 0 < outbound["backlog_oldest_seconds"] < 5
            text = await (await client.get("/metrics")).get_data(as_text=True)
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(text) for s in family.samples}
            assert samples[("agent_outbound_backlog", ())] == 2
            assert samples[("agent_outbound_backlog_oldest_seconds", ())] > 0
            assert samples[("agent_intake_refused_total", (("reason", "backlog"),))] == 1
            assert samples[("agent_webhook_ack_seconds_count", (("outcome", "unavailable"),))] == 1

            await wait_for(lambda: svc.outbound.backlog == 0, timeout=10)   # the accepted ones still go out
            retried = await client.post("/webhook", json=upsert("hola 3", jid=chat(3), message_id="LATE"))
            assert (await retried.get_json())["status"] == "accepted"
            await wait_for(lambda: len(fake.sent) == 4, timeout=10)
            await wait_for(lambda: svc.outbound.backlog == 0 and svc.registry.statistics().running_actors == 0)
            assert Counter(r.json["number"] for r in fake.sent) == {chat(n): 1 for n in range(4)}
            assert svc.outbound.statistics().backlog_oldest_seconds == 0.0
