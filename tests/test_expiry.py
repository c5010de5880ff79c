"""Idle expiry through the whole service with the SQLite store: the actor stops and its rows are deleted."""

from __future__ import annotations

import trio

from tests.conftest import key_of, make_settings, running_service, wait_for
from tests.doubles import ScriptedProvider
from tests.payloads import upsert

JID = "5491131376731@s.whatsapp.net"


async def test_idle_chat_is_forgotten_with_its_rows(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, STORE="sqlite", ACTOR_IDLE_TTL=1)
    async with running_service(settings, ScriptedProvider()) as service:
        assert service.outbound is not None and service.registry is not None
        await service.intake(upsert("hola"))
        await service.intake(upsert("hola", jid="5490000000001@s.whatsapp.net"))
        await wait_for(lambda: len(service.outbound.outbox_entries()) == 2)
        assert await service.store.load(key_of(JID)) is not None
        await wait_for(lambda: key_of(JID) not in service.registry, timeout=5)              # the sweeper runs every 1 s
        assert await service.store.load(key_of(JID)) is None
        assert await service.store.pending_inbox() == [] and await service.store.pending_outbox() == []
        await service.intake(upsert("volví"))                                         # a fresh conversation
        await wait_for(lambda: len(service.outbound.outbox_entries(jid=JID)) == 2)
        found = await service.conversation_state(JID)
        assert found is not None and len(found[0]["window"]) == 2


async def test_stored_conversations_expire_even_if_never_reactivated(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """After a restart, a chat that is only in the store (not live) is deleted by the sweep too."""
    settings = make_settings(tmp_path, STORE="sqlite", ACTOR_IDLE_TTL=3600)
    async with running_service(settings, ScriptedProvider()) as service:
        await service.intake(upsert("hola"))
        await wait_for(lambda: len(service.outbound.outbox_entries()) == 1)  # type: ignore[union-attr]
    settings = make_settings(tmp_path, STORE="sqlite", ACTOR_IDLE_TTL=1)
    async with running_service(settings, ScriptedProvider()) as service:
        assert await service.store.load(key_of(JID)) is not None
        assert key_of(JID) not in service.registry  # type: ignore[operator]
        store = service.store
        with trio.fail_after(5):
            while await store.load(key_of(JID)) is not None:
                await trio.sleep(0.1)


async def test_undeliverable_reply_is_a_persisted_dead_letter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.fakes.evolution import FakeEvolution
    from tests.fakes.server import running_server

    evolution = FakeEvolution(api_key="the-right-key", instances={"prueba-py-agent"})
    async with running_server(evolution) as evo_url:
        settings = make_settings(tmp_path, STORE="sqlite", EVOLUTION_API_URL=evo_url, EVOLUTION_API_KEY="a-wrong-key")
        async with running_service(settings, ScriptedProvider()) as service:
            await service.intake(upsert("hola"))
            await wait_for(lambda: service.outbound.statistics().failed == 1)  # type: ignore[union-attr]
        async with running_service(settings, ScriptedProvider()) as service:   # after a restart
            dead = await service.store.dead_letters()
            assert len(dead) == 1 and dead[0].key == key_of(JID) and dead[0].payload["text"] == "re: hola"
            assert "401" in dead[0].reason
            assert await service.store.pending_outbox() == []                  # not re-sent at start-up
