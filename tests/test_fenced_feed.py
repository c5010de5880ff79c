"""Two nodes on one real PostgreSQL, without the domain: fenced commits (runtime/fenced_store.py) and
the per-key ordered hand-over of accepted messages (runtime/inbox_feed.py)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest
import trio

from runtime.fenced_store import FencedStore
from runtime.inbox_feed import InboxFeed
from runtime.postgres_store import LEGACY_CHANNEL, PostgresStore, node_channel
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

    @asynccontextmanager
    async def feeding(self, *, listening: bool = True) -> AsyncIterator[None]:
        """The node's inbox feed running (and its wake-up listener, unless ``listening`` is False)
        for the body of the ``async with``."""
        async with trio.open_nursery() as nursery:
            if listening:
                await nursery.start(self.store.listen, self.owner.node, self.feed.wake)
            await nursery.start(self.feed.run)
            yield
            nursery.cancel_scope.cancel()

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
        async with a.feeding():
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
            await wait_for_seqs(a, key, 20)
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


async def wait_for_seqs(node: Node, key: str, count: int) -> None:
    with trio.fail_after(5):
        while len(node.seqs(key)) < count:
            await trio.sleep(0.02)
    await trio.sleep(0.2)   # nothing more (twice) arrives after


async def test_rows_carried_by_wake_ups_are_handed_over_once_in_order_without_a_read(postgres_cluster: Any) -> None:
    url = postgres_cluster.create_database()
    a, b = await open_node(url, "a"), await open_node(url, "b")
    a.feed.poll_seconds = 60   # no poll during the test: only wake-ups hand anything over
    try:
        await a.owner.step()
        key = key_in(4)
        assert a.feed.is_next(key, 1) and not a.feed.is_next(key, 2)   # a first row needs no read
        async with a.feeding():
            for n in range(1, 11):
                assert await b.store.accept(key, f"m{n}", {"n": n, "text": "¿qué tal? ñ"}) == n
            await wait_for_seqs(a, key, 10)
        assert a.seqs(key) == list(range(1, 11))
        assert [row.payload for row in a.handed] == [{"n": n, "text": "¿qué tal? ñ"} for n in range(1, 11)]
        assert (a.feed.carried, a.feed.caught_up, a.feed.polls) == (10, 0, 0)   # nothing read back
    finally:
        await a.store.close()
        await b.store.close()


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


async def test_an_oversized_row_wakes_with_its_shard_alone_and_is_read(postgres_cluster: Any) -> None:
    """A row too large for a notification (8000 bytes: "ñ" is two) wakes the owner with the shard
    alone; the owner reads it, and the rows around it still arrive once, in order."""
    url = postgres_cluster.create_database()
    a, b = await open_node(url, "a"), await open_node(url, "b")
    a.feed.poll_seconds = 60
    big = {"text": "ñ" * 3990}   # 3,990 characters, 7,980 bytes: over the limit with the row's frame
    try:
        await a.owner.step()
        key = key_in(6)
        async with a.feeding():
            assert await b.store.accept(key, "m1", {"n": 1}) == 1
            await wait_for_seqs(a, key, 1)
            assert await b.store.accept(key, "m2", big) == 2
            await wait_for_seqs(a, key, 2)
            assert await b.store.accept(key, "m3", {"n": 3}) == 3
            await wait_for_seqs(a, key, 3)
        assert a.seqs(key) == [1, 2, 3] and a.handed[1].payload == big
        assert (a.feed.carried, a.feed.caught_up, a.feed.wakeups) == (2, 1, 3)
    finally:
        await a.store.close()
        await b.store.close()


async def test_lost_wake_ups_are_read_after_a_gap_or_by_the_poll(postgres_cluster: Any) -> None:
    url = postgres_cluster.create_database()
    a, b = await open_node(url, "a"), await open_node(url, "b")
    a.feed.poll_seconds = 60
    try:
        await a.owner.step()
        key = key_in(7)
        for n in (1, 2):   # a is not listening: these wake-ups are lost
            await b.store.accept(key, f"m{n}", {"n": n})
        async with a.feeding():
            await b.store.accept(key, "m3", {"n": 3})   # carried, but not the next: the key is read
            await wait_for_seqs(a, key, 3)
            assert (a.feed.carried, a.feed.caught_up, a.feed.polls) == (0, 3, 0)
        await b.store.accept(key, "m4", {"n": 4})   # nobody listens: only the poll finds it
        a.feed.poll_seconds = 0.1
        async with a.feeding(listening=False):
            await wait_for_seqs(a, key, 4)
        assert a.seqs(key) == [1, 2, 3, 4] and a.feed.polls > 0
    finally:
        await a.store.close()
        await b.store.close()


async def test_a_shard_only_wake_up_of_the_previous_version_is_still_heard(postgres_cluster: Any) -> None:
    """Rolling upgrade: a node of the previous version wakes the owner with the shard alone on the
    old channel; the owner polls that shard. A malformed notification is skipped, not fatal."""
    url = postgres_cluster.create_database()
    a, old = await open_node(url, "a"), PostgresStore(url, shards=SHARDS)   # no node: accept wakes nobody
    await old.open()
    a.feed.poll_seconds = 60
    try:
        await a.owner.step()
        key = key_in(1)
        async with a.feeding():
            await old.accept(key, "m1", {"n": 1})
            for channel, note in ((node_channel("a"), "not a wake-up"), (node_channel("a"), "[1, 2]"),
                                  (node_channel("a", LEGACY_CHANNEL), str(shard_of(key, SHARDS)))):
                await old._run(lambda conn: conn.execute("SELECT pg_notify(%s, %s)", (channel, note)))
            await wait_for_seqs(a, key, 1)
        assert a.seqs(key) == [1] and (a.feed.carried, a.feed.caught_up, a.feed.polls) == (0, 1, 1)
    finally:
        await a.store.close()
        await old.close()


async def test_rows_handed_over_before_a_gained_shard_is_read_are_not_handed_over_twice(postgres_cluster: Any) -> None:
    """Between acquiring a shard and reading its pending rows the service awaits (its outbox), and
    meanwhile the intake or a wake-up may hand a key's rows over already: the read must skip them."""
    url = postgres_cluster.create_database()
    a = await open_node(url, "a")
    try:
        key = key_in(2)
        for n in range(1, 4):
            await a.store.accept(key, f"m{n}", {"n": n})

        async def gained(shards: list[int]) -> None:
            await a.feed.catch_up(key)   # as the intake does for a message of a key it has not handed over
            await a.feed.gained(shards)

        a.owner._on_gained = gained
        await a.owner.step()
        assert a.seqs(key) == [1, 2, 3] and a.feed.delivered[key] == 3
    finally:
        await a.store.close()
