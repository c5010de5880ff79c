"""NEW_CHATS_PER_MINUTE: how many conversations one instance may open per minute.

Counts first messages of conversations that are not live, per instance name, over a sliding
minute (a stored chat coming back counts too; past the limit the service lets it through). Instance names come from the payload, so the table is bounded (runtime/bounded.py): past
``MAX_INSTANCES`` names, new ones share one ``other`` count.
"""

from __future__ import annotations

import collections
import math
from typing import Deque

from runtime.bounded import bounded_key

WINDOW_SECONDS = 60.0
MAX_INSTANCES = 64


class NewChatLimiter:
    """A sliding-window counter per instance; ``limit`` 0 never refuses."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._opened: dict[str, Deque[float]] = {}

    def refused(self, instance: str, now: float) -> int | None:
        """Count one new chat for ``instance`` at ``now``; or, past the limit, the seconds to wait."""
        if not self.limit:
            return None
        key = bounded_key(self._opened, instance, MAX_INSTANCES)
        opened = self._opened.setdefault(key, collections.deque())
        while opened and opened[0] <= now - WINDOW_SECONDS:
            opened.popleft()
        if len(opened) >= self.limit:
            return max(1, math.ceil(opened[0] + WINDOW_SECONDS - now))
        opened.append(now)
        return None
