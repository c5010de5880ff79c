"""Shard ownership by leases (runtime/shards.py) on a real PostgreSQL: the hash, the fair share, a
joining node's graceful handoff, takeover after a lease runs out, fenced commits, leaving, and a
store that cannot be reached."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import trio

from runtime.postgres_store import PostgresStore
from runtime.shards import NodeInfo, ShardOwner, fair_share, shard_of
from runtime.store import Fenced, StateMeta, StoreError

SHARDS = 16


def test_shard_of_is_stable_and_spreads_keys() -> None:
    # fixed values: a change of hash would move every conversation of a running deployment
    assert [shard_of(k, 1024) for k in ("a", "acme/5491100000001@s.whatsapp.net", "beta/123@lid")] == [559, 561, 949]
    counts = Counter(shard_of(f"inst/54911{i:08d}@s.whatsapp.net", SHARDS) for i in range(16_000))
    assert len(counts) == SHARDS and max(counts.values()) < 1.1 * 1000 and min(counts.values()) > 0.9 * 1000


@pytest.mark.parametrize("nodes", [1, 2, 3, 5, 7])
def test_fair_shares_add_up_to_every_shard(nodes: int) -> None:
    names = [f"node-{i}" for i in range(nodes)]
    shares = [fair_share(n, names, 1024) for n in names]
    assert sum(shares) == 1024 and max(shares) - min(shares) <= 1


class Node:
    """A ShardOwner and what its callbacks saw."""

    def __init__(self, store: PostgresStore, name: str, lease: float, max_acquire: int = SHARDS) -> None:
        self.events: list[tuple[str, list[int]]] = []
        self.owner = ShardOwner(store, name, shards=SHARDS, lease_seconds=lease,
                                on_gained=self._note("gained"), on_lost=self._note("lost"),
                                on_release=self._note("release"), max_acquire=max_acquire,
                                describe=lambda: NodeInfo(f"{name}.example:5000", 1.5, {"steps": len(self.events)}))

    def _note(self, what: str) -> Any:
        async def note(shards: list[int]) -> None:
            self.events.append((what, shards))
        return note


async def open_store(url: str) -> PostgresStore:
    store = PostgresStore(url, shards=SHARDS)
    await store.open()
    return store


async def test_a_joining_node_gets_its_share_by_graceful_handoff(postgres_cluster: Any) -> None:
    url = postgres_cluster.create_database()
    sa, sb = await open_store(url), await open_store(url)
    try:
        a, b = Node(sa, "node-a", 5.0), Node(sb, "node-b", 5.0)
        await a.owner.step()
        assert len(a.owner.owned) == SHARDS and a.events == [("gained", list(range(SHARDS)))]
        await b.owner.step()                       # every lease is held and valid: nothing to take yet
        assert b.owner.owned == {}
        await a.owner.step()                       # a sees two live nodes: hands back its excess
        assert len(a.owner.owned) == SHARDS // 2
        released = [shards for what, shards in a.events if what == "release"]
        assert released == [list(range(SHARDS // 2, SHARDS))]   # work finished before the release
        await b.owner.step()
        assert sorted(b.owner.owned) == list(range(SHARDS // 2, SHARDS))
        assert all(epoch == 2 for epoch in b.owner.owned.values())   # each acquired a second time
        assert b.owner.taken_over == 0 and a.owner.handed_back == SHARDS // 2   # handed over, not taken over
        rows = await sa.lease_rows()
        assert Counter(r.owner for r in rows) == {"node-a": SHARDS // 2, "node-b": SHARDS // 2}
        nodes = await sb.nodes(5.0)
        assert [(n.node, n.live, n.owned, n.info.address) for n in nodes] == [
            ("node-a", True, SHARDS // 2, "node-a.example:5000"), ("node-b", True, SHARDS // 2, "node-b.example:5000")]
        assert nodes[0].info.stats == {"steps": 1}   # said at its last heartbeat, before the release and nodes[0].info.started_at == 1.5 and nodes[0].seconds_ago < 5
    finally:
        await sa.close()
        await sb.close()


async def test_a_silent_node_is_taken_over_and_its_writes_are_fenced(postgres_cluster: Any) -> None:
    """A node paused past its lease (SIGSTOP, a partition): another takes its shards with a new
    epoch; the paused node's commits are refused (Fenced) and, when it runs again, it drops them."""
    url = postgres_cluster.create_database()
    sa, sb = await open_store(url), await open_store(url)
    try:
        a, b = Node(sa, "node-a", 1.0), Node(sb, "node-b", 1.0)
        await a.owner.step()
        key = "acme/5491100000001@s.whatsapp.net"
        old = a.owner.fence(key)
        assert old is not None
        await sa.accept(key, "i:1", {"n": 1})
        await sa.commit(key, b"by a", StateMeta(last_activity=1.0), acked=[1], fence=("node-a", old))
        await trio.sleep(1.2)                      # a "paused": its leases run out
        assert a.owner.fence(key) is None          # a itself no longer trusts them
        await b.owner.step()
        assert len(b.owner.owned) == SHARDS and b.owner.taken_over == SHARDS   # from a, whose leases ran out
        assert [(n.node, n.live, n.owned) for n in await sb.nodes(1.0)] == [("node-a", False, 0), ("node-b", True, SHARDS)]
        new = b.owner.fence(key)
        assert new is not None and new.epoch == old.epoch + 1
        with pytest.raises(Fenced):
            await sa.commit(key, b"late write by a", StateMeta(last_activity=2.0), fence=("node-a", old))
        await sb.commit(key, b"by b", StateMeta(last_activity=3.0), fence=("node-b", new))
        assert await sa.load(key) == b"by b"
        await a.owner.step()                       # a runs again: renewal finds nothing of its own
        assert a.owner.owned == {} and ("lost", list(range(SHARDS))) in a.events
    finally:
        await sa.close()
        await sb.close()


async def test_a_dead_nodes_shards_are_taken_as_soon_as_its_leases_run_out(postgres_cluster: Any) -> None:
    """Issue 16: a dead node's shards are taken within SHARD_LEASE_SECONDS + 2 s. The survivor's
    regular rounds (every lease / 3) need not fall right after the expiry: it starts a round when the
    dead node's leases run out, and that round takes all of them, even more than ``max_acquire``.
    Seen failing before: taken only at the next regular round, a quarter at a time (6.7 s after the
    last renewal with a 3 s lease)."""
    url = postgres_cluster.create_database()
    sa, sb = await open_store(url), await open_store(url)
    try:
        a, b = Node(sa, "node-a", 3.0), Node(sb, "node-b", 3.0, max_acquire=SHARDS // 4)
        await a.owner.step()                       # a owns every shard, then dies: no more renewals
        died = trio.current_time()
        await trio.sleep(3.0 - 0.3)
        async with trio.open_nursery() as nursery:
            await nursery.start(b.owner.run)       # its first round: a's leases still hold
            assert b.owner.owned == {}
            with trio.fail_after(5):
                while len(b.owner.owned) < SHARDS:
                    await trio.sleep(0.01)
            took = trio.current_time() - died
            nursery.cancel_scope.cancel()
        print(f"\nshards of a dead node taken {took:.2f}s after its last renewal (lease 3 s)")
        assert took <= 3.0 + 0.5, took
    finally:
        await sa.close()
        await sb.close()


async def test_leaving_frees_every_shard_at_once(postgres_cluster: Any) -> None:
    url = postgres_cluster.create_database()
    sa, sb = await open_store(url), await open_store(url)
    try:
        a, b = Node(sa, "node-a", 30.0), Node(sb, "node-b", 30.0)
        await a.owner.step()
        await a.owner.leave()
        assert a.owner.owned == {} and ("release", list(range(SHARDS))) in a.events
        await b.owner.step()                       # no waiting for a 30 s lease
        assert len(b.owner.owned) == SHARDS and b.owner.live == ["node-b"]
    finally:
        await sa.close()
        await sb.close()


async def test_an_unreachable_store_drops_the_shards_when_the_leases_run_out(postgres_cluster: Any) -> None:
    url = postgres_cluster.create_database()
    store = PostgresStore(url, shards=SHARDS, connect_timeout=1)
    await store.open()
    try:
        a = Node(store, "node-a", 2.0)
        await a.owner.step()
        assert len(a.owner.owned) == SHARDS
        await trio.to_thread.run_sync(postgres_cluster.pg_ctl, "stop")
        try:
            await a.owner.step()                   # fails: kept while the leases may still be ours
            assert len(a.owner.owned) == SHARDS and not any(w == "lost" for w, _ in a.events)
            await trio.sleep(2.0)
            await a.owner.step()
            assert a.owner.owned == {} and ("lost", list(range(SHARDS))) in a.events
        finally:
            await trio.to_thread.run_sync(postgres_cluster.pg_ctl, "start")
    finally:
        await store.close()


async def test_a_different_shard_count_is_refused_at_open(postgres_cluster: Any) -> None:
    url = postgres_cluster.create_database()
    first = PostgresStore(url, shards=SHARDS)
    await first.open()
    await first.close()
    with pytest.raises(StoreError, match=f"SHARDS=32 but this database was created with {SHARDS}"):
        await PostgresStore(url, shards=32).open()
