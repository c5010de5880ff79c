"""What a chat's inbox row carries: a customer's message, or an admin command.

With several nodes (runtime/shards.py) only the owner of a chat runs its actor, and the chat's
inbox is the one queue every node can append to in order: an admin command given on any node
(pause, resume, reset, reply, summary) is stored there as a row of its own, after every message
accepted before it, and the owner hands it to the actor in sequence order like a message. The
actor acks the row with the command's commit (actors/conversation.py ``Control.seq``).
"""

from __future__ import annotations

from typing import Any

from runtime.store import InboxRow

from .conversation import Accepted, Control, Mail
from .inbound import InboundMessage

CONTROL_FIELD = "control"   # an inbox payload with it is an admin command; a message never has it


def control_payload(command: str, value: Any) -> dict[str, Any]:
    """The inbox payload of an admin command (``value`` must be JSON: minutes, a text or None)."""
    return {CONTROL_FIELD: command, "value": value}


def mail_of(row: InboxRow, arrived: float, orders: dict[tuple[str, int], Control]) -> Mail:
    """The mail ``row`` stands for: a command (the very order an admin request on this node is
    waiting for, when it is in ``orders``) or the accepted message."""
    payload = row.payload
    if CONTROL_FIELD in payload:
        waiting = orders.pop((row.key, row.seq), None)
        return waiting if waiting is not None else Control(str(payload[CONTROL_FIELD]), payload.get("value"),
                                                           seq=row.seq)
    return Accepted(row.seq, InboundMessage(**payload), arrived)
