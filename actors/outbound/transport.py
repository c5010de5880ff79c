"""The one small interface every way of sending a reply implements, and what a send gives back.

The supervisor (sender.py) decides order, candidates, retries, pacing and splitting; a transport
only carries one text or one "typing…" to one chat and says how it went. It also fetches the bytes
of a customer's media message (actors/media.py asks it), bounded and timed out like its sends. Two exist: the Evolution
API over HTTP (evolution.py) and the in-process local outbox (local.py). A transport never raises
for a failed send: the failure is in the ``SendOutcome``.
"""

from __future__ import annotations

from typing import AsyncContextManager, Protocol

import attrs

STATUS_NETWORK_ERROR = 0        # the pseudo status of a request that got no HTTP answer


@attrs.frozen
class SendOutcome:
    """What one send gave. ``status`` is HTTP's; 0 means no answer (network error or timeout)."""

    status: int
    message_id: str = ""
    error: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        """Worth retrying later on the same candidate: no answer, 408, 429 or a server error."""
        return self.status in (STATUS_NETWORK_ERROR, 408, 429) or self.status >= 500


@attrs.frozen
class MediaOutcome:
    """What one media fetch gave: the bytes and their mimetype, or why not (``status`` as above)."""

    status: int
    mimetype: str = ""
    data: bytes = attrs.field(default=b"", repr=lambda data: f"<{len(data)} bytes>")
    error: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and bool(self.data)


class Transport(Protocol):
    """Carries sends for the supervisor; its attributes tell the supervisor what applies to it."""

    #: ``"evolution"`` or ``"local"``, reported in the statistics.
    mode: str
    #: Whether the per-instance rate and the per-chat min gap apply (a real WhatsApp number's limits).
    paced: bool
    #: How many "typing…" calls may run at once (they are skipped beyond it); 0: it shows none.
    presence_slots: int
    #: For a transport without Evolution instances: every send goes once, named by the chat's
    #: instance, else by this name. None: the message's instance candidates are tried, the one
    #: that worked last first.
    fixed_candidate: str | None

    def open(self) -> AsyncContextManager[None]:
        """Hold what the sends need (connections) while the supervisor runs; logs how replies go."""
        ...

    async def send_text(self, candidate: str, number: str, text: str, *, api_key: str | None = None) -> SendOutcome:
        """Send ``text`` to ``number`` through instance ``candidate`` (with the instance's ``api_key``,
        when the transport needs one; None: the configured one)."""
        ...

    async def send_presence(self, candidate: str, number: str, presence: str, delay_ms: int, *,
                            api_key: str | None = None) -> SendOutcome:
        """Show ``presence`` (e.g. ``"composing"``) in the chat for ``delay_ms``."""
        ...

    async def fetch_media(self, candidate: str, message_id: str, max_bytes: int) -> MediaOutcome:
        """The media of the message ``message_id`` received through instance ``candidate`` (at most
        ``max_bytes``; larger is a failure, never read whole)."""
        ...
