"""Two nodes on one real PostgreSQL, without the domain: fenced commits (runtime/fenced_store.py) and
the per-key ordered hand-over of accepted messages (runtime/inbox_feed.py)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from runtime.fenced_store import FencedStore
from runtime.inbox_feed import InboxFeed
from runtime.postgres_store import PostgresStore
from runtime.shards import ShardOwner, shard_of
from runtime.store import Fenced, InboxRow, StateMeta

SHARDS = 8


class Node:
    """A store, a ShardOwner over it, a FencedStore and an InboxFeed, and what they did."""

    def __init__(self, store: PostgresStore, name: str, lease: float = 10.0) -> None:
        self.store = store
        self.lost: list[list[int]] = []
        self.handed: list[InboxRow] = []
        self.owner = ShardOwner(store, name, shards=SHARDS, lease_seconds=lease, on_gained=self._gained,
                                on_lost=self._lost, on_release=self._noop, max_acquire=SHARDS)
        self.fenced = FencedStore(store, self.owner)
        self.feed = InboxFeed(store, self.owner, deliver=self.handed.append,
                              may_deliver=self.owner.owns, poll_seconds=0.1)

    async def _gained(self, shards: list[int]) -> None:
        await self.feed.gained(shards)

    async def _lost(self, shards: list[int]) -> None:
        self.lost.append(shards)
        self.feed.forget_shards(shards)

    async def _noop(self, shards: list[int]) -> None:
        return None

    def seqs(self, key: str) -> list[int]:
        return [row.seq for row in self.handed if row.key == key]


async def open_node(url: str, name: str, lease: float = 10.0) -> Node:
    store = PostgresStore(url, shards=SHARDS, node=name)
    await store.open()
    return Node(store, name, lease)


def key_in(shard: int, n: int = 0) -> str:
    found = [k for k in (f"inst/{i}@s.whatsapp.net" for i in range(10_000)) if shard_of(k, SHARDS) == shard]
    return found[n]


async def test_a_commit_without_the_lease_is_refused_and_drops_the_shard(postgres_cluster: Any) -> None:
    url = postgres_cluster.create_database()
    a, b = await open_node(url, "a", lease=1.0), await open_node(url, "b", lease=1.0)
    try:
        await a.owner.step()                      # a alone: every shard
        key = key_in(3)
        assert await a.fenced.commit(key, b"v1", StateMeta(last_activity=1.0)) == []
        with pytest.raises(Fenced):               # b owns nothing: refused before any round trip
            await b.fenced.commit(key, b"b", StateMeta(last_activity=1.0))
        assert b.fenced.refused == 1 and await a.store.load(key) == b"v1"
        # a "pauses" past its lease; b takes every shard over; a's late commit is refused by the store
        await trio.sleep(1.1)
        await b.owner.step()
        assert len(b.owner.owned) == SHARDS
        a.owner._deadline = trio.current_time() + 60   # a still believes it holds its leases
        with pytest.raises(Fenced):
            await a.fenced.commit(key, b"late", StateMeta(last_activity=2.0))
        assert a.fenced.refused == 1 and 3 in a.lost[-1] and 3 not in a.owner.owned
        assert await a.store.load(key) == b"v1"
        assert await b.fenced.commit(key, b"v2", StateMeta(last_activity=2.0)) == []
    finally:
        await a.store.close()
        await b.store.close()


async def test_messages_accepted_on_two_nodes_reach_the_owner_once_in_order(postgres_cluster: Any) -> None:
    """One chat's messages accepted alternately by the owner and another node: the owner hands
    each over once, strictly in sequence order, woken by NOTIFY or by its poll."""
    url = postgres_cluster.create_database()
    a, b = await open_node(url, "a"), await open_node(url, "b")
    try:
        await a.owner.step()
        key = key_in(5)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.store.listen, "a", a.feed.wake)
            nursery.start_soon(a.feed.run)
            for n in range(1, 21):
                if n % 2:   # b accepts: stored, a is woken
                    assert await b.store.accept(key, f"m{n}", {"n": n}) == n
                else:       # a accepts: handed over directly only when it is the next
                    seq = await a.store.accept(key, f"m{n}", {"n": n})
                    assert seq == n
                    if a.feed.is_next(key, seq):
                        a.handed.append(InboxRow(key, seq, {"n": n}))
                        a.feed.handed(key, seq)
                    else:
                        await a.feed.catch_up(key)
            with trio.fail_after(5):
                while len(a.seqs(key)) < 20:
                    await trio.sleep(0.02)
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
        assert a.seqs(key) == list(range(1, 21))
        assert a.feed.wakeups > 0
        assert b.handed == []   # b owns nothing: it never hands anything over
    finally:
        await a.store.close()
        await b.store.close()


async def test_a_gained_shard_hands_over_its_pending_rows_and_forgets_on_loss(postgres_cluster: Any) -> None:
    url = postgres_cluster.create_database()
    a = await open_node(url, "a")
    try:
        key = key_in(2)
        for n in range(1, 4):
            await a.store.accept(key, f"m{n}", {})
        await a.owner.step()                      # gained: every pending row, in order
        assert a.seqs(key) == [1, 2, 3] and a.feed.delivered[key] == 3
        await a.feed.poll()
        assert a.seqs(key) == [1, 2, 3]           # nothing twice
        await a.owner.lose([2])
        assert key not in a.feed.delivered
        await a.feed.poll()                       # shard 2 is not ours any more: nothing handed over
        assert a.seqs(key) == [1, 2, 3]
    finally:
        await a.store.close()


async def test_a_commit_while_the_renewal_is_late_waits_for_it(postgres_cluster: Any) -> None:
    """The local deadline passed but the lease still holds in the store (a busy process: the renewal
    comes back late): the commit waits for the renewal's outcome instead of being refused and
    dropping the shard. Seen failing before ShardOwner.confirm: Fenced, and the shard dropped."""
    url = postgres_cluster.create_database()
    a = await open_node(url, "a", lease=5.0)
    try:
        await a.owner.step()
        key = key_in(3)
        a.owner._deadline = trio.current_time()    # the renewal is late (the store's lease runs 5 s)

        async def renew_late() -> None:
            await trio.sleep(0.3)
            await a.owner.step()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(renew_late)
            assert await a.fenced.commit(key, b"v1", StateMeta(last_activity=1.0)) == []
            assert a.owner.late_renewals == 1      # it went ahead only once the renewal came back
        assert a.fenced.refused == 0 and a.lost == [] and len(a.owner.owned) == SHARDS
        assert await a.store.load(key) == b"v1"
    finally:
        await a.store.close()


async def test_a_late_renewal_that_finds_the_shard_taken_refuses_the_waiting_commit(postgres_cluster: Any) -> None:
    """The other outcome of the wait: the lease ran out meanwhile and another node took the shard;
    the waiting commit is refused and the shard dropped (its new owner has the pending rows)."""
    url = postgres_cluster.create_database()
    a, b = await open_node(url, "a", lease=1.0), await open_node(url, "b", lease=1.0)
    try:
        await a.owner.step()
        key = key_in(3)
        await trio.sleep(1.1)                      # a's leases run out in the store; b takes every shard
        await b.owner.step()
        assert len(b.owner.owned) == SHARDS

        async def renew_late() -> None:
            await trio.sleep(0.2)
            await a.owner.step()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(renew_late)
            with pytest.raises(Fenced):
                await a.fenced.commit(key, b"late", StateMeta(last_activity=1.0))
        assert a.owner.owned == {} and any(3 in lost for lost in a.lost)
        assert await a.store.load(key) is None
    finally:
        await a.store.close()
        await b.store.close()


async def test_rows_handed_over_before_gained_runs_are_not_handed_again(postgres_cluster: Any) -> None:
    """A node's recovery of newly acquired shards reads other things first (their outbox rows);
    the inbox poll or the intake may hand a row over meanwhile. ``gained`` must not hand it over
    again (the chat would be answered twice). Seen failing: gained forgot what was handed over."""
    url = postgres_cluster.create_database()
    a = await open_node(url, "a")
    a.owner._on_gained = a._noop                   # the recovery is run by hand below, as the service does
    try:
        key = key_in(4)
        for n in range(1, 3):
            await a.store.accept(key, f"m{n}", {})
        await a.owner.step()                       # acquired; the service would now read the outbox first
        await a.feed.poll()                        # meanwhile the poll hands rows 1 and 2 over
        assert a.seqs(key) == [1, 2]
        await a.feed.gained([4])                   # then the recovery's own read of the pending rows
        assert a.seqs(key) == [1, 2]
    finally:
        await a.store.close()
