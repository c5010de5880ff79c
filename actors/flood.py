"""Flood control: at most FLOOD_MAX_PER_MINUTE LLM calls per chat in any minute (0: no limit).

Beyond the limit a message is not sent to the LLM, and the customer is told so at most once a minute.
"""

from __future__ import annotations

import enum
import logging

from .state import ConversationState

log = logging.getLogger(__name__)


class Flood(enum.Enum):
    ASK = "ask"          # within the limit: the call is counted
    SILENT = "silent"    # beyond it, the customer was told less than a minute ago
    NOTICE = "notice"    # beyond it: tell the customer (the notice is counted)


def flood_check(state: ConversationState, now: float, limit: int, jid: str) -> Flood:
    """Whether this turn of ``jid`` may call the LLM now."""
    if not limit:
        return Flood.ASK
    calls = state.llm_calls
    calls[:] = [t for t in calls if now - t < 60.0]
    if len(calls) < limit:
        calls.append(now)
        return Flood.ASK
    log.warning("Flood control: %s sent more than %d messages in a minute; not sent to the LLM", jid, limit)
    if now - state.flood_noticed_at >= 60.0:
        state.flood_noticed_at = now
        return Flood.NOTICE
    return Flood.SILENT
