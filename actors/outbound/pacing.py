"""How fast replies go out: a send rate per Evolution instance, and a minimum gap per chat.

WhatsApp throttles or bans a number that sends too fast, so the supervisor waits for both before
each sendText: ``Pacer`` spaces the sends of one instance (OUTBOUND_RATE_PER_INSTANCE) and
``ChatGap`` spaces the messages to one chat (OUTBOUND_MIN_GAP_SECONDS) without holding back other
chats. A rate or gap of 0 turns each off (docs/behaviour.md §5.6).
"""

from __future__ import annotations

import trio

from runtime.bounded import bounded_key

PRUNE_AT_LEAST = 1024           # ChatGap keeps this many send times before it forgets old ones


class Pacer:
    """One send slot per ``1/rate`` seconds per key (a token bucket of depth one), FIFO among waiters.

    The rate is the caller's (each instance may have its own). Keys come from webhooks (instance
    names): at most ``max_keys`` keep a bucket of their own; the rest share one ``other`` bucket."""

    def __init__(self, max_keys: int) -> None:
        self._max_keys = max_keys
        self._next: dict[str, float] = {}
        self.waiting = 0                 # callers sleeping until their slot (one timer each, no polling)

    async def acquire(self, key: str, rate: float) -> None:
        if rate <= 0:
            return
        key = bounded_key(self._next, key, self._max_keys)
        now = trio.current_time()
        slot = max(now, self._next.get(key, now))
        self._next[key] = slot + 1.0 / rate  # reserve before sleeping: concurrent callers queue up
        if slot > now:
            self.waiting += 1
            try:
                await trio.sleep_until(slot)
            finally:
                self.waiting -= 1


class ChatGap:
    """At least ``gap`` seconds between two accepted sends to one chat (the gap is the caller's:
    each instance may have its own)."""

    def __init__(self) -> None:
        self._gap = 0.0                  # the largest gap seen: what pruning keeps
        self._last_sent: dict[str, float] = {}
        self._pruned_size = 0

    async def wait(self, chat: str, gap: float) -> None:
        """Until ``gap`` seconds have passed since the chat's last accepted send."""
        if gap <= 0:
            return
        last = self._last_sent.get(chat)
        if last is not None:
            await trio.sleep_until(last + gap)

    def sent(self, chat: str, gap: float) -> None:
        """A send to ``chat`` was accepted just now."""
        if gap <= 0:
            return
        self._gap = max(self._gap, gap)
        self._last_sent[chat] = trio.current_time()
        self._prune()

    def _prune(self) -> None:
        """Forget send times older than the gap once the map has doubled (amortised O(1)): a chat
        whose last send is that old waits for nothing, known or not."""
        if len(self._last_sent) <= max(PRUNE_AT_LEAST, 2 * self._pruned_size):
            return
        horizon = trio.current_time() - self._gap
        self._last_sent = {j: t for j, t in self._last_sent.items() if t > horizon}
        self._pruned_size = len(self._last_sent)
