"""The registry: spawns one actor per key on first use, routes messages, supervises and expires them.

Virtual-actor style: ``deliver(key, msg)`` creates the actor if needed. An actor's task runs
only while its mailbox has messages and exits when it is empty, so an idle actor is just
its state, which ``Actor.hibernate()`` compacts when the task ends. Crashes are supervised
Erlang-style: at most ``intensity`` crashes within ``period`` seconds; past that the actor is
stopped ("failed") for ``period`` seconds, and what arrives meanwhile is answered through
``Actor.on_crash`` instead of being lost.
"""

from __future__ import annotations

import logging

from typing import Awaitable, Callable, Generic, Iterator, TypeVar

import attrs
import trio

from .actor import Actor, ActorCell, ActorStatistics, current_actor
from .clock import Clock
from .mailbox import Mailbox, MailboxClosed, MailboxFull

M = TypeVar("M")
log = logging.getLogger("python-agent")

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
        self._nursery: trio.Nursery | None = None
        self._accepting = True
        self._idle = trio.Event()
        self._idle.set()
        self._spawned = 0
        self._expired = 0
        self._crashes = 0

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

    # -- messages ----------------------------------------------------------------------------

    def has_room(self, key: str) -> bool:
        """Whether ``deliver(key, ...)`` would be accepted now."""
        if not self._accepting:
            return False
        cell = self._cells.get(key)
        return cell is None or cell.mailbox.has_room()

    def _cell(self, key: str) -> ActorCell[M]:
        if not self._accepting:
            raise ShuttingDown()
        if self._nursery is None:
            raise RuntimeError("Registry.run() is not running")
        cell = self._cells.get(key)
        if cell is None:
            cell = ActorCell(key=key, actor=self._factory(key), mailbox=Mailbox(self._mailbox_size),
                             last_activity=trio.current_time())
            self._cells[key] = cell
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

    def deliver(self, key: str, message: M, *, reserved: bool = False, force: bool = False) -> None:
        """Queue ``message`` for the actor ``key``, spawning it on first use. Never blocks.

        Raises MailboxFull when its mailbox is at capacity and ShuttingDown during shutdown
        (a reserved slot is delivered even during shutdown: it was accepted before).
        ``force`` ignores the capacity: for re-delivering messages accepted before a restart.
        """
        if reserved:
            cell = self._cells[key]
        else:
            cell = self._cell(key)
        if force:
            cell.mailbox.requeue_back(message)
        else:
            cell.mailbox.put_nowait(message, reserved=reserved)
        cell.last_activity = trio.current_time()
        if not cell.running:
            cell.running = True
            assert self._nursery is not None
            self._nursery.start_soon(self._run_cell, cell, name=f"actor:{key}")

    async def _run_cell(self, cell: ActorCell[M]) -> None:
        current_actor.set(cell.key)  # this task's own context: log lines carry the actor's key
        try:
            while (first := cell.mailbox.take()) is not None:
                batch = [first]
                if self._is_failed(cell):
                    batch.extend(cell.mailbox.take_all())
                    await self._answer_failed(cell, batch, RuntimeError(cell.last_error or "actor stopped"))
                    continue
                try:
                    if not cell.activated:
                        await cell.actor.activate()
                        cell.activated = True
                    delay = cell.actor.batch_delay(first)
                    if delay > 0:
                        await trio.sleep(delay)
                        batch.extend(cell.mailbox.take_all())
                    await cell.actor.handle(batch)
                except Exception as exc:  # supervision: the crash is recorded and answered
                    await self._crashed(cell, batch, exc)
            self._hibernate(cell)
        finally:
            cell.running = False
            if not self._idle.is_set() and not any(c.running for c in self._cells.values()):
                self._idle.set()

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

    async def _crashed(self, cell: ActorCell[M], batch: list[M], error: Exception) -> None:
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
        await self._answer_failed(cell, batch, error)

    async def _answer_failed(self, cell: ActorCell[M], batch: list[M], error: BaseException) -> None:
        try:
            unreached = await cell.actor.on_crash(batch, error)
        except Exception as exc:
            log.exception("Actor %s could not answer a failed turn: %s", cell.key, exc)
            return
        if unreached:
            cell.mailbox.requeue(list(unreached))

    # -- expiry ------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await trio.sleep(self.sweep_interval)
            await self.sweep()

    async def sweep(self) -> list[str]:
        """Expire every actor idle for at least the TTL; returns their keys."""
        now = trio.current_time()
        expired = [
            cell for cell in self._cells.values()
            if not cell.running and not len(cell.mailbox) and not cell.mailbox.reserved
            and now - cell.last_activity >= self._idle_ttl
        ]
        for cell in expired:
            del self._cells[cell.key]
            cell.mailbox.close()
            self._expired += 1
            try:
                await cell.actor.on_expire()
            except Exception as exc:
                log.exception("Actor %s failed to expire cleanly: %s", cell.key, exc)
            log.info("Actor %s expired after %.0fs idle", cell.key, now - cell.last_activity)
        if self._on_idle_sweep is not None:
            await self._on_idle_sweep(self._clock.now() - self._idle_ttl)
        return [cell.key for cell in expired]

    def forget(self, key: str) -> bool:
        """Drop an idle actor without calling on_expire (admin reset). False if it is busy or absent."""
        cell = self._cells.get(key)
        if cell is None or cell.running or len(cell.mailbox) or cell.mailbox.reserved:
            return False
        del self._cells[key]
        cell.mailbox.close()
        return True

    # -- snapshots ---------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self._cells

    def __len__(self) -> int:
        return len(self._cells)

    def keys(self) -> Iterator[str]:
        return iter(list(self._cells))

    def actor(self, key: str) -> Actor[M] | None:
        cell = self._cells.get(key)
        return cell.actor if cell is not None else None

    def actor_statistics(self, key: str) -> ActorStatistics | None:
        cell = self._cells.get(key)
        if cell is None:
            return None
        offset = self._clock.now() - trio.current_time()
        if cell.failed_at is not None and trio.current_time() - cell.failed_at < self._period:
            status = "failed"
        else:
            status = "running" if cell.running else "idle"
        return ActorStatistics(
            key=cell.key,
            status=status,
            mailbox_depth=len(cell.mailbox),
            mailbox_capacity=self._mailbox_size,
            last_activity=offset + cell.last_activity,
            expires_at=offset + cell.last_activity + self._idle_ttl,
            crashes=cell.crashes,
            last_error=cell.last_error,
            state=cell.actor.snapshot(),
        )

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
        )


