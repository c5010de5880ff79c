"""Overhead of the fallback chain on top of a direct SDK call (openai), against a zero-latency fake.

The fake OpenAI API runs as a separate process (``python -m tests.fakes.llm``) on 127.0.0.1, so its
CPU does not share the measuring event loop. Calls alternate between a bare ``AsyncOpenAI`` client
and ``ProviderChain.ask`` (which wraps its own ``AsyncOpenAI`` client), one at a time, after a warm-up.

    .venv/bin/python bench/llm_overhead.py --calls 2000
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors.llm.base import ChatMessage, Prompt  # noqa: E402
from actors.llm.chain import build_chain  # noqa: E402
from actors.llm.providers import chat_messages  # noqa: E402
from actors.settings import load_settings  # noqa: E402

PROMPT = Prompt(
    "Eres el asistente virtual de una clínica. Responde en español, breve y amable.",
    (
        ChatMessage("user", "Hola, buenas tardes"),
        ChatMessage("assistant", "¡Hola! ¿En qué puedo ayudarte?"),
        ChatMessage("user", "¿Qué horarios tienen el sábado?"),
    ),
)


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(pct / 100.0 * len(ordered)) - 1)]


async def start_fake(nursery: trio.Nursery) -> tuple[trio.Process, str]:
    """Run the OpenAI fake in its own process; return it and its base URL (read from its first line)."""
    process: trio.Process = await nursery.start(
        lambda task_status: trio.run_process(
            [sys.executable, "-m", "tests.fakes.llm", "--port", "0", "--latency", "fixed:0"],
            cwd=str(ROOT), stdout=subprocess.PIPE, check=False, task_status=task_status,
        )
    )
    assert process.stdout is not None
    line = b""
    with trio.fail_after(30):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            if not chunk:
                raise RuntimeError("the fake exited before it was listening")
            line += chunk
    return process, line.decode().strip().rsplit(" ", 1)[-1]


async def measure(calls: int, warmup: int) -> dict[str, list[float]]:
    import openai
    from openai.types.chat import ChatCompletion

    async with trio.open_nursery() as nursery:
        process, url = await start_fake(nursery)
        settings = load_settings(
            {"LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": url, "LLM_TIMEOUT": "20"},
            dotenv_file=None,
        )
        direct = openai.AsyncOpenAI(api_key="sk-bench", base_url=url, timeout=settings.llm.llm_timeout, max_retries=0)
        chain = build_chain(settings, "polite")

        async def direct_call() -> None:   # the very request OpenAIProvider.complete sends
            response = await direct.post(
                "/chat/completions", cast_to=ChatCompletion, options={"security": {"bearer_auth": True}},
                body={"model": settings.llm.openai_model, "messages": chat_messages(PROMPT),
                      "max_completion_tokens": settings.llm.llm_max_tokens},
            )
            assert response.choices[0].message.content

        async def chain_call() -> None:
            answer = await chain.ask(PROMPT)
            assert answer.provider == "openai", answer

        samples: dict[str, list[float]] = {"direct": [], "chain": []}
        try:
            for index in range(warmup + calls):
                for label, call in (("direct", direct_call), ("chain", chain_call)):
                    started = time.perf_counter()
                    await call()
                    if index >= warmup:
                        samples[label].append((time.perf_counter() - started) * 1000.0)
        finally:
            await direct.close()
            await chain.aclose()
            process.terminate()
    return samples


async def measure_in_process(calls: int) -> dict[str, list[float]]:
    """The supervisor's own cost, without network noise: the offline provider alone vs through the chain."""
    from actors.llm.chain import ProviderChain
    from actors.llm.offline import OfflineProvider

    provider = OfflineProvider()
    chain = ProviderChain([provider], polite_text="polite")
    samples: dict[str, list[float]] = {"direct": [], "chain": []}
    for _ in range(calls):
        started = time.perf_counter()
        await provider.complete(PROMPT)
        samples["direct"].append((time.perf_counter() - started) * 1000.0)
        started = time.perf_counter()
        await chain.ask(PROMPT)
        samples["chain"].append((time.perf_counter() - started) * 1000.0)
    return samples


def report(title: str, samples: dict[str, list[float]]) -> None:
    rows = {label: (percentile(s, 50), percentile(s, 99), sum(s) / len(s)) for label, s in samples.items()}
    print(title)
    print(f"{'':10}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for label, (p50, p99, mean) in rows.items():
        print(f"{label:10}{p50:10.3f}{p99:10.3f}{mean:10.3f}")
    (d50, d99, dmean), (c50, c99, cmean) = rows["direct"], rows["chain"]
    print(f"{'overhead':10}{c50 - d50:10.3f}{c99 - d99:10.3f}{cmean - dmean:10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="measured calls each way")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured calls each way first")
    args = parser.parse_args()
    samples = trio.run(measure, args.calls, args.warmup)
    print(f"{args.calls} calls each way after {args.warmup} warm-up, one at a time; "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}")
    report("openai SDK -> fake on 127.0.0.1 (separate process), direct vs through the chain:", samples)
    report("offline provider, direct vs through the chain (the supervisor's own cost):",
           trio.run(measure_in_process, args.calls))

if __name__ == "__main__":
    main()
