"""Durable intake throughput (issue 5): accepted webhooks/s and ack latency, SQLite vs in-memory store.

    .venv/bin/python bench/intake.py [--seconds 15] [--concurrency 64]

Starts the service as deployed (``hypercorn --worker-class trio app:app``) once per store with the
``offline`` provider and the local outbox, then posts real ``messages.upsert`` webhooks from
``--concurrency`` closed-loop posters (each its own chat, so no mailbox fills) for ``--seconds``.
Every accepted message is also answered (the turn commits its state to the same store), so the
figure is the whole service's sustained intake with durability on or off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.payloads import upsert  # noqa: E402
from tests.procs import ServiceProcess  # noqa: E402


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))] if ordered else float("nan")


async def measure(store: str, seconds: float, concurrency: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix=f"intake-{store}-"))
    env = {"STORE": store, "DATA_DIR": str(tmp / "data"), "LOG_DIR": str(tmp / "logs"), "LOG_LEVEL": "WARNING",
           "LOG_STDERR": "false", "REORDER_DELAY_SECONDS": "0", "FLOOD_MAX_PER_MINUTE": "0"}
    acks: list[float] = []
    refused = 0
    with ServiceProcess(env, tmp / "service.out") as service:
        service.start()
        await service.wait_ready()
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=service.url, timeout=30, limits=limits) as client:
            deadline = time.monotonic() + seconds

            async def poster(index: int) -> None:
                nonlocal refused
                jid = f"54911{index:08d}@s.whatsapp.net"
                n = 0
                while time.monotonic() < deadline:
                    n += 1
                    start = time.perf_counter()
                    response = await client.post("/webhook", json=upsert(f"mensaje {n}", jid=jid, message_id=f"{index}-{n}"))
                    if response.status_code == 200 and response.json()["status"] == "accepted":
                        acks.append(time.perf_counter() - start)
                    else:
                        refused += 1

            async with trio.open_nursery() as nursery:
                for index in range(concurrency):
                    nursery.start_soon(poster, index)
        await service.terminate()
    return {"accepted_per_s": len(acks) / seconds, "ack_p50_ms": percentile(acks, 50) * 1000,
            "ack_p99_ms": percentile(acks, 99) * 1000, "ack_mean_ms": statistics.fmean(acks) * 1000 if acks else 0.0,
            "refused": refused}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    results = {store: await measure(store, args.seconds, args.concurrency) for store in ("memory", "sqlite")}
    print(f"{'store':<8} {'accepted/s':>11} {'ack p50 ms':>11} {'ack p99 ms':>11} {'refused':>8}")
    for store, r in results.items():
        print(f"{store:<8} {r['accepted_per_s']:>11.0f} {r['ack_p50_ms']:>11.2f} {r['ack_p99_ms']:>11.2f} {r['refused']:>8.0f}")
    cost = 1 - results["sqlite"]["accepted_per_s"] / results["memory"]["accepted_per_s"]
    print(f"durability costs {cost * 100:.1f}% of intake throughput (goal: under 20%)")


if __name__ == "__main__":
    trio.run(main)
