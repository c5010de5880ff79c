"""The admin console's login sessions, kept in memory: a restart logs everyone out.

A login exchanges ADMIN_TOKEN (or, without one, a loopback connection) for a random session id
(app.py puts it in an HttpOnly, SameSite=Strict cookie) and a per-session CSRF token that the page
sends with every state-changing request.
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Callable

import attrs

SESSIONS_KEPT = 1000


@attrs.define
class Session:
    id: str
    csrf: str
    expires_at: float

    def csrf_matches(self, supplied: str) -> bool:
        """``supplied`` is this session's CSRF token (compared in constant time)."""
        return hmac.compare_digest(supplied.encode(), self.csrf.encode())


class Sessions:
    """The console's logins, each expiring ``ttl`` seconds after it was made, at most SESSIONS_KEPT."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self._clock = clock
        self._by_id: dict[str, Session] = {}

    def create(self) -> Session:
        now = self._clock()
        self._by_id = {k: s for k, s in self._by_id.items() if s.expires_at > now}
        while len(self._by_id) >= SESSIONS_KEPT:  # the oldest login goes first
            self._by_id.pop(next(iter(self._by_id)))
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self.ttl)
        self._by_id[session.id] = session
        return session

    def find(self, session_id: str) -> Session | None:
        """The session with this id, unless unknown or expired."""
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self._clock():
            del self._by_id[session.id]
            return None
        return session

    def end(self, session: Session) -> None:
        self._by_id.pop(session.id, None)
