"""The Store contract (``runtime.store``) in a SQLite file: the schema, its migrations and the
statements of each operation, run by the group-commit engine (``runtime.sqlite_engine``: one
connection, WAL, ``synchronous=FULL`` by default, exclusive lock, quick check at open).

Tables: ``states`` (key, the state's bytes), ``meta`` (key, its StateMeta, and a lowered search
text), ``seqs`` (each key's last inbox sequence), ``inbox``, ``outbox``, ``dead_letters`` and
``seen`` (dedupe ids). Dedupe ids are kept for at least ``dedupe_ttl`` seconds; older ones are
pruned at open and then at most once a minute (the engine's housekeeping).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

from .sqlite_engine import SqliteEngine, Synchronous
from .store import (DEAD_LETTERS_KEPT, EXPIRE_BATCH, Cursor, DeadLetterRow, InboxRow, MetaPage, MetaRow, OutboxRow,
                    StateMeta)

# MIGRATIONS[n] brings a database from version n-1 to version n (never edit a released one).
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
    5: (  # opaque states: the summaries (which already held last_activity and the window length)
          # become each key's StateMeta, the only thing expiry, sizes and listings read; a state
          # is its bytes alone (the JSON text of version 4 becomes its UTF-8 bytes)
        "ALTER TABLE summaries RENAME TO meta",
        "ALTER TABLE meta RENAME COLUMN window_size TO size",
        "DROP INDEX summaries_activity",
        "DROP INDEX summaries_scope",
        "CREATE INDEX meta_activity ON meta (last_activity, key)",
        "CREATE INDEX meta_scope ON meta (scope)",
        "CREATE INDEX meta_size ON meta (key, size)",
        "CREATE TABLE blobs (key TEXT PRIMARY KEY, data BLOB NOT NULL)",
        "INSERT INTO blobs (key, data) SELECT key, CAST(data AS BLOB) FROM states",
        "DROP TABLE states",
        "ALTER TABLE blobs RENAME TO states",
    ),
    6: (  # keys gain a prefix (the service's keys became "<instance>/<chat>"): every key written by
          # schema 5 or older (none has a "/") gets the store's legacy_key_prefix, in every table,
          # and its listing scope becomes legacy_scope; an empty prefix leaves them as they are
        *(f"UPDATE {table} SET key = :legacy_key_prefix || key WHERE :legacy_key_prefix != '' AND instr(key, '/') = 0"
          for table in ("states", "seqs", "inbox", "outbox", "dead_letters")),
        "UPDATE meta SET key = :legacy_key_prefix || key, search = :legacy_search_prefix || search,"
        " scope = :legacy_scope WHERE :legacy_key_prefix != '' AND instr(key, '/') = 0",
    ),
}
SCHEMA_VERSION = len(MIGRATIONS)
# The status in force at :now (see StateMeta.status_at).
_STATUS_AT = "(CASE WHEN status_until = 0 OR status_until > :now THEN status ELSE status_after END)"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _search_text(key: str, title: str) -> str:
    """What Store.listing's search looks in, lowered by Python at write time (SQLite's lower()
    folds ASCII only, and a SQL function written in Python would cost ~50 ms per 10,000 rows)."""
    return f"{key}\n{title}".lower()


class SqliteStore(SqliteEngine):
    """The Store contract in a SQLite file, with group commit (see ``runtime.sqlite_engine``)."""

    def __init__(
        self,
        path: Path,
        *,
        dedupe_ttl: float = 86400.0,
        batch_max: int = 256,
        synchronous: Synchronous = "FULL",
        clock: Callable[[], float] = time.time,
        legacy_key_prefix: str = "",
        legacy_scope: str = "",
    ) -> None:
        """``legacy_key_prefix``: what keys written by schema 5 or older get in front (migration 6;
        keys written since contain a "/" and are left alone), with ``legacy_scope`` as their scope."""
        parameters = {"legacy_key_prefix": legacy_key_prefix, "legacy_search_prefix": legacy_key_prefix.lower(),
                      "legacy_scope": legacy_scope}
        super().__init__(path, migrations=MIGRATIONS, kind="an agent store", batch_max=batch_max,
                         synchronous=synchronous, clock=clock, migration_parameters=parameters)
        self.dedupe_ttl = dedupe_ttl

    def _housekeeping(self, conn: sqlite3.Connection, now: float) -> None:
        """Prune the dedupe ids older than ``dedupe_ttl``."""
        conn.execute("DELETE FROM seen WHERE at < ?", (now - self.dedupe_ttl,))

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

    async def load(self, key: str) -> bytes | None:
        """The key's state as last committed, or None."""

        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT data FROM states WHERE key = ?", (key,)).fetchone()
            return row[0] if row is not None else None

        return await self._call(op)  # type: ignore[no-any-return]

    async def commit(
        self,
        key: str,
        state: bytes,
        meta: StateMeta,
        *,
        acked: Sequence[int] = (),
        outbox: Sequence[tuple[str, dict[str, Any]]] = (),
    ) -> list[int]:
        """Atomically replace the state and meta, ack the inbox rows ``acked`` and add ``outbox``
        rows; the new outbox ids."""
        row = (key, meta.last_activity, meta.size, meta.title, meta.preview, meta.status, meta.status_until,
               meta.status_after, meta.scope, _search_text(key, meta.title))
        acks = [(key, int(seq)) for seq in acked]
        jobs = [(key, kind, _dumps(payload)) for kind, payload in outbox]

        def op(conn: sqlite3.Connection) -> list[int]:
            conn.execute("INSERT INTO states (key, data) VALUES (?, ?)"
                         " ON CONFLICT (key) DO UPDATE SET data = excluded.data", (key, state))
            conn.execute("INSERT OR REPLACE INTO meta (key, last_activity, size, title, preview, status, status_until,"
                         " status_after, scope, search) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
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
                "SELECT key, last_activity FROM meta WHERE last_activity < ?"
                " AND (last_activity > ? OR (last_activity = ? AND key > ?))"
                " ORDER BY last_activity, key LIMIT ?",
                (idle_before, cursor[0], cursor[0], cursor[1], EXPIRE_BATCH)).fetchall()
            deleted = []
            for key, _ in rows:
                if key in kept:
                    continue
                if conn.execute("DELETE FROM meta WHERE key = ? AND last_activity < ?", (key, idle_before)).rowcount:
                    conn.execute("DELETE FROM states WHERE key = ?", (key,))
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

    async def sizes(self) -> dict[str, int]:
        """Every stored key's size, in key order (read from the covering index meta_size)."""

        def op(conn: sqlite3.Connection) -> dict[str, int]:
            return dict(conn.execute("SELECT key, size FROM meta ORDER BY key").fetchall())

        return await self._call(op)  # type: ignore[no-any-return]

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
        """A page of meta rows, newest activity first: the (last_activity, key) index is walked
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

        def op(conn: sqlite3.Connection) -> MetaPage:
            rows = conn.execute(
                "SELECT key, last_activity, size, title, preview, status, status_until, status_after, scope"
                f" FROM meta {hint} WHERE {page} ORDER BY last_activity DESC, key DESC LIMIT :limit", args)
            found = [MetaRow(key, StateMeta(*fields)) for key, *fields in rows]
            if after is None and len(found) < limit:   # a short first page is every match: no second scan
                total = len(found)
            else:
                (total,) = conn.execute(f"SELECT count(*) FROM meta WHERE {condition}", args).fetchone()
            scopes = [s for (s,) in conn.execute("SELECT DISTINCT scope FROM meta WHERE scope != '' ORDER BY scope")]
            return MetaPage(found, total, scopes)

        return await self._call(op)  # type: ignore[no-any-return]
