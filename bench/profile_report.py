"""Summarise a py-spy ``--format raw`` (collapsed stacks) file: where the service's main thread spends time.

    .venv/bin/python bench/profile_report.py bench/results/profile/crowd.txt [--top 30] [--thread MainThread]

Prints the share of samples per thread, then for the chosen thread an exclusive split into categories
(LLM client, outbound client, store, webhook view, actor turn, HTTP server, trio scheduler, other),
the functions with the highest *inclusive* share (the function or anything it calls is on the stack)
and the highest *self* share (the leaf frame). py-spy records only non-idle samples (no ``--idle``).
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

# Exclusive categories: a sample goes to the first whose pattern matches its stack.
BUCKETS = [
    ("LLM call: openai SDK + httpx2 (OpenAIProvider.complete)", re.compile(r"OpenAIProvider\.complete")),
    ("outbound sendText: httpx (EvolutionTransport)", re.compile(r"EvolutionTransport\.")),
    ("outbound other (worker, on_settled, store.settle)", re.compile(r"OutboundSender\.|_reply_settled")),
    ("store (sqlite_store.py, trio side)", re.compile(r"sqlite_store\.py")),
    ("webhook view (app.webhook: json, intake)", re.compile(r"webhook \(app\.py")),
    ("actor turn, rest (conversation.py, chain.py, registry.py)",
     re.compile(r"conversation\.py|chain\.py|registry\.py")),
    ("HTTP server: hypercorn + h11 + quart",
     re.compile(r"hypercorn/(protocol|trio/tcp_server|trio/task_group|app_wrappers)|quart")),
    ("trio scheduler / IO manager", re.compile(r"trio/_core")),
]


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():   # a line py-spy cut short when it was stopped
            print(f"skipped a malformed line: {line[:80]!r}...")
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def report(path: Path, top: int, thread: str) -> dict[str, float]:
    stacks = load(path)
    total = sum(c for _, c in stacks)
    threads: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        threads[frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"] += count
    print(f"{total} samples")
    for name, count in threads.most_common(8):
        print(f"  {100 * count / total:5.1f}%  {name}")
    chosen = [(f, c) for f, c in stacks if thread in (f[0] if f else "")] or stacks
    n = sum(c for _, c in chosen)
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    for frames, count in chosen:
        for frame in set(frames[1:]):
            inclusive[frame] += count
        leaf[frames[-1]] += count
        joined = ";".join(frames)
        for label, pattern in BUCKETS:
            if pattern.search(joined):
                buckets[label] += count
                break
        else:
            buckets["other"] += count
    print(f"\nthread {thread!r}: {n} samples\n\ncategories (exclusive, first match):")
    shares = {}
    for label in [b[0] for b in BUCKETS] + ["other"]:
        shares[label] = buckets[label] / n
        print(f"  {100 * buckets[label] / n:5.1f}%  {label}")
    print("\ninclusive:")
    for frame, count in inclusive.most_common(top):
        print(f"  {100 * count / n:5.1f}%  {frame}")
    print("\nself:")
    for frame, count in leaf.most_common(top):
        print(f"  {100 * count / n:5.1f}%  {frame}")
    return shares


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--thread", default="MainThread", help="a substring of the thread frame (py-spy --threads)")
    args = parser.parse_args()
    report(args.file, args.top, args.thread)


if __name__ == "__main__":
    main()
