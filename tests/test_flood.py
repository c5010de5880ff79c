"""Flood control (docs/behaviour.md §3.9): a flooder gets at most FLOOD_MAX_PER_MINUTE LLM calls, slows nobody."""

from __future__ import annotations

import statistics

import trio

from tests.conftest import key_of, make_settings, running_service, wait_for
from tests.doubles import ScriptedProvider
from tests.payloads import upsert

FLOODER = "5491100000666@s.whatsapp.net"


async def test_flooder_is_capped_and_others_unaffected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, FLOOD_MAX_PER_MINUTE=20, MAILBOX_SIZE=250)
    provider = ScriptedProvider(latency=lambda p: 0.02)
    others = [f"54911000{i:05d}@s.whatsapp.net" for i in range(20)]
    async with running_service(settings, provider) as service:
        assert service.outbound is not None

        async def chat(jid: str, rounds: int, latencies: list[float]) -> None:
            for i in range(rounds):
                start = trio.current_time()
                await service.intake(upsert(f"pregunta {i}", jid=jid))
                await wait_for(lambda: len(service.outbound.outbox_entries(jid=jid, limit=1000)) == i + 1)  # type: ignore[union-attr]
                latencies.append(trio.current_time() - start)

        baseline: list[float] = []
        async with trio.open_nursery() as nursery:
            for jid in others:
                nursery.start_soon(chat, jid, 3, baseline)

        flood_latencies: list[float] = []
        async with trio.open_nursery() as nursery:
            for i in range(200):
                result = await service.intake(upsert(f"spam {i}", jid=FLOODER))
                assert result.status == 200
            for jid in others:
                nursery.start_soon(chat, jid.replace("54911", "54922"), 3, flood_latencies)

        actor = service.registry.actor(key_of(FLOODER))  # type: ignore[union-attr]
        await wait_for(lambda: actor.state.messages_in == 200)  # type: ignore[union-attr]
        flooder_prompts = [p for p in provider.prompts if p.messages[-1].content.startswith("spam")]
        assert len(flooder_prompts) == 20
        await wait_for(lambda: len(service.outbound.outbox_entries(jid=FLOODER, limit=1000)) >= 21)  # type: ignore[union-attr]
        await trio.sleep(0.05)
        texts = [e.text for e in service.outbound.outbox_entries(jid=FLOODER, limit=1000)]
        assert texts.count(service.texts.flood_notice) == 1          # one notice per minute at most
        assert len(texts) == 21
        assert actor.state.window[-1].content == "spam 199"         # the excess is still in the window  # type: ignore[union-attr]
        assert statistics.median(flood_latencies) < statistics.median(baseline) * 3 + 0.05
