"""The owner's CPU per forwarded message (issue 16): a message accepted by a node that does not own
its chat, as the chat's owner pays for it, without the domain.

    .venv/bin/python bench/forward_cost.py [--tree DIR ...] [--messages 1200] [--rate 40] [--rounds 2]

Starts a throwaway PostgreSQL cluster (tests/postgres.py). For each round and each ``--tree`` (a
checkout whose ``runtime/`` is measured; default this one, e.g. compare with
``git archive <commit> runtime | tar -x -C /tmp/before``), in a fresh database: node ``a`` owns every
shard (``ShardOwner``) and runs ``PostgresStore.listen`` and ``InboxFeed`` as the service does;
node ``b``, another process, accepts ``--messages`` messages of 400 chats at ``--rate`` per second
(the rate scenario's half that reaches the other worker); ``a`` acks what it was handed once a
second (as turns would, so the inbox stays short). Prints ``a``'s process CPU (every thread) from
the first accept to the last hand-over, per message, and checks per-chat order.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from typing import Any
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
CHATS = 400

SENDER = r'''
import sys, trio
sys.path.insert(0, sys.argv[1])
from runtime.postgres_store import PostgresStore

async def main() -> None:
    b = PostgresStore(sys.argv[2], shards=1024, node="b")
    await b.open()
    count, rate, chats = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(count):
            await trio.sleep_until(start + i / rate)
            jid = f"549100{i % chats:06d}@s.whatsapp.net"
            nursery.start_soon(b.accept, f"bench/{jid}", f"m{i}", {
                "instance": "bench", "jid": jid, "text": f"hola {i} " * 8, "message_id": f"m{i}",
                "push_name": "Cliente", "timestamp": 1700000000 + i})
    await b.close()

trio.run(main)
'''


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def owner(tree: str, url: str, count: int, rate: float) -> None:
    from runtime.inbox_feed import InboxFeed
    from runtime.postgres_store import PostgresStore
    from runtime.shards import ShardOwner

    store = PostgresStore(url, shards=1024, node="a")
    await store.open()
    handed: list[Any] = []

    async def nothing(shards: list[int]) -> None:
        return None

    shards = ShardOwner(store, "a", shards=1024, lease_seconds=60, on_gained=nothing, on_lost=nothing,
                        on_release=nothing, max_acquire=1024)
    await shards.step()
    feed = InboxFeed(store, shards, deliver=handed.append, may_deliver=shards.owns, poll_seconds=1.0)

    async def ack_every_second() -> None:
        done = 0
        while True:
            await trio.sleep(1.0)
            rows, done = handed[done:], len(handed)
            if rows:
                keys, seqs = [r.key for r in rows], [r.seq for r in rows]
                await store._run(lambda conn: conn.execute(
                    "DELETE FROM agent_inbox i USING unnest(%s::text[], %s::bigint[]) AS d(key, seq)"
                    " WHERE i.key = d.key AND i.seq = d.seq", (keys, seqs)), mode="statement")

    async with trio.open_nursery() as nursery:
        await nursery.start(store.listen, "a", feed.wake)
        await nursery.start(feed.run)
        nursery.start_soon(ack_every_second)
        await trio.sleep(2.0)
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        sender = await trio.lowlevel.open_process(
            [sys.executable, "-c", SENDER, tree, url, str(count), str(rate), str(CHATS)])
        await sender.wait()
        with trio.fail_after(30):
            while len(handed) < count:
                await trio.sleep(0.01)
        cpu, wall = cpu_seconds() - cpu0, time.monotonic() - wall0
        nursery.cancel_scope.cancel()
    await store.close()
    last: dict[str, int] = {}
    for row in handed:
        assert row.seq == last.get(row.key, 0) + 1, f"{row.key}: {row.seq} after {last.get(row.key)}"
        last[row.key] = row.seq
    counters = {k: getattr(feed, k) for k in ("polls", "wakeups", "carried", "caught_up") if hasattr(feed, k)}
    print(f"{tree}: {count} forwarded in {wall:.1f} s, owner CPU {cpu:.3f} s = {cpu / count * 1000:.3f} ms/msg,"
          f" in order; {counters}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", help="a checkout whose runtime/ is measured (repeatable)")
    parser.add_argument("--messages", type=int, default=1200)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--owner", nargs=2, metavar=("TREE", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.owner:   # the measured process: the tree's runtime/ first on the path
        sys.path.insert(0, args.owner[0])
        trio.run(owner, args.owner[0], args.owner[1], args.messages, args.rate)
        return
    sys.path.insert(0, str(ROOT))
    from tests.postgres import PostgresCluster

    cluster = PostgresCluster().start()
    try:
        for _ in range(args.rounds):
            for tree in args.tree or [str(ROOT)]:
                subprocess.run([sys.executable, __file__, "--owner", os.path.abspath(tree), cluster.create_database(),
                                "--messages", str(args.messages), "--rate", str(args.rate)], check=True)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
