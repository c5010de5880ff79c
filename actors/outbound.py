"""The outbound supervisor: every reply to WhatsApp goes through one shared ``OutboundSender``.

Policy lives here (per-JID FIFO order, instance candidates, retries, pacing, splitting, dead letters);
``EvolutionClient`` is the thin HTTP adapter for Evolution API v2. With ``EVOLUTION_API_URL`` empty the
sender runs in *local mode*: nothing goes over the network and replies land in an in-process outbox.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from typing import Any, Awaitable, Callable, Deque, Iterable
from urllib.parse import quote

import attrs
import httpx
import trio

from actors.privacy import log_text
from actors.settings import Settings
from actors.split import split_text
from runtime.bounded import bounded_key

log = logging.getLogger("python-agent")

BASE_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
DEAD_LETTERS_KEPT = 100
OUTBOX_KEPT = 10_000
TYPING_DELAY_MS = 3000          # how long Evolution shows "typing…" (its call blocks that long)
HTTP_LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=30.0)
# sendText requests in flight to Evolution at once. Kept below the HTTP pool's size on purpose: httpcore's
# pool scans every queued request against every connection on each event, so thousands of chats queueing
# inside the pool cost O(queued × connections) CPU each; waiting here in FIFO order costs nothing.
HTTP_CONCURRENCY = 48
# sendPresence calls in flight, a bound of their own: each holds its request for TYPING_DELAY_MS, so in
# sendText's slots they would delay replies. Beyond it "typing…" is skipped (best effort), never queued.
# 48 + 12 (+ the CRM's 4) fit the HTTP pools (64 connections) without queueing inside them.
PRESENCE_CONCURRENCY = 12
# Instance names and ids come from webhooks: the preferred-candidate map and the pacer keep at most
# this many on their own; the rest share one "other" entry.
MAX_INSTANCE_KEYS = 64

STATUS_NETWORK_ERROR = 0        # the pseudo status of a request that got no HTTP answer


@attrs.frozen
class OutboundMessage:
    """One reply to send. ``instances``: its instance candidates, in order (actors/instances.py); when
    empty, the configured EVOLUTION_INSTANCE_ID then EVOLUTION_INSTANCE."""

    jid: str
    text: str
    instances: tuple[str, ...] = ()
    outbox_id: int | None = None  # durable row id, for the store


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
class OutboxEntry:
    """A reply "sent" in local mode. ``seq`` grows by one per entry; ``at`` is unix time."""

    seq: int
    jid: str
    text: str
    at: float


@attrs.frozen
class OutboundStatistics:
    """A snapshot of the sender for ``/supervisors`` and metrics."""

    mode: str                                   # "evolution" | "local"
    queued: int                                 # messages waiting, all JIDs
    max_queued_per_jid: int
    active_jids: int                            # JIDs with a worker task right now
    in_flight: int                              # messages being delivered right now
    sent: int                                   # messages fully accepted
    retried: int                                # retry rounds after a retryable failure
    failed: int                                 # messages dead-lettered
    dead_letters: tuple[DeadLetter, ...]        # the newest DEAD_LETTERS_KEPT, oldest first
    preferred_candidates: dict[str, str]        # instance -> candidate that worked last
    outbox_size: int                            # local mode: entries kept
    typing_in_flight: int


@attrs.frozen
class SendOutcome:
    """What one HTTP call to Evolution gave. ``status`` 0 means no HTTP answer (network error/timeout)."""

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


class EvolutionClient:
    """Thin adapter over Evolution API v2's REST calls; never raises for HTTP or network failures."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, api_key: str, timeout: float) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._headers = {"apikey": api_key, "Content-Type": "application/json", "Accept": "application/json"}
        self._timeout = timeout
        self._limiter = trio.CapacityLimiter(HTTP_CONCURRENCY)
        self._presence_limiter = trio.CapacityLimiter(PRESENCE_CONCURRENCY)

    async def send_text(self, candidate: str, number: str, text: str) -> SendOutcome:
        """``POST /message/sendText/{candidate}`` with the v2 body ``{"number", "text"}``."""
        outcome = await self._post(f"/message/sendText/{quote(candidate, safe='')}", {"number": number, "text": text},
                                   self._timeout, self._limiter)
        log.debug("Tried sendText with candidate=%s status=%s%s", candidate, outcome.status,
                  f" error={outcome.error}" if outcome.error else "")
        return outcome

    async def send_presence(self, candidate: str, number: str, presence: str, delay_ms: int) -> SendOutcome:
        """``POST /chat/sendPresence/{candidate}``; Evolution answers only after ``delay_ms``.

        Bounded by its own PRESENCE_CONCURRENCY slots, never sendText's."""
        outcome = await self._post(f"/chat/sendPresence/{quote(candidate, safe='')}",
                                   {"number": number, "presence": presence, "delay": delay_ms},
                                   self._timeout + delay_ms / 1000, self._presence_limiter)
        log.debug("Tried sendPresence with candidate=%s status=%s", candidate, outcome.status)
        return outcome

    async def _post(self, path: str, body: dict[str, Any], deadline: float,
                    limiter: trio.CapacityLimiter) -> SendOutcome:
        try:
            async with limiter:  # waiting for a slot is not part of the request's timeout
                with trio.fail_after(deadline + 1):  # hard bound over httpx's per-phase timeouts
                    response = await self._http.post(self._base + path, json=body, headers=self._headers,
                                                     timeout=httpx.Timeout(deadline))
        except trio.TooSlowError:
            return SendOutcome(STATUS_NETWORK_ERROR, error="timeout")
        except httpx.HTTPError as exc:
            return SendOutcome(STATUS_NETWORK_ERROR, error=f"{type(exc).__name__}: {exc}"[:200])
        if 200 <= response.status_code < 300:
            message_id = ""
            try:
                payload = response.json()
                if isinstance(payload, dict) and isinstance(payload.get("key"), dict):
                    message_id = str(payload["key"].get("id") or "")
            except ValueError:
                pass
            return SendOutcome(response.status_code, message_id=message_id)
        return SendOutcome(response.status_code, error=_error_summary(response),
                           retry_after=_retry_after(response))


def _error_summary(response: httpx.Response) -> str:
    """A short, key-free description of an Evolution error body."""
    try:
        payload = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:120]}"
    if isinstance(payload, dict):
        detail = payload.get("response", {})
        message = detail.get("message") if isinstance(detail, dict) else detail
        return f"HTTP {response.status_code} {payload.get('error', '')}: {str(message)[:160]}".strip()
    return f"HTTP {response.status_code}: {str(payload)[:120]}"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def backoff_delay(retry: int, rng: random.Random, retry_after: float | None = None) -> float:
    """Seconds to wait before retry number ``retry`` (1-based): exponential, jittered, capped at 30 s."""
    ceiling = min(MAX_BACKOFF_SECONDS, BASE_BACKOFF_SECONDS * 2 ** (retry - 1))
    delay = ceiling * rng.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, MAX_BACKOFF_SECONDS)


class _Pacer:
    """One send slot per ``1/rate`` seconds per key (a token bucket of depth one), FIFO among waiters."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next: dict[str, float] = {}

    async def acquire(self, key: str) -> None:
        if not self._interval:
            return
        key = bounded_key(self._next, key, MAX_INSTANCE_KEYS)
        now = trio.current_time()
        slot = max(now, self._next.get(key, now))
        self._next[key] = slot + self._interval  # reserve before sleeping: concurrent callers queue up
        if slot > now:
            await trio.sleep_until(slot)


@attrs.define
class _PartResult:
    sent: bool
    candidate: str = ""
    attempts: int = 0
    message_id: str = ""
    error: str = ""


class OutboundSender:
    """The shared outbound supervisor.

    ``submit()`` never blocks: it appends to the JID's FIFO queue and, if the JID has no worker, starts one
    in the supervisor's nursery; the worker exits when its queue is empty. A JID's messages are delivered
    strictly one after another (message k+1 is not sent before message k was accepted or given up).
    ``on_settled(message, delivery)`` is awaited by the worker once per message, in order; its
    exceptions are logged and swallowed.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        http: httpx.AsyncClient | None = None,
        on_settled: Callable[[OutboundMessage, Delivery], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._local = not settings.outbound.evolution_api_url
        self._client: EvolutionClient | None = None
        if http is not None and not self._local:
            self._client = self._make_client(http)
        self._on_settled = on_settled
        self._nursery: trio.Nursery | None = None
        self._queues: dict[str, Deque[OutboundMessage]] = {}
        self._rng = random.Random()
        self._pacer = _Pacer(0.0 if self._local else settings.outbound.outbound_rate_per_instance)
        self._min_gap = 0.0 if self._local else settings.outbound.outbound_min_gap_seconds
        self._last_sent: dict[str, float] = {}
        self._last_sent_pruned_size = 0
        self._preferred: dict[str, str] = {}
        self._dead: Deque[DeadLetter] = collections.deque(maxlen=DEAD_LETTERS_KEPT)
        self._outbox: Deque[OutboxEntry] = collections.deque(maxlen=OUTBOX_KEPT)
        self._outbox_seq = 0
        self._typing: set[str] = set()
        self._drained: trio.Event | None = None
        self._queued = 0
        self._in_flight = 0
        self._sent = 0
        self._retried = 0
        self._failed = 0

    # ------------------------------------------------------------------ lifecycle

    def _make_client(self, http: httpx.AsyncClient) -> EvolutionClient:
        s = self._settings
        return EvolutionClient(http, s.outbound.evolution_api_url, s.outbound.evolution_api_key, s.server.http_timeout)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the worker tasks until cancelled. Creates (and closes) the HTTP client if none was given."""
        owned: httpx.AsyncClient | None = None
        if not self._local and self._client is None:
            owned = httpx.AsyncClient(timeout=httpx.Timeout(self._settings.server.http_timeout), limits=HTTP_LIMITS)
            self._client = self._make_client(owned)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for jid in list(self._queues):  # submitted before run() started
                    nursery.start_soon(self._worker, jid)
                if self._local:
                    log.info("Outbound: local mode (EVOLUTION_API_URL empty): replies go to the in-process outbox")
                else:
                    log.info("Outbound: sending through Evolution API at %s (rate %s msg/s per instance, "
                             "min gap %s s per chat)", self._settings.outbound.evolution_api_url,
                             self._settings.outbound.outbound_rate_per_instance, self._settings.outbound.outbound_min_gap_seconds)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self._nursery = None
        finally:
            if owned is not None:
                self._client = None
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await owned.aclose()

    def submit(self, message: OutboundMessage) -> None:
        """Queue ``message`` behind the JID's earlier messages; never blocks, never raises for I/O."""
        queue = self._queues.get(message.jid)
        if queue is not None:
            queue.append(message)
            self._queued += 1
            return
        self._queues[message.jid] = collections.deque([message])
        self._queued += 1
        if self._nursery is not None:
            self._nursery.start_soon(self._worker, message.jid)

    async def drain(self) -> None:
        """Wait until every queued reply was sent or given up (the caller bounds it with a cancel scope)."""
        while self._queues:
            self._drained = trio.Event()
            await self._drained.wait()

    async def typing(self, jid: str, instances: Iterable[str] = ()) -> None:
        """Show "typing…" in the chat, best effort: returns at once (the call runs in the supervisor's
        nursery, bounded in time), never raises, and is skipped in local mode, when ``TYPING_PRESENCE`` is
        off, when one is already running for ``jid`` or when all PRESENCE_CONCURRENCY slots are taken
        (so it never waits for one, and never takes one of the replies')."""
        if (self._local or not self._settings.outbound.typing_presence or self._nursery is None
                or jid in self._typing or len(self._typing) >= PRESENCE_CONCURRENCY):
            return
        self._typing.add(jid)
        self._nursery.start_soon(self._presence, jid, tuple(instances))

    # ------------------------------------------------------------------ snapshots

    def statistics(self) -> OutboundStatistics:
        return OutboundStatistics(
            mode="local" if self._local else "evolution",
            queued=self._queued,
            max_queued_per_jid=max((len(q) for q in self._queues.values()), default=0),
            active_jids=len(self._queues),
            in_flight=self._in_flight,
            sent=self._sent,
            retried=self._retried,
            failed=self._failed,
            dead_letters=tuple(self._dead),
            preferred_candidates=dict(self._preferred),
            outbox_size=len(self._outbox),
            typing_in_flight=len(self._typing),
        )

    def outbox_entries(self, *, after: int = 0, jid: str | None = None, limit: int = 100) -> list[OutboxEntry]:
        """Local-mode replies with ``seq > after`` (optionally one JID's), oldest first, at most ``limit``."""
        result: list[OutboxEntry] = []
        if limit <= 0:
            return result
        for entry in self._outbox:
            if entry.seq > after and (jid is None or entry.jid == jid):
                result.append(entry)
                if len(result) >= limit:
                    break
        return result

    # ------------------------------------------------------------------ workers

    async def _worker(self, jid: str) -> None:
        queue = self._queues[jid]
        while queue:
            message = queue.popleft()
            self._queued -= 1
            self._in_flight += 1
            try:
                delivery = await self._deliver(message)
            except Exception as exc:  # a bug must not kill the supervisor or the JID's later messages
                log.exception("Outbound: unexpected error delivering to %s", jid)
                delivery = self._dead_letter(message, f"internal error: {type(exc).__name__}", 0)
            finally:
                self._in_flight -= 1
            if self._on_settled is not None:
                try:
                    await self._on_settled(message, delivery)
                except Exception:
                    log.exception("Outbound: on_settled callback failed for %s", jid)
        del self._queues[jid]  # no checkpoint since the emptiness check: submit() cannot slip in between
        if not self._queues and self._drained is not None:
            self._drained.set()
        self._prune_last_sent()

    async def _deliver(self, message: OutboundMessage) -> Delivery:
        parts = split_text(message.text, self._settings.outbound.split_max_chars)
        if len(parts) > 1:
            log.info("Outbound: reply to %s is %d characters, sending it in %d parts",
                     message.jid, len(message.text), len(parts))
        if self._local:
            return self._deliver_locally(message, parts)
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

    def _deliver_locally(self, message: OutboundMessage, parts: list[str]) -> Delivery:
        ids = []
        for part in parts:
            self._outbox_seq += 1
            self._outbox.append(OutboxEntry(self._outbox_seq, message.jid, part, time.time()))
            ids.append(f"local-{self._outbox_seq}")
            log.info("[OUTBOX] -> %s: %s", message.jid, log_text(part, self._settings.security.log_customer_text))
        self._sent += 1
        return Delivery("sent", candidate="local", attempts=len(parts), message_id=ids[0],
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

    def _ordered_candidates(self, message: OutboundMessage) -> tuple[str, list[str]]:
        """(instance key, candidates with the one that worked last for that instance first)."""
        natural = self.candidates(message)
        if not natural:
            return "", []
        key = bounded_key(self._preferred, natural[0], MAX_INSTANCE_KEYS)
        preferred = self._preferred.get(key)
        if preferred in natural:
            natural.remove(preferred)
            natural.insert(0, preferred)
        return key, natural

    async def _send_part(self, message: OutboundMessage, text: str) -> _PartResult:
        """Send one part, retrying retryable failures; every candidate rejecting it (4xx) is final."""
        assert self._client is not None
        key, candidates = self._ordered_candidates(message)
        if not candidates:
            return _PartResult(False, error="no Evolution instance: set EVOLUTION_INSTANCE or EVOLUTION_INSTANCE_ID")
        settings = self._settings
        max_attempts = max(1, settings.outbound.outbound_max_attempts)
        started = trio.current_time()
        rejected: dict[str, str] = {}
        attempt = 0
        while True:
            attempt += 1
            await self._wait_gap(message.jid)
            retry: tuple[str, SendOutcome] | None = None
            for candidate in candidates:
                if candidate in rejected:
                    continue
                await self._pacer.acquire(candidate)
                outcome = await self._client.send_text(candidate, message.jid, text)
                if outcome.ok:
                    self._preferred[key] = candidate
                    self._last_sent[message.jid] = trio.current_time()
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
            delay = backoff_delay(attempt, self._rng, outcome.retry_after)
            elapsed = trio.current_time() - started
            if attempt >= max_attempts or elapsed + delay > settings.outbound.outbound_max_retry_seconds:
                return _PartResult(False, candidate, attempt, error=f"gave up after {attempt} attempts: {error}")
            self._retried += 1
            log.warning("Outbound: sendText to %s failed (candidate=%s, %s); retry %d in %.1f s",
                        message.jid, candidate, error, attempt, delay)
            await trio.sleep(delay)

    async def _wait_gap(self, jid: str) -> None:
        if self._min_gap <= 0:
            return
        last = self._last_sent.get(jid)
        if last is not None:
            await trio.sleep_until(last + self._min_gap)

    def _prune_last_sent(self) -> None:
        """Forget send times older than the min gap once the map has doubled (amortised O(1))."""
        if len(self._last_sent) <= max(1024, 2 * self._last_sent_pruned_size):
            return
        horizon = trio.current_time() - self._min_gap
        self._last_sent = {j: t for j, t in self._last_sent.items() if t > horizon or j in self._queues}
        self._last_sent_pruned_size = len(self._last_sent)

    def _dead_letter(self, message: OutboundMessage, error: str, attempts: int, *, candidate: str = "",
                     message_ids: tuple[str, ...] = (), parts: int = 1) -> Delivery:
        self._failed += 1
        self._dead.append(DeadLetter(message.jid, error, attempts, len(message.text), time.time(), message.outbox_id))
        log.error("Outbound: failed to send message to %s after %d attempts (dead letter): %s",
                  message.jid, attempts, error)
        return Delivery("dead", candidate=candidate, attempts=attempts, error=error,
                        message_id=message_ids[0] if message_ids else "", message_ids=message_ids, parts=parts)

    async def _presence(self, jid: str, instances: tuple[str, ...]) -> None:
        try:
            assert self._client is not None
            _, candidates = self._ordered_candidates(OutboundMessage(jid, "", instances))
            with trio.move_on_after(self._settings.server.http_timeout + TYPING_DELAY_MS / 1000 + 1):
                for candidate in candidates:
                    outcome = await self._client.send_presence(candidate, jid, "composing", TYPING_DELAY_MS)
                    if outcome.ok or outcome.retryable:
                        break
        except Exception:
            log.debug("Outbound: sendPresence to %s failed", jid, exc_info=True)
        finally:
            self._typing.discard(jid)
