"""How long the event loop is blocked by admin listings, big-state turns and log rotation, in-process.

    .venv/bin/python bench/loop_block.py [--actors 100000] [--turns 10] [--log-mb 25]

A trio Instrument times every task step (the time between two checkpoints of one task: what
every other chat waits for). Three probes, each printed as a table row:

* ``/actors`` pages with N live actors, through the real app (QuartTrio test client), default
  limit and the maximum (1,000): the time of each request (an upper bound of its longest step);
  with the same actors, the admin console's "answering" filter (``Registry.keys_with_status``);
* a big-state turn: one chat fills its window with maximum-size messages (65,536 characters, the
  parser's limit) and the model answers as much; the longest task step of each further turn, with
  the real SQLite store, at the default bounds and with the bounds lifted (the old behaviour);
* log rotation: ``--log-mb`` of log lines through the real rotating handler (10 MB files),
  the longest step with and without the service's LogCompressor (gzip in a worker thread).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors.conversation import Control  # noqa: E402
from actors.llm.base import Prompt  # noqa: E402
from actors.service import Service  # noqa: E402
from app import create_app  # noqa: E402
from runtime.logs import LogCompressor, configure_logging  # noqa: E402
from tests.conftest import LoopbackClient, chain_of, make_settings, wait_for  # noqa: E402
from tests.payloads import upsert  # noqa: E402


class StepTimer(trio.abc.Instrument):
    """The longest task step since the last ``reset()``."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._started = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.longest = max(self.longest, time.perf_counter() - self._started)

    def reset(self) -> float:
        longest, self.longest = self.longest, 0.0
        return longest


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


async def actors_pages(actors: int, tmp: Path) -> list[str]:
    settings = make_settings(tmp / "pages")
    app = create_app(settings)
    app.test_client_class = LoopbackClient
    rows = []
    async with app.test_app() as test_app:
        client = test_app.test_client()
        service: Service = app.extensions["service"]
        assert service.registry is not None
        orders = []
        for i in range(actors):   # live actors with a real (empty) conversation state, spawned as usual
            order = Control("sent", [])
            service.registry.deliver(f"549{i:010d}@s.whatsapp.net", order, force=True)
            orders.append(order)
            if i % 1000 == 999:
                await trio.sleep(0)
        for order in orders:
            await order.done.wait()
        for limit in (100, 1000):
            times, cursor = [], None
            for _ in range(20):
                query = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
                started = time.perf_counter()
                response = await client.get("/actors", query_string=query)
                times.append(time.perf_counter() - started)
                body = await response.get_json()
                assert response.status_code == 200, body
                cursor = body["next_cursor"]
            rows.append(f"| /actors page, limit {limit}, {actors:,} live actors | {ms(statistics.median(times))} "
                        f"| {ms(max(times))} |")
        times = []
        for _ in range(5):
            started = time.perf_counter()
            service.registry.keys_with_status("running")
            times.append(time.perf_counter() - started)
        rows.append(f"| console filter \"answering\", {actors:,} live actors | {ms(statistics.median(times))} "
                    f"| {ms(max(times))} |")
    return rows


def bookkeeping_control() -> str:
    """A send-id control on an idle chat with a full window: the rollback copy, the change, the
    hibernation the registry does after it (what every settled reply costs its chat)."""
    from actors.state import ASSISTANT, USER, ConversationState, Window, WindowEntry

    entries = [WindowEntry((USER, ASSISTANT)[i % 2], "mensaje de 150 caracteres " * 6, 1769000000.0 + i)
               for i in range(50)]
    state = ConversationState(window=Window(entries))
    state.window.hibernate()
    count, started = 20_000, time.perf_counter()
    for _ in range(count):
        state.copy()
        state.sent_ids.append("id")
        del state.sent_ids[:-50]
        state.window.hibernate()
    per = (time.perf_counter() - started) / count
    return f"| send-id control on an idle chat, 50 messages of 150 characters | {per * 1e6:.1f} µs | - |"


async def big_state_turns(turns: int, tmp: Path, timer: StepTimer, *, bounded: bool) -> str:
    env: dict[str, Any] = {"STORE": "sqlite", "MAX_MESSAGES": 50}
    if not bounded:
        env.update(MAX_MESSAGE_CHARS=65536, MAX_WINDOW_CHARS=50 * 70_000, PROMPT_MAX_CHARS=60 * 70_000)
    settings = make_settings(tmp / ("bounded" if bounded else "unbounded"), **env)

    class Verbose:
        name, available = "verbose", True

        async def complete(self, prompt: Prompt, model: str | None = None) -> str:
            await trio.sleep(0.01)
            return "z" * 65_536

        async def aclose(self) -> None:
            return None

    service = Service(settings, chain=chain_of(settings, Verbose()))
    jid = "5491131376731@s.whatsapp.net"
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        assert service.outbound is not None
        steps = []
        for turn in range(25 + turns):   # 25 turns fill the 50-message window, then measure
            sent = len(service.outbound.outbox_entries(limit=100_000))
            timer.reset()
            await service.intake(upsert(f"{turn:03d}" + "y" * 65_533, jid=jid))
            await wait_for(lambda: len(service.outbound.outbox_entries(limit=100_000)) > sent, timeout=30)
            await trio.sleep(0.05)   # the commit and hibernation after the reply
            if turn >= 25:
                steps.append(timer.reset())
        nursery.cancel_scope.cancel()
    saved = (tmp / ("bounded" if bounded else "unbounded") / "data" / "agent.sqlite3").stat().st_size
    label = "defaults (8,000 / 100,000 / 60,000 characters)" if bounded else "bounds lifted (old behaviour)"
    return (f"| big-state turn, {label} | {ms(statistics.median(steps))} | {ms(max(steps))} |"
            f" <!-- database {saved / 1e6:.1f} MB -->")


async def log_rotation(megabytes: int, tmp: Path, timer: StepTimer, *, compressor: bool) -> str:
    folder = tmp / ("logs-async" if compressor else "logs-sync")
    configure_logging(log_dir=folder, max_bytes=10 * 1024 * 1024, backup_count=3, stderr=False)
    log = logging.getLogger("bench.loop_block")
    line = "x" * 200
    count = megabytes * 1024 * 1024 // 260
    async with trio.open_nursery() as nursery:
        if compressor:
            await nursery.start(LogCompressor().run)
        timer.reset()
        longest = 0.0
        for n in range(count):
            started = time.perf_counter()
            log.warning("line %d %s", n, line)
            longest = max(longest, time.perf_counter() - started)
            if n % 200 == 0:
                await trio.sleep(0)
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    label = "with the LogCompressor (service)" if compressor else "without it (gzip in the logging call)"
    return f"| log rotation, {megabytes} MB of lines, {label}: longest logging call | - | {ms(longest)} |"


async def main(args: argparse.Namespace, timer: StepTimer) -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rows = ["| probe | median ms | max ms |", "| --- | ---: | ---: |"]
        rows += await actors_pages(args.actors, tmp)
        rows.append(bookkeeping_control())
        rows.append(await big_state_turns(args.turns, tmp, timer, bounded=True))
        rows.append(await big_state_turns(args.turns, tmp, timer, bounded=False))
        rows.append(await log_rotation(args.log_mb, tmp, timer, compressor=False))
        rows.append(await log_rotation(args.log_mb, tmp, timer, compressor=True))
        print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", type=int, default=100_000)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--log-mb", type=int, default=25)
    options = parser.parse_args()
    for product in ("actors", "runtime"):
        logging.getLogger(product).setLevel(logging.WARNING)
    step_timer = StepTimer()
    trio.run(main, options, step_timer, instruments=[step_timer])
