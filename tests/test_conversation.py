"""The conversation actor through the service (no HTTP): order, isolation, window, booking, crashes."""

from __future__ import annotations

import json
import logging

import trio

from actors.llm.base import Prompt
from actors.service import Service
from tests.conftest import chain_of, key_of, make_settings, running_service, wait_for
from tests.doubles import CrashingChain, ScriptedProvider, random_latency
from tests.payloads import upsert

JID = "5491131376731@s.whatsapp.net"
BOOKING_URL = "https://calendar.app.google/uxYJoEeZvCWoT3269"


def replies(service: Service, jid: str = JID) -> list[str]:
    assert service.outbound is not None
    return [e.text for e in service.outbound.outbox_entries(jid=jid, limit=100000)]


async def post(service: Service, payload: dict) -> dict:  # type: ignore[type-arg]
    result = await service.intake(payload)
    assert result.status == 200, result
    return result.body


async def exchanges(service: Service, count: int) -> None:
    """``count`` customer messages q0, q1, ..., each posted once the previous one was answered."""
    for i in range(count):
        await post(service, upsert(f"q{i}"))
        await wait_for(lambda: len(replies(service)) == i + 1)


async def test_strict_order_with_random_latency(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, MAILBOX_SIZE=250)
    provider = ScriptedProvider(lambda p: f"reply {p.messages[-1].content}", latency=random_latency(0.0, 0.01))
    async with running_service(settings, provider) as service:
        for i in range(200):
            await post(service, upsert(f"m{i}", timestamp=1769000000 + i))
        await wait_for(lambda: len(replies(service)) == 200, timeout=30)
        assert replies(service) == [f"reply m{i}" for i in range(200)]
        found = await service.conversation_state(JID)
        assert found is not None
        window = found[0]["window"]
        assert len(window) == 50
        assert [c for _, c, *_ in window] == [x for i in range(175, 200) for x in (f"m{i}", f"reply m{i}")]


async def test_hanging_llm_for_one_jid_does_not_delay_others(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, LLM_TIMEOUT=600, TURN_DEADLINE_SECONDS=600)
    release = trio.Event()
    slow = "5490000000001@s.whatsapp.net"

    async def hook(prompt: Prompt) -> None:
        if prompt.messages[-1].content == "hang":
            await release.wait()

    provider = ScriptedProvider(hook=hook)
    async with running_service(settings, provider) as service:
        await post(service, upsert("hang", jid=slow))
        others = [f"54911{i:08d}@s.whatsapp.net" for i in range(100)]
        for jid in others:
            await post(service, upsert("hola", jid=jid))
        await wait_for(lambda: all(replies(service, jid) == ["re: hola"] for jid in others))
        assert replies(service, slow) == []
        release.set()
        await wait_for(lambda: replies(service, slow) == ["re: hang"])


async def test_window_keeps_last_50_and_prompt_is_bounded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path)
    provider = ScriptedProvider()
    async with running_service(settings, provider) as service:
        await exchanges(service, 30)
        found = await service.conversation_state(JID)
        assert found is not None
        contents = [c for _, c, *_ in found[0]["window"]]
        assert len(contents) == 50
        assert contents[0] == "q5" and contents[-1] == "re: q29"
        assert max(len(p.messages) for p in provider.prompts) <= settings.conversation.max_messages
        assert provider.prompts[-1].messages[-1].content == "q29"
        last = provider.prompts[-1].messages
        assert [(m.role, m.content) for m in last[-3:]] == [("user", "q28"), ("assistant", "re: q28"), ("user", "q29")]


async def test_idle_actor_hibernates_its_window_and_thaws_for_the_next_turn(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path)
    provider = ScriptedProvider()
    async with running_service(settings, provider) as service:
        await exchanges(service, 30)
        assert service.registry is not None
        actor = service.registry.actor(key_of(JID))
        await wait_for(lambda: actor.state.window.hibernating)  # type: ignore[union-attr]
        stats = service.registry.actor_statistics(key_of(JID))
        assert stats is not None and stats.state.window_size == 50
        shown = actor.messages()  # type: ignore[union-attr]
        assert [m["content"] for m in shown][-2:] == ["q29", "re: q29"] and len(shown) == 50
        assert actor.state.window.hibernating  # type: ignore[union-attr]   # admin reads do not thaw
        await post(service, upsert("q30"))
        await wait_for(lambda: len(replies(service)) == 31)
        assert [m.content for m in provider.prompts[-1].messages[-3:]] == ["q29", "re: q29", "q30"]
        found = await service.conversation_state(JID)
        assert found is not None
        assert [c for _, c, *_ in found[0]["window"]][-3:] == ["re: q29", "q30", "re: q30"]


async def test_truncation_is_logged(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, MAX_MESSAGES=4)
    caplog.set_level(logging.INFO, logger="actors")
    async with running_service(settings, ScriptedProvider()) as service:
        for i in range(3):
            await post(service, upsert(f"q{i}"))
        await wait_for(lambda: len(replies(service)) == 3)
    assert "Truncated memory: 6 → 4 messages" in caplog.text


def _booking_provider() -> ScriptedProvider:
    def answer(prompt: Prompt) -> str:
        text = prompt.messages[-1].content
        if "cita" in text and "cambiar" not in text:
            return '```json\n{"accion": "reserva", "motivo": "consulta"}\n```'
        return f"re: {text}"

    return ScriptedProvider(answer)


async def test_seed_booking_dialogue(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, GOOGLE_BOOKING_URL=BOOKING_URL)
    provider = _booking_provider()
    caplog.set_level(logging.INFO, logger="actors")
    async with running_service(settings, provider) as service:
        await post(service, upsert("Quiero agendar una cita"))
        await wait_for(lambda: len(replies(service)) == 1)
        link = replies(service)[0]
        assert link.startswith("📅 *Agenda tu cita aquí*") and BOOKING_URL in link
        assert link.endswith("¿Necesitas ayuda con algo más?")
        state, _ = await service.conversation_state(JID)  # type: ignore[misc]
        assert state["booking_sent"] is True

        calls = len(provider.prompts)
        await post(service, upsert("gracias"))
        await wait_for(lambda: (service.registry.actor(key_of(JID)).state.messages_in == 2))  # type: ignore[union-attr]
        assert len(provider.prompts) == calls          # no LLM call
        assert len(replies(service)) == 1              # no reply
        state, _ = await service.conversation_state(JID)  # type: ignore[misc]
        assert state["window"][-1][1] == "gracias"     # still kept in the window
        assert state["booking_sent"] is True

        await post(service, upsert("¿puedo cambiar la fecha?"))
        await wait_for(lambda: len(replies(service)) == 2)
        assert replies(service)[1] == "re: ¿puedo cambiar la fecha?"
        state, _ = await service.conversation_state(JID)  # type: ignore[misc]
        assert state["booking_sent"] is False
    text = caplog.text
    assert "[BOOKING] Generando link de reserva - Motivo: consulta" in text
    assert f"[BOOKING] Conversación marcada como completada para user_id={JID}" in text
    assert "[BOOKING] Conversación finalizada. Mensaje genérico ignorado: gracias" in text
    assert "[BOOKING] Nueva pregunta después del link, continuando conversación: ¿puedo cambiar la fecha?" in text


async def test_booking_without_url_says_unavailable(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, GOOGLE_BOOKING_URL="")
    caplog.set_level(logging.WARNING, logger="actors")
    async with running_service(settings, _booking_provider()) as service:
        await post(service, upsert("necesito una cita"))
        await wait_for(lambda: len(replies(service)) == 1)
        assert replies(service)[0] == service.texts.booking_unavailable
    assert "GOOGLE_BOOKING_URL" in caplog.text


async def test_offline_provider_books_through_the_real_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, GOOGLE_BOOKING_URL=BOOKING_URL)
    async with running_service(settings) as service:
        await post(service, upsert("Hola, quiero reservar un turno"))
        await wait_for(lambda: len(replies(service)) == 1)
        assert BOOKING_URL in replies(service)[0]
        await post(service, upsert("What are your opening hours?"))
        await wait_for(lambda: len(replies(service)) == 2)
        assert "What are your opening hours?" in replies(service)[1]
        assert "Thanks" in replies(service)[1]


async def test_crash_answers_politely_and_keeps_window(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, RESTART_INTENSITY=2, RESTART_PERIOD=60)
    other = "5490000000009@s.whatsapp.net"
    chain = CrashingChain(chain_of(settings, ScriptedProvider()))
    async with running_service(settings, chain=chain) as service:
        await post(service, upsert("first"))
        await wait_for(lambda: len(replies(service)) == 1)
        await post(service, upsert("crash 1"))
        await post(service, upsert("after"))
        await post(service, upsert("hola", jid=other))
        await wait_for(lambda: len(replies(service)) == 3 and replies(service, other) == ["re: hola"])
        polite = service.texts.polite_error
        assert replies(service) == ["re: first", polite, "re: after"]
        state, _ = await service.conversation_state(JID)  # type: ignore[misc]
        assert [c for _, c, *_ in state["window"]] == ["first", "re: first", "crash 1", polite, "after", "re: after"]
        # a crash loop stops at the intensity limit: the actor is failed, messages still answered politely
        for i in range(4):
            await post(service, upsert(f"crash {i + 2}"))
        await post(service, upsert("while failed"))
        await wait_for(lambda: len(replies(service)) == 8)
        assert replies(service)[3:] == [polite] * 5
        stats = service.registry.actor_statistics(key_of(JID))  # type: ignore[union-attr]
        assert stats is not None and stats.status == "failed" and stats.crashes == 3


async def test_duplicate_message_id_answered_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path)
    async with running_service(settings, ScriptedProvider()) as service:
        payload = upsert("hola", message_id="3EB0DUPLICATE")
        bodies = [(await service.intake(json.loads(json.dumps(payload)))).body for _ in range(3)]
        assert bodies[0]["status"] == "accepted"
        assert bodies[1] == bodies[2] == {"status": "ignored", "reason": "duplicate"}
        await wait_for(lambda: len(replies(service)) == 1)
        await trio.sleep(0.05)
        assert len(replies(service)) == 1


async def test_mailbox_full_answers_503(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, MAILBOX_SIZE=3, LLM_TIMEOUT=600, TURN_DEADLINE_SECONDS=600)
    release = trio.Event()

    async def hook(prompt: Prompt) -> None:
        await release.wait()

    async with running_service(settings, ScriptedProvider(hook=hook)) as service:
        first = await service.intake(upsert("m0"))
        await wait_for(lambda: service.registry.actor_statistics(key_of(JID)).mailbox_depth == 0)  # type: ignore[union-attr]
        statuses = [first.status] + [(await service.intake(upsert(f"m{i}"))).status for i in range(1, 6)]
        # one in the running turn, three queued, then 503 with Retry-After
        assert statuses == [200, 200, 200, 200, 503, 503]
        result = await service.intake(upsert("again"))
        assert result.status == 503 and result.retry_after
        release.set()
        await wait_for(lambda: len(replies(service)) == 4)
