"""The Store contract (``runtime.store``) in PostgreSQL, for several processes and machines on one
database.

Driver
    psycopg 3 (libpq). Its async API runs on asyncio only, so each operation is a function run with
    the sync API in a worker thread (``trio.to_thread.run_sync``) on a connection from a
    ``psycopg_pool.ConnectionPool`` (its reconnect backoff capped: runtime/postgres_pool.py), at
    most ``pool_size`` at once (a ``trio.CapacityLimiter`` of the same size, so no thread ever
    waits inside the pool). Every operation is atomic. A turn's
    commit (meta, state, acks, outbox rows) and a burial are sent in pipeline mode and run as the
    implicit transaction before its one Sync: one round trip to the server, not one per statement
    plus BEGIN and COMMIT (libpq trace: 1 Sync, against 3 with an explicit transaction). Accepting
    a message is one statement (dedupe, sequence and inbox row in one CTE): one round trip too.

Cancellation
    A call cancelled while it waits for a connection slot never starts; once its thread runs, the
    transaction completes and the caller gets its result (``run_sync`` is not abandoned on cancel).

Schema
    Versioned migrations (``MIGRATIONS`` in runtime/postgres_schema.py), applied at ``open`` under a
    transaction-level advisory lock, so nodes starting together migrate once. A database with a
    newer version than this code knows, or with tables of its own and no ``agent_schema_version``
    table, is refused with one line. The tables are prefixed ``agent_`` so the service can share a
    database (e.g. Evolution API's) without clashing.

Several nodes
    Any number of processes share one database (runtime/shards.py): inbox, outbox and meta rows
    carry their key's shard (schema v3) so a node reads its own shards' pending work
    (``pending_inbox_in``, ``pending_outbox_in``, ``inbox_heads``, ``inbox_after``); a commit may be
    fenced by a lease (``agent_fence``); ``accept`` on a store given a ``node`` wakes the owner of the
    message's shard when that is another node (NOTIFY on ``node_channel(owner)``, received by
    ``listen``), carrying the accepted row when it fits so the owner need not read it back. The
    lease operations (heartbeat, acquire, renew, release: runtime/postgres_leases.py) use a
    connection of their own, so a renewal never waits behind a burst of webhooks in the pool's queue. A call waits at
    most ``CONNECTION_WAIT`` for a pooled connection, and one that finds the database unreachable
    makes the calls of the next second fail at once, so webhooks answer 503 within seconds.

Errors
    Every failure is a ``StoreError`` with one line naming the database as ``host:port/dbname``:
    the connection string's password never appears in it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Callable, Collection, Literal, Sequence, TypeVar
from urllib.parse import urlsplit

import trio

from .postgres_leases import PostgresLeases
from .postgres_schema import FENCED, MIGRATIONS, SCHEMA_VERSION, SHARDED, AfterCommit, dumps
from .shards import Lease, shard_of
from .store import (DEAD_LETTERS_KEPT, EXPIRE_BATCH, Cursor, DeadLetterRow, Fenced, InboxRow, MetaPage, MetaRow,
                    OutboxRow, StateMeta, StoreError)

T = TypeVar("T")
log = logging.getLogger(__name__)
CONNECTION_WAIT = 2.0     # seconds a call waits for a pooled connection before failing
UNREACHABLE_PAUSE = 1.0   # seconds calls fail at once after the database was found unreachable
WAKE_CHANNEL = "agent_wake_"     # wake-ups: '[shard,seq,key,payload]' (the accepted row) or the shard alone
LEGACY_CHANNEL = "agent_node_"   # shard-only wake-ups sent by nodes of the previous version (rolling upgrade)
NOTIFY_LIMIT = 8000   # PostgreSQL refuses a NOTIFY payload of this many bytes or more
Mode = Literal["statement", "batch", "transaction"]

MIGRATION_LOCK = 0x6167656E74   # pg_advisory_xact_lock key held while migrating ("agent")
HOUSEKEEPING_INTERVAL = 60.0
_STATUS_AT = "(CASE WHEN status_until = 0 OR status_until > %(now)s THEN status ELSE status_after END)"
_META_COLUMNS = "last_activity, size, title, preview, status, status_until, status_after, scope"


def _search_text(key: str, title: str) -> str:
    return f"{key}\n{title}".lower()


def _unreachable(exc: BaseException) -> bool:
    """A lost or refused connection (no connection from the pool, a connection class 08 error, the
    server shutting down: 57P), not a statement's own failure (a timeout, a constraint)."""
    import psycopg
    import psycopg_pool

    if isinstance(exc, (psycopg_pool.PoolTimeout, OSError)):
        return True
    code = getattr(exc, "sqlstate", None)
    return isinstance(exc, psycopg.OperationalError) and (code is None or code.startswith(("08", "57P")))


def node_channel(node: str, prefix: str = WAKE_CHANNEL) -> str:
    """The NOTIFY channel that wakes ``node`` (accept's SQL computes the same from the owner)."""
    return prefix + hashlib.md5(node.encode("utf-8")).hexdigest()[:16]


def wake_of(note: str) -> tuple[int, InboxRow | None]:
    """A wake-up's shard and the accepted row it carries (None: the shard alone, as the row did
    not fit in a notification or a node of the previous version sent it)."""
    if note.startswith("["):
        shard, seq, key, payload = json.loads(note)
        return int(shard), InboxRow(str(key), int(seq), payload)
    return int(note), None


def describe_url(url: str) -> str:
    """``host:port/dbname`` of a connection URL: what errors and logs may show (never a password)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "postgresql (unparsable URL)"
    return f"postgresql {host}:{port}{parts.path or '/'}"


class PostgresStore(PostgresLeases):
    """The Store contract in PostgreSQL (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        connect_timeout: float = 5.0,
        statement_timeout: float = 10.0,
        dedupe_ttl: float = 86400.0,
        clock: Callable[[], float] = time.time,
        shards: int = 1024,
        node: str | None = None,
    ) -> None:
        """``node``: this process's NODE_ID; with it, ``accept`` wakes the owner of the message's
        shard when that is another node (NOTIFY on ``node_channel(owner)``)."""
        self._url = url
        self.shards = shards
        self.node = node
        self.name = describe_url(url)
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self.dedupe_ttl = dedupe_ttl
        self._clock = clock
        self._pool: Any = None
        self._limiter = trio.CapacityLimiter(pool_size)
        # Shard leases go through a connection of their own: a renewal queued behind a busy pool
        # (a webhook burst) would let the node's leases run out while it is alive.
        self._lease_pool: Any = None
        self._lease_limiter = trio.CapacityLimiter(1)
        self._next_housekeeping = 0.0
        self._unreachable_until = -1.0   # time.monotonic(): until then calls fail fast (see _run)

    # -- plumbing ----------------------------------------------------------------------------

    def _error(self, exc: BaseException) -> StoreError:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        kind = Fenced if getattr(exc, "sqlstate", None) == FENCED else StoreError
        return kind(f"{self.name}: {first[:300]}")

    async def _run(self, fn: Callable[[Any], T], *, mode: Mode = "transaction", lease: bool = False) -> T:
        """Run ``fn(conn)`` on a pooled (autocommit) connection in a worker thread, as ``mode`` says:

        - ``"statement"``: each of ``fn``'s statements commits on its own (one statement, or
          independent ones): one round trip each;
        - ``"batch"``: ``fn``'s statements are sent in pipeline mode and run as the one implicit
          transaction before the pipeline's single Sync: one round trip, all or nothing. ``fn``
          must not read a result before the end (a read syncs, which would split it): it
          returns an ``AfterCommit`` that reads them once the round trip is done;
        - ``"transaction"``: an explicit transaction, for an ``fn`` that reads between statements.

        ``lease``: on the lease connection (shard leases and heartbeats), never behind the pool's queue.
        """
        if self._pool is None:
            raise StoreError(f"{self.name}: store is not open")
        # While the database is unreachable every call would hold a thread for the whole connect
        # timeout, and the webhooks behind them would wait as long for their 503: fail at once.
        if time.monotonic() < self._unreachable_until:
            raise StoreError(f"{self.name}: database unreachable (retried in {UNREACHABLE_PAUSE:g}s)")
        if lease:
            return await trio.to_thread.run_sync(self._in_connection, fn, mode, self._lease_pool,
                                                 limiter=self._lease_limiter)
        return await trio.to_thread.run_sync(self._in_connection, fn, mode, self._pool, limiter=self._limiter)

    def _in_connection(self, fn: Callable[[Any], T], mode: Mode, pool: Any) -> T:
        import psycopg

        try:
            # The limiter keeps threads to the pool's size, so a wait here is for a connection being
            # (re)made: past CONNECTION_WAIT the database is taken as unreachable (see _unreachable).
            with pool.connection(timeout=min(self._connect_timeout, CONNECTION_WAIT)) as conn:
                if mode == "statement":
                    return fn(conn)
                if mode == "batch":
                    with conn.pipeline():
                        result = fn(conn)
                else:
                    with conn.transaction():
                        result = fn(conn)
                return result.read() if isinstance(result, AfterCommit) else result
        except StoreError:
            raise
        except (psycopg.Error, OSError) as exc:
            if _unreachable(exc):
                self._unreachable_until = time.monotonic() + UNREACHABLE_PAUSE
            raise self._error(exc) from None
        except Exception as exc:   # the pool's own errors (PoolTimeout is a psycopg.Error subclass too)
            if exc.__class__.__module__.startswith("psycopg"):
                raise self._error(exc) from None
            raise

    def _configure(self, conn: Any) -> None:
        conn.execute(f"SET statement_timeout = {int(self._statement_timeout * 1000)}")

    async def open(self) -> None:
        """Connect, create or migrate the schema; StoreError with one line when unusable."""
        if self._pool is not None:
            return
        await trio.to_thread.run_sync(self._open_sync)

    def _open_sync(self) -> None:
        import psycopg

        from .postgres_pool import Pool   # psycopg_pool with a capped reconnect backoff

        try:
            with psycopg.connect(self._url, connect_timeout=max(1, int(self._connect_timeout)),
                                 autocommit=False) as conn:
                self._migrate(conn)
        except StoreError:
            raise
        except (psycopg.Error, OSError) as exc:
            raise self._error(exc) from None
        pools = [Pool(
            self._url, min_size=1, max_size=size, open=False, configure=self._configure,
            kwargs={"connect_timeout": max(1, int(self._connect_timeout)), "autocommit": True},
            timeout=self._connect_timeout,
            name=name) for name, size in (("agent-store", self._pool_size), ("agent-leases", 1))]
        try:
            for pool in pools:
                pool.open(wait=True, timeout=self._connect_timeout)
        except Exception as exc:
            for pool in pools:
                pool.close()
            raise self._error(exc) from None
        self._pool, self._lease_pool = pools

    def _migrate(self, conn: Any) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            has_version = conn.execute("SELECT to_regclass('agent_schema_version') IS NOT NULL").fetchone()[0]
            if not has_version:
                if conn.execute("SELECT to_regclass('agent_states') IS NOT NULL").fetchone()[0]:
                    raise StoreError(f"{self.name}: not an agent store (agent_states without agent_schema_version)")
                conn.execute("CREATE TABLE agent_schema_version (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO agent_schema_version VALUES (0)")
            (version,) = conn.execute("SELECT version FROM agent_schema_version").fetchone()
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.name}: schema version {version} is newer than this code supports "
                                 f"({SCHEMA_VERSION})")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute("UPDATE agent_schema_version SET version = %s", (target,))
            row = conn.execute("SELECT value FROM agent_config WHERE name = 'shards'").fetchone()
            if row is None:   # a new database: its shard count is fixed from now on
                conn.execute("INSERT INTO agent_config VALUES ('shards', %s)", (str(self.shards),))
                conn.execute("INSERT INTO agent_shards (shard) SELECT generate_series(0, %s - 1)", (self.shards,))
            elif int(row[0]) != self.shards:
                raise StoreError(f"{self.name}: SHARDS={self.shards} but this database was created with {row[0]}"
                                 " (the shard count is fixed for the life of a database)")
            if version < 3 <= SCHEMA_VERSION:   # rows written before version 3: their shards, once
                for table in SHARDED:
                    keys = [k for (k,) in conn.execute(f"SELECT DISTINCT key FROM {table} WHERE shard = -1")]
                    conn.execute(f"UPDATE {table} t SET shard = s.shard FROM unnest(%s::text[], %s::int[])"
                                 " AS s(key, shard) WHERE t.key = s.key",
                                 (keys, [shard_of(k, self.shards) for k in keys]))

    async def close(self) -> None:
        """Close the pool; operations already running finish first (no cancellation interrupts it)."""
        pool, self._pool = self._pool, None
        lease_pool, self._lease_pool = self._lease_pool, None
        with trio.CancelScope(shield=True):
            if pool is not None:
                await trio.to_thread.run_sync(pool.close)
            if lease_pool is not None:
                await trio.to_thread.run_sync(lease_pool.close)

    def _housekeeping(self, conn: Any, now: float) -> None:
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
            conn.execute("DELETE FROM agent_seen WHERE at < %s", (now - self.dedupe_ttl,))

    # -- the contract ------------------------------------------------------------------------

    async def accept(self, key: str, dedupe_id: str, payload: dict[str, Any]) -> int | None:
        """Record an inbound message durably; its inbox sequence number, or None for a duplicate."""
        data, at, shard = dumps(payload), self._clock(), shard_of(key, self.shards)
        # With a node id, the same statement wakes the shard's owner when it is another node (NOTIFY
        # is sent at commit, so the owner's read sees the row), carrying the row (``wake_of``) when
        # it fits in a notification, else the shard alone; nobody is woken for a duplicate.
        wake = (", (SELECT count(*) FROM (SELECT pg_notify(%(channel)s || substr(md5(owner), 1, 16),"
                " CASE WHEN octet_length(w.note) < %(limit)s THEN w.note ELSE %(shard)s::text END)"
                " FROM agent_shards, (SELECT %(head)s::text || seq || %(tail)s::text AS note) AS w"
                " WHERE shard = %(shard)s AND owner IS NOT NULL AND owner <> %(node)s) AS n)"
                ) if self.node is not None else ""
        args = {"dedupe": dedupe_id, "at": at, "key": key, "data": data, "shard": shard, "node": self.node,
                "channel": WAKE_CHANNEL, "limit": NOTIFY_LIMIT, "head": f"[{shard},",
                "tail": f",{dumps(key)},{data}]"}

        def op(conn: Any) -> int | None:
            self._housekeeping(conn, at)
            row = conn.execute(
                "WITH fresh AS (INSERT INTO agent_seen (dedupe_id, at) VALUES (%(dedupe)s, %(at)s)"
                " ON CONFLICT DO NOTHING RETURNING 1),"
                " next AS (INSERT INTO agent_seqs (key, last) SELECT %(key)s, 1 FROM fresh"
                " ON CONFLICT (key) DO UPDATE SET last = agent_seqs.last + 1 RETURNING last),"
                " row AS (INSERT INTO agent_inbox (key, seq, payload, shard)"
                " SELECT %(key)s, last, %(data)s, %(shard)s FROM next RETURNING seq)"
                f" SELECT seq{wake} FROM row", args).fetchone()
            return int(row[0]) if row is not None else None

        return await self._run(op, mode="statement")

    async def load(self, key: str) -> bytes | None:
        """The key's state as last committed, or None."""

        def op(conn: Any) -> bytes | None:
            row = conn.execute("SELECT data FROM agent_states WHERE key = %s", (key,)).fetchone()
            return bytes(row[0]) if row is not None else None

        return await self._run(op, mode="statement")

    async def commit(
        self,
        key: str,
        state: bytes,
        meta: StateMeta,
        *,
        acked: Sequence[int] = (),
        outbox: Sequence[tuple[str, dict[str, Any]]] = (),
        fence: tuple[str, Lease] | None = None,
    ) -> list[int]:
        """Atomically replace the state and meta, ack the inbox rows ``acked`` and add ``outbox``
        rows (one round trip: pipeline mode); the new outbox ids. With ``fence`` (owner, lease),
        only while that owner still holds the key's shard under that epoch, else ``Fenced`` and
        nothing is written. The meta row is written first, as ``expire`` deletes it first: both
        lock a key's rows in the same order (no deadlock)."""
        shard = shard_of(key, self.shards)
        meta_row = (key, meta.last_activity, meta.size, meta.title, meta.preview, meta.status, meta.status_until,
                    meta.status_after, meta.scope, _search_text(key, meta.title), shard)
        acks = [int(seq) for seq in acked]
        jobs = [(kind, dumps(payload)) for kind, payload in outbox]

        def op(conn: Any) -> AfterCommit:
            if fence is not None:
                conn.execute("SELECT agent_fence(%s, %s, %s)", (fence[0], fence[1].shard, fence[1].epoch))
            conn.execute(f"INSERT INTO agent_meta (key, {_META_COLUMNS}, search, shard)"
                         " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (key) DO UPDATE SET"
                         " last_activity = excluded.last_activity, size = excluded.size, title = excluded.title,"
                         " preview = excluded.preview, status = excluded.status,"
                         " status_until = excluded.status_until, status_after = excluded.status_after,"
                         " scope = excluded.scope, search = excluded.search", meta_row)
            conn.execute("INSERT INTO agent_states (key, data) VALUES (%s, %s)"
                         " ON CONFLICT (key) DO UPDATE SET data = excluded.data", (key, state))
            if acks:
                conn.execute("DELETE FROM agent_inbox WHERE key = %s AND seq = ANY(%s)", (key, acks))
            cursors = [conn.execute("INSERT INTO agent_outbox (key, kind, payload, shard) VALUES (%s, %s, %s, %s)"
                                    " RETURNING id", (key, kind, payload, shard)) for kind, payload in jobs]
            return AfterCommit(lambda: [int(cur.fetchone()[0]) for cur in cursors])

        return await self._run(op, mode="batch")

    async def settle(self, outbox_id: int) -> None:
        """Delete a performed (or given up) outbox row."""
        await self._run(lambda conn: conn.execute("DELETE FROM agent_outbox WHERE id = %s", (outbox_id,)),
                        mode="statement")

    async def bury(self, outbox_id: int, reason: str) -> None:
        """Move a job that was given up to the dead letters (the newest 1,000 are kept)."""
        now = self._clock()

        def op(conn: Any) -> None:
            conn.execute("INSERT INTO agent_dead_letters (id, key, kind, payload, reason, at)"
                         " SELECT id, key, kind, payload, %s, %s FROM agent_outbox WHERE id = %s"
                         " ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, at = excluded.at",
                         (reason[:500], now, outbox_id))
            conn.execute("DELETE FROM agent_outbox WHERE id = %s", (outbox_id,))
            conn.execute("DELETE FROM agent_dead_letters WHERE id NOT IN"
                         " (SELECT id FROM agent_dead_letters ORDER BY at DESC, id DESC LIMIT %s)",
                         (DEAD_LETTERS_KEPT,))

        await self._run(op, mode="batch")

    async def dead_letters(self, limit: int = 100) -> list[DeadLetterRow]:
        """The newest dead letters, newest first."""

        def op(conn: Any) -> list[DeadLetterRow]:
            rows = conn.execute("SELECT id, key, kind, payload, reason, at FROM agent_dead_letters"
                                " ORDER BY at DESC, id DESC LIMIT %s", (limit,)).fetchall()
            return [DeadLetterRow(int(i), k, kind, json.loads(p), r, at) for i, k, kind, p, r, at in rows]

        return await self._run(op, mode="statement")

    async def revive(self, dead_letter_id: int) -> OutboxRow | None:
        """Move a dead letter back to the outbox under its old id; None when there is none."""

        def op(conn: Any) -> OutboxRow | None:
            found = conn.execute("DELETE FROM agent_dead_letters WHERE id = %s RETURNING id, key, kind, payload",
                                 (dead_letter_id,)).fetchone()
            if found is None:
                return None
            conn.execute("INSERT INTO agent_outbox (id, key, kind, payload, shard) VALUES (%s, %s, %s, %s, %s)",
                         (*found, shard_of(found[1], self.shards)))
            return OutboxRow(int(found[0]), found[1], found[2], json.loads(found[3]))

        return await self._run(op)

    async def discard(self, dead_letter_id: int) -> bool:
        """Delete a dead letter; False when there is none."""
        return await self._run(lambda conn: bool(conn.execute(
            "DELETE FROM agent_dead_letters WHERE id = %s", (dead_letter_id,)).rowcount), mode="statement")

    async def pending_inbox(self) -> list[InboxRow]:
        """Accepted but unacknowledged messages, per key in sequence order."""

        def op(conn: Any) -> list[InboxRow]:
            rows = conn.execute("SELECT key, seq, payload FROM agent_inbox ORDER BY key, seq").fetchall()
            return [InboxRow(key, int(seq), json.loads(payload)) for key, seq, payload in rows]

        return await self._run(op, mode="statement")

    async def pending_outbox(self) -> list[OutboxRow]:
        """Unsettled jobs in the order they were written."""

        def op(conn: Any) -> list[OutboxRow]:
            rows = conn.execute("SELECT id, key, kind, payload FROM agent_outbox ORDER BY id").fetchall()
            return [OutboxRow(int(id), key, kind, json.loads(payload)) for id, key, kind, payload in rows]

        return await self._run(op, mode="statement")

    async def pending_inbox_in(self, shards: Collection[int]) -> list[InboxRow]:
        """``pending_inbox`` of the keys in ``shards`` only."""

        def op(conn: Any) -> list[InboxRow]:
            rows = conn.execute("SELECT key, seq, payload FROM agent_inbox WHERE shard = ANY(%s)"
                                " ORDER BY key, seq", (list(shards),)).fetchall()
            return [InboxRow(key, int(seq), json.loads(payload)) for key, seq, payload in rows]

        return await self._run(op, mode="statement")

    async def pending_outbox_in(self, shards: Collection[int]) -> list[OutboxRow]:
        """``pending_outbox`` of the keys in ``shards`` only."""

        def op(conn: Any) -> list[OutboxRow]:
            rows = conn.execute("SELECT id, key, kind, payload FROM agent_outbox WHERE shard = ANY(%s)"
                                " ORDER BY id", (list(shards),)).fetchall()
            return [OutboxRow(int(id), key, kind, json.loads(payload)) for id, key, kind, payload in rows]

        return await self._run(op, mode="statement")

    async def inbox_heads(self, shards: Collection[int]) -> dict[str, int]:
        """The highest pending sequence number of every key in ``shards`` that has pending rows
        (cheap: the index only, no payloads), to tell which keys have rows not yet handed over."""
        return await self._run(lambda conn: {key: int(seq) for key, seq in conn.execute(
            "SELECT key, max(seq) FROM agent_inbox WHERE shard = ANY(%s) GROUP BY key",
            (list(shards),)).fetchall()}, mode="statement")

    async def inbox_after(self, after: dict[str, int]) -> list[InboxRow]:
        """The pending rows of each key in ``after`` whose sequence number is above its value, per
        key in sequence order. Seqs are assigned in commit order per key, so this sees every
        pending row committed before it ran."""
        if not after:
            return []

        def op(conn: Any) -> list[InboxRow]:
            rows = conn.execute(
                "SELECT i.key, i.seq, i.payload FROM agent_inbox i JOIN unnest(%s::text[], %s::bigint[])"
                " AS a(key, after) ON i.key = a.key AND i.seq > a.after ORDER BY i.key, i.seq",
                (list(after), list(after.values()))).fetchall()
            return [InboxRow(key, int(seq), json.loads(payload)) for key, seq, payload in rows]

        return await self._run(op, mode="statement")

    async def expire(self, idle_before: float, keep: Collection[str] = (),
                     shards: Collection[int] | None = None) -> list[str]:
        """Delete the state of every key idle since before ``idle_before``, except ``keep`` (and,
        when ``shards`` is given, of those shards' keys only: a node expires what it owns), in
        transactions of at most ``EXPIRE_BATCH`` keys; the condition is re-checked by the DELETE."""
        kept = list(set(keep))
        only = "" if shards is None else " AND shard = ANY(%s)"
        only_args: tuple[Any, ...] = () if shards is None else (list(shards),)
        gone: list[str] = []
        cursor: tuple[float, str] = (float("-inf"), "")

        def op(conn: Any) -> tuple[list[str], tuple[float, str] | None]:
            rows = conn.execute(
                "SELECT key, last_activity FROM agent_meta WHERE last_activity < %s"
                f" AND (last_activity, key) > (%s, %s){only} ORDER BY last_activity, key LIMIT %s",
                (idle_before, cursor[0], cursor[1], *only_args, EXPIRE_BATCH)).fetchall()
            candidates = [key for key, _ in rows]
            deleted = [key for (key,) in conn.execute(
                "DELETE FROM agent_meta WHERE key = ANY(%s) AND NOT key = ANY(%s) AND last_activity < %s"
                " RETURNING key", (candidates, kept, idle_before)).fetchall()]
            conn.execute("DELETE FROM agent_states WHERE key = ANY(%s)", (deleted,))
            conn.execute("DELETE FROM agent_seqs WHERE key = ANY(%s) AND NOT EXISTS"
                         " (SELECT 1 FROM agent_inbox i WHERE i.key = agent_seqs.key)", (candidates,))
            last = (float(rows[-1][1]), str(rows[-1][0])) if len(rows) == EXPIRE_BATCH else None
            gone_now = set(deleted)
            return [key for key in candidates if key in gone_now], last

        while True:
            deleted, last = await self._run(op)
            gone.extend(deleted)
            if last is None:
                return gone
            cursor = last

    async def sizes(self) -> dict[str, int]:
        """Every stored key's size, in key order."""
        return await self._run(lambda conn: {key: int(size) for key, size in conn.execute(
            "SELECT key, size FROM agent_meta ORDER BY key").fetchall()}, mode="statement")

    async def listing(
        self,
        *,
        now: float,
        search: str = "",
        status: str | None = None,
        scope: str | None = None,
        keys: Collection[str] | None = None,
        after: Cursor | None = None,
        limit: int = 50,
    ) -> MetaPage:
        """A page of meta rows, newest activity first, walked from the cursor on the
        (last_activity, key) index."""
        where, args = [], {"now": now, "limit": limit}
        if search:
            where.append("strpos(search, %(search)s) > 0")
            args["search"] = search.lower()
        if status is not None:
            where.append(f"{_STATUS_AT} = %(status)s")
            args["status"] = status
        if scope is not None:
            where.append("scope = %(scope)s")
            args["scope"] = scope
        if keys is not None:
            where.append("key = ANY(%(keys)s)")
            args["keys"] = list(keys)
        condition = " AND ".join(where) or "TRUE"
        page = condition
        if after is not None:
            page += " AND (last_activity, key) < (%(after_at)s, %(after_key)s)"
            args["after_at"], args["after_key"] = after

        def op(conn: Any) -> MetaPage:
            rows = conn.execute(f"SELECT key, {_META_COLUMNS} FROM agent_meta WHERE {page}"
                                " ORDER BY last_activity DESC, key DESC LIMIT %(limit)s", args).fetchall()
            found = [MetaRow(key, StateMeta(*fields)) for key, *fields in rows]
            if after is None and len(found) < limit:
                total = len(found)
            else:
                (total,) = conn.execute(f"SELECT count(*) FROM agent_meta WHERE {condition}", args).fetchone()
            scopes = [s for (s,) in conn.execute(
                "SELECT DISTINCT scope FROM agent_meta WHERE scope != '' ORDER BY scope").fetchall()]
            return MetaPage(found, int(total), scopes)

        return await self._run(op, mode="statement")   # reads only: no transaction needed

    # -- wake-ups ----------------------------------------------------------------------------

    async def listen(self, node: str, on_wake: Callable[[int, InboxRow | None], None], *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Call ``on_wake(shard, row)`` for every wake-up ``accept`` sends ``node`` (``row``: the
        accepted row it carries, or None) until cancelled.

        A dedicated connection (not the pool's) LISTENs. The task waits in trio for its socket to
        become readable and then takes what arrived without blocking (libpq's consume_input and
        notifies): no thread per wake-up, and cancellation at once. A lost connection is reopened
        after a second; wake-ups sent meanwhile are lost, which is fine: they only hurry the
        owner's poll."""
        import psycopg

        started = False
        while True:
            conn: Any = None
            try:
                conn = await trio.to_thread.run_sync(self._listening, node)
                if not started:
                    started = True
                    task_status.started()
                while True:
                    await trio.lowlevel.wait_readable(conn.pgconn.socket)
                    for shard, row in self._received(conn):
                        on_wake(shard, row)
            except (psycopg.Error, OSError) as exc:
                log.warning("Store: wake-up listener lost (%s); polling only, retrying in 1s",
                            self._error(exc))
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(1.0)
            finally:
                if conn is not None:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(conn.close)

    def _listening(self, node: str) -> Any:
        import psycopg

        conn = psycopg.connect(self._url, connect_timeout=max(1, int(self._connect_timeout)), autocommit=True)
        for prefix in (WAKE_CHANNEL, LEGACY_CHANNEL):   # hex names of our own: nothing to escape
            conn.execute(f'LISTEN "{node_channel(node, prefix)}"')
        return conn

    @staticmethod
    def _received(conn: Any) -> list[tuple[int, InboxRow | None]]:
        """The wake-ups that arrived on ``conn`` (reads what the socket holds; never blocks)."""
        pgconn, encoding = conn.pgconn, conn.info.encoding
        pgconn.consume_input()
        found = []
        while (note := pgconn.notifies()) is not None:
            text = note.extra.decode(encoding)
            try:
                found.append(wake_of(text))
            except (ValueError, TypeError) as exc:   # not one of ours: skipped (the poll reads all)
                log.warning("Store: ignored a malformed wake-up (%d bytes): %s", len(text), type(exc).__name__)
        return found
