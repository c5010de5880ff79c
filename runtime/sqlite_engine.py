"""A SQLite file run by one connection with group commit: the engine under ``SqliteStore``,
knowing nothing of its tables (a subclass supplies the migrations and the operations).

Durability
    The database runs in WAL mode with ``synchronous=FULL`` by default: every committed
    transaction is fsync'ed to the WAL before its callers get their results, so a result survives
    a process crash (SIGKILL, OOM kill) *and* an OS crash or power loss. ``synchronous="NORMAL"``
    skips that fsync (the WAL is synced only at checkpoints): still durable across a process
    crash, but the last transactions may roll back after a power loss.

Group commit
    All SQLite work runs on ONE connection, one transaction at a time. Callers put an operation
    (a function of the connection) in a FIFO queue and wait on their own event. The first caller
    that finds no transaction in progress becomes the *leader*: it takes everything queued (up to
    ``batch_max``), runs the operations as one transaction on the trio thread (microseconds each,
    and no GIL hand-over per statement), then COMMITs it (the one fsync) in a worker thread
    (``trio.to_thread.run_sync`` with a private limiter of 1) while the event loop goes on, hands
    each caller its own result, and, if more requests arrived meanwhile, wakes the oldest one to
    lead the next transaction. No background task is needed, so ``open()``/``close()`` are
    enough. If one operation fails, the transaction is rolled back and rerun with a SAVEPOINT
    around each operation, so the failing one gets its error and the others still commit.

    Cancellation: a request cancelled while still queued is withdrawn (it never happens); once
    its transaction has started it completes, and the caller gets its result (the cancellation is
    delivered at the caller's next checkpoint). A leader shields the transaction it runs, so a
    cancelled leader never strands the others.

Opening
    ``open()`` takes an exclusive lock on the file (``locking_mode=EXCLUSIVE``, held until
    ``close()``; no other connection, not even the ``sqlite3`` shell, may hold the file open
    meanwhile), runs ``PRAGMA quick_check`` and brings the schema to the newest of the
    subclass's migrations (``schema_version`` table). A file that is not a database or is
    malformed, a file locked by another running process, a SQLite file without a
    ``schema_version`` table, or a newer schema version raises ``StoreError`` with one line naming
    the file. Nothing is ever reset silently.

Housekeeping (``_housekeeping``, e.g. pruning old rows) runs at open and then at most once per
``HOUSEKEEPING_INTERVAL``, inside a regular transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import trio

from .store import StoreError

HOUSEKEEPING_INTERVAL = 60.0
BUSY_TIMEOUT = 0.2

Synchronous = Literal["FULL", "NORMAL"]
Op = Callable[[sqlite3.Connection], Any]


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


class SqliteEngine:
    """One SQLite file, one connection, group commit (see the module docstring).

    ``migrations[n]`` brings the schema from version n-1 to n (versions 1, 2, … up to the newest);
    its statements may name parameters (``:name``) given by ``migration_parameters``;
    ``kind`` says what the file should be (e.g. "an agent store"), for the error a file without a
    schema version gets.
    Subclasses run their operations with ``_call``."""

    def __init__(
        self,
        path: Path,
        *,
        migrations: Mapping[int, Sequence[str]],
        kind: str,
        migration_parameters: Mapping[str, Any] | None = None,
        batch_max: int = 256,
        synchronous: Synchronous = "FULL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be 'FULL' or 'NORMAL'")
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        if sorted(migrations) != list(range(1, len(migrations) + 1)):
            raise ValueError("migrations must be numbered 1, 2, … without gaps")
        self.path = Path(path)
        self.batch_max = batch_max
        self.synchronous: Synchronous = synchronous
        self.transactions = 0
        """Transactions run so far (one per group commit)."""
        self._migrations = migrations
        self._migration_parameters = dict(migration_parameters or {})
        self._schema_version = len(migrations)
        self._kind = kind
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._closing = False
        self._queue: deque[_Request] = deque()
        self._busy = False
        self._limiter = trio.CapacityLimiter(1)
        self._next_housekeeping = 0.0

    def _housekeeping(self, conn: sqlite3.Connection, now: float) -> None:
        """Periodic upkeep inside a transaction (at open, then every HOUSEKEEPING_INTERVAL)."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or migrate the database and take its exclusive lock; StoreError if unusable."""
        if self._conn is not None:
            return
        with trio.CancelScope(shield=True):
            self._conn = await trio.to_thread.run_sync(self._open_sync, limiter=self._limiter)
        self._closing = False
        self._next_housekeeping = self._clock() + HOUSEKEEPING_INTERVAL

    async def close(self) -> None:
        """Finish every queued and in-flight request, then close the connection (idempotent)."""
        if self._conn is None or self._closing:
            return
        self._closing = True  # new requests fail from now on
        with trio.CancelScope(shield=True):
            await self._submit(lambda conn: None)  # a barrier: FIFO, so everything before it is done
            conn, self._conn = self._conn, None
            await trio.to_thread.run_sync(conn.close, limiter=self._limiter)

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
        upkeep = now >= self._next_housekeeping
        if upkeep:
            self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
        failure: BaseException | None = None
        try:
            # The statements run here, on the trio thread (tens of microseconds each): run in the
            # worker they would each wait for the GIL, up to the 5 ms switch interval when this
            # thread is busy. Only COMMIT, the fsync, runs in the worker thread.
            results = self._run_batch([r.op for r in batch], now if upkeep else None)
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

    def _run_batch(self, ops: list[Op], upkeep_now: float | None) -> list[tuple[Any, BaseException | None]]:
        """Run ``ops`` in one transaction, left open for ``_commit_sync``; each op gets its own
        result or error (a failure of the whole batch rolls it back and fails every op)."""
        conn = self._conn
        assert conn is not None
        try:
            try:
                return self._transaction(conn, ops, upkeep_now, careful=False)
            except _OpFailed:  # rare: roll back and rerun with a savepoint around each op
                if conn.in_transaction:
                    conn.rollback()
                return self._transaction(conn, ops, upkeep_now, careful=True)
        except (sqlite3.Error, _BatchAborted) as exc:
            if conn.in_transaction:
                conn.rollback()
            reason = str(exc) if isinstance(exc, _BatchAborted) else self._describe(exc)
            return [(None, StoreError(reason)) for _ in ops]

    def _transaction(
        self, conn: sqlite3.Connection, ops: list[Op], upkeep_now: float | None, *, careful: bool,
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
        if upkeep_now is not None:
            self._housekeeping(conn, upkeep_now)
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
            self._housekeeping(conn, self._clock())
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
        """Bring the schema to the newest migration (inside the caller's transaction)."""
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" in tables:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                raise StoreError(f"{self.path}: schema_version table is empty")
            version = int(row[0])
        elif tables - {"sqlite_sequence"}:
            raise StoreError(f"{self.path}: not {self._kind} (no schema_version table)")
        else:
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = 0
        newest = self._schema_version
        if version > newest:
            raise StoreError(f"{self.path}: schema version {version} is newer than this code supports ({newest})")
        for step in range(version + 1, newest + 1):
            for statement in self._migrations[step]:
                conn.execute(statement, self._migration_parameters)
            conn.execute("UPDATE schema_version SET version = ?", (step,))
