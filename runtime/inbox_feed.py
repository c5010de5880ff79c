"""Hands a node's accepted messages to its actors strictly in each key's sequence order, whichever
node accepted them (several nodes on one store: runtime/shards.py).

A message may be accepted by any node; only the owner of its key's shard runs the key's actor.
The feed remembers the highest sequence number it handed over per key (``delivered``). The owner's
own intake hands a message over directly only when it is exactly the next one (``is_next``);
otherwise, and for every message another node accepted, the owner reads the key's pending rows
after what it handed over (``catch_up``, ``poll``) and hands them over in order. Sequence numbers
are assigned in commit order per key, so such a read sees every earlier row. The store wakes the
owner when another node accepts one of its messages (``wake``); that is only a hurry-up: the feed
also polls its shards every ``poll_seconds``.

What was handed over for a shard is forgotten when the shard is lost or handed back (its new
owner reads the pending rows afresh), and for a key whose actor expired (its sequence may then
restart at 1).
"""

from __future__ import annotations

import logging
from typing import Callable, Collection, Iterable, Protocol

import trio

from .shards import ShardOwner, shard_of
from .store import InboxRow, StoreError

log = logging.getLogger(__name__)


class InboxSource(Protocol):
    """The reads the feed needs (``runtime.postgres_store.PostgresStore``)."""

    async def pending_inbox_in(self, shards: Collection[int]) -> list[InboxRow]: ...

    async def inbox_heads(self, shards: Collection[int]) -> dict[str, int]: ...

    async def inbox_after(self, after: dict[str, int]) -> list[InboxRow]: ...


class InboxFeed:
    """See the module docstring. ``deliver(row)`` hands a row to its actor (never blocks);
    ``may_deliver(key)`` says whether this node runs the key's actor right now."""

    def __init__(self, store: InboxSource, owner: ShardOwner, *, deliver: Callable[[InboxRow], None],
                 may_deliver: Callable[[str], bool], poll_seconds: float) -> None:
        self._store = store
        self._owner = owner
        self._deliver = deliver
        self._may_deliver = may_deliver
        self.poll_seconds = poll_seconds
        self.delivered: dict[str, int] = {}
        self._wake = trio.Event()
        self.polls = 0
        self.wakeups = 0
        self.caught_up = 0   # rows handed over by a read (not by the intake directly)

    # -- the intake's path -------------------------------------------------------------------

    def is_next(self, key: str, seq: int) -> bool:
        """Whether ``seq`` is exactly the next of ``key`` (the intake may hand it over itself)."""
        return self.delivered.get(key) == seq - 1

    def handed(self, key: str, seq: int) -> None:
        """The intake handed ``seq`` over itself."""
        self.delivered[key] = seq

    async def catch_up(self, key: str) -> None:
        """Read and hand over ``key``'s pending rows after what was handed over."""
        self._hand(await self._store.inbox_after({key: self.delivered.get(key, 0)}))

    # -- wake-ups and polling ----------------------------------------------------------------

    def wake(self, shard: int) -> None:
        """Another node accepted a message of ``shard`` (a NOTIFY): poll now if it is ours."""
        if shard in self._owner.owned:
            self.wakeups += 1
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll the owned shards every ``poll_seconds``, or at once when woken, until cancelled."""
        task_status.started()
        while True:
            with trio.move_on_after(self.poll_seconds):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.poll()
            except StoreError as exc:
                log.warning("Inbox poll failed (retried in %.1fs): %s", self.poll_seconds, exc)

    async def poll(self) -> None:
        """Hand over every pending row of the owned shards that was not handed over yet."""
        self.polls += 1
        shards = sorted(self._owner.owned)
        if not shards:
            return
        heads = await self._store.inbox_heads(shards)
        behind = {key: self.delivered.get(key, 0) for key, head in heads.items()
                  if head > self.delivered.get(key, 0) and self._may_deliver(key)}
        if behind:
            self._hand(await self._store.inbox_after(behind))

    async def gained(self, shards: Collection[int]) -> None:
        """``shards`` were just acquired: hand over all their pending rows not handed over yet.

        Nothing is forgotten here (that happened when the shards were lost or handed back): the
        intake and the poll may already have handed rows of theirs over since they were acquired
        (the caller awaits other reads first), and those are still pending until their turn commits."""
        self._hand(await self._store.pending_inbox_in(list(shards)))

    def _hand(self, rows: Iterable[InboxRow]) -> None:
        """Hand ``rows`` (per key in sequence order) over, skipping what was already handed over
        meanwhile and keys this node does not run now."""
        for row in rows:
            if row.seq > self.delivered.get(row.key, 0) and self._may_deliver(row.key):
                self._deliver(row)
                self.delivered[row.key] = row.seq
                self.caught_up += 1

    # -- forgetting --------------------------------------------------------------------------

    def forget_shards(self, shards: Collection[int]) -> None:
        wanted, count = set(shards), self._owner.shards
        self.delivered = {k: s for k, s in self.delivered.items() if shard_of(k, count) not in wanted}

    def forget_except(self, live: Collection[str]) -> None:
        """Keep only the keys whose actors are still live (the others' sequences may restart)."""
        keep = set(live)
        self.delivered = {k: s for k, s in self.delivered.items() if k in keep}
