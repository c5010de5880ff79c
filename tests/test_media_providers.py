"""Images and prompt caching through each provider's real SDK against the fakes: the image part each
API expects, the 400 a malformed one gets, the summary's place, the cache markers and usage."""

from __future__ import annotations

import base64

import pytest

from actors.llm.base import ChatMessage, ErrorKind, ImagePart, Prompt, ProviderError
from tests.fakes.llm import TINY_PNG, Reply
from tests.test_providers import SYSTEM, served

IMAGE = ImagePart("image/png", TINY_PNG, alt="[imagen]")
B64 = base64.b64encode(TINY_PNG).decode()
WITH_IMAGE = Prompt(SYSTEM, (ChatMessage("user", "hola"), ChatMessage("assistant", "¿En qué te ayudo?"),
                             ChatMessage("user", "¿esto tiene arreglo?", (IMAGE,))))
BROKEN = Prompt(SYSTEM, (ChatMessage("user", "mira", (ImagePart("image/png", b"not a png"),)),))


async def test_openai_gets_an_image_url_part_with_a_data_uri() -> None:
    async with served("openai") as (fake, provider):
        fake.script(Reply("Veo una pieza rota"))
        assert await provider.complete(WITH_IMAGE) == "Veo una pieza rota"
    last = fake.requests[0].json["messages"][-1]
    assert last == {"role": "user", "content": [
        {"type": "text", "text": "¿esto tiene arreglo?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}}]}


async def test_anthropic_gets_an_image_block_with_a_base64_source() -> None:
    async with served("anthropic") as (fake, provider):
        await provider.complete(WITH_IMAGE)
    last = fake.requests[0].json["messages"][-1]
    assert last["content"][0] == {"type": "text", "text": "¿esto tiene arreglo?"}
    assert last["content"][1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64},
                                  "cache_control": {"type": "ephemeral"}}


async def test_gemini_gets_an_inline_data_part() -> None:
    async with served("gemini") as (fake, provider):
        await provider.complete(WITH_IMAGE)
    parts = fake.requests[0].json["contents"][-1]["parts"]
    assert parts[0] == {"text": "¿esto tiene arreglo?"}
    inline = parts[1]["inlineData"]   # the SDK writes the Blob's mime type as mime_type (proto JSON takes both)
    assert (inline["data"], inline.get("mimeType", inline.get("mime_type"))) == (B64, "image/png")


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini"])
async def test_a_malformed_image_is_a_400_for_that_request_only(name: str) -> None:
    async with served(name) as (fake, provider):
        with pytest.raises(ProviderError) as caught:
            await provider.complete(BROKEN)
        assert await provider.complete(WITH_IMAGE)   # the next request is fine
    assert caught.value.kind is ErrorKind.BAD_REQUEST and caught.value.per_request
    assert str(caught.value).startswith("400 ")


async def test_a_provider_without_vision_gets_the_caption_or_the_placeholder() -> None:
    prompt = Prompt(SYSTEM, (ChatMessage("user", "", (IMAGE,)),), vision=frozenset({"anthropic"}))
    assert prompt.seen_by("anthropic") is prompt
    assert prompt.seen_by("openai").messages == (ChatMessage("user", "[imagen]"),)
    async with served("openai") as (fake, provider):
        await provider.complete(prompt.seen_by("openai"))
    assert fake.requests[0].json["messages"][-1] == {"role": "user", "content": "[imagen]"}


# -- prompt caching ------------------------------------------------------------------------
LONG = "Horario: lunes a viernes de 9 a 18. " * 200     # a system prompt past the caches' minimum
TURN1 = Prompt(LONG, (ChatMessage("user", "hola"),), summary="El cliente se llama Ana.", cache_key="chat-1")
TURN2 = Prompt(LONG, (ChatMessage("user", "hola"), ChatMessage("assistant", "¡Hola Ana!"),
                      ChatMessage("user", "¿precio?")), summary="El cliente se llama Ana.", cache_key="chat-1")


async def test_openai_sends_the_summary_second_and_a_per_chat_cache_key_and_counts_cached_tokens() -> None:
    async with served("openai") as (fake, provider):
        await provider.complete(TURN1)
        await provider.complete(TURN2)
        usage = provider.cache_usage.snapshot()   # type: ignore[attr-defined]
    first, second = (r.json for r in fake.requests)
    assert first["prompt_cache_key"] == second["prompt_cache_key"] == "chat-1"
    assert second["messages"][:2] == [{"role": "system", "content": LONG},
                                      {"role": "system", "content": "El cliente se llama Ana."}]
    assert usage["requests"] == 2 and usage["cached_tokens"] >= 1024
    assert usage["cached_tokens"] < usage["prompt_tokens"]


async def test_ollama_sends_no_prompt_cache_key() -> None:
    async with served("ollama") as (fake, provider):
        await provider.complete(TURN1)
    assert "prompt_cache_key" not in fake.requests[0].json


async def test_anthropic_marks_system_summary_and_last_message_and_reads_the_cache_next_turn() -> None:
    async with served("anthropic") as (fake, provider):
        await provider.complete(TURN1)
        after_first = provider.cache_usage.snapshot()   # type: ignore[attr-defined]
        await provider.complete(TURN2)
        after_second = provider.cache_usage.snapshot()   # type: ignore[attr-defined]
    second = fake.requests[1].json
    assert [b["text"] for b in second["system"]] == [LONG, "El cliente se llama Ana."]
    assert all(b["cache_control"] == {"type": "ephemeral"} for b in second["system"])
    assert [("cache_control" in m["content"][-1]) for m in second["messages"]] == [False, False, True]
    assert after_first["cache_write_tokens"] > 0 and after_first["cached_tokens"] == 0
    assert after_second["cached_tokens"] > 0


async def test_gemini_puts_the_summary_in_the_system_instruction() -> None:
    async with served("gemini") as (fake, provider):
        await provider.complete(TURN1)
        await provider.complete(TURN2)
        usage = provider.cache_usage.snapshot()   # type: ignore[attr-defined]
    assert fake.requests[1].json["systemInstruction"]["parts"] == [{"text": LONG}, {"text": "El cliente se llama Ana."}]
    assert usage["cached_tokens"] > 0


async def test_cache_usage_is_counted_per_provider_in_supervisors_and_metrics(tmp_path) -> None:
    from tests.conftest import wait_for
    from tests.fakes.llm import OpenAIFake
    from tests.fakes.server import running_server
    from tests.payloads import upsert
    from tests.test_http import client_for

    fake = OpenAIFake()
    fake.cache_min_tokens = 1   # the test's prompts are short
    async with running_server(fake) as url:
        async with client_for(tmp_path, LLM_PROVIDER="openai", OPENAI_API_KEY="sk-cache", OPENAI_BASE_URL=url) as (app, client):
            for i in range(3):
                await client.post("/webhook", json=upsert(f"pregunta {i}", timestamp=1769000000 + i))
                await wait_for(lambda: len(app.extensions["service"].outbound.outbox_entries()) == i + 1)
            body = await (await client.get("/supervisors")).get_json()
            metrics = (await (await client.get("/metrics")).get_data()).decode()
    [openai_stats] = [p for p in body["llm"]["providers"] if p["name"] == "openai"]
    cache = openai_stats["prompt_cache"]
    assert cache["requests"] == 3 and 0 < cache["cached_tokens"] < cache["prompt_tokens"]
    assert f'agent_llm_prompt_tokens_total{{kind="cached",provider="openai"}} {float(cache["cached_tokens"])}' in metrics
    [key] = {r.json["prompt_cache_key"] for r in fake.requests}   # one per chat, not its phone number
    assert key.startswith("chat-") and "5491131376731" not in key
