"""A keyed serial executor: per key, one item at a time in submission order; keys run concurrently.

What a supervisor of per-key jobs needs (e.g. one queue of replies per recipient):
a key's items are handled strictly one after another, different keys do not wait for each other,
and nothing grows without bound. In the style of trio's memory channels, ``submit_nowait`` never
blocks (it raises ``MailboxFull`` when the key's queue is full and ``ExecutorClosed`` after
``close()``), ``run()`` owns the worker tasks in its nursery (a key has a worker only while it has
work), and ``drain()`` waits until every queued item was handled.

At most ``max_keys_in_flight`` keys are being handled at once; the others wait for a slot in FIFO
order (waiting costs nothing but the queued items). An exception from the handler is logged and
counted, and the key's next item is handled: one bad item never stalls the key or the executor.

The actor registry does not use this: an actor's cell outlives its queue (the state stays in
memory until it expires), its slots are reserved before the store commit that precedes delivery,
and it takes batches, requeued at the front after a crash. The per-key queue is the same bounded
``Mailbox`` in both.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

import attrs
import trio

from .mailbox import Mailbox, MailboxFull

__all__ = ["KeyedSerialExecutor", "KeyedStatistics", "ExecutorClosed", "MailboxFull"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
log = logging.getLogger(__name__)


class ExecutorClosed(Exception):
    """``close()`` was called: the executor takes no new items (queued ones are still handled)."""


@attrs.frozen
class KeyedStatistics:
    """A snapshot of the executor."""

    keys: int                 # keys with work queued or in progress
    running: int              # keys whose handler is running now
    waiting: int              # keys waiting for an in-flight slot
    queued: int               # items not yet handed to the handler, all keys
    max_queued: int           # the longest key's queue
    queue_capacity: int       # items queued per key at most
    max_keys_in_flight: int
    handled: int              # items the handler finished (or raised for)
    errors: int               # handler exceptions (each logged)
    closed: bool


class KeyedSerialExecutor(Generic[K, T]):
    """Hands each key's items to ``handler(key, item)`` one at a time, in submission order."""

    def __init__(self, handler: Callable[[K, T], Awaitable[None]], *, queue_capacity: int,
                 max_keys_in_flight: int, name: str) -> None:
        if queue_capacity < 1 or max_keys_in_flight < 1:
            raise ValueError("queue_capacity and max_keys_in_flight must be at least 1")
        self._handler = handler
        self._capacity = queue_capacity
        self._max_in_flight = max_keys_in_flight
        self._slots = trio.CapacityLimiter(max_keys_in_flight)
        self._name = name
        self._queues: dict[K, Mailbox[T]] = {}
        self._running: set[K] = set()
        self._nursery: trio.Nursery | None = None
        self._idle: trio.Event | None = None
        self._key_done: trio.Event | None = None   # set (and replaced) whenever a key's work is all done
        self._closed = False
        self._handled = 0
        self._errors = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the workers until cancelled; items submitted before this started are handled now."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for key in list(self._queues):
                nursery.start_soon(self._worker, key, name=f"{self._name}:{key}")
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def submit_nowait(self, key: K, item: T) -> None:
        """Queue ``item`` behind the key's earlier items; never blocks.

        Raises ``MailboxFull`` when the key already has ``queue_capacity`` items waiting, and
        ``ExecutorClosed`` after ``close()``."""
        if self._closed:
            raise ExecutorClosed()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = Mailbox(self._capacity)
            if self._nursery is not None:
                self._nursery.start_soon(self._worker, key, name=f"{self._name}:{key}")
        queue.put_nowait(item)

    def close(self) -> None:
        """Refuse new items from now on; what is queued is still handled (``drain()`` waits for it)."""
        self._closed = True

    async def drain(self) -> None:
        """Wait until no key has work queued or in progress (bound it with a cancel scope)."""
        while self._queues:
            self._idle = trio.Event()
            await self._idle.wait()

    async def drain_where(self, wanted: Callable[[K], bool]) -> None:
        """Wait until no key ``wanted`` accepts has work queued or in progress, items submitted
        meanwhile included (bound it with a cancel scope)."""
        while any(wanted(key) for key in self._queues):
            if self._key_done is None:
                self._key_done = trio.Event()
            await self._key_done.wait()

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` has work queued or in progress."""
        return key in self._queues

    def queued(self, key: K) -> int:
        """Items of ``key`` not yet handed to the handler."""
        queue = self._queues.get(key)
        return len(queue) if queue is not None else 0

    def statistics(self) -> KeyedStatistics:
        depths = [len(queue) for queue in self._queues.values()]
        return KeyedStatistics(
            keys=len(self._queues),
            running=len(self._running),
            waiting=self._slots.statistics().tasks_waiting,
            queued=sum(depths),
            max_queued=max(depths, default=0),
            queue_capacity=self._capacity,
            max_keys_in_flight=self._max_in_flight,
            handled=self._handled,
            errors=self._errors,
            closed=self._closed,
        )

    async def _worker(self, key: K) -> None:
        queue = self._queues[key]
        async with self._slots:
            self._running.add(key)
            try:
                while (item := queue.take()) is not None:
                    try:
                        await self._handler(key, item)
                    except Exception:   # one bad item must not stall the key's later items
                        self._errors += 1
                        log.exception("%s: handling an item for %s failed; going on with the next", self._name, key)
                    self._handled += 1
                # No checkpoint since the queue was found empty: a submit cannot slip in between.
                del self._queues[key]
            finally:
                self._running.discard(key)
        if self._key_done is not None:
            self._key_done.set()
            self._key_done = None
        if not self._queues and self._idle is not None:
            self._idle.set()
