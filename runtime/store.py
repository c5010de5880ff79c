"""The store interface (durable intake, actor state, outbox) and its in-memory implementation.

Keys are actor keys; payloads and states are JSON-able dicts. The SQLite implementation
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
    ) -> list[int]:
        """Atomically save ``state``, ack the inbox rows ``acked`` and add ``outbox`` (kind, payload) rows.

        Returns the new outbox row ids, in order.
        """

    async def settle(self, outbox_id: int) -> None:
        """Delete a performed (or given up) outbox row."""

    async def bury(self, outbox_id: int, reason: str) -> None:
        """Move a given-up outbox row to the dead letters (bounded: the newest 1,000)."""

    async def dead_letters(self, limit: int = 100) -> list[DeadLetterRow]:
        """The newest dead letters, newest first."""

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


EXPIRE_BATCH = 500   # keys deleted per transaction by ``Store.expire``


class StoreError(Exception):
    """The store cannot be used (corrupt, locked, newer schema); the message is one line."""


class MemoryStore:
    """The Store contract in process memory: dedupe and ordering, no durability across restarts."""

    def __init__(self, dedupe_ttl: float = 86400.0) -> None:
        self._states: dict[str, dict[str, Any]] = {}
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

    async def commit(self, key, state, *, acked=(), outbox=()):  # type: ignore[no-untyped-def]
        self._states[key] = state
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

    async def pending_inbox(self) -> list[InboxRow]:
        return [InboxRow(key, seq, payload) for (key, seq), payload in sorted(self._inbox.items())]

    async def pending_outbox(self) -> list[OutboxRow]:
        return [self._outbox[i] for i in sorted(self._outbox)]

    async def expire(self, idle_before: float, keep: Collection[str] = ()) -> list[str]:
        gone = [key for key, state in self._states.items()
                if state.get("last_activity", 0) < idle_before and key not in keep]
        for key in gone:
            del self._states[key]
            if not any(k == key for k, _ in self._inbox):
                self._seq.pop(key, None)
        return gone

    async def window_sizes(self) -> dict[str, int]:
        return {key: len(self._states[key].get("window", [])) for key in sorted(self._states)}
