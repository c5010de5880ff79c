"""The store interface: the contract every implementation meets (``runtime.memory_store``,
``runtime.sqlite_store``, ``runtime.postgres_store``), so an actor system survives a restart without
losing or repeating work.

What is stored
    Per key (an actor key): its *state*, opaque ``bytes`` the actor encodes and decodes (the store
    never looks inside), and a small :class:`StateMeta` the actor supplies with every commit (last
    activity, a size, what a listing shows); an *inbox* of accepted messages, numbered per key; an
    *outbox* of jobs (replies, CRM requests) written before they are performed; *dead letters*
    (jobs given up); and the *dedupe ids* of every accepted message. Payloads (inbox, outbox, dead
    letters) are JSON-able dicts and come back equal (a JSON round trip).

Atomicity and isolation
    Every operation is atomic: it happens whole or not at all (``commit`` saves the state and
    meta, acks the inbox rows and adds the outbox rows together; ``bury`` and ``revive`` move a
    row; ``expire`` deletes a key's state and meta together). Calls may come from many trio tasks
    at once; operations are serialisable, and one task's calls take effect in the order it makes
    them. A failing operation fails only its own call.

Ordering
    ``accept`` numbers each key's messages 1, 2, 3… (strictly increasing, never reused while the
    key has a state or a pending inbox row); ``pending_inbox`` lists each key's rows contiguously,
    in sequence order. Outbox ids increase across the whole store and are never reused (``revive``
    restores a dead letter under its own id); ``pending_outbox`` lists rows in id order, which is
    write order.

Dedupe
    A dedupe id is store-wide (not per key) and remembered at least ``dedupe_ttl`` seconds (24 h),
    across restarts and beyond its key's expiry (``MemoryStore``: the newest 200,000 ids, within
    the process). ``accept`` of a known id changes nothing and returns None.

Expiry
    ``expire`` deletes the state and meta of every key whose ``StateMeta.last_activity`` is before
    ``idle_before``, except the keys in ``keep``, and returns the deleted keys. The condition is
    checked in the transaction that deletes, so a state committed meanwhile is never deleted. It
    never deletes inbox or outbox rows (an accepted message is still owed its turn, a queued job
    is still settled by its supervisor), dead letters or dedupe ids; a key's sequence restarts only
    when it has no pending inbox row. Large expiries run as several transactions of at most
    ``EXPIRE_BATCH`` keys, so other calls are not held up behind one huge one.

Durability
    When ``accept``, ``commit``, ``settle``, ``bury``, ``revive``, ``discard`` or ``expire``
    returns, its effect is committed: a durable store keeps it across a process crash (SIGKILL,
    OOM kill), and by default across an OS crash or power loss too (``SqliteStore``: WAL with
    ``synchronous=FULL``; ``NORMAL`` trades the latter away). ``MemoryStore`` keeps nothing
    across restarts (tests, development).

Errors
    Every failure raises :class:`StoreError` with one line naming the store (a file, a database)
    and what is wrong; the store stays usable for other calls. ``open`` raises it when the storage
    is unusable (corrupt, locked by another process, foreign, a newer schema) and never resets
    anything silently. Callers make their calls between ``open`` and ``close``; a store that holds
    a connection (``SqliteStore``) raises StoreError for a call outside them.

Cancellation
    A cancelled call never leaves its operation half done: cancelled before the operation started,
    it has no effect; once started, the operation completes and the call returns its result (the
    cancellation is delivered at the caller's next checkpoint), so an accepted message is never
    committed without its caller learning its sequence number. ``close`` finishes the operations
    already called, and no cancellation interrupts it.
"""

from __future__ import annotations

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
class StateMeta:
    """What the store knows of a key's state besides its bytes, supplied by the actor with every
    commit, so expiry, sizes and listings never load (or understand) the states themselves.

    ``last_activity`` (unix seconds) decides expiry and the listing order; ``size`` is the actor's
    own measure of its state (``Store.sizes``). ``status`` holds until ``status_until`` (unix
    seconds; 0: until the next commit changes it), then ``status_after`` applies; ``scope`` is a
    grouping label (e.g. an account)."""

    last_activity: float = 0.0
    size: int = 0
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
class MetaRow:
    """One key's meta as listed."""

    key: str
    meta: StateMeta


@attrs.frozen
class MetaPage:
    """A page of a listing, newest activity first; ``total`` counts every match, ``scopes`` lists
    every scope in use (for a filter)."""

    rows: list[MetaRow]
    total: int
    scopes: list[str]


Cursor = tuple[float, str]   # (last_activity, key) of the last row of the previous page


def meta_matches(row: MetaRow, now: float, search: str, status: str | None, scope: str | None) -> bool:
    """The filter of ``Store.listing``: ``search`` is a case-insensitive substring of the key or
    title, ``status`` the status in force at ``now`` (``""``: none), ``scope`` an exact scope."""
    needle = search.lower()
    if needle and needle not in row.key.lower() and needle not in row.meta.title.lower():
        return False
    if status is not None and row.meta.status_at(now) != status:
        return False
    return scope is None or row.meta.scope == scope


class Store(Protocol):
    """The operations of the contract in the module docstring."""

    async def open(self) -> None:
        """Create or migrate the storage; StoreError with a one-line reason when unusable."""

    async def close(self) -> None:
        """Finish the calls already made, then release the storage (idempotent)."""

    async def accept(self, key: str, dedupe_id: str, payload: dict[str, Any]) -> int | None:
        """Record an inbound message durably; its inbox sequence number, or None for a duplicate."""

    async def load(self, key: str) -> bytes | None:
        """The key's state as last committed, or None."""

    async def commit(
        self,
        key: str,
        state: bytes,
        meta: StateMeta,
        *,
        acked: Sequence[int] = (),
        outbox: Sequence[tuple[str, dict[str, Any]]] = (),
    ) -> list[int]:
        """Atomically replace the key's ``state`` and ``meta``, ack the inbox rows ``acked`` (unknown
        sequence numbers are ignored) and add ``outbox`` (kind, payload) rows; the new outbox row
        ids, in order."""

    async def settle(self, outbox_id: int) -> None:
        """Delete a performed (or given up) outbox row; an unknown id is ignored."""

    async def bury(self, outbox_id: int, reason: str) -> None:
        """Move an outbox row to the dead letters, its reason cut to 500 characters (the newest
        1,000 dead letters are kept); an unknown id is ignored."""

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
        """Delete the state of every key idle since before ``idle_before`` (unix seconds), except
        the keys in ``keep``; the deleted keys (see Expiry in the module docstring)."""

    async def sizes(self) -> dict[str, int]:
        """Every stored key's ``StateMeta.size``, in key order."""

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
        """One page of stored keys' meta, by (``last_activity``, key) newest first, after the
        ``after`` cursor; filtered as ``meta_matches`` says and, when given, to ``keys``."""


EXPIRE_BATCH = 500   # keys deleted per transaction by ``Store.expire``
DEAD_LETTERS_KEPT = 1000   # the newest dead letters ``Store.bury`` keeps


class StoreError(Exception):
    """The store cannot do what was asked (corrupt, locked, newer schema, closed); one line."""


class Fenced(StoreError):
    """A fenced write was refused: this process no longer holds the key's shard (runtime/shards.py)."""
