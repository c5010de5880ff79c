"""Write N stored conversations, each with a full window, into a fresh SQLite store (memory scenario).

    .venv/bin/python bench/seed_store.py DATA_DIR --actors 30000 [--window 50] [--chars 150] [--first 0]

Uses the service's own ``SqliteStore`` and ``ConversationState`` so the states are exactly what the
service writes (their meta: last activity and window length, an empty listing record): ``window``
holds ``--window`` entries alternating user / assistant, each ``--chars`` characters long (ASCII,
distinct per entry), ``last_activity`` now. Chats are ``bench/loadgen.py``'s
``jid_of(u)`` for u in [first, first + actors), in ``--instance`` (loadgen's ``bench``): their keys are
the conversation keys ``<instance>/<jid>`` the service will look for. One webhook per chat then makes the service spawn
the actor, load that window, add the new message and the reply and truncate back to the window:
N live actors holding full windows for N webhooks instead of 25 x N.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from actors.controls import SENT_IDS_KEPT  # noqa: E402
from actors.conversation_key import ConversationKey  # noqa: E402
from actors.state import ASSISTANT, USER, ConversationState, LeadInfo, WindowEntry  # noqa: E402
from loadgen import FILLER, jid_of  # noqa: E402
from runtime.sqlite_store import SqliteStore  # noqa: E402
from runtime.store import StateMeta  # noqa: E402


def state_for(user: int, window: int, chars: int, now: float) -> ConversationState:
    entries = []
    for i in range(window):
        head = f"h:{user}:{i} "
        entries.append(WindowEntry(USER if i % 2 == 0 else ASSISTANT, (head + FILLER)[:chars], now - (window - i)))
    jid = jid_of(user)
    # like a chat that got window // 2 replies through Evolution: one sent id (22 hex digits) per reply
    sent_ids = [f"3EB0{user:09X}{i:09X}" for i in range(min(SENT_IDS_KEPT, window // 2))]
    return ConversationState(window=entries, lead=LeadInfo(nombre="Cliente", telefono=jid.split("@")[0]),
                             last_activity=now, messages_in=window // 2, replies_out=window // 2,
                             sent_ids=sent_ids)


async def seed(data_dir: Path, first: int, actors: int, window: int, chars: int, instance: str = "bench") -> None:
    store = SqliteStore(data_dir / "agent.sqlite3", synchronous="NORMAL")
    await store.open()
    now = time.time()
    try:
        async def writer(start: int, stop: int) -> None:
            for user in range(start, stop):
                state = state_for(user, window, chars, now)
                await store.commit(ConversationKey(instance, jid_of(user)).key, state.to_bytes(),
                                   StateMeta(last_activity=now, size=window, scope=instance))

        step = max(1, actors // 128)
        async with trio.open_nursery() as nursery:
            for start in range(first, first + actors, step):
                nursery.start_soon(writer, start, min(first + actors, start + step))
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--actors", type=int, required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--chars", type=int, default=150)
    parser.add_argument("--instance", default="bench", help="the instance the chats belong to (loadgen's)")
    args = parser.parse_args()
    started = time.monotonic()
    trio.run(seed, args.data_dir, args.first, args.actors, args.window, args.chars, args.instance)
    print(f"seeded {args.actors} conversations x {args.window} messages of {args.chars} chars "
          f"in {time.monotonic() - started:.1f}s", flush=True)


if __name__ == "__main__":
    main()
