"""The registry: spawns one actor per key on first use, routes messages, supervises and expires them.

Virtual-actor style: ``deliver(key, msg)`` creates the actor if needed. An actor's task runs
only while its mailbox has messages and exits when it is empty, so an idle actor is just
its state, which ``Actor.hibernate()`` compacts when the task ends. Crashes are supervised
Erlang-style: at most ``intensity`` crashes within ``period`` seconds; past that the actor is
stopped ("failed") for ``period`` seconds, and what arrives meanwhile is answered through
``Actor.on_crash`` instead of being lost. Messages a crash hands back because they could not be
handled at all (the actor failed to activate, or ``on_crash`` itself raised) are retried after a
backoff that grows with the recent crashes, so a broken store never becomes a busy loop.

Expiry removes a cell only after checking again, with no await in between, that it is still idle,
empty and unreserved; the durable state is then deleted by ``on_idle_sweep`` (the store deletes only
what is still idle at that moment), never by a per-actor call that could race a new message.
"""

from __future__ import annotations

import bisect
import logging
from typing import Awaitable, Callable, Collection, Generic, Iterator, Sequence, TypeVar

import attrs
import trio

from .actor import Actor, ActorCell, ActorStatistics, current_actor
from .clock import Clock
from .mailbox import Mailbox, MailboxClosed, MailboxFull

M = TypeVar("M")
log = logging.getLogger(__name__)

RETRY_BASE_SECONDS = 1.0   # first retry of messages a crash could not handle; doubles per recent crash

__all__ = ["Registry", "MailboxFull", "MailboxClosed", "ShuttingDown", "RegistryStatistics"]


class ShuttingDown(Exception):
    """The registry no longer accepts messages (graceful shutdown in progress)."""


@attrs.frozen
class RegistryStatistics:
    live_actors: int
    running_actors: int
    failed_actors: int
    mailbox_depth_total: int
    mailbox_depth_max: int
    spawned: int
    expired: int
    crashes: int
    accepting: bool
    sweep_failures: int


class Registry(Generic[M]):
    """Owns every actor task (in its own nursery) and the idle-expiry sweeper."""

    def __init__(
        self,
        factory: Callable[[str], Actor[M]],
        *,
        clock: Clock,
        mailbox_size: int,
        idle_ttl: float,
        intensity: int,
        period: float,
        on_idle_sweep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self._factory = factory
        self._clock = clock
        self._mailbox_size = mailbox_size
        self._idle_ttl = idle_ttl
        self._intensity = intensity
        self._period = period
        self._on_idle_sweep = on_idle_sweep
        self._cells: dict[str, ActorCell[M]] = {}
        self._sorted: list[str] = []     # the live keys in order, for paged listings
        self._nursery: trio.Nursery | None = None
        self._accepting = True
        self._idle = trio.Event()
        self._idle.set()
        self._cell_done = trio.Event()   # set (and replaced) whenever an actor's task ends
        self._spawned = 0
        self._expired = 0
        self._crashes = 0
        self._sweep_failures = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the actors' nursery and the sweeper until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._sweep_forever)
            task_status.started()
            await trio.sleep_forever()

    @property
    def sweep_interval(self) -> float:
        """The sweeper looks at least every min(60 s, TTL)."""
        return min(60.0, self._idle_ttl)

    async def drain(self) -> None:
        """Stop accepting messages and wait until no actor is running (bound it with a cancel scope)."""
        self._accepting = False
        while any(cell.running or len(cell.mailbox) for cell in self._cells.values()):
            self._idle = trio.Event()
            await self._idle.wait()

    async def drain_keys(self, keys: Collection[str]) -> None:
        """Wait until none of ``keys``' actors is running or has mail (bound it with a cancel scope);
        the caller stops sending them messages first. Others keep running."""
        wanted = set(keys)
        while any((cell := self._cells.get(key)) is not None and (cell.running or len(cell.mailbox))
                  for key in wanted):
            await self._cell_done.wait()

    def stop(self, keys: Collection[str]) -> list[str]:
        """Remove ``keys``' actors at once: a turn in flight is cancelled at its next checkpoint
        (nothing of it is committed by the runtime), queued mail is dropped. The keys that were
        live. A later message spawns a fresh actor (which loads the stored state)."""
        stopped = []
        for key in keys:
            cell = self._cells.pop(key, None)
            if cell is None:
                continue
            index = bisect.bisect_left(self._sorted, key)
            if index < len(self._sorted) and self._sorted[index] == key:
                del self._sorted[index]
            cell.mailbox.close()
            if cell.scope is not None:
                cell.scope.cancel()
            stopped.append(key)
        return stopped

    # -- messages ----------------------------------------------------------------------------

    def _cell(self, key: str, *, force: bool = False) -> ActorCell[M]:
        if not self._accepting and not force:
            raise ShuttingDown()
        if self._nursery is None:
            raise RuntimeError("Registry.run() is not running")
        cell = self._cells.get(key)
        if cell is None:
            cell = ActorCell(key=key, actor=self._factory(key), mailbox=Mailbox(self._mailbox_size),
                             last_activity=trio.current_time())
            self._cells[key] = cell
            bisect.insort(self._sorted, key)
            self._spawned += 1
        return cell

    def reserve(self, key: str) -> None:
        """Hold a mailbox slot for ``key`` (spawning the actor) before an await, e.g. a store commit.

        Follow with ``deliver(key, msg, reserved=True)`` or ``release(key)``.
        Raises MailboxFull or ShuttingDown.
        """
        self._cell(key).mailbox.reserve()

    def release(self, key: str) -> None:
        """Give back a slot taken with ``reserve()``."""
        cell = self._cells.get(key)
        if cell is not None:
            cell.mailbox.release()

    def deliver(self, key: str, message: M, *, reserved: bool = False, force: bool = False,
                touch: bool = True) -> None:
        """Queue ``message`` for the actor ``key``, spawning it on first use. Never blocks.

        Raises MailboxFull when its mailbox is at capacity and ShuttingDown during shutdown
        (a reserved slot is delivered even during shutdown: it was accepted before).
        ``force`` ignores the capacity and the shutdown: for messages the system already owes the
        actor (accepted before a restart, or internal bookkeeping such as a CRM lead id), which a
        drain waits for. ``touch=False`` leaves the idle clock alone (internal bookkeeping is not
        activity).
        """
        if reserved:
            cell = self._cells[key]   # a reserved cell is never expired (see sweep)
        else:
            cell = self._cell(key, force=force)
        if force:
            cell.mailbox.requeue_back(message)
        else:
            cell.mailbox.put_nowait(message, reserved=reserved)
        if touch:
            cell.last_activity = trio.current_time()
        if not cell.running:
            cell.running = True
            cell.scope = trio.CancelScope()
            assert self._nursery is not None
            self._nursery.start_soon(self._run_cell, cell, name=f"actor:{key}")

    async def _run_cell(self, cell: ActorCell[M]) -> None:
        current_actor.set(cell.key)  # this task's own context: log lines carry the actor's key
        assert cell.scope is not None
        try:
            with cell.scope:
                await self._work(cell)
        finally:
            cell.running = False
            cell.scope = None
            self._cell_done.set()
            self._cell_done = trio.Event()
            if not self._idle.is_set() and not any(c.running for c in self._cells.values()):
                self._idle.set()

    async def _work(self, cell: ActorCell[M]) -> None:
        """The actor's task: batches until the mailbox is empty, then hibernate."""
        if cell.mailbox.closed:   # stopped before its task started
            return
        while not cell.mailbox.closed and (first := cell.mailbox.take()) is not None:
            batch = [first]
            if self._is_failed(cell):
                batch.extend(cell.mailbox.take_all())
                unreached, _ = await self._answer_failed(
                    cell, batch, RuntimeError(cell.last_error or "actor stopped"))
                later = True   # a stopped actor handing messages back retries them after a backoff
            else:
                unreached, later = await self._run_batch(cell, batch)
            if unreached:
                cell.mailbox.requeue(list(unreached))
                if later:
                    await trio.sleep(self._retry_delay(cell))
        self._hibernate(cell)

    async def _run_batch(self, cell: ActorCell[M], batch: list[M]) -> tuple[Sequence[M], bool]:
        """Activate if needed, wait the actor's batch delay, then hand it everything queued.

        Everything queued by then goes into the batch, not only what arrived during the delay:
        messages that waited behind a running turn are ordered by the actor like a first batch.
        Returns what to put back in the mailbox, and whether to wait before retrying it.
        """
        try:
            if not cell.activated:
                await cell.actor.activate()
                cell.activated = True
            delay = cell.actor.batch_delay(batch[0])
            if delay > 0:
                await trio.sleep(delay)
            batch.extend(cell.mailbox.take_all())
            await cell.actor.handle(batch)
        except Exception as exc:  # supervision: the crash is recorded and answered
            activating = not cell.activated
            unreached, later = await self._crashed(cell, batch, exc)
            return unreached, later or activating
        return (), False

    def _retry_delay(self, cell: ActorCell[M]) -> float:
        """Seconds before retrying messages a crash could not handle: doubles per recent crash."""
        recent = max(1, len(cell.crash_times))
        return min(self._period, RETRY_BASE_SECONDS * 2 ** min(recent - 1, 16))

    def _hibernate(self, cell: ActorCell[M]) -> None:
        try:
            cell.actor.hibernate()
        except Exception as exc:  # the actor stays live and uncompacted; its state is intact
            log.exception("Actor %s could not hibernate: %s", cell.key, exc)

    def _is_failed(self, cell: ActorCell[M]) -> bool:
        if cell.failed_at is None:
            return False
        if trio.current_time() - cell.failed_at >= self._period:
            log.info("Actor %s restarted after its failure period", cell.key)
            cell.failed_at = None
            cell.crash_times.clear()
            cell.activated = False
            return False
        return True

    async def _crashed(self, cell: ActorCell[M], batch: list[M], error: Exception) -> tuple[Sequence[M], bool]:
        now = trio.current_time()
        self._crashes += 1
        cell.crashes += 1
        cell.last_error = f"{type(error).__name__}: {error}"[:300]
        cell.crash_times.append(now)
        cell.crash_times[:] = [t for t in cell.crash_times if now - t <= self._period]
        log.error("Actor %s crashed handling a message (%d in %.0fs): %s", cell.key,
                  len(cell.crash_times), self._period, cell.last_error, exc_info=error)
        if len(cell.crash_times) > self._intensity:
            cell.failed_at = now
            log.error("Actor %s stopped: more than %d crashes in %.0fs", cell.key, self._intensity, self._period)
        return await self._answer_failed(cell, batch, error)

    async def _answer_failed(self, cell: ActorCell[M], batch: list[M],
                             error: BaseException) -> tuple[Sequence[M], bool]:
        """Let the actor answer a failed batch; (messages to requeue, whether to wait first).

        If ``on_crash`` raises, nothing of the batch was answered: all of it is retried later."""
        try:
            return await cell.actor.on_crash(batch, error), False
        except Exception as exc:
            log.exception("Actor %s could not answer a failed turn (%d messages retried later): %s",
                          cell.key, len(batch), exc)
            return batch, True

    # -- expiry ------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await trio.sleep(self.sweep_interval)
            try:
                await self.sweep()
            except Exception as exc:  # e.g. a StoreError: what was not deleted is retried next sweep
                self._sweep_failures += 1
                log.error("Idle sweep failed (retried in %.0fs): %s", self.sweep_interval, exc)

    def _expirable(self, cell: ActorCell[M], now: float) -> bool:
        return (not cell.running and not len(cell.mailbox) and not cell.mailbox.reserved
                and now - cell.last_activity >= self._idle_ttl)

    async def sweep(self) -> list[str]:
        """Expire every actor idle for at least the TTL; returns their keys.

        Cells are removed without an await between the idleness check and the removal, so a message
        arriving meanwhile either keeps its cell or spawns a fresh one; then ``on_idle_sweep``
        deletes the durable state of whatever is still idle (and not live) at that point.
        """
        now = trio.current_time()
        expired = []
        for cell in [c for c in self._cells.values() if self._expirable(c, now)]:
            if self._cells.get(cell.key) is not cell or not self._expirable(cell, now):
                continue
            del self._cells[cell.key]
            index = bisect.bisect_left(self._sorted, cell.key)
            if index < len(self._sorted) and self._sorted[index] == cell.key:
                del self._sorted[index]
            cell.mailbox.close()
            self._expired += 1
            expired.append(cell)
            log.info("Actor %s expired after %.0fs idle", cell.key, now - cell.last_activity)
        if self._on_idle_sweep is not None:
            await self._on_idle_sweep(self._clock.now() - self._idle_ttl)
        return [cell.key for cell in expired]

    # -- snapshots ---------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self._cells

    def __len__(self) -> int:
        return len(self._cells)

    def keys(self) -> Iterator[str]:
        return iter(list(self._cells))

    def page(self, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` live keys after ``after`` in key order (O(log n + limit): paged listings)."""
        start = bisect.bisect_right(self._sorted, after) if after is not None else 0
        return self._sorted[start:start + max(0, limit)]

    def actor(self, key: str) -> Actor[M] | None:
        cell = self._cells.get(key)
        return cell.actor if cell is not None else None

    def actor_statistics(self, key: str) -> ActorStatistics | None:
        cell = self._cells.get(key)
        if cell is None:
            return None
        offset = self._clock.now() - trio.current_time()
        return ActorStatistics(
            key=cell.key,
            status=self._status(cell, trio.current_time()),
            mailbox_depth=len(cell.mailbox),
            mailbox_capacity=self._mailbox_size,
            last_activity=offset + cell.last_activity,
            expires_at=offset + cell.last_activity + self._idle_ttl,
            crashes=cell.crashes,
            last_error=cell.last_error,
            state=cell.actor.snapshot(),
        )

    def _status(self, cell: ActorCell[M], now: float) -> str:
        if cell.failed_at is not None and now - cell.failed_at < self._period:
            return "failed"
        return "running" if cell.running else "idle"

    def keys_with_status(self, status: str) -> list[str]:
        """The live keys whose status (idle | running | failed, as in ``actor_statistics``) is
        ``status``, without building each actor's snapshot (a filter over many actors stays cheap)."""
        now = trio.current_time()
        return [key for key, cell in self._cells.items() if self._status(cell, now) == status]

    def statistics(self) -> RegistryStatistics:
        depths = [len(cell.mailbox) for cell in self._cells.values()]
        return RegistryStatistics(
            live_actors=len(self._cells),
            running_actors=sum(1 for c in self._cells.values() if c.running),
            failed_actors=sum(1 for c in self._cells.values() if c.failed_at is not None
                              and trio.current_time() - c.failed_at < self._period),
            mailbox_depth_total=sum(depths),
            mailbox_depth_max=max(depths, default=0),
            spawned=self._spawned,
            expired=self._expired,
            crashes=self._crashes,
            accepting=self._accepting,
            sweep_failures=self._sweep_failures,
        )


