"""The Store contract (``runtime.store``) in process memory: for tests and development.

Every operation runs without an await, so each is atomic and uncancellable by construction;
nothing survives the process.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any, Collection, Sequence

from .store import (DEAD_LETTERS_KEPT, Cursor, DeadLetterRow, InboxRow, MetaPage, MetaRow, OutboxRow, StateMeta,
                    meta_matches)

DEDUPE_KEPT = 200_000   # dedupe ids remembered (the newest), instead of a time to live


class MemoryStore:
    """The Store contract in process memory: dedupe and ordering, no durability across restarts."""

    def __init__(self) -> None:
        self._states: dict[str, bytes] = {}
        self._meta: dict[str, StateMeta] = {}
        self._inbox: dict[tuple[str, int], dict[str, Any]] = {}
        self._outbox: dict[int, OutboxRow] = {}
        self._seen: dict[str, None] = {}
        self._seq: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._dead: deque[DeadLetterRow] = deque(maxlen=DEAD_LETTERS_KEPT)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def accept(self, key: str, dedupe_id: str, payload: dict[str, Any]) -> int | None:
        if dedupe_id in self._seen:
            return None
        self._seen[dedupe_id] = None
        if len(self._seen) > DEDUPE_KEPT:
            self._seen.pop(next(iter(self._seen)))
        seq = self._seq.get(key, 0) + 1
        self._seq[key] = seq
        self._inbox[(key, seq)] = payload
        return seq

    async def load(self, key: str) -> bytes | None:
        return self._states.get(key)

    async def commit(self, key: str, state: bytes, meta: StateMeta, *, acked: Sequence[int] = (),
                     outbox: Sequence[tuple[str, dict[str, Any]]] = ()) -> list[int]:
        self._states[key] = state
        self._meta[key] = meta
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
        gone = [key for key, meta in self._meta.items() if meta.last_activity < idle_before and key not in keep]
        for key in gone:
            del self._states[key], self._meta[key]
            if not any(k == key for k, _ in self._inbox):
                self._seq.pop(key, None)
        return gone

    async def sizes(self) -> dict[str, int]:
        return {key: self._meta[key].size for key in sorted(self._meta)}

    async def listing(self, *, now: float, search: str = "", status: str | None = None,
                      scope: str | None = None, keys: Collection[str] | None = None,
                      after: Cursor | None = None, limit: int = 50) -> MetaPage:
        wanted = set(keys) if keys is not None else None
        rows = [row for row in (MetaRow(key, meta) for key, meta in self._meta.items())
                if (wanted is None or row.key in wanted) and meta_matches(row, now, search, status, scope)]
        rows.sort(key=lambda r: (r.meta.last_activity, r.key), reverse=True)
        total = len(rows)
        if after is not None:
            rows = [r for r in rows if (r.meta.last_activity, r.key) < after]
        scopes = sorted({m.scope for m in self._meta.values()} - {""})
        return MetaPage(rows[:limit], total, scopes)
