"""Our own replies' fromMe echoes, recognised before their send ids are known.

Evolution posts a fromMe ``messages.upsert`` for every message the number sends, ours included.
The ids of our sends come back in sendText's answer and are recorded (controls.remember_sent), but
Evolution may post the echo first; without its id the echo would look like a person answering from
the phone and silence the bot for HUMAN_TAKEOVER_MINUTES. So an actor remembers the parts of the
replies it just handed to the outbound supervisor (split as the sender splits them) for
``ECHO_WINDOW`` seconds: a fromMe text equal to one of them, with an id not recorded, is our echo
and takes that part off the list. The one case misread: a person typing exactly a part of a reply
the bot sent within that window (the bot is then not silenced that once).
"""

from __future__ import annotations

from collections import deque

from .outbound.split import split_text

ECHO_WINDOW = 120.0   # seconds: Evolution's echo comes within a second or two of the send
MAX_PARTS = 32        # a chat's remembered parts at most (the oldest go first)


class RecentSends:
    """The parts of one chat's recent replies whose echoes may still come."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: deque[tuple[float, str]] = deque(maxlen=MAX_PARTS)

    def add(self, text: str, split_limit: int, now: float) -> None:
        """A reply handed to the outbound supervisor at ``now`` (parts of at most ``split_limit``)."""
        self._parts.extend((now, part.strip()) for part in split_text(text, split_limit))

    def claim(self, text: str, now: float) -> bool:
        """Whether ``text`` is the echo of a remembered part (then forgotten)."""
        self._forget_before(now - ECHO_WINDOW)
        wanted = text.strip()
        for index, (_, part) in enumerate(self._parts):
            if part == wanted:
                del self._parts[index]
                return True
        return False

    def is_empty(self, now: float) -> bool:
        self._forget_before(now - ECHO_WINDOW)
        return not self._parts

    def _forget_before(self, oldest: float) -> None:
        while self._parts and self._parts[0][0] < oldest:
            self._parts.popleft()
