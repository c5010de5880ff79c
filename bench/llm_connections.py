"""How many connections each LLM provider's SDK client opens for bursts of concurrent calls.

    .venv/bin/python bench/llm_connections.py [--bursts 10] [--concurrency 32,128] [--providers openai,anthropic,gemini,huggingface]

Each provider is built as the service builds it (``build_provider``) and pointed at the local fake
of its API (tests/fakes/llm.py) under hypercorn on 127.0.0.1. The load is ``--bursts`` bursts of
``--concurrency`` calls at once (the fake answers each after 0.2 s), 1 s apart: a chat service's
traffic, where the calls in flight rise and fall. The fake counts the connections it was opened
(distinct client ports). Kept alive, one burst's connections serve the next ones: ``concurrency``
connections in all. An SDK client that keeps fewer idle connections than the calls it carries
closes the rest after each burst and opens them again for the next one (a TCP and, against a real
provider, a TLS handshake each).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.llm.base import ChatMessage, Prompt  # noqa: E402
from actors.llm.providers import build_provider  # noqa: E402
from actors.settings import load_settings  # noqa: E402
from tests.fakes.llm import AnthropicFake, FakeAPI, GeminiFake, HuggingFaceFake, OpenAIFake  # noqa: E402
from tests.fakes.server import running_server  # noqa: E402

KEY = "sk-bench"
PROMPT = Prompt("Eres el asistente.", (ChatMessage("user", "hola"),))
FAKES = {"openai": OpenAIFake, "anthropic": AnthropicFake, "gemini": GeminiFake, "huggingface": HuggingFaceFake}
ENV = {
    "openai": lambda url: {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": url, "OPENAI_MODEL": "gpt-bench"},
    "anthropic": lambda url: {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": url, "ANTHROPIC_MODEL": "claude-bench"},
    "gemini": lambda url: {"GEMINI_API_KEY": KEY, "GEMINI_BASE_URL": url, "GEMINI_MODEL": "gemini-bench"},
    "huggingface": lambda url: {"HUGGINGFACE_API_KEY": KEY, "HF_BASE_URL": url, "HF_MODEL": "Qwen/bench"},
}


class Counted:
    """The fake, counting the connections its requests came on (hypercorn: one client port each)."""

    def __init__(self, fake: FakeAPI) -> None:
        self.fake = fake
        self.ports: set[Any] = set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.ports.add(tuple(scope.get("client") or ()))
        await self.fake(scope, receive, send)


async def measure(name: str, concurrency: int, bursts: int) -> tuple[int, int, float]:
    """(calls answered, connections opened, CPU ms per call of this process)."""
    counted = Counted(FAKES[name](latency=lambda: 0.2, record=False))
    async with running_server(counted) as url:
        settings = load_settings({"LLM_PROVIDER": "offline", "LLM_CONCURRENCY": str(concurrency), **ENV[name](url)},
                                 dotenv_file=None)
        provider = build_provider(name, settings)
        answered = 0

        async def call() -> None:
            nonlocal answered
            await provider.complete(PROMPT)
            answered += 1

        cpu = time.process_time()
        try:
            for _ in range(bursts):
                async with trio.open_nursery() as nursery:
                    for _ in range(concurrency):
                        nursery.start_soon(call)
                await trio.sleep(1.0)
        finally:
            await provider.aclose()
        cpu = time.process_time() - cpu
    return answered, len(counted.ports), 1000 * cpu / max(1, answered)


async def main(providers: list[str], concurrencies: list[int], bursts: int) -> None:
    print("| provider | calls at once | bursts | calls | connections opened | CPU ms per call (client and fake) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in providers:
        for concurrency in concurrencies:
            answered, opened, cpu = await measure(name, concurrency, bursts)
            print(f"| {name} | {concurrency} | {bursts} | {answered} | {opened} | {cpu:.2f} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=10)
    parser.add_argument("--concurrency", default="32,128", help="calls at once, comma-separated")
    parser.add_argument("--providers", default="openai,anthropic,gemini,huggingface")
    args = parser.parse_args()
    trio.run(main, args.providers.split(","), [int(c) for c in args.concurrency.split(",")], args.bursts)
