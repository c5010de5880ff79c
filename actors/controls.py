"""What changes a chat outside the customer's turn, in order with its messages.

The admin's commands (pause, resume, reset, and an operator's reply typed in the console), the
supervisors' bookkeeping (the CRM's lead id, the ids Evolution gave our sends) and a person writing
from the business phone (a human takeover, or the keyword that hands the chat back to the bot).
These functions change the conversation state only; the actor commits it and sends the replies.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from .bounds import bounded_entry, truncate
from .inbound import InboundMessage
from .settings import Settings
from .state import OPERATOR, ConversationState

log = logging.getLogger(__name__)
SENT_IDS_KEPT = 50
PAUSED_UNTIL_RESUMED = 253402300799.0   # paused_until for "until resumed" (9999-12-31, finite for JSON)


def remember_sent(state: ConversationState, ids: Iterable[str]) -> None:
    """Keep the newest SENT_IDS_KEPT ids of our sends, so their fromMe echoes are not a person."""
    state.sent_ids.extend(ids)
    del state.sent_ids[:-SENT_IDS_KEPT]


def apply_command(settings: Settings, state: ConversationState, jid: str, command: str, value: Any,
                  now: float) -> str | None:
    """Carry out an admin command or record the CRM's lead id; for ``reply``, the text to send."""
    reply = None
    if command == "pause":
        minutes = settings.conversation.human_takeover_minutes if value is None else float(value)
        state.paused_until = now + minutes * 60 if minutes > 0 else PAUSED_UNTIL_RESUMED
        state.pause_reason = "operator"
    elif command == "resume":
        state.paused_until, state.pause_reason = 0.0, ""
    elif command == "reset":
        state.window.clear()
        state.summary = ""
        state.booking_sent = False
        state.paused_until, state.pause_reason = 0.0, ""
    elif command == "reply":
        reply = _operator_reply(settings, state, jid, str(value), now)
    elif command == "lead":
        state.lead.lead_id = int(value)
    else:
        raise ValueError(f"unknown control command {command!r}")
    if command == "lead":
        log.info("[CRM] lead_id=%s guardado para user_id=%s", value, jid)
    else:
        log.info("Admin %s for %s", command, jid)
    return reply


def _operator_reply(settings: Settings, state: ConversationState, jid: str, text: str, now: float) -> str:
    """An operator's reply typed in the admin console: kept in the window as the operator's, and a
    human takeover (the bot stays silent). The actor sends it behind the bot's earlier replies."""
    state.window.append(bounded_entry(settings, OPERATOR, text, now))
    truncate(settings, state.window)
    state.last_activity = now
    state.paused_until = now + settings.conversation.human_takeover_minutes * 60
    state.pause_reason = "takeover"
    log.info("[TAKEOVER] An operator answered %s from the admin console: the bot is silent for %.0f min",
             jid, settings.conversation.human_takeover_minutes)
    return text


def phone_message(settings: Settings, state: ConversationState, jid: str, message: InboundMessage,
                  now: float) -> None:
    """A fromMe message: our own echo (ignored), the hand-back keyword, or a human taking over."""
    if message.message_id in state.sent_ids:
        return
    if message.text.strip().lower() == settings.conversation.takeover_keyword.lower():
        state.paused_until, state.pause_reason = 0.0, ""
        log.info("[TAKEOVER] Operator handed %s back to the bot", jid)
        return
    state.paused_until = now + settings.conversation.human_takeover_minutes * 60
    state.pause_reason = "takeover"
    state.last_activity = now
    if message.text:
        state.window.append(bounded_entry(settings, OPERATOR, message.text, now))
        truncate(settings, state.window)
    log.info("[TAKEOVER] A person answered %s from the phone: the bot is silent for %.0f min",
             jid, settings.conversation.human_takeover_minutes)
