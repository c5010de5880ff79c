"""Each provider through its real SDK against a local fake of its API: the request, the reply, the errors."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import attrs
import pytest
import trio

from actors.llm.base import ChatMessage, ErrorKind, Prompt, Provider, ProviderError
from actors.llm.providers import build_provider
from actors.settings import Settings, load_settings
from tests.fakes.llm import (
    GEMINI_BAD_KEY_BODY,
    AnthropicFake,
    Blocked,
    Fail,
    FakeAPI,
    GeminiFake,
    Hang,
    HuggingFaceFake,
    OpenAIFake,
    Reply,
    refused_url,
)
from tests.fakes.server import running_server

KEY = "sk-test-K3y-n0t-for-logs"
SYSTEM = "Eres el asistente de la clínica."
HISTORY = (
    ChatMessage("assistant", "Bienvenido"),  # a leading assistant turn (Anthropic/Gemini drop it)
    ChatMessage("user", "hola"),
    ChatMessage("assistant", "¿En qué te ayudo?"),
    ChatMessage("user", "quiero"),
    ChatMessage("user", "una cita"),  # two user turns in a row (Anthropic/Gemini merge them)
)
PROMPT = Prompt(SYSTEM, HISTORY)


def settings(**env: str) -> Settings:
    return load_settings({"LLM_PROVIDER": "offline", "LLM_MAX_TOKENS": "77", **env}, dotenv_file=None)


@attrs.frozen
class Case:
    fake: Callable[[], FakeAPI]
    env: Callable[[str], dict[str, str]]


CASES = {
    "openai": Case(OpenAIFake, lambda url: {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": url, "OPENAI_MODEL": "gpt-test"}),
    "ollama": Case(OpenAIFake, lambda url: {"OLLAMA_BASE_URL": f"{url}/v1", "OLLAMA_MODEL": "llama-test"}),
    "anthropic": Case(
        AnthropicFake, lambda url: {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": url, "ANTHROPIC_MODEL": "claude-test"}
    ),
    "gemini": Case(GeminiFake, lambda url: {"GEMINI_API_KEY": KEY, "GEMINI_BASE_URL": url, "GEMINI_MODEL": "gemini-test"}),
    "huggingface": Case(
        HuggingFaceFake, lambda url: {"HUGGINGFACE_API_KEY": KEY, "HF_BASE_URL": url, "HF_MODEL": "Qwen/test"}
    ),
}
NAMES = list(CASES)


@asynccontextmanager
async def provider_at(name: str, url: str, **env: str) -> AsyncIterator[Provider]:
    provider = build_provider(name, settings(**CASES[name].env(url), **env))
    try:
        yield provider
    finally:
        await provider.aclose()


@asynccontextmanager
async def served(name: str, **env: str) -> AsyncIterator[tuple[FakeAPI, Provider]]:
    fake = CASES[name].fake()
    async with running_server(fake) as url, provider_at(name, url, **env) as provider:
        yield fake, provider


async def failure(provider: Provider) -> ProviderError:
    with trio.fail_after(10):
        with pytest.raises(ProviderError) as caught:
            await provider.complete(PROMPT)
    return caught.value


# -- the request each API receives, and the parsed reply ------------------------------------
CHAT_HISTORY = [{"role": m.role, "content": m.content} for m in HISTORY]
ALTERNATED = [("user", "hola"), ("assistant", "¿En qué te ayudo?"), ("user", "quiero\nuna cita")]


async def test_openai_request_and_reply() -> None:
    async with served("openai") as (fake, provider):
        fake.script(Reply("respuesta ✓"))
        assert await provider.complete(PROMPT) == "respuesta ✓"
    [request] = fake.requests
    assert request.path == "/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.json["model"] == "gpt-test"
    assert request.json["messages"] == [{"role": "system", "content": SYSTEM}, *CHAT_HISTORY]
    assert request.json["max_completion_tokens"] == 77


async def test_ollama_request_and_reply_without_a_key() -> None:
    async with served("ollama") as (fake, provider):
        assert provider.available
        fake.script(Reply("desde ollama"))
        assert await provider.complete(PROMPT) == "desde ollama"
    [request] = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer ollama"
    assert request.json["model"] == "llama-test"
    assert request.json["messages"] == [{"role": "system", "content": SYSTEM}, *CHAT_HISTORY]
    assert request.json["max_tokens"] == 77


async def test_anthropic_request_and_reply() -> None:
    async with served("anthropic") as (fake, provider):
        fake.script(Reply("desde claude"))
        assert await provider.complete(PROMPT) == "desde claude"
    [request] = fake.requests
    assert request.path == "/v1/messages"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert "anthropic-version" in request.headers
    assert request.json["model"] == "claude-test"
    # the system prompt and the last message are cache breakpoints (prompt caching)
    assert request.json["system"] == [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    messages = request.json["messages"]
    assert [(m["role"], "".join(b["text"] for b in m["content"])) for m in messages] == ALTERNATED
    assert [[("cache_control" in b) for b in m["content"]] for m in messages] == [[False], [False], [True]]
    assert request.json["max_tokens"] == 77


async def test_gemini_request_and_reply() -> None:
    async with served("gemini") as (fake, provider):
        fake.script(Reply("desde gemini"))
        assert await provider.complete(PROMPT) == "desde gemini"
    [request] = fake.requests
    assert request.path == "/v1/models/gemini-test:generateContent"
    assert request.headers["x-goog-api-key"] == KEY
    assert "authorization" not in request.headers
    assert request.json["systemInstruction"]["parts"] == [{"text": SYSTEM}]
    turns = [(c["role"], "".join(p["text"] for p in c["parts"])) for c in request.json["contents"]]
    assert turns == [("model" if role == "assistant" else role, text) for role, text in ALTERNATED]
    assert request.json["generationConfig"]["maxOutputTokens"] == 77


async def test_huggingface_request_and_reply() -> None:
    async with served("huggingface") as (fake, provider):
        fake.script(Reply("desde qwen"))
        assert await provider.complete(PROMPT) == "desde qwen"
    [request] = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.json["model"] == "Qwen/test"
    assert request.json["messages"] == [{"role": "system", "content": SYSTEM}, *CHAT_HISTORY]
    assert request.json["max_tokens"] == 77


async def test_one_sdk_client_is_reused_across_calls() -> None:
    async with served("openai") as (fake, provider):
        for _ in range(3):
            await provider.complete(PROMPT)
    assert fake.calls == 3
    assert len({r.headers.get("user-agent") for r in fake.requests}) == 1


# -- error mapping -------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
async def test_429_with_retry_after_is_a_rate_limit(name: str) -> None:
    async with served(name) as (fake, provider):
        fake.script(Fail(429, retry_after="7"))
        error = await failure(provider)
    assert error.kind is ErrorKind.RATE_LIMIT
    assert error.retry_after == 7.0
    assert str(error).startswith("429 ")
    assert fake.calls == 1  # the SDK did not retry on its own


@pytest.mark.parametrize(
    ("status", "kind"), [(401, ErrorKind.AUTH), (400, ErrorKind.BAD_REQUEST), (500, ErrorKind.SERVER)]
)
@pytest.mark.parametrize("name", NAMES)
async def test_status_errors_are_mapped(name: str, status: int, kind: ErrorKind) -> None:
    async with served(name) as (fake, provider):
        fake.script(Fail(status))
        error = await failure(provider)
    assert error.kind is kind
    assert error.retry_after is None
    assert str(error).startswith(f"{status} ")
    assert KEY not in str(error) and "una cita" not in str(error)
    assert fake.calls == 1


@pytest.mark.parametrize(
    ("status", "kind"), [(413, ErrorKind.BAD_REQUEST), (422, ErrorKind.BAD_REQUEST), (404, ErrorKind.UNAVAILABLE)]
)
@pytest.mark.parametrize("name", NAMES)
async def test_request_errors_are_per_request_and_a_missing_model_is_not(name: str, status: int,
                                                                         kind: ErrorKind) -> None:
    async with served(name) as (fake, provider):
        fake.script(Fail(400), Fail(status))
        too_long = await failure(provider)   # e.g. this chat's context is too long for the model
        error = await failure(provider)
    assert (too_long.kind, too_long.per_request) == (ErrorKind.BAD_REQUEST, True)
    assert (error.kind, error.per_request) == (kind, kind is ErrorKind.BAD_REQUEST)


@pytest.mark.parametrize("name", NAMES)
async def test_empty_and_blocked_answers_are_per_request_failures(name: str) -> None:
    async with served(name) as (fake, provider):
        fake.script(Reply(""), Blocked())
        empty = await failure(provider)
        blocked = await failure(provider)
    assert (empty.kind, empty.per_request) == (ErrorKind.EMPTY, True)
    assert (blocked.kind, blocked.per_request) == (ErrorKind.BLOCKED, True)
    assert str(empty).startswith("empty reply") and str(blocked).startswith("blocked reply")


@pytest.mark.parametrize("status", [401, 429, 500])
@pytest.mark.parametrize("name", NAMES)
async def test_provider_level_errors_are_not_per_request(name: str, status: int) -> None:
    async with served(name) as (fake, provider):
        fake.script(Fail(status))
        error = await failure(provider)
    assert not error.per_request


async def test_gemini_failed_precondition_is_provider_level() -> None:
    body = {"error": {"code": 400, "message": "User location is not supported for the API use.",
                      "status": "FAILED_PRECONDITION"}}
    async with served("gemini") as (fake, provider):
        fake.script(Fail(400, body=body))
        error = await failure(provider)
    assert (error.kind, error.per_request, str(error)) == (ErrorKind.UNAVAILABLE, False, "400 FAILED_PRECONDITION")


@pytest.mark.parametrize("name", NAMES)
async def test_sdk_timeout_is_a_timeout(name: str) -> None:
    async with served(name, LLM_TIMEOUT="0.3") as (fake, provider):
        fake.script(Hang())
        start = trio.current_time()
        error = await failure(provider)
    assert error.kind is ErrorKind.TIMEOUT
    assert 0.25 <= trio.current_time() - start < 5
    assert fake.calls == 1


@pytest.mark.parametrize("name", NAMES)
async def test_connection_refused_is_a_connection_error(name: str) -> None:
    async with provider_at(name, refused_url()) as provider:
        error = await failure(provider)
    assert error.kind is ErrorKind.CONNECTION


async def test_gemini_wrong_key_is_an_auth_error() -> None:
    async with served("gemini") as (fake, provider):
        fake.script(Fail(400, body=GEMINI_BAD_KEY_BODY))
        error = await failure(provider)
    assert error.kind is ErrorKind.AUTH
    assert str(error) == "400 API_KEY_INVALID"


async def test_gemini_retry_info_stands_in_for_retry_after() -> None:
    async with served("gemini") as (fake, provider):
        fake.script(Fail(429))  # RESOURCE_EXHAUSTED with RetryInfo retryDelay "37s", no header
        error = await failure(provider)
    assert (error.kind, error.retry_after, str(error)) == (ErrorKind.RATE_LIMIT, 37.0, "429 RESOURCE_EXHAUSTED")


async def test_anthropic_overloaded_is_a_server_error() -> None:
    async with served("anthropic") as (fake, provider):
        fake.script(Fail(529))
        error = await failure(provider)
    assert (error.kind, str(error)) == (ErrorKind.SERVER, "529 overloaded_error")


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini", "huggingface"])
async def test_provider_without_key_is_unavailable(name: str) -> None:
    provider = build_provider(name, settings())
    try:
        assert not provider.available
        with pytest.raises(ProviderError) as caught:
            await provider.complete(PROMPT)
        assert caught.value.kind is ErrorKind.UNAVAILABLE
    finally:
        await provider.aclose()


def test_unknown_provider_name_is_rejected() -> None:
    with pytest.raises(ValueError):
        build_provider("nope", settings())


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini"])
async def test_a_burst_of_calls_reuses_the_connections_of_the_burst_before(name: str) -> None:
    """The chain's slots bound the calls in flight; the SDK client keeps every connection they opened
    (actors/llm/http_pool.py). Two bursts of 110 calls at once, a moment apart, open 110 connections,
    not 110 more for the second burst. Seen failing with the SDKs' own pools, which keep 100 idle
    connections (openai, anthropic) or 20 (google-genai's httpx client): 120 and 180 opened."""
    fake = CASES[name].fake(latency=lambda: 0.3, record=False)
    clients: set[object] = set()

    async def counted(scope: dict, receive: Callable, send: Callable) -> None:  # type: ignore[type-arg]
        if scope["type"] == "http":
            clients.add(tuple(scope["client"]))
        await fake(scope, receive, send)

    async with running_server(counted) as url, provider_at(name, url, LLM_CONCURRENCY="110") as provider:
        for _ in range(2):
            async with trio.open_nursery() as nursery:
                for _ in range(110):
                    nursery.start_soon(provider.complete, PROMPT)
            await trio.sleep(0.2)
    assert fake.calls == 220 and len(clients) == 110
