"""Shard ownership by leases: which process runs the actors of which keys, when several processes
(on one or several machines) share one store.

The keyspace is cut into a fixed number of shards (``shard_of``: a hash that is the same in every
process, unlike Python's salted ``hash``). A process owns a shard through a lease row
``(shard, owner, epoch, expires_at)`` in the shared store:

- it *acquires* a shard only when the row is free or expired, raising its epoch by one;
- it *renews* its leases every ``lease_seconds / 3``; a lease it fails to renew (taken over, or
  the store unreachable for longer than the lease) is *lost* at once, and the shard's actors are
  stopped (``on_lost``);
- every write of a shard's state is *fenced*: done only if the row still holds this owner and
  epoch, checked under a row lock in the writing transaction, so a process that lost a lease
  (paused, partitioned) can no longer write, whatever it believes;
- it aims at its fair share of the shards among the live processes (heartbeats in the store):
  it acquires free and expired ones up to its share and hands back its excess gracefully
  (``on_release`` lets the shard's work in flight finish first), so a joining process gets
  shards without waiting for anyone to die, and a dead one's shards are taken as soon as its
  leases expire: each round asks the store when the next lease of another process runs out and
  the next round starts then if that is earlier than the regular one, and such a round takes all
  it needs, not ``max_acquire`` (a takeover within the lease, not the lease plus a renewal interval
  or two). Regular rounds keep the cap: after a restart of every node, or the store's return, the
  first process to come back does not grab every shard only to hand most back a moment later.
- a renewal that comes back late (the local deadline passed: a busy process, a slow store) is not a
  loss: a write or a send that asks meanwhile (``confirm``) waits for its outcome instead of being
  refused, because a refused send whose shard is then renewed would never be retried (only a new
  owner re-sends what is pending). A shard still unconfirmed after ``lease_seconds`` is dropped.

Time: expiry is judged by the store's clock (one clock for every machine); a process judges its
own deadline by its monotonic clock from the moment it *sent* the renewal, so it always gives a
lease up before the store could hand it to another process.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Awaitable, Callable, Mapping, Protocol, Sequence

import attrs
import trio

from .store import StoreError

log = logging.getLogger(__name__)

EXPIRY_MARGIN = 0.05   # seconds after another node's lease runs out (store clock) before taking it


def shard_of(key: str, shards: int) -> int:
    """The shard of ``key``: stable across processes, machines and Python versions."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


@attrs.frozen(order=True)
class Lease:
    """A shard this process owns, under the epoch its writes are fenced with. ``taken_from``: when
    it was just acquired from another process whose lease had run out (a takeover)."""

    shard: int
    epoch: int
    taken_from: str | None = attrs.field(default=None, eq=False, order=False)


@attrs.frozen
class LeaseRow:
    """One shard's lease as the store holds it (for admin views)."""

    shard: int
    owner: str | None
    epoch: int
    expires_in: float


@attrs.frozen
class NodeInfo:
    """What a process says of itself with its heartbeat, for admins: where it is reached, when it
    started (unix seconds), and its counters (names and numbers of the caller's choosing)."""

    address: str = ""
    started_at: float = 0.0
    stats: Mapping[str, int] = attrs.field(factory=dict)


@attrs.frozen
class NodeRow:
    """A process as the store last heard of it: ``seconds_ago`` since its heartbeat, ``live`` when
    that is within the lease, ``owned`` its unexpired leases."""

    node: str
    info: NodeInfo
    seconds_ago: float
    live: bool
    owned: int


class LeaseStore(Protocol):
    """What the shared store offers for leases (``runtime.postgres_store.PostgresStore``)."""

    async def heartbeat(self, node: str, ttl: float, info: NodeInfo) -> list[str]:
        """Record that ``node`` is alive (with ``info``); the live nodes (heartbeat within ``ttl``), sorted."""

    async def acquire(self, node: str, shards: Sequence[int], lease_seconds: float, limit: int) -> list[Lease]:
        """Take up to ``limit`` of ``shards`` that are free or expired (epoch + 1)."""

    async def renew(self, node: str, leases: Sequence[Lease], lease_seconds: float) -> list[Lease]:
        """Extend the leases still held under their epoch; the ones renewed."""

    async def release(self, node: str, leases: Sequence[Lease]) -> None:
        """Give leases back (free at once for others)."""

    async def leave(self, node: str) -> None:
        """Remove ``node``'s heartbeat (it is going away)."""

    async def lease_rows(self) -> list[LeaseRow]:
        """Every shard's lease."""

    async def nodes(self, ttl: float) -> list[NodeRow]:
        """Every process heard of lately."""

    async def next_expiry(self, node: str) -> float | None:
        """Seconds until the first unexpired lease of another node runs out (None: there is none)."""


def fair_share(node: str, live: Sequence[str], shards: int) -> int:
    """How many shards ``node`` should own: an even split among the live nodes, the first
    ``shards % len(live)`` nodes (in sorted order) taking one more."""
    nodes = sorted(set(live) | {node})
    base, extra = divmod(shards, len(nodes))
    return base + (1 if nodes.index(node) < extra else 0)


class ShardOwner:
    """Keeps this process's fair share of shards (see the module docstring).

    ``on_gained(shards)`` runs once a shard is owned (load its pending work); ``on_lost(shards)`` as
    soon as one is lost (stop its actors at once, nothing more may be written); ``on_release(shards)``
    before an excess shard is handed back (finish its work in flight), after which the lease is
    released. Callbacks run in this task, one at a time. ``describe()`` is what the heartbeat says
    of this process (its address, start, counters) for admins.
    """

    def __init__(
        self,
        store: LeaseStore,
        node: str,
        *,
        shards: int,
        lease_seconds: float = 15.0,
        on_gained: Callable[[list[int]], Awaitable[None]],
        on_lost: Callable[[list[int]], Awaitable[None]],
        on_release: Callable[[list[int]], Awaitable[None]],
        max_acquire: int | None = None,
        describe: Callable[[], NodeInfo] = NodeInfo,
    ) -> None:
        self.store = store
        self.node = node
        self.shards = shards
        self.lease_seconds = lease_seconds
        self._on_gained, self._on_lost, self._on_release = on_gained, on_lost, on_release
        self._describe = describe
        self.max_acquire = max_acquire if max_acquire is not None else max(1, math.ceil(shards / 4))
        self.owned: dict[int, int] = {}   # shard -> epoch
        self._deadline = -math.inf        # trio time after which our leases may be someone else's
        self._renewed = trio.Event()      # set (and replaced) once each renewal attempt has an outcome
        self._next_round = -math.inf      # trio time of the next round
        self._expiry_round = False        # the next round starts when another node's lease runs out
        self.late_renewals = 0            # renewals that came back after the local deadline had passed
        self.live: list[str] = []
        self._stopping = False
        self.balanced = False   # one balance step done: this process owns its share (or tried)
        self.acquired = 0       # leases acquired (a takeover of a dead node's shards counts here)
        self.taken_over = 0     # ... of them from another process whose lease had run out
        self.lost = 0           # leases lost: taken over, run out, or refused by a fenced write
        self.handed_back = 0    # leases released gracefully

    # -- what the rest of the process asks -----------------------------------------------------

    def fence(self, key: str) -> Lease | None:
        """The lease a write of ``key`` must be fenced with, or None when this process does not
        own its shard (or its leases may have run out)."""
        shard = shard_of(key, self.shards)
        epoch = self.owned.get(shard)
        if epoch is None or trio.current_time() >= self._deadline:
            return None
        return Lease(shard, epoch)

    def owns(self, key: str) -> bool:
        return self.fence(key) is not None

    async def confirm(self, key: str) -> Lease | None:
        """Like ``fence``, for a write or a send about to happen: when the local deadline has passed
        while the shard is still held (its renewal is late), wait for the renewal's outcome (at most
        ``lease_seconds``) instead of answering None. None means the shard is not ours: it is then
        always out of ``owned`` (``on_lost`` ran), so its next owner, maybe this process again,
        recovers what was refused (``on_gained``)."""
        shard = shard_of(key, self.shards)
        with trio.move_on_after(self.lease_seconds):
            while shard in self.owned and trio.current_time() >= self._deadline:
                await self._renewed.wait()
        lease = self.fence(key)
        if lease is None and shard in self.owned:   # never confirmed: give it up, as if lost
            with trio.CancelScope(shield=True):      # on_lost may stop the caller's own task
                await self.lose([shard])
        return lease

    async def holds(self, key: str) -> bool:
        """``confirm`` as a yes or no (the outbound and CRM supervisors ask before each attempt)."""
        return await self.confirm(key) is not None

    async def lose(self, shards: Sequence[int]) -> None:
        """Treat ``shards`` as lost at once (a fenced write was refused: another node holds them)."""
        lost = sorted(s for s in set(shards) if self.owned.pop(s, None) is not None)
        if lost:
            self.lost += len(lost)
            log.warning("Shards: %d leases lost (a fenced write was refused): %s", len(lost), _span(lost))
            await self._on_lost(lost)

    # -- the loop ------------------------------------------------------------------------------

    @property
    def interval(self) -> float:
        return self.lease_seconds / 3

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Balance once (so a lone process owns its shards before it serves), then a round every
        ``lease_seconds / 3`` from the previous one's renewal (earlier when another node's lease
        runs out before) until cancelled or ``leave`` is called."""
        await self.step()
        self.balanced = True
        task_status.started()
        while not self._stopping:
            await trio.sleep_until(self._next_round)
            if not self._stopping:
                await self.step()

    async def step(self) -> None:
        """One round: heartbeat, renew, drop what was lost, then acquire or hand back toward the
        fair share. A store error keeps what is owned until the local deadline passes."""
        takeover, self._expiry_round = self._expiry_round, False
        sent = trio.current_time()
        self._next_round = sent + self.interval
        try:
            self.live = await self.store.heartbeat(self.node, self.lease_seconds, self._describe())
            renewed = await self.store.renew(self.node, [Lease(s, e) for s, e in self.owned.items()],
                                             self.lease_seconds)
        except StoreError as exc:
            log.warning("Shards: renewal failed (%s); %d shards kept until their leases run out",
                        exc, len(self.owned))
            await self._expire_if_past_deadline()
            self._renewal_outcome()
            self._next_round = trio.current_time() + self.interval   # a pause after a failed (maybe slow) try
            return
        if self.owned and trio.current_time() >= self._deadline:
            self.late_renewals += 1
            log.warning("Shards: renewal came back %.1fs after the local deadline (a busy process or store); "
                        "writes and sends waited for it", trio.current_time() - self._deadline)
        self._deadline = sent + self.lease_seconds * 0.9   # a margin for the store's clock step
        kept = {lease.shard: lease.epoch for lease in renewed}
        lost = sorted(set(self.owned) - set(kept))
        self.owned = {s: e for s, e in self.owned.items() if kept.get(s) == e}   # not what lose() dropped meanwhile
        self._renewal_outcome()
        self.lost += len(lost)
        if lost:
            log.warning("Shards: %d leases lost (taken over): %s", len(lost), _span(lost))
            await self._on_lost(lost)
        try:
            await self._balance(takeover)
            await self._watch_expiry()
        except StoreError as exc:
            log.warning("Shards: balancing failed (%s); retried in %.1fs", exc, self.interval)
            self._next_round = trio.current_time() + self.interval

    def _renewal_outcome(self) -> None:
        """Wake the writes and sends waiting in ``confirm`` (owned and the deadline are up to date)."""
        self._renewed.set()
        self._renewed = trio.Event()

    async def _watch_expiry(self) -> None:
        """Start the next round right after another node's lease runs out, when that comes before
        the regular round: a dead node's shards are then taken within the lease."""
        left = await self.store.next_expiry(self.node)
        if left is not None and (wake := trio.current_time() + left + EXPIRY_MARGIN) < self._next_round:
            self._next_round, self._expiry_round = wake, True

    async def _expire_if_past_deadline(self) -> None:
        if self.owned and trio.current_time() >= self._deadline:
            lost = sorted(self.owned)
            self.owned = {}
            self.lost += len(lost)
            log.warning("Shards: leases ran out without renewal; %d shards dropped", len(lost))
            await self._on_lost(lost)

    async def _balance(self, takeover: bool = False) -> None:
        """Acquire toward the fair share (everything it needs in a ``takeover`` round, else at most
        ``max_acquire``) or hand the excess back."""
        target = fair_share(self.node, self.live, self.shards)
        if len(self.owned) < target:
            wanted = [s for s in range(self.shards) if s not in self.owned]
            needed = target - len(self.owned)
            gained = await self.store.acquire(self.node, wanted, self.lease_seconds,
                                              needed if takeover else min(needed, self.max_acquire))
            if gained:
                self.owned.update({lease.shard: lease.epoch for lease in gained})
                self.acquired += len(gained)
                self._count_takeovers(gained)
                log.info("Shards: acquired %d (%s), own %d of %d (fair share %d among %d nodes)",
                         len(gained), _span(sorted(g.shard for g in gained)), len(self.owned), self.shards,
                         target, len(self.live) or 1)
                await self._on_gained(sorted(lease.shard for lease in gained))
        elif len(self.owned) > target:
            excess = sorted(self.owned)[target:]
            await self.hand_back(excess)

    def _count_takeovers(self, gained: Sequence[Lease]) -> None:
        previous: dict[str, int] = {}
        for lease in gained:
            if lease.taken_from is not None:
                previous[lease.taken_from] = previous.get(lease.taken_from, 0) + 1
        for node, count in sorted(previous.items()):
            self.taken_over += count
            log.warning("Shards: took over %d shards from %s (its leases ran out)", count, node)

    async def hand_back(self, shards: Sequence[int]) -> None:
        """Finish the shards' work (``on_release``), then release their leases."""
        shards = [s for s in shards if s in self.owned]
        if not shards:
            return
        await self._on_release(list(shards))
        leases = [Lease(s, self.owned.pop(s)) for s in shards if s in self.owned]
        await self.store.release(self.node, leases)
        self.handed_back += len(leases)
        log.info("Shards: handed back %d (%s), own %d", len(leases), _span(shards), len(self.owned))

    async def leave(self) -> None:
        """Hand every shard back and remove this node's heartbeat (SIGTERM, after the drain)."""
        self._stopping = True
        await self.hand_back(sorted(self.owned))
        await self.store.leave(self.node)


def _span(shards: Sequence[int]) -> str:
    """A short text for a list of shards in logs."""
    if len(shards) <= 6:
        return ", ".join(map(str, shards))
    return f"{shards[0]}…{shards[-1]}"
