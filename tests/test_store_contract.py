"""The Store contract (runtime/store.py's module docstring), run against every implementation
through the ``store`` fixture; implementation-specific tests (files, locking, migrations, group
commit) live beside their implementation's (tests/test_sqlite_store.py)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import trio
import trio.testing

from runtime.memory_store import MemoryStore
from runtime.postgres_store import PostgresStore
from runtime.sqlite_store import SqliteStore
from runtime.store import Store, StateMeta

# One entry per implementation: a new store joins the contract by adding itself here. A factory
# gets the test's tmp_path and its request (for fixtures such as the PostgreSQL cluster).
STORES: dict[str, Callable[[Path, pytest.FixtureRequest], Store]] = {
    "memory": lambda tmp_path, request: MemoryStore(),
    "sqlite": lambda tmp_path, request: SqliteStore(tmp_path / "db" / "agent.sqlite3"),
    "postgresql": lambda tmp_path, request: PostgresStore(
        request.getfixturevalue("postgres_cluster").create_database()),
}


@pytest.fixture(params=list(STORES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An opened store of each kind, closed after the test."""
    s = STORES[request.param](tmp_path, request)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def state(tag: str = "") -> bytes:
    """An opaque state the size of a full conversation; not even UTF-8 (the store never decodes it)."""
    return (f"{tag}:" + "mensaje ¿sí? 🙏 " * 400).encode() + b"\x00\xff\xfe"


def meta(last_activity: float, size: int = 50, **listing: Any) -> StateMeta:
    return StateMeta(last_activity=last_activity, size=size, **listing)


async def test_accept_numbers_each_key_and_drops_duplicates(store: Store) -> None:
    assert await store.accept("a@s", "i:1", {"text": "hola"}) == 1
    assert await store.accept("a@s", "i:2", {"text": "dos"}) == 2
    assert await store.accept("b@s", "i:3", {"text": "otro"}) == 1
    assert await store.accept("a@s", "i:1", {"text": "hola otra vez"}) is None
    assert await store.accept("b@s", "i:2", {"text": "same id, other key"}) is None
    assert await store.accept("a@s", "i:4", {"text": "tres"}) == 3
    rows = await store.pending_inbox()
    assert [(r.key, r.seq, r.payload["text"]) for r in rows] == [
        ("a@s", 1, "hola"), ("a@s", 2, "dos"), ("a@s", 3, "tres"), ("b@s", 1, "otro")]


async def test_commit_saves_state_acks_and_returns_outbox_ids_in_order(store: Store) -> None:
    for i in range(1, 4):
        await store.accept("a@s", f"i:{i}", {"n": i})
    assert await store.load("a@s") is None
    saved = state("lead 7")
    ids = await store.commit("a@s", saved, meta(100.0), acked=[1, 2],
                             outbox=[("reply", {"text": "uno"}), ("crm", {"jid": "a@s"}), ("reply", {"text": "dos"})])
    assert len(ids) == 3 and ids == sorted(ids) and len(set(ids)) == 3
    assert await store.load("a@s") == saved
    assert [r.seq for r in await store.pending_inbox()] == [3]
    pending = await store.pending_outbox()
    assert [(r.id, r.key, r.kind, r.payload) for r in pending] == [
        (ids[0], "a@s", "reply", {"text": "uno"}), (ids[1], "a@s", "crm", {"jid": "a@s"}),
        (ids[2], "a@s", "reply", {"text": "dos"})]
    assert await store.commit("a@s", state("later"), meta(101.0), acked=[3, 99]) == []
    assert await store.pending_inbox() == []
    assert await store.load("a@s") == state("later")
    assert [r.meta.last_activity for r in (await store.listing(now=0.0)).rows] == [101.0]


async def test_any_bytes_come_back_exactly(store: Store) -> None:
    for key, blob in (("empty@s", b""), ("binary@s", bytes(range(256)) * 4), ("text@s", '{"a": "ñ"}'.encode())):
        await store.commit(key, blob, meta(1.0))
        loaded = await store.load(key)
        assert loaded == blob and type(loaded) is bytes


async def test_sequence_keeps_increasing_after_ack(store: Store) -> None:
    assert await store.accept("a@s", "i:1", {}) == 1
    await store.commit("a@s", state(), meta(1.0), acked=[1])
    assert await store.accept("a@s", "i:2", {}) == 2


async def test_settle_removes_only_that_job(store: Store) -> None:
    first, second = await store.commit("a@s", state(), meta(1.0), outbox=[("reply", {"n": 1}), ("reply", {"n": 2})])
    await store.settle(first)
    await store.settle(first)  # settling twice is harmless
    await store.settle(123456)  # so is an unknown id
    assert [r.id for r in await store.pending_outbox()] == [second]


async def test_bury_moves_a_job_to_the_dead_letters(store: Store) -> None:
    first, second = await store.commit("a", state(), meta(1.0),
                                       outbox=[("reply", {"text": "uno"}), ("reply", {"text": "dos"})])
    await store.bury(first, "all candidates rejected (401)")
    assert [row.id for row in await store.pending_outbox()] == [second]
    dead = await store.dead_letters()
    assert [(d.id, d.key, d.kind, d.payload, d.reason) for d in dead] == [
        (first, "a", "reply", {"text": "uno"}, "all candidates rejected (401)")]
    await store.bury(second, "x" * 2000)
    assert [d.id for d in await store.dead_letters()] == [second, first]    # newest first
    assert len((await store.dead_letters())[0].reason) == 500
    assert await store.dead_letters(limit=1) == (await store.dead_letters())[:1]


async def test_a_dead_letter_revived_goes_back_to_the_outbox_under_its_id(store: Store) -> None:
    first, second = await store.commit("a", state(), meta(1.0),
                                       outbox=[("reply", {"text": "uno"}), ("crm", {"jid": "a"})])
    await store.bury(first, "gave up")
    await store.bury(second, "gave up too")
    revived = await store.revive(first)
    assert revived is not None and (revived.id, revived.key, revived.kind, revived.payload) == (
        first, "a", "reply", {"text": "uno"})
    assert [r.id for r in await store.pending_outbox()] == [first]
    assert [d.id for d in await store.dead_letters()] == [second]
    assert await store.revive(first) is None          # no longer a dead letter
    assert await store.discard(second) is True
    assert await store.discard(second) is False
    assert await store.dead_letters() == []
    await store.settle(first)
    assert await store.pending_outbox() == []


async def test_listing_pages_newest_first_with_a_cursor(store: Store) -> None:
    for i in range(7):
        await store.commit(f"k{i}@s", state(), meta(100.0 + i % 3, title=f"Cliente {i}", preview=f"p{i}"))
    first = await store.listing(now=0.0, limit=3)
    assert first.total == 7
    order = [(r.meta.last_activity, r.key) for r in first.rows]
    rest = await store.listing(now=0.0, limit=10, after=order[-1])
    keys = [r.key for r in first.rows + rest.rows]
    assert keys == ["k5@s", "k2@s", "k4@s", "k1@s", "k6@s", "k3@s", "k0@s"]   # activity desc, then key desc
    assert first.rows[0].meta == meta(102.0, title="Cliente 5", preview="p5")


async def test_listing_filters_by_search_status_scope_and_keys(store: Store) -> None:
    await store.commit("5491100000001@s", state(), meta(1.0, title="José Pérez", scope="ventas"))
    await store.commit("5491100000002@s", state(), meta(
        2.0, title="Ana", status="paused", status_until=50.0, status_after="finished", scope="soporte"))
    await store.commit("77@lid", state(), meta(3.0, title="Bob", status="finished"))
    await store.commit("88@lid", state(), meta(4.0))                          # an empty listing record

    async def keys(**query: Any) -> list[str]:
        return [r.key for r in (await store.listing(now=10.0, **query)).rows]

    assert await keys(search="JOSÉ") == ["5491100000001@s"]                   # Unicode case-insensitive
    assert await keys(search="0000002") == ["5491100000002@s"]
    assert await keys(search="@lid") == ["88@lid", "77@lid"]
    assert await keys(status="paused") == ["5491100000002@s"]
    assert await keys(status="finished") == ["77@lid"]
    assert await keys(status="") == ["88@lid", "5491100000001@s"]
    assert [r.key for r in (await store.listing(now=60.0, status="finished")).rows] == [
        "77@lid", "5491100000002@s"]                                          # the pause ran out
    assert await keys(scope="ventas") == ["5491100000001@s"]
    assert await keys(keys=["77@lid", "nope"]) == ["77@lid"]
    page = await store.listing(now=10.0, status="finished", limit=0)
    assert (page.rows, page.total, page.scopes) == ([], 1, ["soporte", "ventas"])


async def test_a_commit_replaces_the_meta_and_expiry_drops_it(store: Store) -> None:
    await store.commit("a@s", state(), meta(1.0, title="Ana", preview="hola"))
    await store.commit("a@s", state(), meta(2.0, size=0))
    (row,) = (await store.listing(now=0.0)).rows
    assert row.meta == meta(2.0, size=0)
    assert await store.expire(3.0) == ["a@s"]
    assert (await store.listing(now=0.0)).total == 0
    await store.commit("b@s", state(), meta(1.0, title="B"))
    assert await store.expire(5.0) == ["b@s"]
    assert (await store.listing(now=0.0)).rows == []


async def test_pending_inbox_is_per_key_in_sequence_order(store: Store) -> None:
    keys = ["c@s", "a@s", "b@s"]
    for i in range(12):
        await store.accept(keys[i % 3], f"i:{i}", {"i": i})
    rows = await store.pending_inbox()
    assert len(rows) == 12
    for key in keys:
        mine = [r for r in rows if r.key == key]
        assert [r.seq for r in mine] == [1, 2, 3, 4]
        assert [r.payload["i"] for r in mine] == sorted(r.payload["i"] for r in mine)
    order = [r.key for r in rows]
    assert order == sorted(order, key=order.index)  # each key's rows are contiguous


async def test_pending_outbox_is_in_write_order_across_keys(store: Store) -> None:
    written: list[tuple[str, int]] = []
    for i in range(6):
        key = ["b@s", "a@s"][i % 2]
        await store.commit(key, state(), meta(1.0), outbox=[("reply", {"i": i})])
        written.append((key, i))
    assert [(r.key, r.payload["i"]) for r in await store.pending_outbox()] == written


async def test_expire_respects_idle_before_and_keep(store: Store) -> None:
    await store.commit("old@s", state(), meta(100.0))
    await store.commit("live@s", state(), meta(100.0))
    await store.commit("edge@s", state(), meta(500.0))
    await store.commit("new@s", state(), meta(900.0))
    gone = await store.expire(500.0, keep={"live@s"})
    assert sorted(gone) == ["old@s"]
    assert await store.load("old@s") is None
    assert list(await store.sizes()) == ["edge@s", "live@s", "new@s"]
    assert sorted(await store.expire(1000.0)) == ["edge@s", "live@s", "new@s"]
    assert await store.sizes() == {}


async def test_expire_keeps_what_is_still_owed(store: Store) -> None:
    """An accepted message and a queued job outlive the state: they belong to turns still to come
    (a message accepted during the sweep) or to a supervisor still working (a CRM retry)."""
    await store.commit("old@s", state(), meta(100.0), outbox=[("crm", {"c": 1})])
    assert await store.accept("old@s", "o:1", {"text": "volví"}) == 1
    await store.commit("quiet@s", state(), meta(100.0))
    assert await store.accept("quiet@s", "q:1", {}) == 1
    await store.commit("quiet@s", state(), meta(100.0), acked=[1])
    first, = await store.commit("dead@s", state(), meta(100.0), outbox=[("reply", {"d": 1})])
    await store.bury(first, "gave up")
    assert sorted(await store.expire(500.0)) == ["dead@s", "old@s", "quiet@s"]
    assert [(r.key, r.seq, r.payload) for r in await store.pending_inbox()] == [("old@s", 1, {"text": "volví"})]
    assert [(r.key, r.payload) for r in await store.pending_outbox()] == [("old@s", {"c": 1})]
    assert [(d.key, d.payload) for d in await store.dead_letters()] == [("dead@s", {"d": 1})]
    assert await store.accept("old@s", "o:2", {}) == 2       # its pending row keeps the sequence going
    assert await store.accept("quiet@s", "q:2", {}) == 1     # nothing pending: a fresh sequence
    assert await store.accept("quiet@s", "q:1", {}) is None  # dedupe ids outlive the state


async def test_expire_never_deletes_a_state_committed_meanwhile(store: Store) -> None:
    """The idleness condition is evaluated where the rows are deleted: a commit made while the
    expiry runs (a turn that just ran) is never lost, whatever the caller believed when it asked.
    (A store with concurrent transactions may run the expiry's delete first and report the key;
    the commit then writes the state and meta anew, so nothing committed is missing.)"""
    await store.commit("back@s", state("before"), meta(100.0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(store.commit, "back@s", state("after"), meta(950.0)))
        await trio.testing.wait_all_tasks_blocked()
        gone = await store.expire(500.0)
    assert gone in ([], ["back@s"])
    assert await store.load("back@s") == state("after")
    assert await store.sizes() == {"back@s": 50}


async def test_sizes_list_every_stored_key_in_key_order(store: Store) -> None:
    assert await store.sizes() == {}
    await store.commit("b@s", state(), meta(2.0))
    await store.commit("a@s", state(), meta(1.0))
    await store.commit("a@s", state(), meta(3.0, size=7))
    await store.commit("c@s", state(), meta(4.0, size=0))
    assert await store.sizes() == {"a@s": 7, "b@s": 50, "c@s": 0}
    assert list(await store.sizes()) == ["a@s", "b@s", "c@s"]
