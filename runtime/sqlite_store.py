"""The Store contract on SQLite (stdlib ``sqlite3``), durable across process restarts.

Durability
    The database runs in WAL mode with ``synchronous=FULL`` by default: every committed
    transaction is fsync'ed to the WAL before ``commit`` returns, so a result handed back by
    ``accept``/``commit``/``settle`` survives a process crash (SIGKILL, OOM kill) *and* an OS
    crash or power loss. ``synchronous="NORMAL"`` skips that fsync (the WAL is synced only at
    checkpoints): still durable across a process crash, but the last transactions may roll back
    after a power loss. The product promise ("a 2xx means not lost even if the process dies") is
    kept by both; FULL is the default so it also holds when the machine dies.

Group commit
    All SQLite work runs on ONE connection, one transaction at a time. Callers put a request in a
    FIFO queue and wait on their own event. The first caller that finds no transaction in
    progress becomes the *leader*: it takes everything queued (up to ``batch_max``), runs their
    statements as one transaction on the trio thread (microseconds each, and no GIL hand-over per
    statement), then COMMITs it (the one fsync) in a worker thread (``trio.to_thread.run_sync``
    with a private limiter of 1) while the event loop goes on, hands each request its own
    result, and, if more requests arrived meanwhile, wakes the oldest one to lead the next
    transaction. No background task is needed, so ``open()``/``close()`` are enough. If one operation fails, the transaction is
    rolled back and rerun with a SAVEPOINT around each operation, so the failing one gets its error
    and the others still commit.

    Cancellation: a request cancelled while still queued is withdrawn (it never happens); once
    its transaction has started it completes, and the caller gets its result (the cancellation is
    delivered at the caller's next checkpoint). A leader shields the transaction it runs, so a
    cancelled leader never strands the others.

Opening
    ``open()`` takes an exclusive lock on the file (``locking_mode=EXCLUSIVE``, held until
    ``close()``; no other connection, not even the ``sqlite3`` shell, may hold the file open
    meanwhile), runs ``PRAGMA quick_check`` and migrates the schema (``schema_version`` table).
    A file that is not a database or is malformed, a file locked by another running process, a
    SQLite file that is not an agent store, or a newer schema version raises ``StoreError`` with
    one line naming the file. Nothing is ever reset silently.

Dedupe ids are kept for at least ``dedupe_ttl`` seconds; older ones are pruned at open and then
at most once a minute, inside a regular transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Collection, Literal, Sequence

import trio

from .store import (EXPIRE_BATCH, Cursor, DeadLetterRow, InboxRow, OutboxRow, StoreError, Summary,
                    SummaryPage, SummaryRow)

SCHEMA_VERSION = 4
DEAD_LETTERS_KEPT = 1000

# MIGRATIONS[n] brings a database from version n-1 to version n.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE states (key TEXT PRIMARY KEY, data TEXT NOT NULL, last_activity REAL NOT NULL)",
        "CREATE INDEX states_last_activity ON states (last_activity)",
        "CREATE TABLE seqs (key TEXT PRIMARY KEY, last INTEGER NOT NULL)",
        "CREATE TABLE inbox (key TEXT NOT NULL, seq INTEGER NOT NULL, payload TEXT NOT NULL,"
        " PRIMARY KEY (key, seq))",
        "CREATE TABLE seen (dedupe_id TEXT PRIMARY KEY, at REAL NOT NULL)",
        "CREATE INDEX seen_at ON seen (at)",
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL,"
        " kind TEXT NOT NULL, payload TEXT NOT NULL)",
        "CREATE INDEX outbox_key ON outbox (key)",
    ),
    2: (
        "CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, key TEXT NOT NULL, kind TEXT NOT NULL,"
        " payload TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL)",
    ),
    3: (  # the window's length beside the state, so the admin listing needs no JSON parsing; the
          # covering index keeps it from reading each row's (overflowing) state text to reach it
        "ALTER TABLE states ADD COLUMN window_size INTEGER NOT NULL DEFAULT 0",
        "UPDATE states SET window_size = coalesce(json_array_length(data, '$.window'), 0)",
        "CREATE INDEX states_window_size ON states (key, window_size)",
    ),
    4: (  # each key's small summary (Store.summaries) in its own narrow table, so a listing page or a
          # search never reads the states' text; stored keys start with an empty summary
        "CREATE TABLE summaries (key TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '',"
        " preview TEXT NOT NULL DEFAULT '', status TEXT NOT NULL DEFAULT '', status_until REAL NOT NULL DEFAULT 0,"
        " status_after TEXT NOT NULL DEFAULT '', scope TEXT NOT NULL DEFAULT '', last_activity REAL NOT NULL,"
        " window_size INTEGER NOT NULL DEFAULT 0, search TEXT NOT NULL DEFAULT '')",
        "INSERT INTO summaries (key, last_activity, window_size, search) SELECT key, last_activity, window_size,"
        " lower(key) FROM states",
        "CREATE INDEX summaries_activity ON summaries (last_activity, key)",
        "CREATE INDEX summaries_scope ON summaries (scope)",
    ),
}
# The status in force at :now (see Summary.status_at).
_STATUS_AT = "(CASE WHEN status_until = 0 OR status_until > :now THEN status ELSE status_after END)"

PRUNE_INTERVAL = 60.0
BUSY_TIMEOUT = 0.2

Synchronous = Literal["FULL", "NORMAL"]
Op = Callable[[sqlite3.Connection], Any]


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _window_size(state: dict[str, Any]) -> int:
    window = state.get("window")
    return len(window) if isinstance(window, list) else 0


def _search_text(key: str, title: str) -> str:
    """What Store.summaries' search looks in, lowered by Python at write time (SQLite's lower()
    folds ASCII only, and a SQL function written in Python would cost ~50 ms per 10,000 rows)."""
    return f"{key}\n{title}".lower()


def _last_activity(state: dict[str, Any]) -> float:
    value = state.get("last_activity", 0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


class _Request:
    """One queued operation, its result slot, and the event its caller waits on."""

    __slots__ = ("op", "taken", "done", "value", "error", "wake")

    def __init__(self, op: Op) -> None:
        self.op = op
        self.taken = False
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.wake = trio.Event()

    def finish(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error, self.done = value, error, True
        self.wake.set()


class _OpFailed(Exception):
    """An operation failed on the fast path; the batch is rerun with a savepoint per operation."""


class _BatchAborted(Exception):
    """SQLite rolled the whole transaction back (I/O error, disk full): every request fails."""


class SqliteStore:
    """The Store contract in a SQLite file, with group commit (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        dedupe_ttl: float = 86400.0,
        batch_max: int = 256,
        synchronous: Synchronous = "FULL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be 'FULL' or 'NORMAL'")
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        self.path = Path(path)
        self.dedupe_ttl = dedupe_ttl
        self.batch_max = batch_max
        self.synchronous: Synchronous = synchronous
        self.transactions = 0
        """Transactions run so far (one per group commit)."""
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._closing = False
        self._queue: deque[_Request] = deque()
        self._busy = False
        self._limiter = trio.CapacityLimiter(1)
        self._next_prune = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or migrate the database and take its exclusive lock; StoreError if unusable."""
        if self._conn is not None:
            return
        with trio.CancelScope(shield=True):
            self._conn = await trio.to_thread.run_sync(self._open_sync, limiter=self._limiter)
        self._closing = False
        self._next_prune = self._clock() + PRUNE_INTERVAL

    async def close(self) -> None:
        """Finish every queued and in-flight request, then close the connection (idempotent)."""
        if self._conn is None or self._closing:
            return
        self._closing = True  # new requests fail from now on
        with trio.CancelScope(shield=True):
            await self._submit(lambda conn: None)  # a barrier: FIFO, so everything before it is done
            conn, self._conn = self._conn, None
            await trio.to_thread.run_sync(conn.close, limiter=self._limiter)

    # -- the contract ------------------------------------------------------------------------

    async def accept(self, key: str, dedupe_id: str, payload: dict[str, Any]) -> int | None:
        """Record an inbound message durably; its inbox sequence number, or None for a duplicate."""
        data, at = _dumps(payload), self._clock()

        def op(conn: sqlite3.Connection) -> int | None:
            cur = conn.execute("INSERT OR IGNORE INTO seen (dedupe_id, at) VALUES (?, ?)", (dedupe_id, at))
            if cur.rowcount == 0:
                return None
            (seq,) = conn.execute(
                "INSERT INTO seqs (key, last) VALUES (?, 1)"
                " ON CONFLICT (key) DO UPDATE SET last = last + 1 RETURNING last", (key,)).fetchone()
            conn.execute("INSERT INTO inbox (key, seq, payload) VALUES (?, ?, ?)", (key, seq, data))
            return int(seq)

        return await self._call(op)  # type: ignore[no-any-return]

    async def load(self, key: str) -> dict[str, Any] | None:
        """The actor's saved state, or None."""

        def op(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute("SELECT data FROM states WHERE key = ?", (key,)).fetchone()
            return json.loads(row[0]) if row is not None else None

        return await self._call(op)  # type: ignore[no-any-return]

    async def commit(
        self,
        key: str,
        state: dict[str, Any],
        *,
        acked: Sequence[int] = (),
        outbox: Sequence[tuple[str, dict[str, Any]]] = (),
        summary: Summary | None = None,
    ) -> list[int]:
        """Atomically save ``state``, ack the inbox rows ``acked``, add ``outbox`` rows and replace the
        summary (None keeps it); the new outbox ids."""
        data, last, size = _dumps(state), _last_activity(state), _window_size(state)
        acks = [(key, int(seq)) for seq in acked]
        jobs = [(key, kind, _dumps(payload)) for kind, payload in outbox]

        def op(conn: sqlite3.Connection) -> list[int]:
            conn.execute(
                "INSERT INTO states (key, data, last_activity, window_size) VALUES (?, ?, ?, ?) ON CONFLICT (key)"
                " DO UPDATE SET data = excluded.data, last_activity = excluded.last_activity,"
                " window_size = excluded.window_size",
                (key, data, last, size))
            if summary is None:
                conn.execute("INSERT INTO summaries (key, last_activity, window_size, search) VALUES (?, ?, ?, ?)"
                             " ON CONFLICT (key) DO UPDATE SET last_activity = excluded.last_activity,"
                             " window_size = excluded.window_size", (key, last, size, _search_text(key, "")))
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO summaries (key, title, preview, status, status_until, status_after,"
                    " scope, last_activity, window_size, search) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, summary.title, summary.preview, summary.status, summary.status_until,
                     summary.status_after, summary.scope, last, size, _search_text(key, summary.title)))
            conn.executemany("DELETE FROM inbox WHERE key = ? AND seq = ?", acks)
            ids: list[int] = []
            for job in jobs:
                cur = conn.execute("INSERT INTO outbox (key, kind, payload) VALUES (?, ?, ?)", job)
                assert cur.lastrowid is not None
                ids.append(cur.lastrowid)
            return ids

        return await self._call(op)  # type: ignore[no-any-return]

    async def settle(self, outbox_id: int) -> None:
        """Delete a performed (or given up) outbox row."""
        await self._call(lambda conn: conn.execute("DELETE FROM outbox WHERE id = ?", (outbox_id,)))

    async def bury(self, outbox_id: int, reason: str) -> None:
        """Move a job that was given up from the outbox to the dead letters (the newest 1,000 are kept)."""
        now = self._clock()

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO dead_letters (id, key, kind, payload, reason, at)"
                         " SELECT id, key, kind, payload, ?, ? FROM outbox WHERE id = ?", (reason[:500], now, outbox_id))
            conn.execute("DELETE FROM outbox WHERE id = ?", (outbox_id,))
            conn.execute("DELETE FROM dead_letters WHERE id NOT IN"
                         " (SELECT id FROM dead_letters ORDER BY at DESC, id DESC LIMIT ?)", (DEAD_LETTERS_KEPT,))

        await self._call(op)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetterRow]:
        """The newest dead letters, newest first."""

        def op(conn: sqlite3.Connection) -> list[DeadLetterRow]:
            rows = conn.execute("SELECT id, key, kind, payload, reason, at FROM dead_letters"
                                " ORDER BY at DESC, id DESC LIMIT ?", (limit,))
            return [DeadLetterRow(i, k, kind, json.loads(p), r, at) for i, k, kind, p, r, at in rows]

        return await self._call(op)  # type: ignore[no-any-return]

    async def revive(self, dead_letter_id: int) -> OutboxRow | None:
        """Move a dead letter back to the outbox under its old id; None when there is none."""

        def op(conn: sqlite3.Connection) -> OutboxRow | None:
            found = conn.execute("SELECT id, key, kind, payload FROM dead_letters WHERE id = ?",
                                 (dead_letter_id,)).fetchone()
            if found is None:
                return None
            conn.execute("INSERT INTO outbox (id, key, kind, payload) VALUES (?, ?, ?, ?)", found)
            conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,))
            return OutboxRow(found[0], found[1], found[2], json.loads(found[3]))

        return await self._call(op)  # type: ignore[no-any-return]

    async def discard(self, dead_letter_id: int) -> bool:
        """Delete a dead letter; False when there is none."""
        return bool(await self._call(
            lambda conn: conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,)).rowcount))

    async def pending_inbox(self) -> list[InboxRow]:
        """Accepted but unacknowledged messages, per key in sequence order."""

        def op(conn: sqlite3.Connection) -> list[InboxRow]:
            rows = conn.execute("SELECT key, seq, payload FROM inbox ORDER BY key, seq")
            return [InboxRow(key, seq, json.loads(payload)) for key, seq, payload in rows]

        return await self._call(op)  # type: ignore[no-any-return]

    async def pending_outbox(self) -> list[OutboxRow]:
        """Unsettled jobs in the order they were written."""

        def op(conn: sqlite3.Connection) -> list[OutboxRow]:
            rows = conn.execute("SELECT id, key, kind, payload FROM outbox ORDER BY id")
            return [OutboxRow(id, key, kind, json.loads(payload)) for id, key, kind, payload in rows]

        return await self._call(op)  # type: ignore[no-any-return]

    async def expire(self, idle_before: float, keep: Collection[str] = ()) -> list[str]:
        """Delete the state of every key idle since before ``idle_before``, except ``keep``, in
        transactions of at most ``EXPIRE_BATCH`` keys (see the Store contract)."""
        kept = set(keep)
        gone: list[str] = []
        cursor: tuple[float, str] = (float("-inf"), "")

        def op(conn: sqlite3.Connection) -> tuple[list[str], tuple[float, str] | None]:
            rows = conn.execute(
                "SELECT key, last_activity FROM states WHERE last_activity < ?"
                " AND (last_activity > ? OR (last_activity = ? AND key > ?))"
                " ORDER BY last_activity, key LIMIT ?",
                (idle_before, cursor[0], cursor[0], cursor[1], EXPIRE_BATCH)).fetchall()
            deleted = []
            for key, _ in rows:
                if key in kept:
                    continue
                if conn.execute("DELETE FROM states WHERE key = ? AND last_activity < ?",
                                (key, idle_before)).rowcount:
                    conn.execute("DELETE FROM summaries WHERE key = ?", (key,))
                    deleted.append(key)
                conn.execute("DELETE FROM seqs WHERE key = ? AND NOT EXISTS"
                             " (SELECT 1 FROM inbox WHERE inbox.key = seqs.key)", (key,))
            last = (float(rows[-1][1]), str(rows[-1][0])) if len(rows) == EXPIRE_BATCH else None
            return deleted, last

        while True:
            deleted, last = await self._call(op)
            gone.extend(deleted)
            if last is None:
                return gone
            cursor = last

    async def window_sizes(self) -> dict[str, int]:
        """Every saved conversation's window length, by key (admin listing)."""

        def op(conn: sqlite3.Connection) -> dict[str, int]:
            return dict(conn.execute("SELECT key, window_size FROM states ORDER BY key").fetchall())

        return await self._call(op)  # type: ignore[no-any-return]

    async def summaries(
        self,
        *,
        now: float,
        search: str = "",
        status: str | None = None,
        scope: str | None = None,
        keys: Collection[str] | None = None,
        after: Cursor | None = None,
        limit: int = 50,
    ) -> SummaryPage:
        """A page of summaries, newest activity first: the (last_activity, key) index is walked
        backwards from the cursor, so a page costs the same at any depth."""
        where, args = [], {"now": now, "limit": limit}
        if search:
            where.append("instr(search, :search) > 0")
            args["search"] = search.lower()
        if status is not None:
            where.append(f"{_STATUS_AT} = :status")
            args["status"] = status
        if scope is not None:
            where.append("scope = :scope")
            args["scope"] = scope
        if keys is not None:
            where.append("key IN (SELECT value FROM json_each(:keys))")
            args["keys"] = _dumps(list(keys))
        condition = " AND ".join(where) or "1"
        # A search matches few rows: one pass over the table and a sort of the matches (4 ms at
        # 10,000 rows) beats walking the index and fetching every row by rowid (9 ms).
        hint = "NOT INDEXED" if search else ""
        page = condition
        if after is not None:
            page += " AND (last_activity, key) < (:after_at, :after_key)"
            args["after_at"], args["after_key"] = after

        def op(conn: sqlite3.Connection) -> SummaryPage:
            rows = conn.execute(
                "SELECT key, title, preview, status, status_until, status_after, scope, last_activity, window_size"
                f" FROM summaries {hint} WHERE {page} ORDER BY last_activity DESC, key DESC LIMIT :limit", args)
            found = [SummaryRow(key, Summary(*fields), last, size) for key, *fields, last, size in rows]
            if after is None and len(found) < limit:   # a short first page is every match: no second scan
                total = len(found)
            else:
                (total,) = conn.execute(f"SELECT count(*) FROM summaries WHERE {condition}", args).fetchone()
            scopes = [s for (s,) in conn.execute("SELECT DISTINCT scope FROM summaries WHERE scope != '' ORDER BY scope")]
            return SummaryPage(found, total, scopes)

        return await self._call(op)  # type: ignore[no-any-return]

    # -- group commit ------------------------------------------------------------------------

    async def _call(self, op: Op) -> Any:
        """Run ``op`` in the next group commit and return its result (StoreError when not open)."""
        if self._conn is None or self._closing:
            raise StoreError(f"{self.path}: store is not open")
        return await self._submit(op)

    async def _submit(self, op: Op) -> Any:
        """Queue ``op``, lead or wait for the transaction that runs it, and return its result."""
        request = _Request(op)
        self._queue.append(request)
        while not request.done:
            if not self._busy:
                await self._lead()
                continue
            try:
                await request.wake.wait()
            except trio.Cancelled:
                if not request.taken:  # still queued: withdraw it, pass the lead on if it was ours
                    self._queue.remove(request)
                    self._kick()
                    raise
                with trio.CancelScope(shield=True):  # its transaction runs: wait for its result
                    while not request.done:
                        await request.wake.wait()
                        request.wake = trio.Event()
                break
            if not request.done:
                request.wake = trio.Event()
        if request.error is not None:
            raise request.error
        return request.value

    def _kick(self) -> None:
        """Wake the oldest queued request to lead the next transaction, if nobody leads."""
        if not self._busy and self._queue:
            self._queue[0].wake.set()

    async def _lead(self) -> None:
        """Run the queued requests (up to ``batch_max``) as one transaction and hand out results."""
        count = min(len(self._queue), self.batch_max)
        batch = [self._queue.popleft() for _ in range(count)]
        for request in batch:
            request.taken = True
        self._busy = True
        now = self._clock()
        prune = now >= self._next_prune
        if prune:
            self._next_prune = now + PRUNE_INTERVAL
        failure: BaseException | None = None
        try:
            # The statements run here, on the trio thread (tens of microseconds each): run in the
            # worker they would each wait for the GIL, up to the 5 ms switch interval when this
            # thread is busy. Only COMMIT, the fsync, runs in the worker thread.
            results = self._run_batch([r.op for r in batch], now if prune else None)
            if self._conn is not None and self._conn.in_transaction:
                with trio.CancelScope(shield=True):
                    error = await trio.to_thread.run_sync(self._commit_sync, limiter=self._limiter)
                if error is not None:
                    results = [(None, error) for _ in batch]
        except BaseException as exc:  # the batch itself failed: the whole batch fails
            failure = exc
            reason = self._describe(exc) if isinstance(exc, Exception) else f"{self.path}: interrupted"
            results = [(None, StoreError(reason)) for _ in batch]
        self._busy = False
        for request, (value, error) in zip(batch, results):
            request.finish(value, error)
        self._kick()
        if failure is not None and not isinstance(failure, Exception):
            raise failure  # KeyboardInterrupt and friends are never swallowed

    def _commit_sync(self) -> StoreError | None:
        """Worker thread: COMMIT the open transaction (the fsync); on failure roll back, the error."""
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.rollback()
            return StoreError(self._describe(exc))
        self.transactions += 1
        return None

    def _run_batch(self, ops: list[Op], prune_now: float | None) -> list[tuple[Any, BaseException | None]]:
        """Run ``ops`` in one transaction, left open for ``_commit_sync``; each op gets its own
        result or error (a failure of the whole batch rolls it back and fails every op)."""
        conn = self._conn
        assert conn is not None
        try:
            try:
                return self._transaction(conn, ops, prune_now, careful=False)
            except _OpFailed:  # rare: roll back and rerun with a savepoint around each op
                if conn.in_transaction:
                    conn.rollback()
                return self._transaction(conn, ops, prune_now, careful=True)
        except (sqlite3.Error, _BatchAborted) as exc:
            if conn.in_transaction:
                conn.rollback()
            reason = str(exc) if isinstance(exc, _BatchAborted) else self._describe(exc)
            return [(None, StoreError(reason)) for _ in ops]

    def _transaction(
        self, conn: sqlite3.Connection, ops: list[Op], prune_now: float | None, *, careful: bool,
    ) -> list[tuple[Any, BaseException | None]]:
        """One transaction, up to (not including) COMMIT. Fast path: any failing op raises
        _OpFailed. Careful path: a failing op is rolled back to its savepoint and its error
        becomes its result."""
        results: list[tuple[Any, BaseException | None]] = []
        conn.execute("BEGIN IMMEDIATE")
        for op in ops:
            if not careful:
                try:
                    results.append((op(conn), None))
                except Exception as exc:
                    raise _OpFailed() from exc
                continue
            conn.execute("SAVEPOINT op")
            try:
                value = op(conn)
            except Exception as exc:  # noqa: BLE001 - handed to its caller
                if not conn.in_transaction:  # SQLite rolled everything back (disk full, I/O error)
                    raise _BatchAborted(self._describe(exc)) from exc
                conn.execute("ROLLBACK TO op")
                results.append((None, StoreError(self._describe(exc)) if isinstance(exc, sqlite3.Error) else exc))
            else:
                results.append((value, None))
            conn.execute("RELEASE op")
        if prune_now is not None:
            conn.execute("DELETE FROM seen WHERE at < ?", (prune_now - self.dedupe_ttl,))
        return results

    # -- SQLite details ----------------------------------------------------------------------

    def _describe(self, exc: BaseException) -> str:
        """One line naming the file and what is wrong with it."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        lowered = text.lower()
        if "locked" in lowered or "busy" in lowered:
            return f"{self.path}: database is locked by another running process"
        if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
            return f"{self.path}: file is corrupt or not a database ({text})"
        return f"{self.path}: {text}"

    def _open_sync(self) -> sqlite3.Connection:
        """Worker thread: connect, lock, check and migrate. Raises StoreError with one line."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create its directory ({exc.strerror})") from None
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(self._describe(exc)) from None
        try:
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot use WAL journal mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("BEGIN IMMEDIATE")  # takes (and, in EXCLUSIVE mode, keeps) the write lock
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise StoreError(f"{self.path}: file is corrupt ({'; '.join(map(str, problems))})")
            self._migrate(conn)
            conn.execute("DELETE FROM seen WHERE at < ?", (self._clock() - self.dedupe_ttl,))
            conn.execute("COMMIT")
        except BaseException as exc:
            conn.close()
            if isinstance(exc, StoreError):
                raise
            if isinstance(exc, sqlite3.Error):
                raise StoreError(self._describe(exc)) from None
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the schema to SCHEMA_VERSION (inside the caller's transaction)."""
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" in tables:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                raise StoreError(f"{self.path}: schema_version table is empty")
            version = int(row[0])
        elif tables - {"sqlite_sequence"}:
            raise StoreError(f"{self.path}: not an agent store (no schema_version table)")
        else:
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this code supports ({SCHEMA_VERSION})")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (step,))
