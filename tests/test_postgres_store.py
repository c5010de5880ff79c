"""PostgreSQL-only store tests (the shared contract is tests/test_store_contract.py): durability
across reopening, two stores (two nodes) on one database, schema checks, errors that never show the
password, and an outage of the server."""

from __future__ import annotations

import itertools
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from runtime.postgres_schema import SCHEMA_VERSION
from runtime.postgres_store import PostgresStore
from runtime.shards import NodeInfo, shard_of
from runtime.store import InboxRow, StateMeta, StoreError
from tests.postgres import PASSWORD
from tests.procs import ServiceProcess


async def test_everything_survives_reopening(postgres_cluster: Any) -> None:
    url = postgres_cluster.create_database()
    first = PostgresStore(url)
    await first.open()
    assert await first.accept("k", "i:1", {"text": "hola"}) == 1
    assert await first.accept("k", "i:2", {"text": "otra"}) == 2
    ids = await first.commit("k", b"\x00state\xff", StateMeta(last_activity=5.0, size=2, scope="acme"),
                             acked=[1], outbox=[("reply", {"text": "r"})])
    await first.close()
    again = PostgresStore(url)
    await again.open()
    try:
        assert await again.load("k") == b"\x00state\xff"
        assert [(r.key, r.seq) for r in await again.pending_inbox()] == [("k", 2)]
        assert [r.id for r in await again.pending_outbox()] == ids
        assert await again.accept("k", "i:1", {"text": "re-sent"}) is None   # dedupe kept
        assert await again.accept("k", "i:3", {"text": "next"}) == 3
    finally:
        await again.close()


async def test_two_stores_on_one_database_number_a_key_without_gaps(postgres_cluster: Any) -> None:
    """Two nodes accepting one chat's messages at once: every sequence number once, in 1..N, and a
    message id accepted by both is stored once."""
    url = postgres_cluster.create_database()
    a, b = PostgresStore(url, pool_size=4), PostgresStore(url, pool_size=4)
    await a.open()
    await b.open()
    seqs: list[int | None] = []
    try:
        async def post(store: PostgresStore, n: int) -> None:
            seqs.append(await store.accept("chat", f"i:{n}", {"n": n}))

        async with trio.open_nursery() as nursery:
            for n in range(60):
                nursery.start_soon(post, a, n)
                nursery.start_soon(post, b, n)   # the same message id through the other node
        accepted = sorted(s for s in seqs if s is not None)
        assert accepted == list(range(1, 61))
        assert seqs.count(None) == 60
        rows = await a.pending_inbox()
        assert sorted(r.payload["n"] for r in rows) == list(range(60))
    finally:
        await a.close()
        await b.close()


async def test_a_newer_schema_and_a_foreign_database_are_refused(postgres_cluster: Any) -> None:
    url = postgres_cluster.create_database()
    store = PostgresStore(url)
    await store.open()
    await store.close()
    name = url.rsplit("/", 1)[1]
    postgres_cluster.sql(f"UPDATE agent_schema_version SET version = {SCHEMA_VERSION + 1}", name)
    with pytest.raises(StoreError, match="newer than this code supports"):
        await PostgresStore(url).open()

    foreign = postgres_cluster.create_database()
    postgres_cluster.sql("CREATE TABLE agent_states (x int)", foreign.rsplit("/", 1)[1])
    with pytest.raises(StoreError, match="not an agent store"):
        await PostgresStore(foreign).open()


async def test_errors_name_the_database_and_never_the_password(postgres_cluster: Any) -> None:
    good = postgres_cluster.create_database()
    wrong = good.replace(PASSWORD, "not-the-password-123")
    with pytest.raises(StoreError) as refused:
        await PostgresStore(wrong, connect_timeout=3).open()
    text = str(refused.value)
    assert f"127.0.0.1:{postgres_cluster.port}/" in text and "authentication failed" in text
    assert "not-the-password-123" not in text and PASSWORD not in text

    store = PostgresStore(good)
    with pytest.raises(StoreError, match="not open"):
        await store.load("k")


@asynccontextmanager
async def store_with_one_row(postgres_cluster: Any) -> AsyncIterator[PostgresStore]:
    """An open store on a fresh database, with one accepted message (seq 1) of key ``k``."""
    store = PostgresStore(postgres_cluster.create_database(), connect_timeout=2)
    await store.open()
    try:
        assert await store.accept("k", "i:1", {}) == 1
        yield store
    finally:
        await store.close()


async def accept_once_back(store: PostgresStore, dedupe_id: str) -> int:
    """Accept a message of ``k``, retrying while the pool drops the connections a restart broke and
    reconnects; its sequence number."""
    while True:
        try:
            seq = await store.accept("k", dedupe_id, {})
            assert seq is not None
            return seq
        except StoreError:
            await trio.sleep(0.05)


async def test_calls_fail_while_the_server_is_down_and_work_again_after(postgres_cluster: Any) -> None:
    """An outage: each call raises StoreError (one line, no password) instead of hanging, and the
    same store serves again once the server is back, without being reopened."""
    async with store_with_one_row(postgres_cluster) as store:
        await trio.to_thread.run_sync(postgres_cluster.pg_ctl, "stop")
        try:
            with trio.fail_after(15):
                with pytest.raises(StoreError) as down:
                    await store.accept("k", "i:2", {})
            assert PASSWORD not in str(down.value)
        finally:
            await trio.to_thread.run_sync(postgres_cluster.pg_ctl, "start")
        with trio.fail_after(20):
            assert await accept_once_back(store, "i:2") == 2


async def test_sharded_reads_see_only_their_shards_in_order(postgres_cluster: Any) -> None:
    """Several nodes (runtime/inbox_feed.py): a node reads the pending rows of its shards only, per key
    in sequence order, the heads without payloads, and a key's rows after a given seq."""
    url = postgres_cluster.create_database()
    store = PostgresStore(url, shards=4)
    await store.open()
    try:
        keys = [f"i/{n}@s" for n in range(12)]
        for key in keys:
            for n in range(3):
                assert await store.accept(key, f"{key}:{n}", {"n": n}) == n + 1
        await store.commit(keys[0], b"s", StateMeta(last_activity=1.0), acked=[1],
                           outbox=[("reply", {"text": "r"})])
        mine = {shard_of(keys[0], 4), shard_of(keys[5], 4)}
        inside = [k for k in keys if shard_of(k, 4) in mine]
        rows = await store.pending_inbox_in(mine)
        assert sorted({r.key for r in rows}) == sorted(inside)
        assert [(r.key, r.seq) for r in rows] == sorted((r.key, r.seq) for r in rows)
        heads = await store.inbox_heads(mine)
        assert heads == {k: 3 for k in inside}
        after = await store.inbox_after({keys[0]: 2, keys[5]: 0})
        assert [(r.key, r.seq, r.payload) for r in after] == [
            (keys[0], 3, {"n": 2}), *[(keys[5], n + 1, {"n": n}) for n in range(3)]]
        assert [r.key for r in await store.pending_outbox_in([shard_of(keys[0], 4)])] == [keys[0]]
        assert await store.pending_outbox_in([s for s in range(4) if s != shard_of(keys[0], 4)]) == []
        # expiry restricted to shards: the key outside them is kept
        await store.commit(keys[1], b"s", StateMeta(last_activity=1.0))
        other = [s for s in range(4) if s != shard_of(keys[0], 4)]
        gone = await store.expire(5.0, shards=other)
        assert keys[0] not in gone and await store.load(keys[0]) == b"s"
    finally:
        await store.close()


async def test_accept_wakes_the_owner_of_another_node(postgres_cluster: Any) -> None:
    """An accept on a node that does not own the key's shard NOTIFYs the owner's channel (payload:
    the accepted row, or the shard alone when the row does not fit), in the accept's own statement;
    the owner's own accepts and duplicates wake nobody."""
    url = postgres_cluster.create_database()
    owner, other = PostgresStore(url, shards=2, node="n1"), PostgresStore(url, shards=2, node="n2")
    await owner.open()
    await other.open()
    woken: list[tuple[int, InboxRow | None]] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(owner.listen, "n1", lambda shard, row: woken.append((shard, row)))
            leases = await owner.acquire("n1", [0, 1], 10.0, 2)
            assert len(leases) == 2
            key = "inst/1@s"
            assert await owner.accept(key, "a", {}) == 1      # its own: no wake-up
            assert await other.accept(key, "b", {}) == 2
            assert await other.accept(key, "b", {}) is None   # a duplicate: none
            assert await other.accept(key, "c", {"text": "x" * 8000}) == 3   # too large: the shard alone
            with trio.fail_after(5):
                while len(woken) < 2:
                    await trio.sleep(0.02)
            await trio.sleep(0.3)
            assert woken == [(shard_of(key, 2), InboxRow(key, 2, {})), (shard_of(key, 2), None)]
            nursery.cancel_scope.cancel()
    finally:
        await owner.close()
        await other.close()


def _start_failure(tmp_path: Path, store_url: str, name: str, **extra: str) -> tuple[int, str]:
    env = {"DATA_DIR": str(tmp_path / "data"), "LOG_DIR": str(tmp_path / "logs"), "STORE_URL": store_url,
           "LOG_STDERR": "true", **extra}
    with ServiceProcess(env, tmp_path / f"{name}.log") as service:
        service.start()
        assert service.proc is not None
        service.proc.wait(timeout=30)
        return service.proc.returncode, service.output()


@pytest.mark.slow
def test_a_refused_database_stops_start_up_with_one_line_and_no_password(postgres_cluster: Any,
                                                                       tmp_path: Path) -> None:
    """The service as deployed (hypercorn): a wrong password, and a SHARDS that differs from the
    database's, each stop start-up with one ``Store error:`` line naming host:port/dbname."""
    url = postgres_cluster.create_database()
    wrong = url.replace(PASSWORD, "wrong-password-5150")
    code, output = _start_failure(tmp_path, wrong, "wrong")
    assert code != 0 and "Store error:" in output and f"127.0.0.1:{postgres_cluster.port}/" in output, output
    assert "wrong-password-5150" not in output and "Traceback" not in output, output

    async def create() -> None:   # a database created with the default 1024 shards
        store = PostgresStore(url)
        await store.open()
        await store.close()

    trio.run(create)
    code, output = _start_failure(tmp_path, url, "shards", SHARDS="7")
    assert code != 0 and "SHARDS=7 but this database was created with 1024" in output, output
    assert PASSWORD not in output, output


async def test_a_commit_is_all_or_nothing_in_its_one_round_trip(postgres_cluster: Any) -> None:
    """A turn's commit runs as the pipeline's one implicit transaction: when its last statement fails
    (here a trigger refuses the outbox row), the state, meta and acks before it are rolled back."""
    url = postgres_cluster.create_database()
    store = PostgresStore(url)
    await store.open()
    try:
        assert await store.accept("k", "i:1", {"text": "hola"}) == 1
        await store.commit("k", b"before", StateMeta(last_activity=1.0, size=1))
        postgres_cluster.sql(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN IF NEW.kind = 'boom' THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$;"
            " CREATE TRIGGER refuse BEFORE INSERT ON agent_outbox FOR EACH ROW EXECUTE FUNCTION refuse()",
            url.rsplit("/", 1)[1])
        with pytest.raises(StoreError, match="refused by the test"):
            await store.commit("k", b"after", StateMeta(last_activity=2.0, size=2), acked=[1],
                               outbox=[("reply", {"text": "r"}), ("boom", {})])
        assert await store.load("k") == b"before"
        assert [(r.key, r.seq) for r in await store.pending_inbox()] == [("k", 1)]
        assert await store.pending_outbox() == []
        assert await store.sizes() == {"k": 1}
        assert await store.commit("k", b"after", StateMeta(last_activity=2.0, size=2), acked=[1]) == []
        assert await store.load("k") == b"after"   # the connection is usable after the failure
    finally:
        await store.close()


async def test_lease_renewals_never_wait_behind_a_busy_pool(postgres_cluster: Any) -> None:
    """Shard leases use a connection of their own: with every pooled connection busy and more calls
    queued (a webhook burst), a heartbeat and a renewal still answer at once, so a live node's leases
    never run out behind its own traffic (bench crowd lost messages when they shared the pool)."""
    url = postgres_cluster.create_database()
    store = PostgresStore(url, pool_size=2, shards=4)
    await store.open()
    try:
        leases = await store.acquire("n", [0, 1, 2, 3], 10.0, 4)
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(store._run, lambda conn: conn.execute("SELECT pg_sleep(1.5)"))
            await trio.sleep(0.2)
            started = trio.current_time()
            assert await store.heartbeat("n", 10.0, NodeInfo()) == ["n"]
            assert await store.renew("n", leases, 10.0) == leases
            assert trio.current_time() - started < 1.0
    finally:
        await store.close()


@pytest.mark.slow
async def test_the_store_serves_again_within_seconds_of_the_database_coming_back(postgres_cluster: Any) -> None:
    """After a 25 s outage, with calls failing all along (as webhooks keep coming), the store serves
    again within a few seconds of the server accepting connections. Seen failing with psycopg_pool's
    uncapped reconnect backoff (1, 2, 4, 8, 16 s...): its next attempt came 5-10 s after the restart
    here, and 21-25 s after a 40 s outage (bench/db_outage.py)."""
    async with store_with_one_row(postgres_cluster) as store:
        await trio.to_thread.run_sync(postgres_cluster.pg_ctl, "stop")
        try:
            with trio.move_on_after(25):
                for n in itertools.count():
                    with pytest.raises(StoreError):
                        await store.accept("k", f"down:{n}", {})
                    await trio.sleep(0.1)
        finally:
            await trio.to_thread.run_sync(postgres_cluster.pg_ctl, "start")
        back = trio.current_time()
        assert await accept_once_back(store, "i:2") == 2
        assert trio.current_time() - back < 5.0   # RECONNECT_MAX_DELAY (2 s) + UNREACHABLE_PAUSE (1 s) + slack


def test_reconnect_waits_double_from_one_second_up_to_the_cap() -> None:
    """The pool's reconnect attempts (runtime/postgres_pool.py): 1 s (±10 % jitter), then doubling,
    never more than RECONNECT_MAX_DELAY; the give-up time stays psycopg_pool's reconnect_timeout."""
    from psycopg_pool import ConnectionPool

    from runtime.postgres_pool import RECONNECT_MAX_DELAY, CappedAttempt, Pool

    assert Pool._add_connection is not ConnectionPool._add_connection   # still there to override (a rename: no cap)

    attempt = CappedAttempt(timeout=300.0)
    delays = []
    for _ in range(8):
        attempt.update_delay(1000.0)
        delays.append(attempt.delay)
    assert 0.9 <= delays[0] <= 1.1 and delays[1] == pytest.approx(min(2 * delays[0], RECONNECT_MAX_DELAY))
    assert delays[2:] == [RECONNECT_MAX_DELAY] * 6 and attempt.give_up_at == 1300.0
