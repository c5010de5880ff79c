"""Hands a node's accepted messages to its actors strictly in each key's sequence order, whichever
node accepted them (several nodes on one store: runtime/shards.py).

A message may be accepted by any node; only the owner of its key's shard runs the key's actor.
The feed remembers the highest sequence number it handed over per key (``delivered``). The owner's
own intake hands a message over directly only when it is exactly the next one (``is_next``);
otherwise, and for every message another node accepted, the owner reads the key's pending rows
after what it handed over (``catch_up``, ``poll``) and hands them over in order. Sequence numbers
are assigned in commit order per key, so such a read sees every earlier row. The store wakes the
owner when another node accepts one of its messages (``wake``), with the accepted row itself when it
fits in the wake-up: the owner hands that row over without reading it back when it is exactly the
key's next one, and otherwise reads that key's rows (or, for a wake-up without the row, its shard's).
A wake-up is only a hurry-up (it may be lost): the feed also polls its shards every ``poll_seconds``.

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
        self._keys_woken: set[str] = set()     # woken with a row that was not the next: read these keys
        self._shards_woken: set[int] = set()   # woken without the row: poll these shards
        self.polls = 0
        self.wakeups = 0
        self.carried = 0     # rows handed over straight from a wake-up (nothing read back)
        self.caught_up = 0   # rows handed over by a read (not by the intake directly)

    # -- the intake's path -------------------------------------------------------------------

    def is_next(self, key: str, seq: int) -> bool:
        """Whether ``seq`` is exactly the next of ``key`` (the intake may hand it over itself): the
        one after what was handed over, or 1 for a key none was (a key's first row: none before it)."""
        return self.delivered.get(key, 0) == seq - 1

    def handed(self, key: str, seq: int) -> None:
        """The intake handed ``seq`` over itself."""
        self.delivered[key] = seq

    async def catch_up(self, key: str) -> None:
        """Read and hand over ``key``'s pending rows after what was handed over."""
        await self.read([key])

    # -- wake-ups and polling ----------------------------------------------------------------

    def wake(self, shard: int, row: InboxRow | None = None) -> None:
        """Another node accepted a message of ``shard`` (a NOTIFY; ``row``: the accepted row, None
        when it did not fit): hand ``row`` over at once when it is exactly its key's next one, else
        read that key's pending rows (without ``row``: the shard's) now, if the shard is ours."""
        if shard not in self._owner.owned:
            return
        self.wakeups += 1
        if row is None:
            self._shards_woken.add(shard)
        elif row.seq <= self.delivered.get(row.key, 0) or not self._may_deliver(row.key):
            return   # a read handed it over already, or this node does not run the key right now
        elif self.is_next(row.key, row.seq):
            self.carried += self._hand_one(row)
            return
        else:   # earlier rows were not handed over yet (their wake-ups lost, or still on the way)
            self._keys_woken.add(row.key)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll the owned shards every ``poll_seconds`` (however often it is woken meanwhile), and
        read what a wake-up asks for at once, until cancelled."""
        task_status.started()
        next_poll = trio.current_time() + self.poll_seconds
        while True:
            with trio.move_on_at(next_poll):
                await self._wake.wait()
            self._wake = trio.Event()
            keys, self._keys_woken = self._keys_woken, set()
            shards, self._shards_woken = self._shards_woken, set()
            try:
                if trio.current_time() >= next_poll:
                    next_poll = trio.current_time() + self.poll_seconds
                    await self.poll()
                else:
                    if shards:
                        await self.poll(shards)
                    if keys:
                        await self.read(keys)
            except StoreError as exc:   # what was asked for is read by the next poll
                log.warning("Inbox poll failed (retried within %.1fs): %s", self.poll_seconds, exc)

    async def poll(self, shards: Collection[int] | None = None) -> None:
        """Hand over every pending row of the owned shards (of ``shards`` only, when given) that
        was not handed over yet."""
        self.polls += 1
        owned = sorted(self._owner.owned if shards is None else {s for s in shards if s in self._owner.owned})
        if not owned:
            return
        heads = await self._store.inbox_heads(owned)
        behind = {key: self.delivered.get(key, 0) for key, head in heads.items()
                  if head > self.delivered.get(key, 0) and self._may_deliver(key)}
        if behind:
            self._hand(await self._store.inbox_after(behind))

    async def read(self, keys: Collection[str]) -> None:
        """Read and hand over ``keys``' pending rows after what was handed over."""
        behind = {key: self.delivered.get(key, 0) for key in keys if self._may_deliver(key)}
        if behind:
            self._hand(await self._store.inbox_after(behind))

    async def gained(self, shards: Collection[int]) -> None:
        """``shards`` were just acquired: hand over all their pending rows that were not handed over
        yet. Nothing is forgotten here: what a shard's earlier ownership handed over was forgotten
        when it ended, and what the intake or a wake-up handed over since the shard was acquired
        (before this read) must not be handed over twice."""
        self._hand(await self._store.pending_inbox_in(list(shards)))

    def _hand(self, rows: Iterable[InboxRow]) -> None:
        """Hand ``rows`` (per key in sequence order) over, skipping what was already handed over
        meanwhile and keys this node does not run now."""
        for row in rows:
            self.caught_up += self._hand_one(row)

    def _hand_one(self, row: InboxRow) -> bool:
        """Hand ``row`` over unless it was already or this node does not run its key now."""
        if row.seq <= self.delivered.get(row.key, 0) or not self._may_deliver(row.key):
            return False
        self._deliver(row)
        self.delivered[row.key] = row.seq
        return True

    # -- forgetting --------------------------------------------------------------------------

    def forget_shards(self, shards: Collection[int]) -> None:
        wanted, count = set(shards), self._owner.shards
        self.delivered = {k: s for k, s in self.delivered.items() if shard_of(k, count) not in wanted}

    def forget_except(self, live: Collection[str]) -> None:
        """Keep only the keys whose actors are still live (the others' sequences may restart)."""
        keep = set(live)
        self.delivered = {k: s for k, s in self.delivered.items() if k in keep}
