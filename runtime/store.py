"""The store interface (durable intake, actor state, outbox, dead letters, a summary per key for
admin listings) and its in-memory implementation.

Keys are actor keys; payloads and states are JSON-able dicts; the store never looks inside a state
(a listing reads the small ``Summary`` its actor supplies with each commit). The SQLite implementation
(``runtime.sqlite_store``) keeps the same contract across process restarts.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any, Collection, Protocol, Sequence

import attrs


@attrs.frozen
class InboxRow:
    """An accepted message not yet acknowledged by its actor's turn."""

    key: str
    seq: int
    payload: dict[str, Any]


@attrs.frozen
class OutboxRow:
    """A job (a reply, a CRM request) written before it is performed, deleted once settled."""

    id: int
    key: str
    kind: str
    payload: dict[str, Any]


@attrs.frozen
class DeadLetterRow:
    """A job that was given up (e.g. a reply Evolution never accepted), kept for the operator."""

    id: int
    key: str
    kind: str
    payload: dict[str, Any]
    reason: str
    at: float


@attrs.frozen
class Summary:
    """A small, domain-free description of one key, supplied by its actor with each commit, so an
    admin listing never has to load (or understand) the states themselves.

    ``status`` holds until ``status_until`` (unix seconds; 0: until the next commit changes it),
    then ``status_after`` applies; ``scope`` is a grouping label (e.g. an account)."""

    title: str = ""
    preview: str = ""
    status: str = ""
    status_until: float = 0.0
    status_after: str = ""
    scope: str = ""

    def status_at(self, now: float) -> str:
        """The status in force at ``now``."""
        return self.status if not self.status_until or self.status_until > now else self.status_after


@attrs.frozen
class SummaryRow:
    """One key's summary as listed: its Summary, its state's ``last_activity`` and window length."""

    key: str
    summary: Summary
    last_activity: float
    window_size: int


@attrs.frozen
class SummaryPage:
    """A page of summaries, newest activity first; ``total`` counts every match, ``scopes`` lists
    every scope in use (for a filter)."""

    rows: list[SummaryRow]
    total: int
    scopes: list[str]


Cursor = tuple[float, str]   # (last_activity, key) of the last row of the previous page


def summary_matches(row: SummaryRow, now: float, search: str, status: str | None, scope: str | None) -> bool:
    """The filter of ``Store.summaries``: ``search`` is a case-insensitive substring of the key or
    title, ``status`` the status in force at ``now`` (``""``: none), ``scope`` an exact scope."""
    needle = search.lower()
    if needle and needle not in row.key.lower() and needle not in row.summary.title.lower():
        return False
    if status is not None and row.summary.status_at(now) != status:
        return False
    return scope is None or row.summary.scope == scope


class Store(Protocol):
    """Everything an actor system needs to survive a restart without losing or repeating work."""

    async def open(self) -> None:
        """Create or migrate the storage; raises StoreError with a one-line reason when unusable."""

    async def close(self) -> None: ...

    async def accept(self, key: str, dedupe_id: str, payload: dict[str, Any]) -> int | None:
        """Record an inbound message durably; its inbox sequence number, or None for a duplicate."""

    async def load(self, key: str) -> dict[str, Any] | None:
        """The actor's saved state, or None."""

    async def commit(
        self,
        key: str,
        state: dict[str, Any],
        *,
        acked: Sequence[int] = (),
        outbox: Sequence[tuple[str, dict[str, Any]]] = (),
        summary: Summary | None = None,
    ) -> list[int]:
        """Atomically save ``state``, ack the inbox rows ``acked``, add ``outbox`` (kind, payload) rows
        and replace the key's ``summary`` (None keeps the previous one).

        Returns the new outbox row ids, in order.
        """

    async def settle(self, outbox_id: int) -> None:
        """Delete a performed (or given up) outbox row."""

    async def bury(self, outbox_id: int, reason: str) -> None:
        """Move a given-up outbox row to the dead letters (bounded: the newest 1,000)."""

    async def dead_letters(self, limit: int = 100) -> list[DeadLetterRow]:
        """The newest dead letters, newest first."""

    async def revive(self, dead_letter_id: int) -> OutboxRow | None:
        """Move a dead letter back to the outbox (same id, kind and payload) for another attempt;
        None when there is no such dead letter. The caller submits the row to its supervisor."""

    async def discard(self, dead_letter_id: int) -> bool:
        """Delete a dead letter; False when there is no such dead letter."""

    async def pending_inbox(self) -> list[InboxRow]:
        """Accepted but unacknowledged messages, per key in sequence order."""

    async def pending_outbox(self) -> list[OutboxRow]:
        """Unsettled jobs in the order they were written."""

    async def expire(self, idle_before: float, keep: Collection[str] = ()) -> list[str]:
        """Delete the saved state of every key whose state's ``last_activity`` is before
        ``idle_before`` (unix seconds), except the keys in ``keep``; returns the deleted keys.

        The condition is checked in the transaction that deletes, so a state committed meanwhile
        is never deleted. Inbox and outbox rows are kept (an accepted message is still owed its
        turn, a queued reply or CRM job is still settled by its supervisor); the key's sequence
        restarts only when it has no pending inbox row. Large expiries run in several small
        transactions (``EXPIRE_BATCH`` keys each), so other requests are not held up behind them.
        """

    async def window_sizes(self) -> dict[str, int]:
        """Every saved conversation's window length, by key in key order (admin listing)."""

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
        """One page of saved keys' summaries, by (``last_activity``, key) newest first, after
        the ``after`` cursor; filtered as ``summary_matches`` says and, when given, to ``keys``."""


EXPIRE_BATCH = 500   # keys deleted per transaction by ``Store.expire``


class StoreError(Exception):
    """The store cannot be used (corrupt, locked, newer schema); the message is one line."""


class MemoryStore:
    """The Store contract in process memory: dedupe and ordering, no durability across restarts."""

    def __init__(self, dedupe_ttl: float = 86400.0) -> None:
        self._states: dict[str, dict[str, Any]] = {}
        self._summaries: dict[str, Summary] = {}
        self._inbox: dict[tuple[str, int], dict[str, Any]] = {}
        self._outbox: dict[int, OutboxRow] = {}
        self._seen: dict[str, None] = {}
        self._seq: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._dead: deque[DeadLetterRow] = deque(maxlen=1000)
        self._dedupe_limit = 200_000

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def accept(self, key: str, dedupe_id: str, payload: dict[str, Any]) -> int | None:
        if dedupe_id in self._seen:
            return None
        self._seen[dedupe_id] = None
        if len(self._seen) > self._dedupe_limit:
            self._seen.pop(next(iter(self._seen)))
        seq = self._seq.get(key, 0) + 1
        self._seq[key] = seq
        self._inbox[(key, seq)] = payload
        return seq

    async def load(self, key: str) -> dict[str, Any] | None:
        return self._states.get(key)

    async def commit(self, key, state, *, acked=(), outbox=(), summary=None):  # type: ignore[no-untyped-def]
        self._states[key] = state
        if summary is not None or key not in self._summaries:
            self._summaries[key] = summary or Summary()
        for seq in acked:
            self._inbox.pop((key, seq), None)
        ids = []
        for kind, payload in outbox:
            row = OutboxRow(id=next(self._ids), key=key, kind=kind, payload=payload)
            self._outbox[row.id] = row
            ids.append(row.id)
        return ids

    async def settle(self, outbox_id: int) -> None:
        self._outbox.pop(outbox_id, None)

    async def bury(self, outbox_id: int, reason: str) -> None:
        row = self._outbox.pop(outbox_id, None)
        if row is not None:
            self._dead.appendleft(DeadLetterRow(row.id, row.key, row.kind, row.payload, reason[:500], time.time()))

    async def dead_letters(self, limit: int = 100) -> list[DeadLetterRow]:
        return list(self._dead)[:limit]

    async def revive(self, dead_letter_id: int) -> OutboxRow | None:
        dead = next((d for d in self._dead if d.id == dead_letter_id), None)
        if dead is None:
            return None
        self._dead.remove(dead)
        row = OutboxRow(id=dead.id, key=dead.key, kind=dead.kind, payload=dead.payload)
        self._outbox[row.id] = row
        return row

    async def discard(self, dead_letter_id: int) -> bool:
        dead = next((d for d in self._dead if d.id == dead_letter_id), None)
        if dead is not None:
            self._dead.remove(dead)
        return dead is not None

    async def pending_inbox(self) -> list[InboxRow]:
        return [InboxRow(key, seq, payload) for (key, seq), payload in sorted(self._inbox.items())]

    async def pending_outbox(self) -> list[OutboxRow]:
        return [self._outbox[i] for i in sorted(self._outbox)]

    async def expire(self, idle_before: float, keep: Collection[str] = ()) -> list[str]:
        gone = [key for key, state in self._states.items()
                if state.get("last_activity", 0) < idle_before and key not in keep]
        for key in gone:
            del self._states[key]
            self._summaries.pop(key, None)
            if not any(k == key for k, _ in self._inbox):
                self._seq.pop(key, None)
        return gone

    async def window_sizes(self) -> dict[str, int]:
        return {key: len(self._states[key].get("window", [])) for key in sorted(self._states)}

    async def summaries(self, *, now: float, search: str = "", status: str | None = None,
                        scope: str | None = None, keys: Collection[str] | None = None,
                        after: Cursor | None = None, limit: int = 50) -> SummaryPage:
        wanted = set(keys) if keys is not None else None
        rows = []
        for key, summary in self._summaries.items():
            if wanted is not None and key not in wanted:
                continue
            state = self._states[key]
            row = SummaryRow(key, summary, float(state.get("last_activity", 0)), len(state.get("window", [])))
            if summary_matches(row, now, search, status, scope):
                rows.append(row)
        rows.sort(key=lambda r: (r.last_activity, r.key), reverse=True)
        total = len(rows)
        if after is not None:
            rows = [r for r in rows if (r.last_activity, r.key) < after]
        scopes = sorted({s.scope for s in self._summaries.values()} - {""})
        return SummaryPage(rows[:limit], total, scopes)
