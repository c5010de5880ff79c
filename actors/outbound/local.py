"""The local outbox transport: with ``EVOLUTION_API_URL`` empty, replies land in memory, not on WhatsApp.

For development and tests: every send is accepted at once (id ``local-N``), logged as
``[OUTBOX] -> jid: text`` and kept as an ``OutboxEntry`` (the newest OUTBOX_KEPT) that the admin
API reads with ``outbox_entries()``. Nothing goes over the network, so nothing is paced and no "typing…"
is shown (docs/behaviour.md §5.1).
"""

from __future__ import annotations

import collections
import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Deque

import attrs

from actors.privacy import log_text

from .transport import STATUS_NETWORK_ERROR, MediaOutcome, SendOutcome

log = logging.getLogger(__name__)

OUTBOX_KEPT = 10_000
STATUS_ACCEPTED = 200


@attrs.frozen
class OutboxEntry:
    """A reply "sent" in local mode. ``seq`` grows by one per entry; ``at`` is unix time;
    ``instance`` is the WhatsApp number's instance it would have gone out through (``local``
    when the chat names none)."""

    seq: int
    jid: str
    text: str
    at: float
    instance: str


class LocalOutbox:
    """The in-process outbox as a transport: it accepts every send and records it."""

    mode: str = "local"
    paced: bool = False
    presence_slots: int = 0
    fixed_candidate: str | None = "local"

    def __init__(self, log_customer_text: str) -> None:
        self._log_customer_text = log_customer_text
        self._entries: Deque[OutboxEntry] = collections.deque(maxlen=OUTBOX_KEPT)
        self._seq = 0

    def __len__(self) -> int:
        """Entries kept."""
        return len(self._entries)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        log.info("Outbound: local mode (EVOLUTION_API_URL empty): replies go to the in-process outbox")
        yield

    async def send_text(self, candidate: str, number: str, text: str, *, api_key: str | None = None) -> SendOutcome:
        """Record ``text`` for ``number`` as sent through instance ``candidate``; never fails, never waits."""
        self._seq += 1
        self._entries.append(OutboxEntry(self._seq, number, text, time.time(), candidate))
        log.info("[OUTBOX] -> %s: %s", number, log_text(text, self._log_customer_text))
        return SendOutcome(STATUS_ACCEPTED, message_id=f"local-{self._seq}")

    async def send_presence(self, candidate: str, number: str, presence: str, delay_ms: int, *,
                            api_key: str | None = None) -> SendOutcome:
        """Accepted and ignored: there is no chat to show "typing…" in (``presence_slots`` is 0, so the
        supervisor does not call it)."""
        return SendOutcome(STATUS_ACCEPTED)

    async def fetch_media(self, candidate: str, message_id: str, max_bytes: int) -> MediaOutcome:
        """Nothing to fetch from: in local mode only a webhook's own ``message.base64`` brings media."""
        return MediaOutcome(STATUS_NETWORK_ERROR, error="local mode: no Evolution API to fetch media from")

    def outbox_entries(self, *, after: int = 0, jid: str | None = None, limit: int = 100) -> list[OutboxEntry]:
        """Replies with ``seq > after`` (optionally one JID's), oldest first, at most ``limit``."""
        result: list[OutboxEntry] = []
        if limit <= 0:
            return result
        for entry in self._entries:
            if entry.seq > after and (jid is None or entry.jid == jid):
                result.append(entry)
                if len(result) >= limit:
                    break
        return result
