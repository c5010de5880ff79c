"""One LLM supervisor per provider account (actors/llm/accounts.py), with the real SDKs against local fakes.

Instances on the same account (provider, base URL, key) share one slot: its circuit, its concurrency
bound, its SDK client; an instance with its own key gets its own. Each request still carries its own
instance's model.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import attrs
import trio

from actors.llm.accounts import ChainPool
from actors.llm.base import ChatMessage, Prompt
from actors.settings import Settings, load_instances, load_settings
from tests.conftest import wait_for
from tests.fakes.llm import AnthropicFake, Fail, OpenAIFake, Reply
from tests.fakes.server import running_server

POLITE = "Gracias por contactarnos. En este momento estamos experimentando dificultades técnicas..."
PROMPT = Prompt("Eres el asistente.", (ChatMessage("user", "hola"),))
SHARED_KEY, OWN_KEY = "sk-shared-SECRET-1111", "sk-gamma-SECRET-2222"


def instances(tmp_path: Path, openai_url: str, **env: str) -> dict[str, Settings]:
    """Three instances on openai: acme and beta on the deployment's key (each its own model), gamma on its own key."""
    base = load_settings({"LLM_PROVIDER": "openai", "OPENAI_API_KEY": SHARED_KEY, "OPENAI_BASE_URL": openai_url,
                          "OPENAI_MODEL": "base-model", **env}, dotenv_file=None)
    path = tmp_path / "instances.toml"
    path.write_text('[instances."acme-bot"]\nopenai_model = "acme-model"\n'
                    '[instances."beta-shop"]\nopenai_model = "beta-model"\n'
                    '[instances."gamma"]\nopenai_api_key_env = "GAMMA_OPENAI_KEY"\n')
    return load_instances(base, path, {"GAMMA_OPENAI_KEY": OWN_KEY}, dotenv_file=None)


@asynccontextmanager
async def pool_over(tmp_path: Path, **env: str) -> AsyncIterator[tuple[ChainPool, dict[str, Settings], OpenAIFake]]:
    fake = OpenAIFake()
    async with running_server(fake) as url:
        pool = ChainPool()
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            try:
                yield pool, instances(tmp_path, url, **env), fake
            finally:
                fake.release()
                nursery.cancel_scope.cancel()
                await pool.aclose()


def health(chain, index: int = 0):  # type: ignore[no-untyped-def]
    return chain.statistics().providers[index]


async def test_instances_on_one_account_share_a_circuit_and_own_keys_do_not(tmp_path: Path) -> None:
    async with pool_over(tmp_path, CIRCUIT_FAILURE_THRESHOLD="3") as (pool, tenants, fake):
        acme, beta, gamma = (pool.chain_for(tenants[name], POLITE) for name in ("acme-bot", "beta-shop", "gamma"))
        assert acme is not beta and acme.slots[0] is beta.slots[0] and gamma.slots[0] is not acme.slots[0]
        fake.script(Fail(500), Fail(500), Fail(500))
        for _ in range(3):   # three provider-level failures through acme open the account's circuit
            assert (await acme.ask(PROMPT)).failed
        assert health(beta).circuit == "open"            # beta sees it open: the same circuit
        calls = fake.calls
        assert (await beta.ask(PROMPT)).failed and fake.calls == calls   # skipped: nothing reached the provider
        assert health(gamma).circuit == "closed"         # gamma's own key: its own circuit
        answer = await gamma.ask(PROMPT)
        assert answer.provider == "openai#2" and not answer.failed
        assert fake.requests[-1].headers["authorization"] == f"Bearer {OWN_KEY}"


async def test_each_request_carries_its_own_instances_model(tmp_path: Path) -> None:
    async with pool_over(tmp_path) as (pool, tenants, fake):
        for name in ("acme-bot", "beta-shop", "gamma", "acme-bot"):
            assert not (await pool.chain_for(tenants[name], POLITE).ask(PROMPT)).failed
        assert [r.json["model"] for r in fake.requests] == ["acme-model", "beta-model", "base-model", "acme-model"]
        assert [r.headers["authorization"] for r in fake.requests] == [
            f"Bearer {SHARED_KEY}", f"Bearer {SHARED_KEY}", f"Bearer {OWN_KEY}", f"Bearer {SHARED_KEY}"]


async def test_instances_on_one_account_share_its_concurrency_bound(tmp_path: Path) -> None:
    async with pool_over(tmp_path, LLM_CONCURRENCY="1") as (pool, tenants, fake):
        acme, beta, gamma = (pool.chain_for(tenants[name], POLITE) for name in ("acme-bot", "beta-shop", "gamma"))
        fake.script(Reply("lento", delay=2.0))
        answers: dict[str, bool] = {}

        async def ask(name: str, chain) -> None:  # type: ignore[no-untyped-def]
            answers[name] = not (await chain.ask(PROMPT)).failed

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "acme", acme)
            await wait_for(lambda: fake.in_flight == 1)
            nursery.start_soon(ask, "beta", beta)
            await wait_for(lambda: health(beta).waiting == 1)   # beta queues behind acme's call: one bound
            assert health(acme).waiting == 1 and fake.in_flight == 1
            assert not (await gamma.ask(PROMPT)).failed   # gamma's own account: its own bound, not queued
            assert fake.max_in_flight == 2 and health(beta).waiting == 1 and "acme" not in answers
        assert answers == {"acme": True, "beta": True} and fake.max_in_flight == 2
        assert [r.json["model"] for r in fake.requests] == ["acme-model", "base-model", "beta-model"]


async def test_a_fallback_carries_the_bound_of_an_open_primary_for_every_chain(tmp_path: Path) -> None:
    """The shared openai slot is sized across chains: acme's open primary (anthropic) lends openai its
    slots, and beta, whose chain is openai alone, does not size them back (sized per chain, it would)."""
    anthropic = AnthropicFake(default=Fail(401))
    async with running_server(anthropic) as anthropic_url, pool_over(tmp_path, LLM_CONCURRENCY="4") as (pool, tenants, _):
        acme_settings = tenants["acme-bot"]
        acme_settings = attrs.evolve(acme_settings, llm=attrs.evolve(
            acme_settings.llm, llm_provider="anthropic", llm_provider_fallback=("openai",),
            anthropic_api_key="sk-ant-acme-3333", anthropic_base_url=anthropic_url))
        acme, beta = pool.chain_for(acme_settings, POLITE), pool.chain_for(tenants["beta-shop"], POLITE)
        assert acme.slots[1] is beta.slots[0]
        answer = await acme.ask(PROMPT)      # a 401 opens anthropic's circuit at once; openai answers
        assert answer.provider == "openai" and answer.fallback_used and health(acme).circuit == "open"
        assert not (await beta.ask(PROMPT)).failed
        assert health(beta).concurrency == 8 == health(acme, 1).concurrency


async def test_the_same_settings_get_the_same_chain_and_statistics_show_no_key(tmp_path: Path) -> None:
    async with pool_over(tmp_path) as (pool, tenants, fake):
        acme = pool.chain_for(tenants["acme-bot"], POLITE)
        assert pool.chain_for(tenants["acme-bot"], POLITE) is acme
        assert pool.chain_for(attrs.evolve(tenants["acme-bot"]), POLITE) is acme
        assert pool.chain_for(tenants["acme-bot"], "Thank you for contacting us...") is not acme   # its own polite text
        pool.chain_for(tenants["gamma"], POLITE)
        accounts = pool.statistics()
        assert [(a.account, a.provider, a.host, a.chains) for a in accounts] == [
            ("openai", "openai", "127.0.0.1", 2), ("openai#2", "openai", "127.0.0.1", 1)]
        assert SHARED_KEY not in repr(accounts) and OWN_KEY not in repr(attrs.asdict(accounts[1]))


async def test_closing_one_chain_leaves_the_shared_client_to_the_pool(tmp_path: Path) -> None:
    async with pool_over(tmp_path) as (pool, tenants, fake):
        acme, beta = pool.chain_for(tenants["acme-bot"], POLITE), pool.chain_for(tenants["beta-shop"], POLITE)
        await acme.aclose()                  # a pool's chain only borrows its slots
        assert not (await beta.ask(PROMPT)).failed and fake.requests[-1].json["model"] == "beta-model"


async def test_the_pool_runs_the_probes_of_chains_made_before_and_after_it_started(tmp_path: Path) -> None:
    fake = OpenAIFake()
    async with running_server(fake) as url:
        tenants = instances(tmp_path, url)
        pool = ChainPool()
        before = pool.chain_for(tenants["acme-bot"], POLITE)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            after = pool.chain_for(tenants["beta-shop"], POLITE)
            assert before._nursery is after._nursery is not None   # one nursery for every chain's probes
            nursery.cancel_scope.cancel()
        assert before._nursery is None and after._nursery is None
        await pool.aclose()
