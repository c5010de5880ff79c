"""Durable intake throughput (docs/durability.md): accepted webhooks/s and ack latency, SQLite vs memory store.

    .venv/bin/python bench/intake.py [--seconds 15] [--concurrency 64]

Starts the service as deployed (``hypercorn --worker-class trio app:app``) once per store with the
``offline`` provider and the local outbox, then posts real ``messages.upsert`` webhooks from
``--concurrency`` closed-loop posters (each its own chat) for ``--seconds``. Every accepted message
is also answered (the turn commits its state to the same store), so the figure is the whole
service's sustained intake with durability on or off. The posters use a minimal keep-alive h11
client (``bench/client_cost.py``'s ``RawClient``, ~0.2 ms of CPU per request) so that the load
generator, which shares the machine's two cores, is not what limits the figure (an httpx client
costs ~1 ms per request and was). The service worker's CPU per accepted message is printed too: the
cost of durability independent of the client.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from client_cost import RawClient  # noqa: E402
from run import children, cpu_seconds  # noqa: E402
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
        assert service.proc is not None
        worker = max(children(service.proc.pid), default=service.proc.pid)   # hypercorn's worker process
        client = RawClient("127.0.0.1", service.port, concurrency)
        cpu_before = cpu_seconds(worker)
        deadline = time.monotonic() + seconds

        async def poster(index: int) -> None:
            nonlocal refused
            jid = f"54911{index:08d}@s.whatsapp.net"
            n = 0
            while time.monotonic() < deadline:
                n += 1
                start = time.perf_counter()
                status, body = await client.request_json(
                    "/webhook", upsert(f"mensaje {n}", jid=jid, message_id=f"{index}-{n}"))
                if status == 200 and body["status"] == "accepted":
                    acks.append(time.perf_counter() - start)
                else:
                    refused += 1

        async with trio.open_nursery() as nursery:
            for index in range(concurrency):
                nursery.start_soon(poster, index)
        cpu = cpu_seconds(worker) - cpu_before
        await service.terminate()
    return {"accepted_per_s": len(acks) / seconds, "ack_p50_ms": percentile(acks, 50) * 1000,
            "ack_p99_ms": percentile(acks, 99) * 1000, "ack_mean_ms": statistics.fmean(acks) * 1000 if acks else 0.0,
            "refused": refused, "cpu_ms_per_msg": 1000 * cpu / len(acks) if acks else 0.0}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    results = {store: await measure(store, args.seconds, args.concurrency) for store in ("memory", "sqlite")}
    print(f"{'store':<8} {'accepted/s':>11} {'ack p50 ms':>11} {'ack p99 ms':>11} {'refused':>8} {'CPU ms/msg':>11}")
    for store, r in results.items():
        print(f"{store:<8} {r['accepted_per_s']:>11.0f} {r['ack_p50_ms']:>11.2f} {r['ack_p99_ms']:>11.2f} "
              f"{r['refused']:>8.0f} {r['cpu_ms_per_msg']:>11.2f}")
    cost = 1 - results["sqlite"]["accepted_per_s"] / results["memory"]["accepted_per_s"]
    print(f"durability costs {cost * 100:.1f}% of intake throughput (goal: under 20%)")


if __name__ == "__main__":
    trio.run(main)
