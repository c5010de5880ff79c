"""The Store contract, run against MemoryStore and SqliteStore; then SQLite-only durability,
group commit, locking, corruption, schema versions and a real SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio
import trio.testing

from runtime.sqlite_store import SCHEMA_VERSION, SqliteStore
from runtime.store import InboxRow, MemoryStore, Store, StoreError, Summary

ROOT = Path(__file__).resolve().parent.parent


class GatedStore(SqliteStore):
    """A SqliteStore whose COMMITs can be held (in the worker thread) until the test releases them:
    a transaction in flight, with the event loop free to queue more requests meanwhile."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._gates: list[tuple[threading.Event, threading.Event]] = []

    def hold_next_commit(self) -> tuple[threading.Event, threading.Event]:
        """(entered, release): ``entered`` is set when that COMMIT starts; it waits for ``release``."""
        gate = (threading.Event(), threading.Event())
        self._gates.append(gate)
        return gate

    def _commit_sync(self) -> StoreError | None:
        if self._gates:
            entered, release = self._gates.pop(0)
            entered.set()
            release.wait(10)
        return super()._commit_sync()


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An opened store of each kind, closed after the test."""
    s: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "db" / "agent.sqlite3")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def state(last_activity: float, **extra: Any) -> dict[str, Any]:
    window = [{"role": "user", "content": f"mensaje {i} ¿sí? 🙏", "timestamp": 1.5 * i} for i in range(50)]
    return {"last_activity": last_activity, "window": window, "booking_sent": False, **extra}


# -- the contract (both stores) ----------------------------------------------------------------


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
    saved = state(100.0, lead={"nombre": "Ana", "lead_id": 7})
    ids = await store.commit("a@s", saved, acked=[1, 2],
                             outbox=[("reply", {"text": "uno"}), ("crm", {"jid": "a@s"}), ("reply", {"text": "dos"})])
    assert len(ids) == 3 and ids == sorted(ids) and len(set(ids)) == 3
    assert await store.load("a@s") == saved
    assert [r.seq for r in await store.pending_inbox()] == [3]
    pending = await store.pending_outbox()
    assert [(r.id, r.key, r.kind, r.payload) for r in pending] == [
        (ids[0], "a@s", "reply", {"text": "uno"}), (ids[1], "a@s", "crm", {"jid": "a@s"}),
        (ids[2], "a@s", "reply", {"text": "dos"})]
    assert await store.commit("a@s", state(101.0), acked=[3, 99]) == []
    assert await store.pending_inbox() == []
    assert (await store.load("a@s"))["last_activity"] == 101.0  # type: ignore[index]


async def test_sequence_keeps_increasing_after_ack(store: Store) -> None:
    assert await store.accept("a@s", "i:1", {}) == 1
    await store.commit("a@s", state(1.0), acked=[1])
    assert await store.accept("a@s", "i:2", {}) == 2


async def test_settle_removes_only_that_job(store: Store) -> None:
    first, second = await store.commit("a@s", state(1.0), outbox=[("reply", {"n": 1}), ("reply", {"n": 2})])
    await store.settle(first)
    await store.settle(first)  # settling twice is harmless
    await store.settle(123456)  # so is an unknown id
    assert [r.id for r in await store.pending_outbox()] == [second]


async def test_bury_moves_a_job_to_the_dead_letters(store: Store) -> None:
    first, second = await store.commit("a", state(1.0), outbox=[("reply", {"text": "uno"}), ("reply", {"text": "dos"})])
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
    first, second = await store.commit("a", state(1.0), outbox=[("reply", {"text": "uno"}), ("crm", {"jid": "a"})])
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


async def test_summaries_page_newest_first_with_a_cursor(store: Store) -> None:
    for i in range(7):
        await store.commit(f"k{i}@s", state(100.0 + i % 3), summary=Summary(title=f"Cliente {i}", preview=f"p{i}"))
    first = await store.summaries(now=0.0, limit=3)
    assert first.total == 7
    order = [(r.last_activity, r.key) for r in first.rows]
    rest = await store.summaries(now=0.0, limit=10, after=order[-1])
    keys = [r.key for r in first.rows + rest.rows]
    assert keys == ["k5@s", "k2@s", "k4@s", "k1@s", "k6@s", "k3@s", "k0@s"]   # activity desc, then key desc
    assert first.rows[0].summary == Summary(title="Cliente 5", preview="p5")
    assert first.rows[0].window_size == 50


async def test_summaries_filter_by_search_status_scope_and_keys(store: Store) -> None:
    await store.commit("5491100000001@s", state(1.0), summary=Summary(title="José Pérez", scope="ventas"))
    await store.commit("5491100000002@s", state(2.0), summary=Summary(
        title="Ana", status="paused", status_until=50.0, status_after="finished", scope="soporte"))
    await store.commit("77@lid", state(3.0), summary=Summary(title="Bob", status="finished"))
    await store.commit("88@lid", state(4.0))                                  # no summary: an empty one

    async def keys(**query: Any) -> list[str]:
        return [r.key for r in (await store.summaries(now=10.0, **query)).rows]

    assert await keys(search="JOSÉ") == ["5491100000001@s"]                   # Unicode case-insensitive
    assert await keys(search="0000002") == ["5491100000002@s"]
    assert await keys(search="@lid") == ["88@lid", "77@lid"]
    assert await keys(status="paused") == ["5491100000002@s"]
    assert await keys(status="finished") == ["77@lid"]
    assert await keys(status="") == ["88@lid", "5491100000001@s"]
    assert [r.key for r in (await store.summaries(now=60.0, status="finished")).rows] == [
        "77@lid", "5491100000002@s"]                                          # the pause ran out
    assert await keys(scope="ventas") == ["5491100000001@s"]
    assert await keys(keys=["77@lid", "nope"]) == ["77@lid"]
    page = await store.summaries(now=10.0, status="finished", limit=0)
    assert (page.rows, page.total, page.scopes) == ([], 1, ["soporte", "ventas"])


async def test_a_commit_without_summary_keeps_it_and_expiry_drops_it(store: Store) -> None:
    await store.commit("a@s", state(1.0), summary=Summary(title="Ana", preview="hola"))
    await store.commit("a@s", state(2.0, window=[]))
    (row,) = (await store.summaries(now=0.0)).rows
    assert (row.summary.title, row.last_activity, row.window_size) == ("Ana", 2.0, 0)
    assert await store.expire(3.0) == ["a@s"]
    assert (await store.summaries(now=0.0)).total == 0
    await store.commit("b@s", state(1.0), summary=Summary(title="B"))
    assert await store.expire(5.0) == ["b@s"]
    assert (await store.summaries(now=0.0)).rows == []


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
        await store.commit(key, state(1.0), outbox=[("reply", {"i": i})])
        written.append((key, i))
    assert [(r.key, r.payload["i"]) for r in await store.pending_outbox()] == written


async def test_expire_respects_idle_before_and_keep(store: Store) -> None:
    await store.commit("old@s", state(100.0))
    await store.commit("live@s", state(100.0))
    await store.commit("edge@s", state(500.0))
    await store.commit("new@s", state(900.0))
    gone = await store.expire(500.0, keep={"live@s"})
    assert sorted(gone) == ["old@s"]
    assert await store.load("old@s") is None
    assert list(await store.window_sizes()) == ["edge@s", "live@s", "new@s"]
    assert sorted(await store.expire(1000.0)) == ["edge@s", "live@s", "new@s"]
    assert await store.window_sizes() == {}


async def test_expire_keeps_what_is_still_owed(store: Store) -> None:
    """An accepted message and a queued job outlive the state: they belong to turns still to come
    (a message accepted during the sweep) or to a supervisor still working (a CRM retry)."""
    await store.commit("old@s", state(100.0), outbox=[("crm", {"c": 1})])
    assert await store.accept("old@s", "o:1", {"text": "volví"}) == 1
    await store.commit("quiet@s", state(100.0))
    assert await store.accept("quiet@s", "q:1", {}) == 1
    await store.commit("quiet@s", state(100.0), acked=[1])
    assert sorted(await store.expire(500.0)) == ["old@s", "quiet@s"]
    assert [(r.key, r.seq, r.payload) for r in await store.pending_inbox()] == [("old@s", 1, {"text": "volví"})]
    assert [(r.key, r.payload) for r in await store.pending_outbox()] == [("old@s", {"c": 1})]
    assert await store.accept("old@s", "o:2", {}) == 2       # its pending row keeps the sequence going
    assert await store.accept("quiet@s", "q:2", {}) == 1     # nothing pending: a fresh sequence
    assert await store.accept("quiet@s", "q:1", {}) is None  # dedupe ids outlive the state


async def test_expire_never_deletes_a_state_committed_meanwhile(store: Store) -> None:
    """The idleness condition is evaluated where the rows are deleted: a commit queued before the
    expiry (a turn that just ran) wins, whatever the caller believed when it asked."""
    await store.commit("back@s", state(100.0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(store.commit, "back@s", state(950.0)))
        await trio.testing.wait_all_tasks_blocked()
        gone = await store.expire(500.0)
    assert gone == []
    saved = await store.load("back@s")
    assert saved is not None and saved["last_activity"] == 950.0


async def test_expire_runs_in_small_transactions(tmp_path: Path) -> None:
    """Thousands of expired chats (after downtime) are deleted a batch per transaction, so other
    requests are not queued behind one huge one."""
    from runtime.store import EXPIRE_BATCH

    s = SqliteStore(tmp_path / "agent.sqlite3")
    await s.open()
    try:
        count = EXPIRE_BATCH * 4 + 7
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(partial(s.commit, f"{i:05d}@s", {"last_activity": 10.0 + i % 3}))
        await s.commit("keep@s", {"last_activity": 1.0})
        before = s.transactions
        gone = await s.expire(100.0, keep={"keep@s"})
        assert sorted(gone) == sorted(f"{i:05d}@s" for i in range(count))
        assert s.transactions - before >= count // EXPIRE_BATCH
        assert list(await s.window_sizes()) == ["keep@s"]
    finally:
        await s.close()


async def test_window_sizes_list_every_saved_conversation(store: Store) -> None:
    assert await store.window_sizes() == {}
    await store.commit("b@s", state(2.0))
    await store.commit("a@s", state(1.0))
    await store.commit("a@s", {**state(3.0), "window": state(3.0)["window"][:7]})
    await store.commit("c@s", {"last_activity": 4.0})   # no window at all
    assert await store.window_sizes() == {"a@s": 7, "b@s": 50, "c@s": 0}
    assert list(await store.window_sizes()) == ["a@s", "b@s", "c@s"]


# -- SQLite only -------------------------------------------------------------------------------


async def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    first = SqliteStore(path)
    await first.open()
    for i in range(1, 4):
        await first.accept("a@s", f"i:{i}", {"text": f"m{i}", "emoji": "📅"})
    saved = state(42.0, lead={"lead_id": 9})
    ids = await first.commit("a@s", saved, acked=[1], outbox=[("reply", {"text": "r"}), ("crm", {"c": 1})])
    await first.settle(ids[0])
    await first.close()

    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.load("a@s") == saved
        assert await second.pending_inbox() == [InboxRow("a@s", 2, {"text": "m2", "emoji": "📅"}),
                                                InboxRow("a@s", 3, {"text": "m3", "emoji": "📅"})]
        assert [(r.id, r.kind) for r in await second.pending_outbox()] == [(ids[1], "crm")]
        assert await second.accept("a@s", "i:2", {}) is None  # dedupe ids survive
        assert await second.accept("a@s", "i:9", {}) == 4  # and so does the sequence
        new_id, = await second.commit("a@s", saved, outbox=[("reply", {})])
        assert new_id > ids[1]  # outbox ids are never reused
    finally:
        await second.close()


async def test_concurrent_accepts_are_group_committed(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "agent.sqlite3")
    await s.open()
    before = s.transactions
    got: dict[tuple[str, int], int | None] = {}

    async def one(i: int) -> None:
        got[(f"k{i % 20}@s", i)] = await s.accept(f"k{i % 20}@s", f"id:{i}", {"i": i})

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    used = s.transactions - before
    assert 1 <= used <= 10, used
    inbox = {(r.key, r.seq): r.payload["i"] for r in await s.pending_inbox()}
    assert len(inbox) == 200
    for (key, i), seq in got.items():
        assert seq is not None and inbox[(key, seq)] == i  # each caller got its own row's seq
    for k in range(20):
        assert sorted(seq for (key, _), seq in got.items() if key == f"k{k}@s") == list(range(1, 11))  # type: ignore[type-var]
    await s.close()


async def test_batch_max_bounds_a_transaction(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "agent.sqlite3", batch_max=16)
    await s.open()
    before = s.transactions
    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(s.accept, "a@s", f"id:{i}", {})
    assert s.transactions - before >= 200 // 16
    assert [r.seq for r in await s.pending_inbox()] == list(range(1, 201))
    await s.close()


async def test_cancelled_queued_request_is_withdrawn_and_the_rest_complete(tmp_path: Path) -> None:
    s = GatedStore(tmp_path / "agent.sqlite3")
    await s.open()
    _, gate = s.hold_next_commit()
    results: dict[str, int | None] = {}

    async def accept(name: str) -> None:
        results[name] = await s.accept("a@s", name, {"name": name})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(s._call, lambda conn: None)  # a transaction in flight
        await trio.testing.wait_all_tasks_blocked()
        doomed = trio.CancelScope()

        async def cancelled_accept() -> None:
            with doomed:
                await accept("doomed")

        nursery.start_soon(cancelled_accept)  # queued first: it would lead the next transaction
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(accept, "kept1")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(accept, "kept2")
        await trio.testing.wait_all_tasks_blocked()
        doomed.cancel()
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert "doomed" not in results
    assert results == {"kept1": 1, "kept2": 2}
    assert [r.payload["name"] for r in await s.pending_inbox()] == ["kept1", "kept2"]
    await s.close()


async def test_cancelled_request_already_in_a_transaction_gets_its_result(tmp_path: Path) -> None:
    s = GatedStore(tmp_path / "agent.sqlite3")
    await s.open()
    _, first = s.hold_next_commit()
    entered, second = s.hold_next_commit()
    results: dict[str, int | None] = {}
    scope = trio.CancelScope()

    async def accept_then_get_cancelled() -> None:
        with scope:
            results["x"] = await s.accept("a@s", "x", {})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(s._call, lambda conn: None)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(s._call, lambda conn: None)  # leads the next one...
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(accept_then_get_cancelled)  # ...which also takes this accept
        await trio.testing.wait_all_tasks_blocked()
        first.set()
        await trio.to_thread.run_sync(entered.wait, 10)  # the second transaction (with the accept) runs
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        second.set()
    assert results == {"x": 1}
    assert [r.seq for r in await s.pending_inbox()] == [1]
    await s.close()


async def test_a_failing_operation_fails_only_its_caller(tmp_path: Path) -> None:
    s = GatedStore(tmp_path / "agent.sqlite3")
    await s.open()
    _, gate = s.hold_next_commit()
    seqs: list[int | None] = []
    errors: list[StoreError] = []

    async def accept(i: int) -> None:
        seqs.append(await s.accept("a@s", f"id:{i}", {"i": i}))

    async def broken() -> None:
        try:
            await s._call(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)"))
        except StoreError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(s._call, lambda conn: None)
        await trio.testing.wait_all_tasks_blocked()
        before = s.transactions
        for start in (partial(accept, 1), broken, partial(accept, 2)):  # queued in this order,
            nursery.start_soon(start)  # so they share the next transaction
            await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert len(errors) == 1 and "no such table" in str(errors[0])
    assert sorted(seqs) == [1, 2]  # type: ignore[type-var]
    assert s.transactions - before == 2  # the gate's transaction, then the accepts' (rerun once)
    assert [r.payload["i"] for r in await s.pending_inbox()] == [1, 2]
    await s.close()


async def test_close_finishes_queued_work_and_then_refuses(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    s = GatedStore(path)
    await s.open()
    _, gate = s.hold_next_commit()
    seqs: list[int | None] = []
    closed = trio.Event()

    async def accept(i: int) -> None:
        seqs.append(await s.accept("a@s", f"id:{i}", {}))

    async def close() -> None:
        await s.close()
        closed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(s._call, lambda conn: None)  # a transaction in flight
        await trio.testing.wait_all_tasks_blocked()
        for i in range(20):
            nursery.start_soon(accept, i)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(close)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(StoreError, match="not open"):  # closing: new work is refused at once
            await s.accept("a@s", "late", {})
        assert not closed.is_set() and seqs == []
        gate.set()
    assert closed.is_set()
    assert sorted(seqs) == list(range(1, 21))  # type: ignore[type-var]
    again = SqliteStore(path)
    await again.open()
    assert len(await again.pending_inbox()) == 20
    await again.close()


async def test_old_dedupe_ids_are_pruned_after_the_ttl(tmp_path: Path) -> None:
    now = [1_000_000.0]
    s = SqliteStore(tmp_path / "agent.sqlite3", dedupe_ttl=3600.0, clock=lambda: now[0])
    await s.open()
    assert await s.accept("a@s", "i:1", {}) == 1
    now[0] += 3000.0
    assert await s.accept("a@s", "i:1", {}) is None  # within the ttl
    now[0] += 3600.0
    await s.accept("a@s", "i:2", {})  # a later transaction prunes ids older than the ttl
    assert await s.accept("a@s", "i:1", {}) == 3
    await s.close()


async def test_second_store_on_the_same_file_fails_fast_as_locked(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    first = SqliteStore(path)
    await first.open()
    second = SqliteStore(path)
    with trio.fail_after(5):
        with pytest.raises(StoreError, match="locked") as info:
            await second.open()
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert await first.accept("a@s", "i:1", {}) == 1  # the first one is unaffected
    await first.close()
    await second.open()  # the lock goes with the first store
    assert [r.seq for r in await second.pending_inbox()] == [1]
    await second.close()


async def test_garbage_file_is_reported_as_corrupt_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    garbage = bytes(range(256)) * 64
    path.write_bytes(garbage)
    with pytest.raises(StoreError, match="corrupt or not a database") as info:
        await SqliteStore(path).open()
    assert "\n" not in str(info.value)
    assert path.read_bytes() == garbage  # never a silent reset


async def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.close()
    with pytest.raises(StoreError, match="not an agent store"):
        await SqliteStore(path).open()


async def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    s = SqliteStore(path)
    await s.open()
    await s.close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        await SqliteStore(path).open()


CHILD = """
import sys, trio
from pathlib import Path
from runtime.sqlite_store import SqliteStore

async def main() -> None:
    store = SqliteStore(Path(sys.argv[1]))
    await store.open()
    print("open", flush=True)

    async def writer(w: int) -> None:
        for i in range(100_000):
            seq = await store.accept(f"k{w}@s", f"{w}:{i}", {"w": w, "i": i})
            print(f"k{w}@s {seq} {i}", flush=True)

    async with trio.open_nursery() as nursery:
        for w in range(8):
            nursery.start_soon(writer, w)

trio.run(main)
"""


@pytest.mark.slow
async def test_every_acknowledged_accept_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await trio.lowlevel.open_process([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, env=env,
                                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    output = b""
    try:
        with trio.fail_after(30):
            while output.count(b"\n") < 300:
                chunk = await proc.stdout.receive_some()
                assert chunk, "child exited early"
                output += chunk
            with pytest.raises(StoreError, match="locked"):  # a live process holds the file
                await SqliteStore(path).open()
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            while chunk := await proc.stdout.receive_some():
                output += chunk
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.stdout.aclose()
    assert proc.returncode == -signal.SIGKILL
    lines = output.split(b"\n")[1:-1]  # skip "open"; the last piece may be a partial line
    printed = {(key, int(seq)): int(i) for key, seq, i in (line.decode().split() for line in lines)}
    assert len(printed) >= 299

    store = SqliteStore(path)
    await store.open()
    inbox = {(r.key, r.seq): r.payload["i"] for r in await store.pending_inbox()}
    await store.close()
    missing = {k: v for k, v in printed.items() if inbox.get(k) != v}
    assert not missing, f"{len(missing)} acknowledged accepts lost, e.g. {list(missing.items())[:3]}"


async def test_a_version_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    import sqlite3

    from runtime.sqlite_store import MIGRATIONS, SCHEMA_VERSION

    path = tmp_path / "agent.sqlite3"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        for statement in MIGRATIONS[1]:
            conn.execute(statement)
        conn.execute("INSERT INTO states (key, data, last_activity) VALUES ('a', '{\"window\": []}', 5.0)")
        conn.execute("INSERT INTO states (key, data, last_activity) VALUES ('b', ?, 6.0)",
                     ('{"window": [["user", "hola", 1.0], ["assistant", "¡hola!", 1.0]]}',))
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.load("a") == {"window": []}
        assert await store.dead_letters() == []
        assert await store.window_sizes() == {"a": 0, "b": 2}   # version 3 counted the stored windows
        page = await store.summaries(now=10.0)                   # version 4 listed them, summaries empty
        assert [(r.key, r.summary, r.last_activity, r.window_size) for r in page.rows] == [
            ("b", Summary(), 6.0, 2), ("a", Summary(), 5.0, 0)]
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()
