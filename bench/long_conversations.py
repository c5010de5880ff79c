"""Long conversations: the sliding window against summarised memory (MEMORY_SUMMARY), what each
costs in prompt tokens, how much of each prompt a provider's prefix cache can reuse, the extra LLM
calls of summarising, and the reply latency (docs/memory-and-caching.md).

An in-process Service (memory store, local outbox) talks to the OpenAI provider through the real
SDK, pointed at the in-process OpenAI fake (tests/fakes/llm.py) on 127.0.0.1. ``--chats`` customers
each hold a ``--turns``-turn conversation, one message after the reply to the previous one,
``--concurrent`` chats at a time (the service, the SDK and the fake share one process: with every
chat at once the latencies measure the machine's saturation more than the modes). The fake answers ~``--reply-chars`` characters after ``--llm-latency`` seconds, and a summary
request with a summary that carries the previous one forward plus what the customer said (what the
summary instruction asks of a model), so the customer's name from turn 1 can be checked at the end.

Tokens are estimated as characters / 4 (the messages' text: system, summary, window; the JSON
around them is not counted). The *cacheable share* of a prompt is the part of its text equal to the
previous prompt of the same chat from the start (whole messages): what a provider's prefix cache can
reuse. *Uncached* tokens are the rest. The fake also applies OpenAI's own rule (cached from 1,024
tokens, in 128-token steps) to the usage it reports: those figures are shown too (``openai rule``).

    .venv/bin/python bench/long_conversations.py [--chats 200] [--turns 60] [--concurrent 50] [--llm-latency 0.05]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors.conversation_key import ConversationKey  # noqa: E402
from actors.prompts import SPANISH  # noqa: E402
from actors.service import Service  # noqa: E402
from actors.settings import load_settings  # noqa: E402
from tests.fakes.llm import OpenAIFake, RecordedRequest, Reply, common_prefix  # noqa: E402
from tests.fakes.server import running_server  # noqa: E402
from tests.payloads import upsert  # noqa: E402

CHARS_PER_TOKEN = 4
QUESTIONS = ("¿Qué horarios tienen el sábado por la mañana?", "¿Cuánto cuesta la revisión completa del equipo?",
             "¿Puedo pagar con tarjeta o transferencia?", "¿El precio incluye los repuestos o van aparte?",
             "¿Tienen estacionamiento cerca del local?", "Perfecto, ¿y cuánto tarda normalmente el trabajo?")


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(pct / 100.0 * len(ordered)) - 1)] if ordered else float("nan")


def text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content or [])


class Recorder:
    """The fake's behaviour: answers, and measures every request it gets."""

    def __init__(self, reply_chars: int, latency: float) -> None:
        self.reply_chars = reply_chars
        self.latency = latency
        self.last: dict[str, list[dict[str, Any]]] = {}
        self.turn_chars: list[int] = []
        self.turn_shared: list[int] = []
        self.summary_calls = 0
        self.summary_chars = 0

    def __call__(self, request: RecordedRequest) -> Reply:
        messages = (request.json or {}).get("messages") or []
        chars = sum(len(text_of(m)) for m in messages)
        if messages and text_of(messages[0]) == SPANISH.summary_instruction:
            self.summary_calls += 1
            self.summary_chars += chars
            return Reply(self._summary(text_of(messages[-1])), delay=self.latency)
        key = str(request.json.get("prompt_cache_key", ""))
        previous = self.last.get(key, [])
        shared = common_prefix(messages, previous)
        self.last[key] = messages
        self.turn_chars.append(chars)
        self.turn_shared.append(sum(len(text_of(m)) for m in messages[:shared]))
        question = text_of(messages[-1])
        body = f"Sobre «{question[:60]}»: " + "con gusto te ayudo; " * 40
        return Reply(body[:self.reply_chars], delay=self.latency)

    @staticmethod
    def _summary(request: str) -> str:
        previous = request.split("\n", 2)[1]
        said = [line[len("[customer] "):] for line in request.splitlines() if line.startswith("[customer] ")]
        facts = [] if previous == "(none)" else [previous]
        facts += [s for s in said if "llamo" in s or "cita" in s]   # the durable facts; small talk dropped
        facts.append(f"Hizo {len(said)} preguntas más sobre horarios, precios y pagos.")
        return " ".join(facts)[:1200]


async def run_mode(summary: bool, args: argparse.Namespace) -> dict[str, Any]:
    recorder = Recorder(args.reply_chars, args.llm_latency)
    fake = OpenAIFake(default=recorder, record=False)
    turn_seconds: list[float] = []
    async with running_server(fake) as url:
        env = {"LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": url,
               "STORE": "memory", "DATA_DIR": tempfile.mkdtemp(), "LOG_DIR": tempfile.mkdtemp(),
               "REORDER_DELAY_SECONDS": "0", "FLOOD_MAX_PER_MINUTE": "0", "NEW_CHATS_PER_MINUTE": "0",
               "OUTBOUND_MIN_GAP_SECONDS": "0", "OUTBOUND_RATE_PER_INSTANCE": "0", "TYPING_PRESENCE": "false",
               "MAX_MESSAGES": str(args.max_messages), "SUMMARY_CHUNK": str(args.chunk),
               "MEMORY_SUMMARY": "true" if summary else "false", "LLM_TIMEOUT": "60", "TURN_DEADLINE_SECONDS": "120"}
        service = Service(load_settings(env, dotenv_file=None))

        class Turns:   # the service's arrival → committed-reply observer, recorded here
            @staticmethod
            def observe(seconds: float) -> None:
                turn_seconds.append(seconds)

        service.metrics.turn_seconds = Turns()   # type: ignore[assignment]
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            assert service.registry is not None

            async def customer(n: int) -> None:
                jid = f"54911{n:08d}@s.whatsapp.net"
                for turn in range(args.turns):
                    text = (f"Hola, me llamo Cliente{n} y quiero una cita para revisar mi equipo" if turn == 0
                            else f"{QUESTIONS[turn % len(QUESTIONS)]} (consulta {turn})")
                    result = await service.intake(upsert(text, jid=jid, timestamp=1769000000 + turn,
                                                         message_id=f"B{n:05d}T{turn:04d}"))
                    assert result.status == 200, result
                    key = keys[n] = ConversationKey(result.body["instance"], jid).key
                    while True:
                        actor = service.registry.actor(key) if key in service.registry else None
                        if actor is not None and actor.state.replies_out > turn:   # type: ignore[attr-defined]
                            break
                        await trio.sleep(0.005)

            keys: dict[int, str] = {}   # each chat's conversation key, as intake answered it
            talking = trio.CapacityLimiter(args.concurrent)

            async def one_chat(n: int) -> None:
                async with talking:
                    await customer(n)

            async with trio.open_nursery() as chats:
                for n in range(args.chats):
                    chats.start_soon(one_chat, n)
            # let the last folds land, then read the summaries
            assert service.summariser is not None
            while service.summariser.statistics()["in_progress"]:
                await trio.sleep(0.05)
            elapsed = time.perf_counter() - started
            summaries = [service.registry.actor(keys[n]).state.summary   # type: ignore[attr-defined]
                         for n in range(args.chats)]
            assert service.chain is not None
            [usage] = [p.prompt_cache for p in service.chain.statistics().providers if p.name == "openai"]
            nursery.cancel_scope.cancel()
    turns = len(recorder.turn_chars)
    sent = sum(recorder.turn_chars) / CHARS_PER_TOKEN
    shared = sum(recorder.turn_shared) / CHARS_PER_TOKEN
    summary_tokens = recorder.summary_chars / CHARS_PER_TOKEN
    full = [i for i in range(turns) if recorder.turn_chars[i] > 0]
    return {
        "mode": "summarised" if summary else "sliding",
        "turns": turns,
        "seconds": round(elapsed, 1),
        "prompt_tokens_per_turn": round(sent / turns, 1),
        "cacheable_share": round(shared / sent, 4),
        "mean_share_per_prompt": round(sum(recorder.turn_shared[i] / recorder.turn_chars[i] for i in full) / len(full), 4),
        "uncached_tokens_per_turn": round((sent - shared) / turns, 1),
        "summary_calls": recorder.summary_calls,
        "summary_calls_per_turn": round(recorder.summary_calls / turns, 4),
        "summary_prompt_tokens_per_turn": round(summary_tokens / turns, 1),
        "uncached_tokens_per_turn_with_summaries": round((sent - shared + summary_tokens) / turns, 1),
        "openai_rule": usage,
        "reply_latency_ms": {"p50": round(percentile(turn_seconds, 50) * 1000, 1),
                             "p95": round(percentile(turn_seconds, 95) * 1000, 1),
                             "p99": round(percentile(turn_seconds, 99) * 1000, 1)},
        "summaries_with_the_name_from_turn_1": sum(f"Cliente{n}" in s for n, s in enumerate(summaries)),
        "chats": args.chats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--turns", type=int, default=60)
    parser.add_argument("--concurrent", type=int, default=50, help="chats talking at the same time")
    parser.add_argument("--max-messages", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=20)
    parser.add_argument("--reply-chars", type=int, default=300)
    parser.add_argument("--llm-latency", type=float, default=0.05, help="seconds per fake LLM call")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    print(f"{args.chats} chats x {args.turns} turns ({args.concurrent} at a time), MAX_MESSAGES={args.max_messages}, SUMMARY_CHUNK={args.chunk}, "
          f"replies ~{args.reply_chars} chars, fake LLM latency {args.llm_latency}s; tokens = chars / {CHARS_PER_TOKEN}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    results = [trio.run(run_mode, False, args), trio.run(run_mode, True, args)]
    for result in results:
        print(json.dumps(result, ensure_ascii=False))
    sliding, summarised = results
    print(f"uncached tokens per turn: {sliding['uncached_tokens_per_turn']} → "
          f"{summarised['uncached_tokens_per_turn_with_summaries']} (summary calls included): "
          f"{summarised['uncached_tokens_per_turn_with_summaries'] / sliding['uncached_tokens_per_turn']:.0%} of the sliding window's")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
