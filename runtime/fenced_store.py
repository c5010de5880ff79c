"""A store whose commits are fenced by shard ownership: what the actors of a node that shares its
database with other nodes write through (runtime/shards.py).

Every ``commit`` of a key carries the lease of the key's shard (``fence=(node, lease)``); the
store refuses it with ``Fenced`` unless that lease still holds, checked in the commit's own
transaction. Without a lease at all (the shard is not ours, or our leases ran out: a renewal that
is only late is waited for, ``ShardOwner.confirm``) the commit is refused here, before any round
trip. A refusal makes the owner treat the shard as lost at once (``ShardOwner.lose``: its actors
stop), so a paused or partitioned node stops writing as soon as it wakes up. ``expire`` only
touches the shards this node owns. Everything else passes through unchanged: the domain never
sees any of this.
"""

from __future__ import annotations

import logging
from typing import Any, Collection, Protocol, Sequence

import trio

from .shards import Lease, ShardOwner, shard_of
from .store import Fenced, StateMeta

log = logging.getLogger(__name__)


class ShardedStore(Protocol):
    """What a fenced store needs of the store it wraps (``runtime.postgres_store.PostgresStore``)."""

    shards: int

    async def commit(self, key: str, state: bytes, meta: StateMeta, *, acked: Sequence[int] = (),
                     outbox: Sequence[tuple[str, dict[str, Any]]] = (),
                     fence: tuple[str, Lease] | None = None) -> list[int]: ...

    async def expire(self, idle_before: float, keep: Collection[str] = (),
                     shards: Collection[int] | None = None) -> list[str]: ...


class FencedStore:
    """``store`` with fenced commits for ``owner``'s node (see the module docstring)."""

    def __init__(self, store: ShardedStore, owner: ShardOwner) -> None:
        self._store = store
        self._owner = owner
        self.refused = 0   # commits refused (here or by the store): writes of a node that lost the shard

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def commit(self, key: str, state: bytes, meta: StateMeta, *, acked: Sequence[int] = (),
                     outbox: Sequence[tuple[str, dict[str, Any]]] = ()) -> list[int]:
        lease = await self._owner.confirm(key)   # a late renewal is waited for, not taken as a loss
        if lease is None:
            await self._refused(key, shard_of(key, self._store.shards), "shard not owned")
        assert lease is not None
        try:
            return await self._store.commit(key, state, meta, acked=acked, outbox=outbox,
                                            fence=(self._owner.node, lease))
        except Fenced as exc:
            await self._refused(key, lease.shard, str(exc))
            raise

    async def _refused(self, key: str, shard: int, why: str) -> None:
        self.refused += 1
        log.warning("Fenced: a commit of %s was refused (shard %d: %s); the shard is dropped", key, shard, why)
        with trio.CancelScope(shield=True):   # the stop it causes may cancel this very task: finish first
            await self._owner.lose([shard])
        raise Fenced(f"shard {shard} is not owned by this node ({why})")

    async def expire(self, idle_before: float, keep: Collection[str] = ()) -> list[str]:
        return await self._store.expire(idle_before, keep, shards=sorted(self._owner.owned))
