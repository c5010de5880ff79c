"""Customers' photos through the whole service: fetched from Evolution (or the webhook's base64),
sent to each provider through its real SDK against the fakes, the window keeping a placeholder."""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest

from actors.service import Service
from tests.conftest import make_settings, running_service, wait_for
from tests.fakes.evolution import FakeEvolution, StoredMedia
from tests.fakes.llm import TINY_PNG, AnthropicFake, Fail, FakeAPI, GeminiFake, OpenAIFake, Reply
from tests.fakes.server import running_server
from tests.payloads import image_upsert, upsert

JID = "5491131376731@s.whatsapp.net"
INSTANCE = "prueba-py-agent"
KEY = "sk-test-media"
ENV = {
    "openai": lambda url: {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": url, "OPENAI_MODEL": "gpt-4o"},
    "anthropic": lambda url: {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": url},
    "gemini": lambda url: {"GEMINI_API_KEY": KEY, "GEMINI_BASE_URL": url},
}
FAKES = {"openai": OpenAIFake, "anthropic": AnthropicFake, "gemini": GeminiFake}


def image_parts(name: str, request_json: dict[str, Any]) -> list[dict[str, Any]]:
    """The image parts of a request's last message, in the API's shape."""
    if name == "openai":
        content = request_json["messages"][-1]["content"]
        return [p for p in content if isinstance(content, list) and p["type"] == "image_url"]
    if name == "anthropic":
        return [b for b in request_json["messages"][-1]["content"] if b["type"] == "image"]
    return [p for p in request_json["contents"][-1]["parts"] if "inlineData" in p]


def sent_texts(evolution: FakeEvolution) -> list[str]:
    return [text for _, _, text in evolution.texts()]


@asynccontextmanager
async def media_service(tmp_path, name: str = "openai", *, evolution: bool = True, fallback: str = "",
                        **env: Any) -> AsyncIterator[tuple[Service, dict[str, FakeAPI], FakeEvolution]]:
    fakes = {n: FAKES[n]() for n in {name, fallback} - {""}}
    evo = FakeEvolution(api_key="k")
    async with running_server(evo) as evo_url, running_server(fakes[name]) as url:
        extra: dict[str, Any] = {}
        if fallback:
            async with running_server(fakes[fallback]) as fallback_url:
                extra = {**ENV[fallback](fallback_url), "LLM_PROVIDER_FALLBACK": fallback}
                settings = make_settings(tmp_path, LLM_PROVIDER=name, **ENV[name](url), **extra,
                                         **({"EVOLUTION_API_URL": evo_url, "EVOLUTION_API_KEY": "k"} if evolution else {}),
                                         **env)
                async with running_service(settings) as service:
                    yield service, fakes, evo
            return
        settings = make_settings(tmp_path, LLM_PROVIDER=name, **ENV[name](url),
                                 **({"EVOLUTION_API_URL": evo_url, "EVOLUTION_API_KEY": "k"} if evolution else {}), **env)
        async with running_service(settings) as service:
            yield service, fakes, evo


async def window(service: Service) -> list[list[Any]]:
    found = await service.conversation_state(JID)
    assert found is not None
    return found[0]["window"]


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini"])
async def test_an_image_with_a_caption_reaches_each_provider_as_an_image_part(tmp_path, name: str) -> None:
    async with media_service(tmp_path, name) as (service, fakes, evo):
        fakes[name].script(Reply("Es un grifo roto; podemos cambiarlo."))
        payload = image_upsert("¿Tiene arreglo?", instance=INSTANCE)
        evo.media[payload["data"]["key"]["id"]] = StoredMedia("image/png", TINY_PNG)
        assert (await service.intake(payload)).status == 200
        await wait_for(lambda: sent_texts(evo) == ["Es un grifo roto; podemos cambiarlo."])
        [fetch] = evo.calls("/chat/getBase64FromMediaMessage/")
        assert fetch.path == f"/chat/getBase64FromMediaMessage/{INSTANCE}"
        assert fetch.json == {"message": {"key": {"id": payload["data"]["key"]["id"]}}, "convertToMp4": False}
        assert fetch.headers["apikey"] == "k"
        [request] = fakes[name].requests
        assert len(image_parts(name, request.json)) == 1
        assert "¿Tiene arreglo?" in json.dumps(request.json, ensure_ascii=False)
        stored = await window(service)
        assert [row[:2] for row in stored] == [["user", "[imagen] ¿Tiene arreglo?"],
                                               ["assistant", "Es un grifo roto; podemos cambiarlo."]]
        assert "iVBOR" not in json.dumps(stored)   # never the bytes


async def test_an_image_without_caption_goes_alone_and_the_next_turn_sees_the_placeholder(tmp_path) -> None:
    async with media_service(tmp_path) as (service, fakes, evo):
        payload = image_upsert(None, instance=INSTANCE)
        evo.media[payload["data"]["key"]["id"]] = StoredMedia("image/png", TINY_PNG)
        await service.intake(payload)
        await wait_for(lambda: len(evo.texts()) == 1)
        await service.intake(upsert("¿y?"))
        await wait_for(lambda: len(evo.texts()) == 2)
    first, second = fakes["openai"].requests
    assert [p["type"] for p in first.json["messages"][-1]["content"]] == ["image_url"]   # no empty text part
    assert second.json["messages"][1:] == [
        {"role": "user", "content": "[imagen]"}, {"role": "assistant", "content": "Hola, ¿en qué puedo ayudarte?"},
        {"role": "user", "content": "¿y?"}]


async def test_too_big_or_text_only_model_gets_the_caption_alone(tmp_path) -> None:
    async with media_service(tmp_path, MEDIA_MAX_BYTES=1000) as (service, fakes, evo):
        big = image_upsert("mi recibo", file_length=2_000_000, instance=INSTANCE)
        evo.media[big["data"]["key"]["id"]] = StoredMedia("image/png", TINY_PNG)
        await service.intake(big)
        await wait_for(lambda: len(evo.texts()) == 1)
        assert not evo.calls("/chat/getBase64FromMediaMessage/")   # not even fetched
        assert fakes["openai"].requests[-1].json["messages"][-1] == {"role": "user", "content": "mi recibo"}
    async with media_service(tmp_path, OPENAI_VISION="false") as (service, fakes, evo):
        await service.intake(image_upsert("mi recibo", instance=INSTANCE))
        await wait_for(lambda: len(evo.texts()) == 1)
        assert fakes["openai"].requests[-1].json["messages"][-1] == {"role": "user", "content": "mi recibo"}
        await service.intake(image_upsert(None, instance=INSTANCE))   # nothing to read: the unknown-message text
        await wait_for(lambda: len(evo.texts()) == 2)
        assert sent_texts(evo)[1] == service.texts.unknown_message
        assert len(fakes["openai"].requests) == 1 and not evo.calls("/chat/getBase64FromMediaMessage/")


async def test_a_failed_fetch_answers_the_caption_or_the_polite_text(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="actors.media")
    async with media_service(tmp_path) as (service, fakes, evo):
        fakes["openai"].script(Reply("Sobre tu recibo: ..."))
        await service.intake(image_upsert("mi recibo", instance=INSTANCE))   # Evolution did not keep it: 400
        await wait_for(lambda: len(evo.texts()) == 1)
        assert sent_texts(evo) == ["Sobre tu recibo: ..."]
        assert fakes["openai"].requests[-1].json["messages"][-1] == {"role": "user", "content": "mi recibo"}
        await service.intake(image_upsert(None, instance=INSTANCE))
        await wait_for(lambda: len(evo.texts()) == 2)
        assert sent_texts(evo)[1] == service.texts.media_failed
        assert len(fakes["openai"].requests) == 1
        assert [r.status for r in evo.calls("/chat/getBase64FromMediaMessage/")] == [400, 400]
        assert (await window(service))[2][1] == "[imagen]"
    assert "could not fetch the image" in caplog.text and "Message not found" in caplog.text


async def test_local_mode_takes_the_webhooks_base64(tmp_path) -> None:
    async with media_service(tmp_path, evolution=False) as (service, fakes, _):
        await service.intake(image_upsert("esta pieza", inline=TINY_PNG, instance=INSTANCE))
        assert service.outbound is not None
        await wait_for(lambda: len(service.outbound.outbox_entries(jid=JID)) == 1)
        assert len(image_parts("openai", fakes["openai"].requests[0].json)) == 1
        # an inline image is never stored in the inbox row
        assert "iVBOR" not in json.dumps(await window(service))


async def test_on_fallback_the_next_provider_gets_the_same_image(tmp_path) -> None:
    async with media_service(tmp_path, "openai", fallback="anthropic") as (service, fakes, evo):
        fakes["openai"].script(Fail(500))
        payload = image_upsert("¿qué es esto?", instance=INSTANCE)
        evo.media[payload["data"]["key"]["id"]] = StoredMedia("image/png", TINY_PNG)
        await service.intake(payload)
        await wait_for(lambda: len(evo.texts()) == 1)
    assert len(image_parts("openai", fakes["openai"].requests[0].json)) == 1
    [sent] = image_parts("anthropic", fakes["anthropic"].requests[0].json)
    url = fakes["openai"].requests[0].json["messages"][-1]["content"][1]["image_url"]["url"]
    assert url.endswith(sent["source"]["data"])


def test_the_webhook_parser_reads_an_images_fields_and_keeps_its_base64_out_of_the_inbox_row() -> None:
    from actors.evolution import WebhookError, parse_webhook

    message = parse_webhook(image_upsert("hola", mimetype="image/jpeg", file_length=1234, inline=TINY_PNG))
    assert (message.media, message.mimetype, message.media_bytes, message.text) == ("image", "image/jpeg", 1234, "hola")
    assert message.media_base64 and "media_base64" not in message.stored_fields()
    long_form = image_upsert(None)
    long_form["data"]["message"]["imageMessage"]["fileLength"] = {"low": 70, "high": 0, "unsigned": True}
    assert parse_webhook(long_form).media_bytes == 70
    bad = image_upsert(None)
    bad["data"]["message"]["base64"] = 12
    with pytest.raises(WebhookError, match="base64 must be a string"):
        parse_webhook(bad)


async def test_offline_mode_summarises_extractively() -> None:
    from actors.llm.offline import OfflineProvider
    from actors.memory_summary import FoldJob, summary_prompt
    from actors.prompts import SPANISH

    job = FoldJob("Se llama Ana.", (("user", "quiero una cita el lunes", 1.0), ("assistant", "¡Claro!", 1.0)))
    text = await OfflineProvider().complete(summary_prompt(SPANISH, job))
    assert text == "Se llama Ana. | quiero una cita el lunes"


async def test_the_media_fetch_is_bounded_timed_out_and_capped(tmp_path) -> None:
    import trio

    from actors.outbound.evolution import MEDIA_CONCURRENCY, EvolutionTransport

    evo = FakeEvolution(api_key="k", latency=0.2)
    for i in range(10):
        evo.media[f"M{i}"] = StoredMedia("image/png", TINY_PNG)
    evo.media["BIG"] = StoredMedia("image/png", TINY_PNG * 2000)
    async with running_server(evo) as url:
        settings = make_settings(tmp_path, EVOLUTION_API_URL=url, EVOLUTION_API_KEY="k", HTTP_TIMEOUT="1")
        transport = EvolutionTransport(settings)
        async with transport.open():
            outcomes = []

            async def fetch(i: int) -> None:
                outcomes.append(await transport.fetch_media(INSTANCE, f"M{i}", 1000))

            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(fetch, i)
            assert all(o.ok and o.data == TINY_PNG and o.mimetype == "image/png" for o in outcomes)
            arrivals = sorted(r.at for r in evo.calls("/chat/getBase64FromMediaMessage/"))
            assert arrivals[MEDIA_CONCURRENCY] - arrivals[0] >= 0.19   # the 5th waited for a slot
            big = await transport.fetch_media(INSTANCE, "BIG", 1000)
            assert big.status == 413 and not big.data
            missing = await transport.fetch_media(INSTANCE, "NOPE", 1000)
            assert missing.status == 400 and "Message not found" in missing.error
            evo.latency = 5.0
            with trio.fail_after(4):
                slow = await transport.fetch_media(INSTANCE, "M0", 1000)
            assert slow.status == 0 and slow.error == "timeout"
