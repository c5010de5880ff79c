"""SqliteStore beyond the Store contract (tests/test_store_contract.py): durability across reopen
and a real SIGKILL, group commit, cancellation, locking, corruption, schema versions and migrations."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from runtime.sqlite_store import SCHEMA_VERSION, SqliteStore
from runtime.store import InboxRow, StateMeta, StoreError

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
                nursery.start_soon(partial(s.commit, f"{i:05d}@s", b"{}", StateMeta(last_activity=10.0 + i % 3)))
        await s.commit("keep@s", b"{}", StateMeta(last_activity=1.0))
        before = s.transactions
        gone = await s.expire(100.0, keep={"keep@s"})
        assert sorted(gone) == sorted(f"{i:05d}@s" for i in range(count))
        assert s.transactions - before >= count // EXPIRE_BATCH
        assert list(await s.sizes()) == ["keep@s"]
    finally:
        await s.close()



async def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    first = SqliteStore(path)
    await first.open()
    for i in range(1, 4):
        await first.accept("a@s", f"i:{i}", {"text": f"m{i}", "emoji": "📅"})
    saved = '{"lead": {"lead_id": 9}, "text": "¿sí? 📅"}'.encode()
    ids = await first.commit("a@s", saved, StateMeta(last_activity=42.0, size=3, title="Ana"), acked=[1],
                             outbox=[("reply", {"text": "r"}), ("crm", {"c": 1})])
    await first.settle(ids[0])
    await first.close()

    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.load("a@s") == saved
        assert [r.meta for r in (await second.listing(now=0.0)).rows] == [
            StateMeta(last_activity=42.0, size=3, title="Ana")]
        assert await second.pending_inbox() == [InboxRow("a@s", 2, {"text": "m2", "emoji": "📅"}),
                                                InboxRow("a@s", 3, {"text": "m3", "emoji": "📅"})]
        assert [(r.id, r.kind) for r in await second.pending_outbox()] == [(ids[1], "crm")]
        assert await second.accept("a@s", "i:2", {}) is None  # dedupe ids survive
        assert await second.accept("a@s", "i:9", {}) == 4  # and so does the sequence
        new_id, = await second.commit("a@s", saved, StateMeta(), outbox=[("reply", {})])
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
    from runtime.sqlite_store import MIGRATIONS

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
        assert await store.load("a") == b'{"window": []}'
        assert await store.dead_letters() == []
        assert await store.sizes() == {"a": 0, "b": 2}   # version 3 counted the stored windows
        page = await store.listing(now=10.0)              # version 4 listed them, summaries empty
        assert [(r.key, r.meta) for r in page.rows] == [("b", StateMeta(6.0, 2)), ("a", StateMeta(5.0, 0))]
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()


def _version_4_file(path: Path, states: dict[str, dict[str, Any]], titles: dict[str, str]) -> None:
    """A database as version 4 wrote it: each state's JSON text beside its last_activity and window
    length, and its summary row (the statements of migrations 1 to 4, as released)."""
    from runtime.sqlite_store import MIGRATIONS

    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version (version) VALUES (4)")
        for step in range(1, 5):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
        for key, data in states.items():
            text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
            conn.execute("INSERT INTO states (key, data, last_activity, window_size) VALUES (?, ?, ?, ?)",
                         (key, text, data["last_activity"], len(data["window"])))
            conn.execute("INSERT INTO summaries (key, title, status, scope, last_activity, window_size, search)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (key, titles[key], "finished" if data["booking_sent"] else "", "prueba-py-agent",
                          data["last_activity"], len(data["window"]), f"{key}\n{titles[key]}".lower()))
    conn.close()


BOOKED = "5491100000001@s.whatsapp.net"
CHATTING = "5491100000002@s.whatsapp.net"


def _old_states(now: float) -> dict[str, dict[str, Any]]:
    from actors.state import ASSISTANT, USER, ConversationState, LeadInfo, WindowEntry

    def conversation(n: int, booked: bool, name: str) -> dict[str, Any]:
        window = [WindowEntry(USER if i % 2 == 0 else ASSISTANT, f"mensaje {i} ¿sí? 📅", now - 100 + i)
                  for i in range(n)]
        return ConversationState(window=window, booking_sent=booked, lead=LeadInfo(nombre=name, lead_id=41),
                                 last_activity=now - 10).to_dict()

    return {BOOKED: conversation(6, True, "José"), CHATTING: conversation(3, False, "Ana")}


async def test_a_version_4_database_keeps_its_states_and_meta(tmp_path: Path) -> None:
    """Version 5 makes the states opaque: the JSON text rows become their UTF-8 bytes, and the
    summaries (with last_activity and the window length) become each key's StateMeta."""
    from actors.state import ConversationState

    path = tmp_path / "agent.sqlite3"
    now = 1_769_000_000.0
    old = _old_states(now)
    _version_4_file(path, old, {BOOKED: "José", CHATTING: "Ana"})
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO inbox (key, seq, payload) VALUES (?, 1, ?)", (BOOKED, '{"text": "¿sigue?"}'))
        conn.execute("INSERT INTO seqs (key, last) VALUES (?, 1)", (BOOKED,))
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        for key, data in old.items():
            blob = await store.load(key)
            assert type(blob) is bytes and blob == json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
            assert ConversationState.from_bytes(blob).to_dict() == data
        assert await store.sizes() == {BOOKED: 6, CHATTING: 3}
        page = await store.listing(now=now, search="josé")
        assert [(r.key, r.meta) for r in page.rows] == [(BOOKED, StateMeta(
            last_activity=now - 10, size=6, title="José", status="finished", scope="prueba-py-agent"))]
        assert [(r.key, r.seq) for r in await store.pending_inbox()] == [(BOOKED, 1)]
        assert await store.accept(BOOKED, "i:2", {}) == 2                  # the sequence goes on
        assert await store.expire(now - 5) and await store.sizes() == {}   # expiry reads the meta
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)
    assert {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {
        "states", "meta"}
    assert [row[1] for row in conn.execute("PRAGMA table_info(states)")] == ["key", "data"]
    conn.close()


async def test_a_restart_after_the_migration_keeps_every_window_and_booking_flag(tmp_path: Path) -> None:
    """The service started on a version 4 file: each chat comes back with its window, lead and
    booking flag, from the store and once its actor loads it for the next message."""
    from actors.service import Service
    from tests.conftest import chain_of, make_settings, wait_for
    from tests.doubles import ScriptedProvider
    from tests.payloads import upsert

    from tests.conftest import key_of

    # the chats were the instance's whose webhooks continue them (migration 6 puts them under EVOLUTION_INSTANCE)
    settings = make_settings(tmp_path, STORE="sqlite", GOOGLE_BOOKING_URL="https://calendar.app.google/x",
                             EVOLUTION_INSTANCE="prueba-py-agent")
    settings.storage.data_dir.mkdir(parents=True)
    old = _old_states(time.time())
    _version_4_file(settings.storage.data_dir / "agent.sqlite3", old, {BOOKED: "José", CHATTING: "Ana"})
    service = Service(settings, chain=chain_of(settings, ScriptedProvider()))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        assert await service.window_sizes() == {key_of(BOOKED): 6, key_of(CHATTING): 3}
        for jid, data in old.items():
            assert await service.conversation_state(key_of(jid)) == (data, False)
        for jid in (CHATTING, BOOKED):
            assert (await service.intake(upsert("gracias", jid=jid))).status == 200
        registry = service.registry
        assert registry is not None
        await wait_for(lambda: (actor := registry.actor(key_of(CHATTING))) is not None and len(actor.state.window) == 5)
        loaded = registry.actor(key_of(CHATTING)).state   # type: ignore[union-attr]
        assert [e.content for e in loaded.window][:3] == [row[1] for row in old[CHATTING]["window"]]
        assert loaded.lead.lead_id == 41 and loaded.booking_sent is False
        # the booked chat keeps the message unanswered, as booked chats do: its flag came back
        await wait_for(lambda: (actor := registry.actor(key_of(BOOKED))) is not None and len(actor.state.window) == 7)
        booked = registry.actor(key_of(BOOKED)).state   # type: ignore[union-attr]
        assert booked.booking_sent is True and booked.lead.nombre == "José"
        assert booked.window[-1].content == "gracias"
        assert [e.content for e in booked.window][:6] == [row[1] for row in old[BOOKED]["window"]]
        nursery.cancel_scope.cancel()
