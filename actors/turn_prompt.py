"""The prompt of one turn, ordered for the providers' prefix caches: the system prompt, the chat's
summary (MEMORY_SUMMARY), then the chat's history oldest first with the new text (and its images) last.

The history holds at most MAX_MESSAGES messages within PROMPT_MAX_CHARS (less the system prompt and
summary); the customer's new text is last, verbatim, cut only when it alone exceeds that budget, so
a huge chat can never make a huge prompt. A merged turn (DEBOUNCE_SECONDS) is one user message. With
MEMORY_SUMMARY the whole window is sent (it is trimmed in SUMMARY_CHUNK steps by the summary fold,
so its start stays the same for many turns); without it, the newest MAX_MESSAGES.
"""

from __future__ import annotations

import logging
from typing import Sequence

from .bounds import trim
from .inbound import InboundMessage
from .media import vision_providers
from .llm.base import ChatMessage, ImagePart, Prompt
from .settings import Settings
from .state import USER, Window

log = logging.getLogger(__name__)
MIN_PROMPT_MESSAGE_CHARS = 1000   # the newest message keeps at least this much, however long the system prompt


def build_prompt(settings: Settings, system: str, window: Window, messages: Sequence[InboundMessage], *,
                 images: tuple[ImagePart, ...] = (), summary: str = "", cache_key: str = "") -> Prompt:
    """The prompt for the turn of ``messages``, whose texts are the newest entries of ``window``;
    ``images`` go with the new text; ``summary`` is the chat's running summary (already headed)."""
    limit = len(window) if settings.conversation.memory_summary else settings.conversation.max_messages
    history = [ChatMessage(e.model_role, e.content) for e in window[-limit:]]
    history[-1] = ChatMessage(USER, model_text(messages), images)
    for _ in range(min(len(messages), len(history)) - 1):  # merged turn: one user message for all
        history.pop(-2)
    budget = max(settings.conversation.prompt_max_chars - len(system) - len(summary), MIN_PROMPT_MESSAGE_CHARS)
    vision = vision_providers(settings) if images else None
    return Prompt(system=system, messages=tuple(within(history[-limit:], budget)), summary=summary,
                  cache_key=cache_key, vision=vision)


def model_text(messages: Sequence[InboundMessage]) -> str:
    """The customers' text(s) verbatim; a quoted message or a group sender's name as context."""
    parts = []
    for message in messages:
        text = message.text
        if message.jid.endswith("@g.us") and message.push_name:
            text = f"{message.push_name}: {text}"
        if message.quoted_text:
            text = f"[En respuesta a: \"{trim(message.quoted_text, 500)}\"]\n{text}"
        parts.append(text)
    return "\n".join(p for p in parts if p)


def within(history: list[ChatMessage], budget: int) -> list[ChatMessage]:
    """The newest messages whose text fits in ``budget`` characters; the newest always (cut to
    the budget when it alone is larger)."""
    kept: list[ChatMessage] = []
    used = 0
    for message in reversed(history):
        room = budget - used
        if len(message.content) > room:
            if kept:
                break
            log.info("Truncated the prompt's last message: %d → %d characters", len(message.content), room)
            message = ChatMessage(message.role, message.content[:room], message.images)
        kept.append(message)
        used += len(message.content)
    kept.reverse()
    return kept
