"""How long the PostgreSQL store takes to serve again once the database is back after an outage.

    .venv/bin/python bench/db_outage.py [--outages 5,20,60] [--rate 20]

Starts a throwaway PostgreSQL cluster (tests/postgres.py) and one ``PostgresStore`` with the
service's pool settings. Messages are accepted at ``--rate`` per second (as webhooks would), each
from its own task, so failing calls do not slow the others down. For each outage length the server
is stopped (``pg_ctl stop -m fast``, which also breaks the pool's connections), kept down that long,
and started again; the figure is the time from the server accepting connections again to the first
accept that succeeds ("lag"), and how many accepts failed in all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.postgres_store import PostgresStore  # noqa: E402
from runtime.store import StoreError  # noqa: E402
from tests.postgres import PostgresCluster  # noqa: E402


async def one_outage(cluster: PostgresCluster, store: PostgresStore, down_s: float, rate: float) -> tuple[float, int]:
    """(seconds from the server's restart to the first accept that succeeded, accepts failed)."""
    back_at: float | None = None
    first_ok: float | None = None
    failed = 0
    sent = 0

    async def post(n: int) -> None:
        nonlocal first_ok, failed
        try:
            await store.accept(f"bench/{n % 50}", f"outage:{down_s}:{n}", {"n": n})
        except StoreError:
            failed += 1
            return
        if back_at is not None and first_ok is None:
            first_ok = time.monotonic()

    async with trio.open_nursery() as nursery:
        async def load() -> None:
            nonlocal sent
            while True:
                sent += 1
                nursery.start_soon(post, sent)
                await trio.sleep(1 / rate)

        nursery.start_soon(load)
        await trio.sleep(2)
        await trio.to_thread.run_sync(cluster.pg_ctl, "stop")
        await trio.sleep(down_s)
        await trio.to_thread.run_sync(cluster.pg_ctl, "start")   # returns once it accepts connections
        back_at = time.monotonic()
        with trio.move_on_after(max(120.0, 2 * down_s)):
            while first_ok is None:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    lag = (first_ok - back_at) if first_ok is not None else float("inf")
    return lag, failed


async def main(outages: list[float], rate: float) -> None:
    cluster = PostgresCluster().start()
    try:
        store = PostgresStore(cluster.create_database(), pool_size=8, connect_timeout=10.0)   # config.toml's
        await store.open()
        try:
            print("| outage s | back after s | accepts failed |")
            print("|---:|---:|---:|")
            for down_s in outages:
                lag, failed = await one_outage(cluster, store, down_s, rate)
                print(f"| {down_s:g} | {lag:.2f} | {failed} |", flush=True)
        finally:
            await store.close()
    finally:
        cluster.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outages", default="5,20,60", help="outage lengths in seconds, comma-separated")
    parser.add_argument("--rate", type=float, default=20.0, help="accepts per second")
    args = parser.parse_args()
    trio.run(main, [float(x) for x in args.outages.split(",")], args.rate)
