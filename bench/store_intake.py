"""Intake throughput and latency of the stores: C trio tasks, each accepting messages for its own key.

Usage::

    .venv/bin/python bench/store_intake.py [--concurrency 200] [--duration 5] [--dir DIR] [--postgres]

For each store (MemoryStore, SqliteStore synchronous=FULL, SqliteStore synchronous=NORMAL, and with
``--postgres`` a PostgresStore on a throwaway local cluster, tests/postgres.py) it runs
``concurrency`` tasks for ``duration`` seconds; every task loops ``await store.accept(...)`` with
its own key and a webhook-sized payload, timing each call. It prints accepted messages/s, accept
latency p50/p99, the benchmark process's CPU per message (for PostgreSQL the server's CPU is not
in it) and, for SQLite, the transactions run and the mean group-commit size, as a Markdown table. SQLite files go to a fresh temporary directory inside ``--dir`` (default: the
system temp dir), so pass the data directory's file system to measure its fsync cost.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.memory_store import MemoryStore  # noqa: E402
from runtime.sqlite_store import SqliteStore  # noqa: E402
from runtime.store import Store  # noqa: E402


@attrs.frozen
class Result:
    name: str
    accepted: int
    seconds: float
    p50_ms: float
    p99_ms: float
    transactions: int | None
    cpu_ms: float = 0.0

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds


def payload(key: str, i: int) -> dict[str, Any]:
    """Roughly what ``/webhook`` stores for one text message."""
    return {
        "jid": key, "instance": "bench-instance", "instance_name": "bench", "message_id": f"3EB0{i:016X}",
        "text": "Hola, quisiera agendar una cita para la próxima semana, ¿tienen disponibilidad? 🙏",
        "push_name": "Cliente de prueba", "from_me": False, "kind": "text", "timestamp": 1_767_000_000 + i,
    }


async def run_one(name: str, store: Store, concurrency: int, duration: float) -> Result:
    """Run ``concurrency`` accepting tasks against an opened ``store`` for ``duration`` seconds."""
    latencies: list[float] = []
    deadline = trio.current_time() + duration

    async def client(c: int) -> None:
        key = f"5491100{c:06d}@s.whatsapp.net"
        i = 0
        while trio.current_time() < deadline:
            i += 1
            t0 = time.perf_counter()
            seq = await store.accept(key, f"bench:{c}:{i}", payload(key, i))
            latencies.append(time.perf_counter() - t0)
            assert seq == i, (key, seq, i)
            await trio.lowlevel.checkpoint()  # MemoryStore never yields: keep the tasks fair

    start, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for c in range(concurrency):
            nursery.start_soon(client, c)
    seconds = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    cpu_ms = (time.process_time() - cpu) * 1000 / max(1, len(latencies))
    transactions = store.transactions if isinstance(store, SqliteStore) else None
    return Result(name, len(latencies), seconds, q[49] * 1000, q[98] * 1000, transactions, cpu_ms)


async def main(concurrency: int, duration: float, base: Path | None, postgres: bool) -> list[Result]:
    results = []
    workdir = Path(tempfile.mkdtemp(prefix="store-bench-", dir=base))
    try:
        memory = MemoryStore()
        await memory.open()
        results.append(await run_one("MemoryStore", memory, concurrency, duration))
        await memory.close()
        for sync in ("FULL", "NORMAL"):
            store = SqliteStore(workdir / f"{sync.lower()}.sqlite3", synchronous=sync)  # type: ignore[arg-type]
            await store.open()
            before = store.transactions
            result = await run_one(f"SqliteStore synchronous={sync}", store, concurrency, duration)
            results.append(attrs.evolve(result, transactions=store.transactions - before))
            await store.close()
        if postgres:
            from runtime.postgres_store import PostgresStore
            from tests.postgres import PostgresCluster

            cluster = await trio.to_thread.run_sync(lambda: PostgresCluster().start())
            try:
                pg = PostgresStore(await trio.to_thread.run_sync(cluster.create_database))
                await pg.open()
                results.append(await run_one(f"PostgresStore pool={pg._pool_size}", pg, concurrency, duration))
                await pg.close()
            finally:
                await trio.to_thread.run_sync(cluster.stop)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def table(results: list[Result]) -> str:
    lines = ["| store | accepted | msg/s | p50 ms | p99 ms | CPU ms/msg (client) | transactions | msgs/transaction |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        tx = f"{r.transactions}" if r.transactions is not None else "–"
        per = f"{r.accepted / r.transactions:.1f}" if r.transactions else "–"
        lines.append(f"| {r.name} | {r.accepted} | {r.rate:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.cpu_ms:.3f}"
                     f" | {tx} | {per} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", "-c", type=int, default=200, help="concurrent accepting tasks (200)")
    parser.add_argument("--duration", "-d", type=float, default=5.0, help="seconds per store (5)")
    parser.add_argument("--dir", type=Path, default=None, help="where the SQLite files go (system temp dir)")
    parser.add_argument("--postgres", action="store_true", help="add a PostgresStore on a throwaway cluster")
    args = parser.parse_args()
    print(f"concurrency={args.concurrency} duration={args.duration}s python={sys.version.split()[0]}"
          f" sqlite={__import__('sqlite3').sqlite_version}")
    print(table(trio.run(main, args.concurrency, args.duration, args.dir, args.postgres)))
