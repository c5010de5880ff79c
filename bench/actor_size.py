"""Bytes per live conversation actor with a full window, by allocation site (tracemalloc), in-process.

    .venv/bin/python bench/actor_size.py [--actors 5000] [--window 50] [--chars 150]

Builds what the registry holds for one live, idle chat (``ActorCell`` + ``Mailbox`` + a
``ConversationActor`` whose state was loaded the way ``activate()`` does it:
``ConversationState.from_bytes`` of the stored bytes, then ``hibernate()`` as the registry does once
the mailbox is empty; ``--live`` skips that) for N chats seeded like ``bench/seed_store.py``, and
prints the traced bytes per actor and the top allocation sites. This is the Python-heap share of the RSS the memory scenario measures (RSS adds allocator slack and the process's fixed costs).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from collections import Counter, deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from actors.conversation import ConversationActor  # noqa: E402
from actors.state import ConversationState, WindowEntry  # noqa: E402
from loadgen import jid_of  # noqa: E402
from runtime.actor import ActorCell  # noqa: E402
from runtime.mailbox import Mailbox  # noqa: E402
from seed_store import state_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=5000)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--chars", type=int, default=150)
    parser.add_argument("--live", action="store_true", help="keep the windows live (no hibernation)")
    args = parser.parse_args()
    now = time.time()
    rows = [state_for(u, args.window, args.chars, now).to_bytes() for u in range(args.actors)]
    context = object()   # the actor only keeps a reference to the shared context
    cells: dict[str, ActorCell] = {}
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    for u, row in enumerate(rows):
        jid = jid_of(u)
        actor = ConversationActor(jid, context)  # type: ignore[arg-type]
        actor.state = ConversationState.from_bytes(row)
        if not args.live:
            actor.hibernate()   # what the registry does when the actor's mailbox is empty
        cells[jid] = ActorCell(key=jid, actor=actor, mailbox=Mailbox(100), last_activity=0.0, activated=True)
    gc.collect()
    after = tracemalloc.take_snapshot()
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"{args.actors} actors, window {args.window} x {args.chars} chars: "
          f"{total / args.actors / 1024:.2f} KB per actor traced by tracemalloc\n")
    print("top allocation sites (bytes per actor):")
    by_site: Counter[str] = Counter()
    for stat in stats:
        frame = stat.traceback[0]
        by_site[f"{Path(frame.filename).name}:{frame.lineno}"] += stat.size_diff
    for site, size in by_site.most_common(14):
        print(f"  {size / args.actors:9.0f}  {site}")
    window = next(iter(cells.values())).actor.state.window
    packed = sys.getsizeof(window._packed) if window.hibernating else 0
    entry = window[0]
    print("\nsizes of the pieces (sys.getsizeof, + 16 B GC header for tracked objects):")
    pieces = {
        f"hibernated window ({args.window} entries packed in one bytes object)": packed,
        "WindowEntry (attrs slots, 3 fields)": sys.getsizeof(entry) + 16,
        f"content str ({args.chars} ASCII chars)": sys.getsizeof(entry.content),
        "float (WindowEntry.at)": sys.getsizeof(entry.at),
        "empty collections.deque (Mailbox._items, ActorCell.crash_times)": sys.getsizeof(deque()) + 16,
        "ConversationActor instance (slots)": sys.getsizeof(cells[jid_of(0)].actor) + 16,
        "sent id str (22 chars)": sys.getsizeof("3EB0" + "0" * 18),
    }
    for name, size in pieces.items():
        print(f"  {size:6d}  {name}")
    assert all(isinstance(e, WindowEntry) for e in cells[jid_of(0)].actor.state.window)


if __name__ == "__main__":
    main()
