"""What the admin console's overview costs the node per call, in its PostgreSQL reads: the node
list alone (what it reads now) against the node list plus every shard's lease row (what it read
when it was built from GET /cluster's body). The console asks every second while it is open.

    .venv/bin/python bench/overview_cost.py [--calls 300]

Starts a throwaway PostgreSQL cluster (tests/postgres.py), one node owning all 1024 shards.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.postgres_store import PostgresStore  # noqa: E402
from runtime.shards import ShardOwner  # noqa: E402
from tests.postgres import PostgresCluster  # noqa: E402


async def measure(url: str, calls: int) -> None:
    store = PostgresStore(url, shards=1024, node="a")
    await store.open()

    async def nothing(shards: list[int]) -> None:
        return None

    owner = ShardOwner(store, "a", shards=1024, on_gained=nothing, on_lost=nothing, on_release=nothing,
                       max_acquire=1024)
    await owner.step()

    async def before() -> Any:
        return await store.nodes(15.0), await store.lease_rows()

    async def after() -> Any:
        return await store.nodes(15.0)

    reads: list[tuple[str, Callable[[], Awaitable[Any]]]] = [("nodes + every lease row (before)", before),
                                                             ("nodes alone (now)", after)]
    try:
        for label, read in reads:
            for _ in range(20):   # warm the pool and the server's caches
                await read()
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(calls):
                await read()
            print(f"{label}: {(time.perf_counter() - wall) / calls * 1000:.2f} ms wall, "
                  f"{(time.process_time() - cpu) / calls * 1000:.2f} ms of the node's CPU per overview call")
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    cluster = PostgresCluster().start()
    try:
        trio.run(measure, cluster.create_database(), args.calls)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
