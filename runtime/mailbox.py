"""A bounded FIFO mailbox for one actor.

Like trio's memory channels it has a non-blocking twin (``put_nowait`` raises ``MailboxFull``)
and explicit closing (``MailboxClosed``), but it also lets its owner take everything queued
at once (``take_all``), which an actor uses to handle a burst as one batch.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class MailboxFull(Exception):
    """The mailbox holds ``capacity`` items; the sender should retry later."""


class MailboxClosed(Exception):
    """The mailbox was closed (its actor stopped); nothing more can be put in it."""


class Mailbox(Generic[T]):
    """Bounded FIFO. Only the owning actor takes from it, one item (or one batch) at a time."""

    __slots__ = ("_items", "_capacity", "_closed", "_reserved")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._items: deque[T] | None = None   # allocated while non-empty: an idle actor keeps no deque
        self._capacity = capacity
        self._closed = False
        self._reserved = 0

    def put_nowait(self, item: T, *, reserved: bool = False) -> None:
        """Append ``item``. Raises MailboxClosed after ``close()``, MailboxFull at capacity.

        ``reserved=True`` uses a slot taken earlier with ``reserve()`` (it cannot be full).
        """
        if self._closed:
            raise MailboxClosed()
        if reserved:
            self._reserved -= 1
        elif not self.has_room():
            raise MailboxFull()
        self._queue().append(item)

    def reserve(self) -> None:
        """Hold one slot for a ``put_nowait(..., reserved=True)`` that will follow an await.

        Raises MailboxFull or MailboxClosed like ``put_nowait``; undo with ``release()``.
        """
        if self._closed:
            raise MailboxClosed()
        if not self.has_room():
            raise MailboxFull()
        self._reserved += 1

    def release(self) -> None:
        """Give back a slot taken with ``reserve()`` that will not be used."""
        self._reserved -= 1

    def has_room(self) -> bool:
        return not self._closed and len(self) + self._reserved < self._capacity

    def _queue(self) -> deque[T]:
        if self._items is None:
            self._items = deque()
        return self._items

    def requeue(self, items: list[T]) -> None:
        """Put ``items`` back at the front, in order (they were already counted; capacity is not checked)."""
        self._queue().extendleft(reversed(items))

    def requeue_back(self, item: T) -> None:
        """Append ``item`` without checking capacity (messages accepted before a restart)."""
        if self._closed:
            raise MailboxClosed()
        self._queue().append(item)

    def take(self) -> T | None:
        """The oldest item, or None when empty."""
        if not self._items:
            return None
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    def take_all(self) -> list[T]:
        """Every queued item, oldest first."""
        items = list(self._items) if self._items else []
        self._items = None
        return items

    def close(self) -> list[T]:
        """Refuse further puts; returns what was still queued (the caller decides its fate)."""
        self._closed = True
        return self.take_all()

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else 0

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def closed(self) -> bool:
        return self._closed
