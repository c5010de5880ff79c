"""Reply settle time with typing presence on, under many concurrent turns (docs/performance.md).

The Evolution fake runs as a separate process (``python -m tests.fakes.evolution``) and, like
Evolution, answers ``sendPresence`` only after its ``delay`` (3 s). In this process the service's
``OutboundSender`` plays ``--turns`` concurrent turns per round, as a conversation turn does: show
"typing…", wait the LLM's latency, submit the reply. The figure is each reply's settle time: from
``submit()`` to Evolution accepting its ``sendText``. Rounds follow each other at once, so the
previous round's presence calls are still held when the next round replies. Typing on, then off.

    .venv/bin/python bench/typing_presence.py [--turns 60] [--rounds 5] [--llm-s 0.3]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors.outbound import Delivery, OutboundMessage, OutboundSender  # noqa: E402
from actors.settings import load_settings  # noqa: E402
from run import start_evolution  # noqa: E402  (bench/run.py: this directory is on sys.path)


def percentile(ordered: list[float], pct: float) -> float:
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


async def measure(url: str, *, typing: bool, turns: int, rounds: int, llm_s: float) -> list[float]:
    """Settle seconds of every reply, ``rounds`` x ``turns`` of them."""
    settings = load_settings({
        "EVOLUTION_API_URL": url, "EVOLUTION_API_KEY": "k", "EVOLUTION_INSTANCE": "bench",
        "OUTBOUND_MIN_GAP_SECONDS": "0", "OUTBOUND_RATE_PER_INSTANCE": "0",
        "TYPING_PRESENCE": "true" if typing else "false",
    }, dotenv_file=None)
    submitted: dict[str, float] = {}
    settles: list[float] = []
    settled = trio.Event()

    async def on_settled(message: OutboundMessage, delivery: Delivery) -> None:
        if delivery.status != "sent":
            raise RuntimeError(f"reply to {message.jid} not sent: {delivery.error}")
        settles.append(trio.current_time() - submitted[message.jid])
        if len(settles) % turns == 0:
            settled.set()

    sender = OutboundSender(settings, on_settled=on_settled)

    async def turn(jid: str) -> None:
        await sender.typing(jid, ())
        await trio.sleep(llm_s)
        submitted[jid] = trio.current_time()
        sender.submit(OutboundMessage(jid, "Hola, ¿en qué puedo ayudarte?"))

    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        for index in range(rounds):
            settled = trio.Event()
            async with trio.open_nursery() as turns_nursery:
                for i in range(turns):
                    turns_nursery.start_soon(turn, f"549{typing:d}{index:03d}{i:05d}@s.whatsapp.net")
            with trio.fail_after(60):
                await settled.wait()
        nursery.cancel_scope.cancel()
    return settles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=60, help="concurrent turns per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--llm-s", type=float, default=0.3, help="seconds between typing and the reply")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-typing-") as work:
        evolution, url = start_evolution(Path(work))
        try:
            print(f"{args.turns} concurrent turns x {args.rounds} rounds, {args.llm_s:g} s from typing to reply; "
                  f"Evolution holds each sendPresence for its 3 s delay")
            print(f"{'typing':<8}{'replies':>8}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}")
            for typing in (True, False):
                settles = sorted(trio.run(lambda: measure(url, typing=typing, turns=args.turns,
                                                          rounds=args.rounds, llm_s=args.llm_s)))
                print(f"{'on' if typing else 'off':<8}{len(settles):>8}{percentile(settles, 50) * 1000:>9.1f}"
                      f"{percentile(settles, 95) * 1000:>9.1f}{settles[-1] * 1000:>9.1f}")
        finally:
            evolution.stop()


if __name__ == "__main__":
    main()
