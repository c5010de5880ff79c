"""The actor protocol and the cell that runs one actor: mailbox, one task at a time, supervision."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Generic, Protocol, Sequence, TypeVar

import attrs
import trio

from .mailbox import Mailbox

M = TypeVar("M")

#: The key of the actor whose task is running (None outside actors). Tasks spawned from an actor's
#: task (e.g. its outbound deliveries) inherit it; the log setup stamps it on every record.
current_actor: ContextVar[str | None] = ContextVar("current_actor", default=None)


class Actor(Protocol[M]):
    """Behaviour of one actor. The runtime calls these one at a time, never concurrently."""

    async def activate(self) -> None:
        """Load state before the first batch (lazily, on the first message after spawn)."""

    def batch_delay(self, first: M) -> float:
        """Seconds to wait after ``first`` for more messages to handle with it (0: none)."""

    async def handle(self, batch: Sequence[M]) -> None:
        """Handle one batch (usually one message). An exception is a crash."""

    async def on_crash(self, batch: Sequence[M], error: BaseException) -> Sequence[M]:
        """Answer the messages whose turn raised (or the whole batch while the actor is failed).

        Returns the messages of ``batch`` to handle again: the runtime puts them back at the front
        of the mailbox (at once, or after a backoff when the crash happened while activating). If
        it raises, the whole batch is put back and retried after a backoff.
        """

    def hibernate(self) -> None:
        """The mailbox is empty and the actor's task ends: compact the state until the next message."""

    def snapshot(self) -> Any:
        """A frozen view of the actor's domain state, for admin endpoints."""


@attrs.frozen
class ActorStatistics:
    """What the runtime knows of one actor, plus the actor's own snapshot (``state``)."""

    key: str
    status: str               # idle | running | failed
    mailbox_depth: int
    mailbox_capacity: int
    last_activity: float      # unix seconds
    expires_at: float         # unix seconds
    crashes: int
    last_error: str | None
    state: Any


@attrs.define(slots=True)
class ActorCell(Generic[M]):
    """Runtime bookkeeping for one live actor."""

    key: str
    actor: Actor[M]
    mailbox: Mailbox[M]
    last_activity: float               # trio time of the last inbound message
    running: bool = False
    activated: bool = False
    failed_at: float | None = None     # trio time the actor was stopped for crashing too often
    crash_times: list[float] = attrs.Factory(list)   # recent crashes, within the restart period
    crashes: int = 0
    last_error: str | None = None
    scope: trio.CancelScope | None = None   # the running task's, so ``Registry.stop`` can end it at once
