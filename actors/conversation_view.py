"""A frozen view of one chat's conversation, which the admin endpoints serialise.

Built by ``Service.conversation`` from the live actor's state or, for a chat that is not live,
from the store; the HTTP surface and the console's JSON builders read it instead of the actor or
the state's stored form.
"""

from __future__ import annotations

from typing import Any

import attrs

from runtime.actor import ActorStatistics

from .state import ConversationState, LeadInfo, WindowEntry, seed_messages

_NOT_STATE = ("jid", "live", "actor", "window")   # the view's own fields, besides the state's


@attrs.frozen
class ConversationView:
    """One chat's conversation state, whether ``live`` (an actor holds it) or only stored.

    ``actor`` is what the registry knows of a live chat's actor (status, mailbox, expiry, crashes,
    last error; its ``state`` is the actor's ConversationSnapshot), None for a stored one."""

    jid: str
    live: bool
    actor: ActorStatistics | None
    window: tuple[WindowEntry, ...]
    booking_sent: bool
    lead: LeadInfo            # the view's own copy
    last_activity: float
    messages_in: int
    replies_out: int
    ignored: int
    crashes: int
    paused_until: float
    llm_calls: tuple[float, ...]
    flood_noticed_at: float
    sent_ids: tuple[str, ...]
    pause_reason: str
    instance: str
    instances: tuple[str, ...]
    summary: str = ""

    @classmethod
    def of(cls, jid: str, state: ConversationState, *, live: bool,
           actor: ActorStatistics | None = None) -> "ConversationView":
        return cls(
            jid=jid, live=live, actor=actor, window=tuple(state.window), booking_sent=state.booking_sent,
            lead=attrs.evolve(state.lead), last_activity=state.last_activity, messages_in=state.messages_in,
            replies_out=state.replies_out, ignored=state.ignored, crashes=state.crashes,
            paused_until=state.paused_until, llm_calls=tuple(state.llm_calls),
            flood_noticed_at=state.flood_noticed_at, sent_ids=tuple(state.sent_ids),
            pause_reason=state.pause_reason, instance=state.instance, instances=tuple(state.instances),
            summary=state.summary,
        )

    @property
    def window_size(self) -> int:
        return len(self.window)

    def seed_messages(self) -> list[dict[str, str]]:
        """The window in the seed's ``/memory/{jid}`` shape (role, content)."""
        return seed_messages(self.window)

    def timed_messages(self) -> list[dict[str, Any]]:
        """The window in the seed's shape plus each message's time and whether a person wrote it."""
        return [dict(m, at=e.at, human=e.human) for m, e in zip(self.seed_messages(), self.window)]

    def state_fields(self) -> dict[str, Any]:
        """Every field of the state but its window, as JSON-able values (lists for the tuples)."""
        fields = attrs.asdict(self, filter=lambda field, _: field.name not in _NOT_STATE)
        return {name: list(value) if isinstance(value, tuple) else value for name, value in fields.items()}
