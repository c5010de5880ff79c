"""The fallback supervisor with real SDK providers against local fakes.

Tests that wait on timeouts, cool-downs or Retry-After run on trio's MockClock (the ``clock``
fixture): it jumps to the next deadline once every task has been blocked for 50 real milliseconds,
so a 20 s timeout costs no real time. (Not a zero threshold: the openai and anthropic SDKs detect the
platform in a worker thread on a client's first request, and a jump while that thread runs would fire
a timeout the test did not mean.)
"""

from __future__ import annotations

import json
import logging
from contextlib import AsyncExitStack, asynccontextmanager
from typing import AsyncIterator

import attrs
import pytest
import trio
from trio.testing import MockClock

from actors.llm.base import ChatMessage, ErrorKind, Prompt, ProviderError
from actors.llm.chain import ProviderChain, build_chain
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
from tests.doubles import ScriptedProvider
from tests.fakes.server import running_server

POLITE = "Gracias por contactarnos. En este momento estamos experimentando dificultades técnicas..."
CUSTOMER_TEXT = "Hola, mi cédula es 30111222 y quiero agendar una cita"
PROMPT = Prompt("Eres el asistente.", (ChatMessage("user", CUSTOMER_TEXT),))
LOGGER = "actors.llm.chain"

FAKES = {"openai": OpenAIFake, "ollama": OpenAIFake, "anthropic": AnthropicFake, "gemini": GeminiFake,
         "huggingface": HuggingFaceFake}
KEYS = {"openai": "sk-openai-SECRET-1111", "anthropic": "sk-ant-SECRET-2222", "gemini": "AIzaSECRET3333",
        "huggingface": "hf_SECRET4444", "ollama": "ollama-SECRET-5555"}


@pytest.fixture
def clock() -> MockClock:
    return MockClock(autojump_threshold=0.05)


def provider_env(name: str, url: str) -> dict[str, str]:
    prefix = {"huggingface": "HF"}.get(name, name.upper())
    key_var = "HUGGINGFACE_API_KEY" if name == "huggingface" else f"{name.upper()}_API_KEY"
    base = f"{url}/v1" if name == "ollama" else url
    return {key_var: KEYS[name], f"{prefix}_BASE_URL": base, f"{prefix}_MODEL": f"{name}-model"}


def settings(order: list[str], urls: dict[str, str], **env: str) -> Settings:
    values = {"LLM_PROVIDER": order[0], "LLM_PROVIDER_FALLBACK": ",".join(order[1:]), **env}
    for name, url in urls.items():
        values.update(provider_env(name, url))
    return load_settings(values, dotenv_file=None)


@asynccontextmanager
async def running(chain: ProviderChain) -> AsyncIterator[ProviderChain]:
    """The chain with its own nursery running (as the service starts it), for the hedged probes."""
    async with trio.open_nursery() as nursery:
        await nursery.start(chain.run)
        yield chain
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def chain_with(order: list[str], *, refused: tuple[str, ...] = (), **env: str
                     ) -> AsyncIterator[tuple[ProviderChain, dict[str, FakeAPI]]]:
    """Serve a fake per provider in ``order`` (except ``refused``: a closed port) and build the chain."""
    fakes: dict[str, FakeAPI] = {}
    urls: dict[str, str] = {}
    async with AsyncExitStack() as stack:
        for name in order:
            if name in refused:
                urls[name] = refused_url()
            else:
                fakes[name] = FAKES[name]()
                urls[name] = await stack.enter_async_context(running_server(fakes[name]))
        chain = build_chain(settings(order, urls, **env), POLITE)
        try:
            async with running(chain):   # as the service runs it: its nursery holds the hedged probes
                yield chain, fakes
        finally:
            for fake in fakes.values():
                fake.release()
            await chain.aclose()


def records(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, str]]:
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


def stats_of(chain: ProviderChain, name: str):
    return next(p for p in chain.statistics().providers if p.name == name)


# -- fallback ------------------------------------------------------------------------------
FAILURES = {
    # case: (primary, how it fails, the safe reason logged)
    "429": ("gemini", Fail(429), "429 RESOURCE_EXHAUSTED"),
    "500": ("anthropic", Fail(500), "500 api_error"),
    "timeout": ("ollama", Hang(), "timeout after 20s"),
    "refused": ("huggingface", None, "connection error (ConnectError)"),
}


@pytest.mark.parametrize("case", list(FAILURES))
async def test_fallback_when_the_primary_fails(case: str, clock, caplog) -> None:
    caplog.set_level(logging.INFO)
    primary, behaviour, reason = FAILURES[case]
    async with chain_with([primary, "openai"], refused=(primary,) if behaviour is None else ()) as (chain, fakes):
        if behaviour is not None:
            fakes[primary].script(behaviour)
        fakes["openai"].script(Reply("respuesta de respaldo"))
        answer = await chain.ask(PROMPT)
        stats = chain.statistics()

    assert (answer.text, answer.provider, answer.fallback_used) == ("respuesta de respaldo", "openai", True)
    assert records(caplog) == [
        (LOGGER, logging.INFO, f"LLM providers in order: {primary}, openai"),
        (LOGGER, logging.ERROR, f"Error con LLM provider principal ({primary}): {reason}"),
        (LOGGER, logging.WARNING, "⚠️ Intentando con proveedor de respaldo: openai"),
        (LOGGER, logging.INFO, "✅ Respuesta exitosa con proveedor de respaldo: openai"),
    ]
    assert fakes["openai"].requests[0].json["messages"][-1] == {"role": "user", "content": CUSTOMER_TEXT}
    assert (stats.asks, stats.fallbacks_used, stats.polite_answers) == (1, 1, 0)
    primary_stats = next(p for p in stats.providers if p.name == primary)
    assert sum(primary_stats.failures.values()) == 1 and primary_stats.last_error == reason


async def test_all_failing_gives_the_polite_text(caplog) -> None:
    caplog.set_level(logging.INFO)
    async with chain_with(["openai", "anthropic"]) as (chain, fakes):
        fakes["openai"].script(Fail(500))
        fakes["anthropic"].script(Fail(500))
        answer = await chain.ask(PROMPT)
        stats = chain.statistics()
    assert (answer.text, answer.provider, answer.failed) == (POLITE, None, True)
    assert (LOGGER, logging.ERROR, "❌ Error también con proveedor de respaldo (anthropic): 500 api_error") in records(caplog)
    assert (stats.asks, stats.fallbacks_used, stats.polite_answers) == (1, 0, 1)


async def test_three_providers_are_tried_in_order(caplog) -> None:
    caplog.set_level(logging.INFO)
    async with chain_with(["gemini", "anthropic", "openai"]) as (chain, fakes):
        fakes["gemini"].script(Fail(429))
        fakes["anthropic"].script(Fail(500))
        fakes["openai"].script(Reply("tercero"))
        answer = await chain.ask(PROMPT)
    assert (answer.text, answer.provider) == ("tercero", "openai")
    assert [f.calls for f in fakes.values()] == [1, 1, 1]
    assert [m for _, _, m in records(caplog)][1:] == [
        "Error con LLM provider principal (gemini): 429 RESOURCE_EXHAUSTED",
        "⚠️ Intentando con proveedor de respaldo: anthropic",
        "❌ Error también con proveedor de respaldo (anthropic): 500 api_error",
        "⚠️ Intentando con proveedor de respaldo: openai",
        "✅ Respuesta exitosa con proveedor de respaldo: openai",
    ]


async def test_a_provider_listed_twice_is_tried_once() -> None:
    async with chain_with(["openai", "anthropic"], LLM_PROVIDER_FALLBACK="openai,anthropic,openai") as (chain, fakes):
        fakes["openai"].script(Fail(500))
        fakes["anthropic"].script(Fail(500))
        answer = await chain.ask(PROMPT)
    assert answer.failed
    assert [p.name for p in chain.statistics().providers] == ["openai", "anthropic"]
    assert fakes["openai"].calls == 1


async def test_unavailable_provider_is_skipped_and_logged_once(caplog) -> None:
    caplog.set_level(logging.INFO)
    async with chain_with(["openai"], LLM_PROVIDER_FALLBACK="anthropic,openai") as (chain, fakes):
        fakes["openai"].default = Fail(500)
        for _ in range(3):
            assert (await chain.ask(PROMPT)).failed
        stats = stats_of(chain, "anthropic")
    unavailable = [m for _, level, m in records(caplog) if "unavailable" in m]
    assert unavailable == ["LLM provider anthropic is unavailable (no API key configured): it will be skipped"]
    assert (stats.configured, stats.available, stats.calls) == (False, False, 0)


# -- circuit breaker -----------------------------------------------------------------------
async def test_hanging_primary_opens_the_circuit(clock) -> None:
    async with chain_with(["openai", "anthropic"]) as (chain, fakes):
        fakes["openai"].default = Hang()
        start = trio.current_time()
        answers = []
        for _ in range(50):
            answers.append(await chain.ask(PROMPT))
            await trio.sleep(1)  # messages arrive one second apart
        elapsed = trio.current_time() - start
        await trio.sleep(20)   # the last probe goes on (in the chain's nursery) until LLM_TIMEOUT decides it
        stats = stats_of(chain, "openai")

    threshold, timeout = 3, 20.0  # config.toml defaults
    assert all(a.provider == "anthropic" for a in answers)
    # three timeouts open the circuit; after the 30 s cool-down one probe times out and reopens it
    assert fakes["openai"].calls == threshold + 1
    assert elapsed < 50 * timeout / 5
    assert stats.circuit == "open" and 0 < stats.reopens_in_seconds <= 30
    assert stats.failures == {"timeout": threshold + 1}
    assert not stats.available


async def test_stalled_primary_opens_the_circuit_long_before_its_timeout(clock) -> None:
    async with chain_with(["openai", "anthropic"]) as (chain, fakes):
        fakes["openai"].default = Reply("rápido", delay=0.2)
        for _ in range(10):   # the primary's recent latency: p95 0.2 s, so the stall limit is the 2 s floor
            assert (await chain.ask(PROMPT)).provider == "openai"
        assert stats_of(chain, "openai").stall_after_seconds == 2.0
        fakes["openai"].default = Hang()
        answers: list[tuple[str | None, float]] = []

        async def ask() -> None:
            started = trio.current_time()
            answer = await chain.ask(PROMPT)
            answers.append((answer.provider, trio.current_time() - started))

        async with trio.open_nursery() as nursery:
            for _ in range(60):   # ten messages a second for six seconds
                nursery.start_soon(ask)
                await trio.sleep(0.1)
        stats = stats_of(chain, "openai")
        chain_stats = chain.statistics()

    assert len(answers) == 60 and all(provider == "anthropic" for provider, _ in answers)
    # every call caught by the hang was hedged to the fallback after 2 x p95 (0.4 s), instead of waiting
    # out the 20 s timeout; the stall was seen once three of them had had no answer for 2 s, and later
    # messages did not try the primary at all
    assert max(latency for _, latency in answers) < 0.4 + 0.3
    hung = fakes["openai"].calls - 10
    assert 3 <= hung <= 25
    assert stats.stalls == 1 and stats.circuit == "open" and stats.in_flight == 0
    # the hedged calls were cancelled when the fallback answered: no failures; the calls still in
    # flight when the stall was seen were cancelled by it and count as timeouts
    assert chain_stats.hedges == chain_stats.hedges_won >= 3
    assert stats.failures == {"timeout": hung - chain_stats.hedges}


async def test_probe_of_a_stalled_provider_costs_its_customer_only_the_stall_limit(clock) -> None:
    async with chain_with(["openai", "anthropic"], CIRCUIT_COOLDOWN_SECONDS="30") as (chain, fakes):
        fakes["openai"].default = Reply("rápido", delay=0.2)
        for _ in range(10):
            await chain.ask(PROMPT)
        fakes["openai"].default = Hang()
        async with trio.open_nursery() as nursery:
            for _ in range(5):   # hedged to the fallback after 0.4 s each
                nursery.start_soon(chain.ask, PROMPT)
                await trio.sleep(0.1)
        await trio.sleep(2)
        await chain.ask(PROMPT)   # its admission sees the stall (five calls without an answer for 2 s)
        assert stats_of(chain, "openai").circuit == "open"
        await trio.sleep(30)
        started = trio.current_time()
        answer = await chain.ask(PROMPT)   # the half-open probe: still hanging
        waited = trio.current_time() - started
        during = stats_of(chain, "openai")
        assert (await chain.ask(PROMPT)).provider == "anthropic"   # one probe at a time: the next is not one
        await trio.sleep(20)
        stats = stats_of(chain, "openai")
    assert answer.provider == "anthropic"
    assert 2.0 <= waited < 2.5          # the 2 s stall limit, not the 20 s LLM_TIMEOUT
    # the probe itself went on in the chain's nursery, and its timeout (LLM_TIMEOUT) reopened the circuit
    assert (during.circuit, during.available, during.in_flight) == ("half_open", False, 1)
    assert stats.circuit == "open" and stats.last_error == "timeout after 20s" and stats.in_flight == 0


def slowing(switch_after: int, before: float = 0.5, after: float = 3.5):
    """A latency function: ``before`` seconds for the first ``switch_after`` calls, ``after`` from then on."""
    calls = iter(range(10**9))
    return lambda prompt: before if next(calls) < switch_after else after


async def traffic(chain: ProviderChain, *, seconds: float, per_second: float) -> list[tuple[float, str | None, float]]:
    """Ask at a steady rate; (submitted at, provider that answered, seconds the customer waited) per message."""
    results: list[tuple[float, str | None, float]] = []
    start = trio.current_time()

    async def ask() -> None:
        submitted = trio.current_time()
        answer = await chain.ask(PROMPT)
        results.append((submitted - start, answer.provider, trio.current_time() - submitted))

    async with trio.open_nursery() as nursery:
        for _ in range(int(seconds * per_second)):
            nursery.start_soon(ask)
            await trio.sleep(1 / per_second)
    return sorted(results)


async def test_a_slower_but_healthy_only_provider_recovers(autojump_clock) -> None:
    # The only provider answered in 0.5 s and now answers in 3.5 s, well within LLM_TIMEOUT (20 s).
    provider = ScriptedProvider(latency=slowing(20))
    chain = ProviderChain([provider], polite_text=POLITE, cooldown=30.0)
    async with running(chain):
        for _ in range(20):
            assert (await chain.ask(PROMPT)).provider == "scripted"
        results = await traffic(chain, seconds=150, per_second=2)
        stats = stats_of(chain, "scripted")
    # The stall rule may open the circuit once (2 s limit from the 0.5 s history), but the half-open
    # probe waits for its answer (up to LLM_TIMEOUT), succeeds at 3.5 s, and the limit follows it.
    recovered = [provider for at, provider, _ in results if at >= 40]
    assert recovered == ["scripted"] * len(recovered) and len(recovered) >= 200
    assert sum(1 for _, provider, _ in results if provider == "scripted") >= 0.7 * len(results)
    assert stats.circuit == "closed" and stats.stalls <= 1
    assert stats.stall_after_seconds is not None and stats.stall_after_seconds >= 3 * 3.5


async def test_a_slower_primary_recovers_and_its_probe_costs_a_customer_the_stall_limit(autojump_clock) -> None:
    primary = ScriptedProvider(latency=slowing(20))
    primary.name = "primary"
    fallback = ScriptedProvider(lambda p: "respaldo", latency=lambda p: 0.3)
    chain = ProviderChain([primary, fallback], polite_text=POLITE, cooldown=30.0)
    async with running(chain):
        for _ in range(20):
            await chain.ask(PROMPT)
        results = await traffic(chain, seconds=120, per_second=2)
        stats = stats_of(chain, "primary")
    assert all(provider is not None for _, provider, _ in results)   # nobody got the polite text
    late = [provider for at, provider, _ in results if at >= 40]
    assert late == ["primary"] * len(late)                           # recovered for good
    # the calls caught by the stall moved on once it was seen (three calls past the 2 s limit: 3 s) ...
    assert max(waited for at, _, waited in results if at < 10) < 3.0 + 0.3 + 0.1
    # ... and the customer whose message probed after the cool-down waited the 2 s stall limit, not 3.5 s
    hedged = [waited for at, provider, waited in results if at >= 10 and provider == "scripted" and waited > 1]
    assert len(hedged) == 1 and 2.0 + 0.3 - 0.01 <= hedged[0] < 2.0 + 0.3 + 0.1
    assert stats.circuit == "closed" and stats.successes >= 20 + len(late)


async def test_a_probe_success_past_the_stall_limit_raises_it_at_once(autojump_clock) -> None:
    server = ProviderError(ErrorKind.SERVER, "500 api_error")
    # (latency, error): ten answers in 0.2 s, three quick 500s, then a probe answered in 5 s
    steps = iter([(0.2, None)] * 10 + [(0.0, server)] * 3 + [(5.0, None)])
    step: list[tuple[float, ProviderError | None]] = []

    def latency(prompt: Prompt) -> float:
        step[:] = [next(steps, (0.2, None))]
        return step[0][0]

    def answer(prompt: Prompt) -> str:
        if step[0][1] is not None:
            raise step[0][1]
        return "ok"

    provider = ScriptedProvider(answer, latency=latency)
    chain = ProviderChain([provider, ScriptedProvider(lambda p: "respaldo")], polite_text=POLITE, cooldown=30.0)
    async with running(chain):
        for _ in range(13):   # ten answers at 0.2 s, then three 500s open the circuit
            await chain.ask(PROMPT)
        assert stats_of(chain, "scripted").circuit == "open"
        assert stats_of(chain, "scripted").stall_after_seconds == 2.0
        await trio.sleep(30)
        await chain.ask(PROMPT)   # the probe: this customer moves on after 2 s, the probe answers at 5 s
        await trio.sleep(5)
        stats = stats_of(chain, "scripted")
    assert stats.circuit == "closed" and stats.successes == 11
    assert stats.stall_after_seconds == 3 * 5.0


async def test_a_long_outage_costs_a_customer_at_most_the_stall_limit_per_cooldown(autojump_clock) -> None:
    hung = trio.Event()   # never set: the primary accepts calls and never answers

    async def hang(prompt: Prompt) -> None:
        if len(primary.prompts) > 10:
            await hung.wait()

    primary = ScriptedProvider(latency=lambda p: 0.2, hook=hang)
    primary.name = "primary"
    chain = ProviderChain([primary, ScriptedProvider(lambda p: "respaldo")], polite_text=POLITE, cooldown=30.0)
    async with running(chain):
        for _ in range(10):
            await chain.ask(PROMPT)
        results = await traffic(chain, seconds=600, per_second=1)   # ten minutes of outage
        stats = stats_of(chain, "primary")
    assert all(provider == "scripted" for _, provider, _ in results)
    # at one message a second the stall is seen once three calls hung for 2 s (the first waited 4 s) ...
    assert max(waited for at, _, waited in results if at < 10) < 4.0 + 0.1
    # ... and from then on, the one customer per cool-down who triggers the probe waits the stall
    # limit (2 s), never LLM_TIMEOUT (20 s): the probe goes on in the chain's nursery
    later = [waited for at, _, waited in results if at >= 10]
    assert max(later) < 2.0 + 0.1
    probes = sum(1 for waited in later if waited >= 1.0)
    assert 600 / (30 + 20) - 2 <= probes <= 600 / 30 + 1   # the probe runs until LLM_TIMEOUT decides it
    assert stats.circuit in ("open", "half_open")


async def test_calls_slower_than_the_limit_are_no_stall_while_others_are_answered(clock) -> None:
    async with chain_with(["openai", "anthropic"]) as (chain, fakes):
        fakes["openai"].default = Reply("rápido", delay=0.2)
        for _ in range(10):
            await chain.ask(PROMPT)
        turn = iter(range(10**6))

        def alternate(request: object) -> Reply:
            # every other call takes 3 s (past the 2 s stall limit); the rest keep being answered in 0.2 s
            return Reply("lento", delay=3.0) if next(turn) % 2 else Reply("rápido", delay=0.2)

        fakes["openai"].default = alternate
        answers: list[str | None] = []

        async def ask() -> None:
            answers.append((await chain.ask(PROMPT)).provider)

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(ask)
                await trio.sleep(0.1)
        stats = stats_of(chain, "openai")
        hedges = chain.statistics().hedges
    # the slow calls were hedged after 0.4 s (2 x p95) and the fallback answered them; hedged away,
    # they are no failures, and the fast answers meanwhile show the provider is no stalled one
    assert sorted(answers) == ["anthropic"] * 25 + ["openai"] * 25 and hedges == 25
    assert stats.stalls == 0 and stats.circuit == "closed" and not stats.failures


@pytest.mark.parametrize("probe_latency", [1.0, 5.0])
async def test_half_open_sends_exactly_one_probe_and_its_success_closes(probe_latency: float, clock) -> None:
    async with chain_with(["openai", "anthropic"], CIRCUIT_COOLDOWN_SECONDS="30") as (chain, fakes):
        fakes["openai"].script(Fail(500), Fail(500), Fail(500), Reply("sondeo", delay=probe_latency))
        for _ in range(4):  # three failures open the circuit; the fourth ask does not reach openai
            assert (await chain.ask(PROMPT)).provider == "anthropic"
        assert fakes["openai"].calls == 3
        assert stats_of(chain, "openai").circuit == "open"

        await trio.sleep(30)
        assert stats_of(chain, "openai").circuit == "half_open"
        answers: list = []

        async def ask() -> None:
            answers.append(await chain.ask(PROMPT))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(ask)
        await trio.sleep(5)
        assert fakes["openai"].calls == 4  # one probe among five concurrent asks
        # with no latency known yet the probe's customer waits the 2 s stall floor for it, then the
        # fallback answers; the probe goes on and its success closes the circuit all the same
        probed = ["openai"] if probe_latency < 2.0 else ["anthropic"]
        assert sorted(a.provider for a in answers) == ["anthropic"] * 4 + probed
        assert stats_of(chain, "openai").circuit == "closed"
        assert (await chain.ask(PROMPT)).provider == "openai"


# -- hedging and the fallback's bound -------------------------------------------------------
async def warmed(chain: ProviderChain, fakes: dict[str, FakeAPI], delay: float = 0.2) -> None:
    """Ten answers from the primary (openai) in ``delay`` seconds: its p95, so a hedge after 2 x that."""
    fakes["openai"].script(*[Reply("rápido", delay=delay)] * 10)
    for _ in range(10):
        assert (await chain.ask(PROMPT)).provider == "openai"


async def timed_ask(chain: ProviderChain) -> tuple[object, float]:
    started = trio.current_time()
    answer = await chain.ask(PROMPT)
    return answer, trio.current_time() - started


async def race(chain: ProviderChain, fakes: dict[str, FakeAPI], primary: Reply, fallback: Reply) -> tuple[object, float]:
    """After the primary's warm-up, one message the primary and the fallback answer as given; its answer and wait."""
    await warmed(chain, fakes)
    fakes["openai"].script(primary)
    fakes["anthropic"].script(fallback)
    return await timed_ask(chain)


async def test_a_call_past_twice_the_p95_is_hedged_and_the_fallback_answer_wins(clock, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with chain_with(["openai", "anthropic"]) as (chain, fakes):
        answer, waited = await race(chain, fakes, Reply("lento", delay=5.0), Reply("respaldo", delay=0.3))
        chain_stats, primary = chain.statistics(), stats_of(chain, "openai")
        await trio.sleep(6)   # the primary's cancelled call does not come back as an answer later
        later = stats_of(chain, "openai")
    assert (answer.text, answer.provider, answer.fallback_used) == ("respaldo", "anthropic", True)
    assert 0.4 + 0.3 <= waited < 0.4 + 0.3 + 0.1   # hedged after 2 x 0.2 s, not the primary's 5 s
    assert (chain_stats.hedges, chain_stats.hedges_won, chain_stats.fallbacks_used) == (1, 1, 1)
    # the losing call was cancelled: not in flight, no failure, no success, the circuit untouched
    assert (primary.in_flight, primary.failures, primary.last_error, primary.circuit) == (0, {}, None, "closed")
    assert (later.successes, later.calls) == (10, 11)
    assert (LOGGER, logging.INFO, "LLM provider openai: no answer after 0.40s (2 x its p95): asking the fallback too") in records(caplog)
    assert (LOGGER, logging.INFO, "✅ Respuesta exitosa con proveedor de respaldo: anthropic") in records(caplog)


async def test_a_hedged_primary_that_answers_first_wins_and_the_fallback_call_is_cancelled(clock) -> None:
    async with chain_with(["openai", "anthropic"]) as (chain, fakes):
        answer, waited = await race(chain, fakes, Reply("principal", delay=0.6), Reply("respaldo", delay=3.0))
        chain_stats, fallback = chain.statistics(), stats_of(chain, "anthropic")
    assert (answer.text, answer.provider, answer.fallback_used) == ("principal", "openai", False)
    assert 0.6 - 1e-9 <= waited < 0.7
    assert (chain_stats.hedges, chain_stats.hedges_won, chain_stats.fallbacks_used) == (1, 0, 0)
    assert fakes["anthropic"].calls == 1
    assert (fallback.in_flight, fallback.failures, fallback.successes, fallback.circuit) == (0, {}, 0, "closed")


async def test_no_hedge_without_a_fallback(clock) -> None:
    async with chain_with(["openai"]) as (chain, fakes):
        await warmed(chain, fakes)
        fakes["openai"].script(Reply("lento", delay=3.0))
        answer, waited = await timed_ask(chain)
        chain_stats = chain.statistics()
    assert (answer.text, answer.provider) == ("lento", "openai")
    assert 3.0 <= waited < 3.1 and fakes["openai"].calls == 11
    assert (chain_stats.hedges, chain_stats.hedges_won) == (0, 0)


async def test_no_hedge_when_hedging_is_off(clock) -> None:
    async with chain_with(["openai", "anthropic"], LLM_HEDGE_FACTOR="0") as (chain, fakes):
        await warmed(chain, fakes)
        fakes["openai"].script(Reply("lento", delay=3.0))
        answer, _ = await timed_ask(chain)
    assert answer.provider == "openai" and fakes["anthropic"].calls == 0 and chain.statistics().hedges == 0


async def test_a_hedged_call_whose_fallback_fails_waits_for_the_primary_and_both_failing_is_polite(clock, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with chain_with(["openai", "anthropic"]) as (chain, fakes):
        await warmed(chain, fakes)
        # hedged after 0.4 s; then, its slowest recent answer being 1.5 s, after 3 s
        fakes["openai"].script(Reply("tarde", delay=1.5), Fail(500, delay=4.0))
        fakes["anthropic"].script(Fail(500), Fail(500))
        late, late_wait = await timed_ask(chain)     # the fallback fails at once: the primary still answers
        failed, failed_wait = await timed_ask(chain)  # both fail: the polite text, once both have failed
        chain_stats = chain.statistics()
    assert (late.text, late.provider, 1.5 <= late_wait < 1.6) == ("tarde", "openai", True)
    assert (failed.text, failed.provider, 4.0 <= failed_wait < 4.1) == (POLITE, None, True)
    assert (chain_stats.hedges, chain_stats.hedges_won, chain_stats.polite_answers) == (2, 0, 1)
    assert [sum(p.failures.values()) for p in chain_stats.providers] == [1, 2]
    messages = [m for _, _, m in records(caplog)]
    assert "❌ Error también con proveedor de respaldo (anthropic): 500 api_error" in messages
    assert [m for m in messages if m.startswith("Error con LLM provider principal (openai): 500")]


async def test_the_turn_deadline_holds_over_a_hedge(clock, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with chain_with(["openai", "anthropic"], TURN_DEADLINE_SECONDS="10") as (chain, fakes):
        await warmed(chain, fakes)
        fakes["openai"].default = Hang()
        fakes["anthropic"].default = Hang()
        answer, waited = await timed_ask(chain)
        chain_stats = chain.statistics()
    assert (answer.text, answer.failed) == (POLITE, True)
    assert 10 <= waited < 10.1
    assert (chain_stats.hedges, chain_stats.deadline_exceeded, chain_stats.polite_answers) == (1, 1, 1)
    # both calls were cut by the deadline: neither provider's fault
    assert [p.failures for p in chain_stats.providers] == [{}, {}]
    assert [p.in_flight for p in chain_stats.providers] == [0, 0]
    assert (LOGGER, logging.ERROR, "LLM turn deadline of 10s exceeded: answering with the polite text") in records(caplog)


async def test_the_fallback_carries_the_bound_of_a_primary_whose_circuit_is_open(clock) -> None:
    async with chain_with(["openai", "anthropic"], LLM_CONCURRENCY="4") as (chain, fakes):
        fakes["anthropic"].default = Reply("respaldo", delay=0.5)
        assert stats_of(chain, "anthropic").concurrency == 4
        fakes["openai"].default = Fail(401)   # opens the primary's circuit at once
        assert (await chain.ask(PROMPT)).provider == "anthropic"
        assert stats_of(chain, "openai").circuit == "open"
        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(chain.ask, PROMPT)
        opened = stats_of(chain, "anthropic")
        await trio.sleep(30)   # the cool-down: the probe (anthropic's answer wins) and the primary still failing
        fakes["openai"].default = Reply("sano")
        await trio.sleep(30)
        assert (await chain.ask(PROMPT)).provider == "openai"   # the probe closes the circuit
        await chain.ask(PROMPT)   # the bounds are sized at each admission
        closed = chain.statistics()
    # the primary's four slots came to the fallback while its circuit was open, and went back after
    assert opened.concurrency == 8 and fakes["anthropic"].max_in_flight == 8
    assert [p.concurrency for p in closed.providers] == [4, 4]


def raising(*errors: ProviderError):
    """An answer function for ScriptedProvider that raises ``errors`` in turn, then answers "sano"."""
    pending = list(errors)

    def answer(prompt: Prompt) -> str:
        if pending:
            raise pending.pop(0)
        return "sano"

    return answer


PER_REQUEST = [ProviderError(ErrorKind.BAD_REQUEST, "400 context_length_exceeded"),
               ProviderError(ErrorKind.EMPTY, "empty reply (length)"),
               ProviderError(ErrorKind.BLOCKED, "blocked reply (SAFETY)")]


async def test_per_request_failures_never_open_the_circuit() -> None:
    primary = ScriptedProvider(raising(*PER_REQUEST * 4))   # twelve in a row, threshold 3
    primary.name = "primary"
    fallback = ScriptedProvider(lambda p: "respaldo")
    fallback.name = "fallback"
    chain = ProviderChain([primary, fallback], polite_text=POLITE)
    answers = [await chain.ask(PROMPT) for _ in range(13)]
    stats = stats_of(chain, "primary")
    # each failing request moved on to the fallback on its own; the primary stayed open to everyone
    assert [a.provider for a in answers] == ["fallback"] * 12 + ["primary"]
    assert len(primary.prompts) == 13
    assert stats.circuit == "closed" and stats.available
    assert stats.failures == {"bad_request": 4, "empty": 4, "blocked": 4}


async def test_per_request_failures_between_provider_failures_do_not_add_up() -> None:
    server = ProviderError(ErrorKind.SERVER, "500 api_error")
    primary = ScriptedProvider(raising(server, PER_REQUEST[0], server, PER_REQUEST[1], PER_REQUEST[2]))
    primary.name = "primary"
    chain = ProviderChain([primary, ScriptedProvider(lambda p: "respaldo")], polite_text=POLITE)
    for _ in range(5):
        await chain.ask(PROMPT)
    assert stats_of(chain, "primary").circuit == "closed"   # two provider failures: below the threshold of 3
    assert (await chain.ask(PROMPT)).provider == "primary"


async def test_a_per_request_failure_of_the_probe_lets_the_next_message_probe(clock) -> None:
    server = ProviderError(ErrorKind.SERVER, "500 api_error")
    primary = ScriptedProvider(raising(server, server, server, PER_REQUEST[0]))
    primary.name = "primary"
    chain = ProviderChain([primary, ScriptedProvider(lambda p: "respaldo")], polite_text=POLITE, cooldown=30)
    for _ in range(3):
        await chain.ask(PROMPT)
    assert stats_of(chain, "primary").circuit == "open"
    await trio.sleep(30)
    assert (await chain.ask(PROMPT)).provider == "scripted"   # the probe: this chat's request is refused
    assert stats_of(chain, "primary").circuit == "half_open"  # no verdict on the provider: not reopened
    assert (await chain.ask(PROMPT)).provider == "primary"    # the next message probes, succeeds, closes it
    assert stats_of(chain, "primary").circuit == "closed"


async def test_per_request_failures_through_the_sdks_keep_the_circuit_closed() -> None:
    async with chain_with(["openai", "anthropic"]) as (chain, fakes):
        fakes["openai"].script(Fail(400), Reply(""), Blocked(), Fail(413), Fail(422), Blocked())
        fakes["anthropic"].default = Reply("respaldo")
        answers = [await chain.ask(PROMPT) for _ in range(7)]
        stats = stats_of(chain, "openai")
    assert [a.provider for a in answers] == ["anthropic"] * 6 + ["openai"]
    assert stats.circuit == "closed"
    assert stats.failures == {"bad_request": 3, "empty": 1, "blocked": 2}


async def test_auth_failure_opens_the_circuit_at_once(caplog) -> None:
    async with chain_with(["openai", "anthropic"]) as (chain, fakes):
        fakes["openai"].default = Fail(401)
        assert (await chain.ask(PROMPT)).provider == "anthropic"
        assert (await chain.ask(PROMPT)).provider == "anthropic"
        stats = stats_of(chain, "openai")
    assert fakes["openai"].calls == 1
    assert (stats.circuit, stats.failures, stats.last_error) == ("open", {"auth": 1}, "401 invalid_api_key")


# -- Retry-After ---------------------------------------------------------------------------
async def test_retry_after_within_budget_retries_the_same_provider(clock) -> None:
    async with chain_with(["openai", "anthropic"], LLM_RETRY_AFTER_BUDGET="2") as (chain, fakes):
        fakes["openai"].script(Fail(429, retry_after="1.5"), Reply("tras esperar"))
        start = trio.current_time()
        answer = await chain.ask(PROMPT)
        elapsed = trio.current_time() - start
    assert (answer.text, answer.provider, answer.fallback_used) == ("tras esperar", "openai", False)
    assert (fakes["openai"].calls, fakes["anthropic"].calls) == (2, 0)
    assert 1.5 <= elapsed < 2.5


async def test_retry_after_is_honoured_only_once(clock) -> None:
    async with chain_with(["openai", "anthropic"]) as (chain, fakes):
        fakes["openai"].script(Fail(429, retry_after="1"), Fail(429, retry_after="1"))
        answer = await chain.ask(PROMPT)
    assert answer.provider == "anthropic"
    assert fakes["openai"].calls == 2


async def test_retry_after_beyond_budget_moves_on_at_once(clock) -> None:
    async with chain_with(["openai", "anthropic"], LLM_RETRY_AFTER_BUDGET="2") as (chain, fakes):
        fakes["openai"].script(Fail(429, retry_after="30"))
        start = trio.current_time()
        answer = await chain.ask(PROMPT)
        elapsed = trio.current_time() - start
    assert answer.provider == "anthropic"
    assert (fakes["openai"].calls, fakes["anthropic"].calls) == (1, 1)
    assert elapsed < 1


# -- concurrency and deadlines --------------------------------------------------------------
async def test_concurrency_per_provider_is_bounded(clock) -> None:
    async with chain_with(["openai"], LLM_CONCURRENCY="4") as (chain, fakes):
        fakes["openai"].default = Reply("lento", delay=0.5)
        answers: list = []
        peak_waiting = 0

        async def ask() -> None:
            answers.append(await chain.ask(PROMPT))

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(ask)
            await trio.sleep(0.25)
            peak_waiting = stats_of(chain, "openai").waiting
        stats = stats_of(chain, "openai")
    assert len(answers) == 100 and all(a.provider == "openai" for a in answers)
    assert fakes["openai"].max_in_flight == 4
    assert peak_waiting == 96
    assert (stats.in_flight, stats.waiting, stats.calls, stats.successes) == (0, 0, 100, 100)


async def test_turn_deadline_answers_the_polite_text(clock, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with chain_with(["openai", "anthropic"], TURN_DEADLINE_SECONDS="25") as (chain, fakes):
        fakes["openai"].default = Hang()
        fakes["anthropic"].default = Hang()
        start = trio.current_time()
        answer = await chain.ask(PROMPT)
        elapsed = trio.current_time() - start
        stats = chain.statistics()
    assert answer.text == POLITE and answer.failed
    assert 25 <= elapsed < 26
    assert (stats.polite_answers, stats.deadline_exceeded) == (1, 1)
    # openai timed out (a failure); anthropic was cut by the deadline (not its fault)
    assert [sum(p.failures.values()) for p in stats.providers] == [1, 0]
    assert (LOGGER, logging.ERROR, "LLM turn deadline of 25s exceeded: answering with the polite text") in records(caplog)


# -- statistics and logs -------------------------------------------------------------------
async def test_statistics_snapshot_is_frozen_and_json_serialisable() -> None:
    async with chain_with(["openai", "anthropic"]) as (chain, fakes):
        fakes["openai"].script(Reply("a"), Fail(500), Reply("b"))
        for _ in range(3):
            await chain.ask(PROMPT)
        stats = chain.statistics()
    document = json.loads(json.dumps(attrs.asdict(stats)))
    openai_stats = document["providers"][0]
    assert openai_stats["name"] == "openai" and openai_stats["circuit"] == "closed"
    assert (openai_stats["calls"], openai_stats["successes"], openai_stats["failures"]) == (3, 2, {"server": 1})
    assert openai_stats["latency_p50_ms"] is not None and openai_stats["latency_p95_ms"] >= openai_stats["latency_p50_ms"]
    assert (document["asks"], document["fallbacks_used"], document["polite_answers"]) == (3, 1, 0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.asks = 0  # type: ignore[misc]


async def test_no_secret_or_prompt_in_logs(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    order = ["gemini", "anthropic", "huggingface", "openai", "ollama"]
    async with chain_with(order, OLLAMA_API_KEY=KEYS["ollama"]) as (chain, fakes):
        fakes["gemini"].script(Fail(429), Fail(400, body=GEMINI_BAD_KEY_BODY))
        fakes["anthropic"].script(Fail(401), Fail(401))
        fakes["huggingface"].script(Fail(401), Fail(403))
        fakes["openai"].script(Fail(401), Fail(401))
        fakes["ollama"].script(Reply("ok"), Fail(500))
        first = await chain.ask(PROMPT)
        second = await chain.ask(PROMPT)
    assert first.provider == "ollama" and second.failed
    lines = [r.getMessage() for r in caplog.records]
    assert any("401" in line for line in lines)
    for key in KEYS.values():
        assert not [line for line in lines if key in line], key
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [line for line in loud if CUSTOMER_TEXT in line or "30111222" in line]


async def test_build_chain_follows_the_provider_order() -> None:
    chain = build_chain(
        load_settings({"LLM_PROVIDER": "gemini", "LLM_PROVIDER_FALLBACK": "openai,gemini,offline",
                       "OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": refused_url()}, dotenv_file=None),
        POLITE,
    )
    try:
        stats = chain.statistics()
        assert [(p.name, p.configured) for p in stats.providers] == [("gemini", False), ("openai", True), ("offline", True)]
        answer = await chain.ask(Prompt("", (ChatMessage("user", "quiero reservar un turno"),)))
    finally:
        await chain.aclose()
    # gemini has no key and is skipped; openai's connection is refused; offline answers with the booking JSON
    assert answer.provider == "offline" and '"accion": "reserva"' in answer.text
