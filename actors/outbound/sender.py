"""The outbound supervisor: every reply to WhatsApp goes through one shared ``OutboundSender``.

Policy lives here, the same whatever carries the sends: per-chat FIFO order (a ``KeyedSerialExecutor``
keyed by the conversation key, "<instance>/<jid>"), instance candidates with the one that worked last remembered, retries
(``RetryPolicy``), pacing (pacing.py), splitting long replies, dead letters and statistics. The
transport is chosen once, at construction: the Evolution API (evolution.py), or with
``EVOLUTION_API_URL`` empty the in-process local outbox (local.py). Pacing, the split limit and the
Evolution API key are the reply's instance's (``settings_for``); the rest is process-wide. What it
does is docs/behaviour.md §5.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Awaitable, Callable, Deque, Iterable

import attrs
import httpx
import trio

from actors.conversation_key import instance_of
from actors.settings import Settings
from runtime.bounded import bounded_key
from runtime.keyed import KeyedSerialExecutor, MailboxFull
from runtime.retry import RetryPolicy

from .evolution import EvolutionTransport
from .local import LocalOutbox, OutboxEntry
from .pacing import ChatGap, Pacer
from .split import split_text
from .transport import SendOutcome, Transport

log = logging.getLogger(__name__)

DEAD_LETTERS_KEPT = 100
SENT_IDS_KEPT = 10_000   # stored replies remembered as sent (a few minutes of traffic at full rate)
TYPING_DELAY_MS = 3000          # how long Evolution shows "typing…" (its call blocks that long)
# Instance names and ids come from webhooks: the preferred-candidate map and the pacer keep at most
# this many on their own; the rest share one "other" entry.
MAX_INSTANCE_KEYS = 64
# Replies waiting per chat: far beyond what a conversation produces (one per turn), reached only if
# Evolution stays down while a chat keeps writing. Past it a reply is a dead letter at once.
QUEUE_CAPACITY = 1000
# Chats being delivered to at once; the others wait their turn in FIFO order. The transport's own
# bound (HTTP_CONCURRENCY) is what limits the requests: this only bounds the tasks.
MAX_CHATS_IN_FLIGHT = 4096
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 30.0
BACKOFF_JITTER = 0.5


class NotOwned(Exception):
    """The reply's chat is no longer this node's to send (its shard moved): it is dropped here and
    its outbox row stays for the new owner."""


@attrs.frozen
class OutboundMessage:
    """One reply to send. ``instances``: its instance candidates, in order (actors/instances.py); when
    empty, the configured EVOLUTION_INSTANCE_ID then EVOLUTION_INSTANCE."""

    jid: str
    text: str
    instances: tuple[str, ...] = ()
    outbox_id: int | None = None  # durable row id, for the store
    key: str = ""                 # the conversation key "<instance>/<jid>" (empty: the JID alone)

    @property
    def chat(self) -> str:
        """What orders the chat's replies: its conversation key."""
        return self.key or self.jid

    @property
    def tenant(self) -> str:
        """The instance whose settings (pacing, split limit, API key) apply."""
        return instance_of(self.key) if self.key else ""


@attrs.frozen
class Delivery:
    """How a message settled. ``status`` is ``"sent"`` (every part accepted) or ``"dead"``.

    ``message_id`` is Evolution's ``key.id`` of the first part; ``message_ids`` holds every part's id.
    ``attempts`` counts send rounds across all parts (1 per part when nothing had to be retried).
    """

    status: str
    candidate: str = ""
    attempts: int = 0
    message_id: str = ""
    error: str = ""
    message_ids: tuple[str, ...] = ()
    parts: int = 1
    repeat: bool = False     # sent before by this process (a second copy): only settled, not sent or counted


@attrs.frozen
class DeadLetter:
    """A message given up on. Never holds the text itself or any credential."""

    jid: str
    error: str
    attempts: int
    text_length: int
    at: float                       # unix time
    outbox_id: int | None = None


@attrs.frozen
class OutboundStatistics:
    """A snapshot of the sender for ``/supervisors`` and metrics."""

    mode: str                                   # "evolution" | "local"
    queued: int                                 # messages waiting, all JIDs
    max_queued_per_jid: int
    active_jids: int                            # JIDs with messages queued or being delivered
    in_flight: int                              # messages being delivered right now
    sent: int                                   # messages fully accepted
    retried: int                                # retry rounds after a retryable failure
    failed: int                                 # messages dead-lettered
    dead_letters: tuple[DeadLetter, ...]        # the newest DEAD_LETTERS_KEPT, oldest first
    preferred_candidates: dict[str, str]        # instance -> candidate that worked last
    outbox_size: int                            # local mode: entries kept
    typing_in_flight: int
    backlog: int                                # replies submitted and not yet settled (OUTBOUND_MAX_BACKLOG)
    backlog_oldest_seconds: float               # how long the oldest of them has waited (0 when none)
    pacing_waiting: int                         # sends waiting for their per-instance pacing slot


@attrs.define
class _PartResult:
    sent: bool
    candidate: str = ""
    attempts: int = 0
    message_id: str = ""
    error: str = ""


class OutboundSender:
    """The shared outbound supervisor.

    ``submit()`` never blocks: it queues the message behind the JID's earlier ones. A JID's messages
    are delivered strictly one after another (message k+1 is not sent before message k was accepted or
    given up); different JIDs do not wait for each other. ``on_settled(message, delivery)`` is awaited
    once per message, in order; its exceptions are logged and swallowed. A message refused because its
    chat already has QUEUE_CAPACITY waiting is a dead letter at once, settled apart from the chat's
    queue (so possibly before the messages queued ahead of it).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        http: httpx.AsyncClient | None = None,
        on_settled: Callable[[OutboundMessage, Delivery], Awaitable[None]] | None = None,
        settings_for: Callable[[str], Settings] | None = None,
        may_send: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        """``settings_for(instance)``: that instance's effective settings (default: ``settings``).
        ``may_send(chat)``: awaited right before each send attempt (several nodes: only the owner of
        the chat's shard sends; it may wait for a late lease renewal); a reply it refuses is dropped
        unsettled, its durable row kept for the shard's next owner."""
        self._settings = settings
        self._may_send = may_send
        self._settings_for = settings_for if settings_for is not None else (lambda _: settings)
        self._outbox: LocalOutbox | None = None
        if settings.outbound.evolution_api_url:
            self._transport: Transport = EvolutionTransport(settings, http)
        else:
            self._outbox = LocalOutbox(settings.security.log_customer_text)
            self._transport = self._outbox
        self._paced = self._transport.paced
        self._pacer = Pacer(MAX_INSTANCE_KEYS)
        self._gap = ChatGap()
        self._retry = RetryPolicy(
            attempts=max(1, settings.outbound.outbound_max_attempts),
            base=BACKOFF_BASE_SECONDS, cap=BACKOFF_CAP_SECONDS, jitter=BACKOFF_JITTER,
            budget=max(0.0, settings.outbound.outbound_max_retry_seconds),  # below 0 gives up as at 0: on the first failure
        )
        # Per chat, the items are (backlog token, message): the token finds the reply's submit time in
        # _pending, whose first entry is the oldest unsettled reply (a waiting reply costs that entry,
        # its queue slot and, for the chat at the head, one parked worker task: nothing polls).
        self._pending: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._tokens = 0
        self._chats: KeyedSerialExecutor[str, tuple[int, OutboundMessage]] = KeyedSerialExecutor(
            self._handle, queue_capacity=QUEUE_CAPACITY, max_keys_in_flight=MAX_CHATS_IN_FLIGHT, name="Outbound")
        self._on_settled = on_settled
        self._nursery: trio.Nursery | None = None
        # Replies submit() refused (a full chat queue) are dead letters at once; their on_settled
        # (burying the durable row) runs here, per chat in order, off the caller's path.
        self._refusals: KeyedSerialExecutor[str, tuple[OutboundMessage, Delivery]] = KeyedSerialExecutor(
            self._settle_refused, queue_capacity=QUEUE_CAPACITY, max_keys_in_flight=1, name="Outbound refusals")
        self._preferred: dict[str, str] = {}
        self._dead: Deque[DeadLetter] = collections.deque(maxlen=DEAD_LETTERS_KEPT)
        self._typing: set[str] = set()
        self._in_flight = 0
        self._sent = 0
        self._retried = 0
        self._failed = 0
        self.dropped = 0   # replies dropped unsent because their chat moved to another node
        # Stored replies this process sent, newest last (SENT_IDS_KEPT): a second copy of one (its
        # shard recovered again while it was queued or being settled) is settled, never sent again.
        self._sent_ids: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the per-chat workers and the typing calls until cancelled; the transport is open meanwhile."""
        async with self._transport.open():
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._chats.run)   # handles what was submitted before run() started
                await nursery.start(self._refusals.run)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self._nursery = None

    def submit(self, message: OutboundMessage) -> None:
        """Queue ``message`` behind the JID's earlier messages; never blocks, never raises for I/O.
        A stored reply (``outbox_id``) this process already sent is not sent again, only settled
        (a shard recovered again while its replies were still queued or being settled here)."""
        self._tokens += 1
        try:
            self._chats.submit_nowait(message.chat, (self._tokens, message))
            self._pending[self._tokens] = trio.current_time()
        except MailboxFull:
            error = f"outbound queue full: {QUEUE_CAPACITY} replies already waiting for this chat"
            delivery = self._dead_letter(message, error, 0)
            try:
                self._refusals.submit_nowait(message.chat, (message, delivery))
            except MailboxFull:   # its durable row stays: the next start sends it again
                log.error("Outbound: %s's refused replies are not settled yet; this one stays in the store "
                          "until the next start", message.jid)

    async def drain(self) -> None:
        """Wait until every queued reply was sent or given up (the caller bounds it with a cancel scope)."""
        while True:
            await self._chats.drain()
            await self._refusals.drain()
            if not self._chats.statistics().keys:
                return

    async def drain_chats(self, wanted: Callable[[str], bool]) -> None:
        """Wait until the chats ``wanted`` accepts (by conversation key) have no reply queued, on the
        wire or being settled (a shard handed back: its next owner must not find a reply this node
        is still sending, or it sends it again). The caller bounds it with a cancel scope."""
        await self._chats.drain_where(wanted)
        await self._refusals.drain_where(wanted)

    async def typing(self, jid: str, instances: Iterable[str] = (), key: str = "") -> None:
        """Show "typing…" in the chat, best effort: returns at once (the call runs in the supervisor's
        nursery, bounded in time), never raises, and is skipped when the transport shows none (local
        mode), when ``TYPING_PRESENCE`` is off, when one is already running for the chat or when all the
        transport's presence slots are taken (so it never waits for one, and never takes one of the
        replies')."""
        chat = key or jid
        if (not self._settings.outbound.typing_presence or self._nursery is None
                or chat in self._typing or len(self._typing) >= self._transport.presence_slots):
            return
        self._typing.add(chat)
        self._nursery.start_soon(self._presence, jid, tuple(instances), key)

    # ------------------------------------------------------------------ snapshots

    @property
    def transport(self) -> Transport:
        """The transport the replies go through (the media fetch of actors/media.py uses it too)."""
        return self._transport

    @property
    def backlog(self) -> int:
        """Replies submitted and not yet settled: queued, waiting for pacing, being sent or retried."""
        return len(self._pending)

    def statistics(self) -> OutboundStatistics:
        chats = self._chats.statistics()
        oldest = next(iter(self._pending.values()), None)
        return OutboundStatistics(
            mode=self._transport.mode,
            queued=chats.queued,
            max_queued_per_jid=chats.max_queued,
            active_jids=chats.keys,
            in_flight=self._in_flight,
            sent=self._sent,
            retried=self._retried,
            failed=self._failed,
            dead_letters=tuple(self._dead),
            preferred_candidates=dict(self._preferred),
            outbox_size=len(self._outbox) if self._outbox is not None else 0,
            typing_in_flight=len(self._typing),
            backlog=len(self._pending),
            backlog_oldest_seconds=trio.current_time() - oldest if oldest is not None else 0.0,
            pacing_waiting=self._pacer.waiting,
        )

    def outbox_entries(self, *, after: int = 0, jid: str | None = None, limit: int = 100) -> list[OutboxEntry]:
        """Local-mode replies with ``seq > after`` (optionally one JID's), oldest first, at most ``limit``
        (none when sending through Evolution)."""
        if self._outbox is None:
            return []
        return self._outbox.outbox_entries(after=after, jid=jid, limit=limit)

    # ------------------------------------------------------------------ delivery

    async def _handle(self, jid: str, item: tuple[int, OutboundMessage]) -> None:
        """One message of a chat, the executor's handler: deliver it, then settle it."""
        token, message = item
        self._in_flight += 1
        try:
            stored = (message.chat, message.outbox_id) if message.outbox_id is not None else None
            if stored is not None and stored in self._sent_ids:
                delivery = Delivery("sent", repeat=True)
            else:
                delivery = await self._deliver(message)
                if delivery.status == "sent" and stored is not None:
                    self._sent_ids[stored] = None
                    if len(self._sent_ids) > SENT_IDS_KEPT:
                        self._sent_ids.popitem(last=False)
        except NotOwned:
            self.dropped += 1
            log.info("Outbound: reply to %s dropped unsent: its chat moved to another node (the outbox row stays)",
                     message.jid)
            return
        except Exception as exc:  # a bug must not kill the supervisor or the JID's later messages
            log.exception("Outbound: unexpected error delivering to %s", jid)
            delivery = self._dead_letter(message, f"internal error: {type(exc).__name__}", 0)
        finally:
            self._in_flight -= 1
            self._pending.pop(token, None)
        await self._settle(message, delivery)

    async def _settle(self, message: OutboundMessage, delivery: Delivery) -> None:
        if self._on_settled is not None:
            try:
                await self._on_settled(message, delivery)
            except Exception:
                log.exception("Outbound: on_settled callback failed for %s", message.jid)

    async def _settle_refused(self, jid: str, item: tuple[OutboundMessage, Delivery]) -> None:
        await self._settle(*item)

    async def _deliver(self, message: OutboundMessage) -> Delivery:
        parts = split_text(message.text, self._settings_for(message.tenant).outbound.split_max_chars)
        if len(parts) > 1:
            log.info("Outbound: reply to %s is %d characters, sending it in %d parts",
                     message.jid, len(message.text), len(parts))
        ids: list[str] = []
        attempts = 0
        candidate = ""
        for part in parts:
            result = await self._send_part(message, part)
            attempts += result.attempts
            if not result.sent:
                return self._dead_letter(message, result.error, attempts, candidate=result.candidate,
                                         message_ids=tuple(ids), parts=len(parts))
            candidate = result.candidate
            ids.append(result.message_id)
        self._sent += 1
        return Delivery("sent", candidate=candidate, attempts=attempts, message_id=ids[0] if ids else "",
                        message_ids=tuple(ids), parts=len(parts))

    def candidates(self, message: OutboundMessage) -> list[str]:
        """The message's instance candidates (else the configured ones), duplicates and empties removed.

        Never the configured ones after the message's own: an unknown instance served with
        UNKNOWN_INSTANCES=serve must not send through a configured one (docs/security.md)."""
        s = self._settings
        ordered: list[str] = []
        for candidate in message.instances or (s.outbound.evolution_instance_id, s.outbound.evolution_instance):
            candidate = candidate.strip()
            if candidate and candidate not in ordered:
                ordered.append(candidate)
        return ordered

    def _ordered_candidates(self, message: OutboundMessage) -> tuple[str | None, list[str]]:
        """(instance key to remember the winner under, or None; candidates with the one that worked
        last for that instance first). A transport with a fixed candidate has nothing to choose: it
        is told the chat's instance by name (the local outbox records it), else its fixed name."""
        if self._transport.fixed_candidate is not None:
            return None, [message.tenant or self._transport.fixed_candidate]
        natural = self.candidates(message)
        if not natural:
            return None, []
        key = bounded_key(self._preferred, natural[0], MAX_INSTANCE_KEYS)
        preferred = self._preferred.get(key)
        if preferred in natural:
            natural.remove(preferred)
            natural.insert(0, preferred)
        return key, natural

    async def _send_part(self, message: OutboundMessage, text: str) -> _PartResult:
        """Send one part, retrying retryable failures; every candidate rejecting it (4xx) is final."""
        key, candidates = self._ordered_candidates(message)
        if not candidates:
            return _PartResult(False, error="no Evolution instance: set EVOLUTION_INSTANCE or EVOLUTION_INSTANCE_ID")
        started = trio.current_time()
        rejected: dict[str, str] = {}
        attempt = 0
        tenant = self._settings_for(message.tenant).outbound
        gap = tenant.outbound_min_gap_seconds if self._paced else 0.0
        rate = tenant.outbound_rate_per_instance if self._paced else 0.0
        while True:
            attempt += 1
            await self._gap.wait(message.chat, gap)
            if self._may_send is not None and not await self._may_send(message.chat):
                raise NotOwned(message.chat)
            retry: tuple[str, SendOutcome] | None = None
            for candidate in candidates:
                if candidate in rejected:
                    continue
                await self._pacer.acquire(candidate, rate)
                outcome = await self._transport.send_text(candidate, message.jid, text, api_key=tenant.evolution_api_key)
                if outcome.ok:
                    if key is not None:
                        self._preferred[key] = candidate
                    self._gap.sent(message.chat, gap)
                    return _PartResult(True, candidate, attempt, outcome.message_id)
                if outcome.retryable:
                    retry = (candidate, outcome)
                    break
                rejected[candidate] = outcome.error or f"HTTP {outcome.status}"
                if outcome.status in (401, 403):
                    log.warning("Outbound: Evolution rejected the API key for candidate=%s (status=%s): "
                                "check EVOLUTION_API_KEY", candidate, outcome.status)
            if retry is None:
                reasons = "; ".join(f"{c}: {e}" for c, e in rejected.items())
                return _PartResult(False, attempts=attempt, error=f"all candidates rejected ({reasons})")
            candidate, outcome = retry
            error = outcome.error or f"HTTP {outcome.status}"
            delay = self._retry.delay(attempt, elapsed=trio.current_time() - started,
                                      retry_after=outcome.retry_after)
            if delay is None:
                return _PartResult(False, candidate, attempt, error=f"gave up after {attempt} attempts: {error}")
            self._retried += 1
            log.warning("Outbound: sendText to %s failed (candidate=%s, %s); retry %d in %.1f s",
                        message.jid, candidate, error, attempt, delay)
            await trio.sleep(delay)

    def _dead_letter(self, message: OutboundMessage, error: str, attempts: int, *, candidate: str = "",
                     message_ids: tuple[str, ...] = (), parts: int = 1) -> Delivery:
        self._failed += 1
        self._dead.append(DeadLetter(message.jid, error, attempts, len(message.text), time.time(), message.outbox_id))
        log.error("Outbound: failed to send message to %s after %d attempts (dead letter): %s",
                  message.jid, attempts, error)
        return Delivery("dead", candidate=candidate, attempts=attempts, error=error,
                        message_id=message_ids[0] if message_ids else "", message_ids=message_ids, parts=parts)

    async def _presence(self, jid: str, instances: tuple[str, ...], key: str) -> None:
        try:
            message = OutboundMessage(jid, "", instances, key=key)
            api_key = self._settings_for(message.tenant).outbound.evolution_api_key
            _, candidates = self._ordered_candidates(message)
            with trio.move_on_after(self._settings.server.http_timeout + TYPING_DELAY_MS / 1000 + 1):
                for candidate in candidates:
                    outcome = await self._transport.send_presence(candidate, jid, "composing", TYPING_DELAY_MS,
                                                                  api_key=api_key)
                    if outcome.ok or outcome.retryable:
                        break
        except Exception:
            log.debug("Outbound: sendPresence to %s failed", jid, exc_info=True)
        finally:
            self._typing.discard(key or jid)
