"""How much of a chat its state keeps: each message cut to MAX_MESSAGE_CHARS, the window to the
newest MAX_MESSAGES within MAX_WINDOW_CHARS, so a chat's stored state stays bounded whatever
customers (or the model) send. The replies themselves are sent whole."""

from __future__ import annotations

import logging

from .settings import Settings
from .state import Window, WindowEntry

log = logging.getLogger(__name__)


def trim(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when it was cut (for quotes and previews)."""
    return text if len(text) <= limit else text[:limit] + "…"


def bounded_entry(settings: Settings, role: str, text: str, at: float) -> WindowEntry:
    """A window entry, its text cut to MAX_MESSAGE_CHARS."""
    limit = settings.conversation.max_message_chars
    if len(text) > limit:
        log.info("Truncated a %s message kept in memory: %d → %d characters", role, len(text), limit)
        text = text[:limit]
    return WindowEntry(role, text, at)


def truncate(settings: Settings, window: Window) -> None:
    """Keep the newest MAX_MESSAGES messages, and fewer while they exceed MAX_WINDOW_CHARS. With
    MEMORY_SUMMARY the summary fold shrinks the window (actors/memory_summary.py): it may hold another
    SUMMARY_CHUNK messages while a fold is under way or failed, and only past that are they cut."""
    conversation = settings.conversation
    limit = conversation.max_messages + (conversation.summary_chunk if conversation.memory_summary else 0)
    before = len(window)
    if before > limit:
        del window[: before - limit]
    budget = settings.conversation.max_window_chars
    sizes = [len(e.content) for e in window]
    total, cut = sum(sizes), 0
    while total > budget and cut < len(sizes) - 1:
        total -= sizes[cut]
        cut += 1
    if cut:
        del window[:cut]
    if len(window) < before:
        log.info("Truncated memory: %d → %d messages", before, len(window))
