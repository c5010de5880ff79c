"""Operator-facing conversation features (docs/behaviour.md §3): debounce, reordering, human takeover, resets,
lists, media, LID addressing, quoted context, admin pause/resume/reset."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from actors.service import Service
from app import create_app
from tests.conftest import LoopbackClient, key_of, make_settings, running_service, wait_for
from tests.doubles import ScriptedProvider
from tests.payloads import upsert

JID = "5491131376731@s.whatsapp.net"


def replies(service: Service, jid: str = JID) -> list[str]:
    assert service.outbound is not None
    return [e.text for e in service.outbound.outbox_entries(jid=jid, limit=100000)]


def window(service: Service, jid: str = JID) -> list[tuple[str, str]]:
    actor = service.registry.actor(key_of(jid))  # type: ignore[union-attr]
    return [(e.role, e.content) for e in actor.state.window]  # type: ignore[union-attr]


def handled(service: Service, jid: str = JID) -> int:
    actor = service.registry.actor(key_of(jid)) if service.registry is not None else None
    return actor.state.messages_in if actor is not None else 0  # type: ignore[union-attr]


async def post(service: Service, payload: dict[str, Any]) -> dict[str, Any]:
    result = await service.intake(payload)
    assert result.status == 200, result
    return result.body


async def test_debounce_merges_a_burst_into_one_turn(tmp_path) -> None:  # type: ignore[no-untyped-def]
    provider = ScriptedProvider()
    async with running_service(make_settings(tmp_path, DEBOUNCE_SECONDS=1), provider) as service:
        for i, text in enumerate(["hola", "quería saber", "el precio", "del servicio"]):
            await post(service, upsert(text, timestamp=1769000000 + i))
            await trio.sleep(0.1)
        await wait_for(lambda: len(replies(service)) == 1)
        await trio.sleep(0.2)
        assert len(provider.prompts) == 1
        assert provider.prompts[0].messages[-1].content == "hola\nquería saber\nel precio\ndel servicio"
        assert replies(service) == ["re: hola\nquería saber\nel precio\ndel servicio"]
        assert window(service) == [("user", "hola"), ("user", "quería saber"), ("user", "el precio"),
                                   ("user", "del servicio"), ("assistant", replies(service)[0])]


async def test_without_debounce_each_message_is_answered_in_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    provider = ScriptedProvider()
    async with running_service(make_settings(tmp_path, DEBOUNCE_SECONDS=0), provider) as service:
        for i, text in enumerate(["a", "b", "c", "d"]):
            await post(service, upsert(text, timestamp=1769000000 + i))
        await wait_for(lambda: len(replies(service)) == 4)
        assert replies(service) == ["re: a", "re: b", "re: c", "re: d"]
        assert len(provider.prompts) == 4


async def test_reverse_arrival_is_handled_in_timestamp_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    provider = ScriptedProvider()
    async with running_service(make_settings(tmp_path, REORDER_DELAY_SECONDS=0.3), provider) as service:
        for i in reversed(range(4)):
            await post(service, upsert(f"m{i}", timestamp=1769000000 + i))
        await wait_for(lambda: len(replies(service)) == 4)
        assert replies(service) == ["re: m0", "re: m1", "re: m2", "re: m3"]
        # other chats are never reordered against each other: each is its own actor
        await post(service, upsert("x", jid="5490000000002@s.whatsapp.net", timestamp=1))
        await wait_for(lambda: replies(service, "5490000000002@s.whatsapp.net") == ["re: x"])


async def test_human_takeover_silences_the_bot_until_timeout(tmp_path, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    provider = ScriptedProvider()
    async with running_service(make_settings(tmp_path, HUMAN_TAKEOVER_MINUTES=60), provider) as service:
        await post(service, upsert("hola"))
        await wait_for(lambda: len(replies(service)) == 1)
        await post(service, upsert("Hola Juan, soy Ana de la tienda", from_me=True))
        for i in range(3):
            await post(service, upsert(f"pregunta {i}"))
        await wait_for(lambda: handled(service) == 4)
        assert len(replies(service)) == 1 and len(provider.prompts) == 1
        assert ("operator", "Hola Juan, soy Ana de la tienda") in window(service)
        assert window(service)[-1] == ("user", "pregunta 2")
        assert service.registry.actor(key_of(JID)).state.window[2].human is True  # type: ignore[union-attr]
        await trio.sleep(61 * 60)
        await post(service, upsert("¿siguen ahí?"))
        await wait_for(lambda: len(replies(service)) == 2)
        assert replies(service)[-1] == "re: ¿siguen ahí?"
        # the model sees the person's words as the business's (assistant) turn
        assert ("assistant", "Hola Juan, soy Ana de la tienda") in [(m.role, m.content) for m in provider.prompts[-1].messages]


async def test_operator_hands_back_with_keyword(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with running_service(make_settings(tmp_path), ScriptedProvider()) as service:
        await post(service, upsert("yo me encargo", from_me=True))
        await post(service, upsert("hola"))
        await wait_for(lambda: handled(service) == 1)
        assert replies(service) == []
        await post(service, upsert("#bot", from_me=True))
        await post(service, upsert("¿precio?"))
        await wait_for(lambda: replies(service) == ["re: ¿precio?"])
        assert ("assistant", "#bot") not in window(service)


async def test_bots_own_sends_never_trigger_takeover(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with running_service(make_settings(tmp_path), ScriptedProvider()) as service:
        await post(service, upsert("hola"))
        await wait_for(lambda: len(replies(service)) == 1)
        actor = service.registry.actor(key_of(JID))  # type: ignore[union-attr]
        await wait_for(lambda: len(actor.state.sent_ids) == 1)  # type: ignore[union-attr]
        echo_id = actor.state.sent_ids[0]  # type: ignore[union-attr]
        await post(service, upsert(replies(service)[0], from_me=True, message_id=echo_id))
        await post(service, upsert("otra"))
        await wait_for(lambda: len(replies(service)) == 2)
        assert actor.state.paused_until == 0.0  # type: ignore[union-attr]


async def test_customer_reset_keyword(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with running_service(make_settings(tmp_path), ScriptedProvider()) as service:
        await post(service, upsert("hola"))
        await post(service, upsert("Reiniciar"))
        await wait_for(lambda: len(replies(service)) == 2)
        assert replies(service)[1] == service.texts.reset_done
        assert window(service) == [("assistant", service.texts.reset_done)]


async def test_ignore_and_allow_lists(tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = "5490000000003@s.whatsapp.net"
    settings = make_settings(tmp_path, IGNORE_JIDS=f"{other},@lid")
    async with running_service(settings, ScriptedProvider()) as service:
        assert await post(service, upsert("hola", jid=other)) == {"status": "ignored", "reason": "ignore list"}
        assert (await post(service, upsert("hola", jid="123456789012@lid")))["reason"] == "ignore list"
    settings = make_settings(tmp_path, ALLOW_JIDS=JID)
    async with running_service(settings, ScriptedProvider()) as service:
        assert await post(service, upsert("hola", jid=other)) == {"status": "ignored", "reason": "not in allow list"}
        assert (await post(service, upsert("hola")))["status"] == "accepted"


async def test_media_gets_the_configured_reply_or_silence(tmp_path) -> None:  # type: ignore[no-untyped-def]
    provider = ScriptedProvider()
    async with running_service(make_settings(tmp_path), provider) as service:
        await post(service, upsert(None, message={"audioMessage": {"seconds": 4}}))
        await post(service, upsert(None, message={"audioMessage": {"seconds": 4}, "speechToText": "[audio] quiero info"}))
        await wait_for(lambda: len(replies(service)) == 2)
        assert replies(service) == [service.texts.unknown_message, "re: [audio] quiero info"]
        assert len(provider.prompts) == 1
    async with running_service(make_settings(tmp_path, UNKNOWN_MESSAGE_TEXT=""), provider) as service:
        body = await post(service, upsert(None, message={"stickerMessage": {}}))
        assert body == {"status": "ignored", "reason": "no text"}


async def test_groups_when_enabled_give_the_sender_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    group = "120363025246125486@g.us"
    provider = ScriptedProvider()
    async with running_service(make_settings(tmp_path, GROUPS_ENABLED="true"), provider) as service:
        await post(service, upsert("¿abren hoy?", jid=group, participant=JID, push_name="Ana"))
        await wait_for(lambda: len(replies(service, group)) == 1)
        assert provider.prompts[0].messages[-1].content == "Ana: ¿abren hoy?"


async def test_lid_chat_keeps_one_actor_when_phone_jid_appears(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lid = "123456789012345@lid"
    async with running_service(make_settings(tmp_path), ScriptedProvider()) as service:
        await post(service, upsert("hola", jid=lid, addressingMode="lid"))
        await wait_for(lambda: len(replies(service, lid)) == 1)
        await post(service, upsert("sigo yo", jid=lid, remoteJidAlt=JID, addressingMode="lid"))
        await post(service, upsert("desde el número", jid=JID, remoteJidAlt=lid))
        await wait_for(lambda: len(replies(service, lid)) == 2 and len(replies(service, JID)) == 1)
        assert list(service.registry.keys()) == [key_of(lid)]  # type: ignore[union-attr]
        assert [c for r, c in window(service, lid) if r == "user"] == ["hola", "sigo yo", "desde el número"]
        lead = service.registry.actor(key_of(lid)).state.lead  # type: ignore[union-attr]
        assert lead.alt_jid == JID and lead.telefono == "5491131376731"


async def test_lid_mapping_survives_a_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lid = "123456789012345@lid"
    settings = make_settings(tmp_path, STORE="sqlite")
    async with running_service(settings, ScriptedProvider()) as service:
        await post(service, upsert("hola", jid=lid, addressingMode="lid"))
        await wait_for(lambda: len(replies(service, lid)) == 1)
    async with running_service(settings, ScriptedProvider()) as service:
        await post(service, upsert("desde el número", jid=JID, remoteJidAlt=lid))
        await wait_for(lambda: len(replies(service, JID)) == 1)
        assert list(service.registry.keys()) == [key_of(lid)]  # type: ignore[union-attr]
        assert [c for r, c in window(service, lid) if r == "user"] == ["hola", "desde el número"]


async def test_quoted_message_is_given_to_the_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    provider = ScriptedProvider()
    async with running_service(make_settings(tmp_path), provider) as service:
        await post(service, upsert(None, message={"extendedTextMessage": {
            "text": "¿y esto cuánto sale?", "contextInfo": {"quotedMessage": {"conversation": "Plan Pro"}}}}))
        await wait_for(lambda: len(replies(service)) == 1)
        assert provider.prompts[0].messages[-1].content == '[En respuesta a: "Plan Pro"]\n¿y esto cuánto sale?'
        assert window(service)[0] == ("user", "¿y esto cuánto sale?")


async def test_admin_pause_resume_reset(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = create_app(make_settings(tmp_path))
    app.test_client_class = LoopbackClient
    async with app.test_app() as test_app:
        client = test_app.test_client()
        service: Service = app.extensions["service"]
        assert (await client.post(f"/actors/{JID}/pause")).status_code == 404
        await client.post("/webhook", json=upsert("hola"))
        await wait_for(lambda: len(replies(service)) == 1)
        body = await (await client.post(f"/actors/{JID}/pause")).get_json()
        assert body["status"] == "applied" and body["paused_until"] > 0
        assert (await (await client.get(f"/actors/{JID}")).get_json())["state"]["paused_until"] > 0
        await client.post("/webhook", json=upsert("¿hola?"))
        await wait_for(lambda: handled(service) == 2)
        assert len(replies(service)) == 1
        body = await (await client.post(f"/actors/{JID}/resume")).get_json()
        assert body["paused_until"] == 0.0
        body = await (await client.post(f"/actors/{JID}/reset")).get_json()
        assert body["window_size"] == 0 and body["booking_sent"] is False
        assert (await (await client.get(f"/actors/{JID}")).get_json())["state"]["window_size"] == 0
        assert (await client.post(f"/actors/{JID}/explode")).status_code == 404
        assert (await client.post("/actors/garbage/pause")).status_code == 400
