"""The fallback supervisor: one per service, shared by every conversation actor.

Tries LLM_PROVIDER, then each LLM_PROVIDER_FALLBACK in order (never the same provider twice), then
answers the polite error text. Per provider it bounds concurrent calls (FIFO), applies a timeout per
call, honours a short Retry-After once, and keeps a circuit breaker so a dead provider does not add
its timeout to every message. All timing uses ``trio.current_time()`` (tests run it on a MockClock).

A provider that hangs (accepts connections, never answers) produces no failure until its calls
time out, and meanwhile every slot is held by a hung call with new turns queueing behind them. So
the breaker also watches for a *stall*: when at least ``failure_threshold`` calls have been in
flight for longer than the stall limit (``STALL_FACTOR`` x the provider's recent p95 latency, at
least ``stall_seconds``, at most the call timeout) and no call at all completed meanwhile, the
circuit opens at once and the stalled calls are cancelled, so their turns move on to the fallback
instead of waiting out the timeout. The check runs whenever a call asks that provider for a slot.
The limit follows the provider's latency: it also covers ``STALL_FACTOR`` x the slowest of its last
``RECENT_SUCCESSES`` answers, so one success past the old limit raises it at once (a provider that
became slower but stays healthy is not taken for a dead one again).

The half-open probe after the cool-down may take the whole call timeout: only an answer (or a
failure) decides the circuit, whatever the provider's latency. So that during a long outage the
customer whose message triggers the probe does not wait that timeout every cool-down, the probe is
*hedged* when a fallback exists: it runs in the chain's own nursery (``run()``, started by the
service), the customer waits for it at most the stall limit and then moves on to the fallback,
while the probe goes on until it is answered or times out. Without a fallback, or before ``run()``
started, the probe runs in the customer's task.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
from typing import Sequence

import attrs
import trio

from ..settings import Settings
from .base import ErrorKind, Prompt, Provider, ProviderError

log = logging.getLogger("python-agent")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STALL_FACTOR = 3.0   # a call this many times slower than the recent p95, with no other answer meanwhile, is stalled
RECENT_SUCCESSES = 16   # the stall limit also covers STALL_FACTOR x the slowest of this many latest answers


@attrs.frozen
class Answer:
    """The chain's result. ``provider`` is None when every provider failed (``text`` is the polite text)."""

    text: str
    provider: str | None
    fallback_used: bool = False

    @property
    def failed(self) -> bool:
        return self.provider is None


@attrs.frozen
class ProviderStatistics:
    """One provider's health. ``configured``: its settings are complete (e.g. it has its key);
    ``available``: configured and its circuit lets a call through now. Latencies are of successful
    calls, from a ring of the most recent ones."""

    name: str
    configured: bool
    available: bool
    circuit: str
    reopens_in_seconds: float | None
    in_flight: int
    waiting: int
    stall_after_seconds: float | None
    stalls: int
    calls: int
    successes: int
    failures: dict[str, int]
    last_error: str | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None


@attrs.frozen
class ChainStatistics:
    """A snapshot of the supervisor; ``attrs.asdict`` of it is JSON-serialisable."""

    providers: tuple[ProviderStatistics, ...]
    asks: int
    fallbacks_used: int
    polite_answers: int
    deadline_exceeded: int


@attrs.define
class _Probe:
    """A hedged probe's outcome, for the customer waiting on it."""

    done: trio.Event = attrs.field(factory=trio.Event)
    text: str | None = None


class _Admission(enum.Enum):
    DENY = "deny"
    PASS = "pass"
    PROBE = "probe"


class _Slot:
    """A provider with its limiter, circuit breaker and counters."""

    def __init__(self, provider: Provider, *, concurrency: int, threshold: int, cooldown: float,
                 latency_window: int, stall_seconds: float, timeout: float) -> None:
        self.provider = provider
        self.name = provider.name
        self.limiter = trio.CapacityLimiter(concurrency)
        self.threshold = threshold
        self.cooldown = cooldown
        self.stall_seconds = stall_seconds
        self.timeout = timeout
        self.state = CLOSED
        self.open_until = 0.0
        self.probing = False
        self.consecutive_failures = 0
        # Calls in flight, oldest first: start time and the scope that cancels the call on a stall.
        self.running: dict[int, tuple[float, trio.CancelScope]] = {}
        self._next_call = 0
        self.last_completion = 0.0
        self.stalls = 0
        self._p95: float | None = None   # of the latencies (ms), cached; None: recompute
        self.calls = 0
        self.successes = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.last_error: str | None = None
        self.latencies: collections.deque[float] = collections.deque(maxlen=latency_window)
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT_SUCCESSES)

    # -- circuit breaker ------------------------------------------------------------------
    def circuit(self, now: float) -> str:
        if self.state == OPEN and now >= self.open_until:
            return HALF_OPEN
        return self.state

    @property
    def in_flight(self) -> int:
        return len(self.running)

    def admit(self, now: float) -> _Admission:
        self.check_stall(now)
        state = self.circuit(now)
        if state == CLOSED:
            return _Admission.PASS
        if state == OPEN or self.probing:
            return _Admission.DENY
        self.state, self.probing = HALF_OPEN, True
        return _Admission.PROBE

    def still_admits(self, admission: _Admission, now: float) -> bool:
        """After waiting for a concurrency slot: did the circuit open meanwhile?"""
        return admission is _Admission.PROBE or self.circuit(now) == CLOSED

    # -- calls in flight and stall detection ------------------------------------------------
    def begin(self, now: float, scope: trio.CancelScope) -> int:
        self._next_call += 1
        self.running[self._next_call] = (now, scope)
        self.calls += 1
        return self._next_call

    def end(self, call: int, now: float) -> None:
        del self.running[call]
        self.last_completion = now

    def stall_after(self) -> float | None:
        """Seconds in flight, with no other call completing, after which calls count as stalled."""
        if self.stall_seconds <= 0 or not self.latencies:
            return None   # disabled, or nothing known of this provider's latency yet: the timeout decides
        if self._p95 is None:
            self._p95 = _percentile(sorted(self.latencies), 95) or 0.0
        typical = max(self._p95, max(self.recent))   # a recent slow answer counts before the p95 moves
        return min(self.timeout, max(self.stall_seconds, STALL_FACTOR * typical / 1000.0))

    def check_stall(self, now: float) -> None:
        """Open the circuit and cancel the stalled calls when the provider stopped answering."""
        limit = self.stall_after()
        if limit is None or self.state != CLOSED or len(self.running) < self.threshold:
            return
        if now - self.last_completion < limit:
            return
        stalled = sum(1 for started, _ in self.running.values() if now - started >= limit)
        if stalled < self.threshold:
            return
        # Every call in flight waits on the same dead provider, the younger ones too: all move on.
        self.stalls += 1
        self.state, self.open_until, self.probing = OPEN, now + self.cooldown, False
        self.failures[ErrorKind.TIMEOUT.value] += len(self.running)
        self.last_error = f"stalled: {stalled} calls without an answer for over {limit:g}s"
        log.warning("LLM provider %s: circuit open for %gs: %d calls without an answer for over %gs; "
                    "moving its %d calls in flight to the fallback", self.name, self.cooldown, stalled, limit,
                    len(self.running))
        for _, scope in self.running.values():
            scope.cancel()

    def record_success(self, latency: float) -> None:
        if self.state != CLOSED:
            log.info("LLM provider %s recovered: circuit closed", self.name)
        self.state, self.probing, self.consecutive_failures = CLOSED, False, 0
        self.successes += 1
        self.latencies.append(latency * 1000.0)
        self.recent.append(latency * 1000.0)
        if len(self.latencies) < 64 or self.successes % 64 == 0:
            self._p95 = None   # recomputed from the latencies at the next check

    def record_failure(self, error: ProviderError, now: float, *, probe: bool) -> None:
        self.failures[error.kind.value] += 1
        self.last_error = str(error)
        if error.per_request:
            # This request's own fault (e.g. its context is too long): no verdict on the provider, so
            # it neither counts towards opening the circuit nor closes it; a probe lets the next one try.
            if probe:
                self.release_probe()
            return
        self.consecutive_failures += 1
        if probe or error.kind is ErrorKind.AUTH or self.consecutive_failures >= self.threshold:
            if self.state == CLOSED or probe:
                log.warning(
                    "LLM provider %s: circuit open for %gs after %d consecutive failure(s) (last: %s)",
                    self.name, self.cooldown, self.consecutive_failures, error,
                )
            self.state, self.open_until = OPEN, now + self.cooldown
            self.probing = False

    def release_probe(self) -> None:
        """A probe cancelled before it decided anything: let the next caller probe."""
        self.probing = False

    def statistics(self, now: float) -> ProviderStatistics:
        state = self.circuit(now)
        configured = self.provider.available
        ordered = sorted(self.latencies)
        return ProviderStatistics(
            name=self.name,
            configured=configured,
            available=configured and (state == CLOSED or (state == HALF_OPEN and not self.probing)),
            circuit=state,
            reopens_in_seconds=round(self.open_until - now, 3) if state == OPEN else None,
            in_flight=self.in_flight,
            waiting=self.limiter.statistics().tasks_waiting,
            stall_after_seconds=self.stall_after(),
            stalls=self.stalls,
            calls=self.calls,
            successes=self.successes,
            failures=dict(self.failures),
            last_error=self.last_error,
            latency_p50_ms=_percentile(ordered, 50),
            latency_p95_ms=_percentile(ordered, 95),
        )


def _percentile(ordered: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence; None when empty."""
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(pct / 100.0 * len(ordered)) - 1)], 3)


class ProviderChain:
    """Asks providers in order; never raises for a provider failure.

    ``timeout`` is per call, ``turn_deadline`` bounds a whole ``ask`` (then the polite text),
    ``concurrency`` bounds calls in flight per provider, a 429 whose Retry-After is at most
    ``retry_after_budget`` seconds is retried once on the same provider, and ``failure_threshold``
    consecutive provider-level failures (or one auth failure) open a provider's circuit for ``cooldown``
    seconds (a per-request failure, ``ProviderError.per_request``, only sends its request on),
    and so does a stall (see the module docstring; ``stall_seconds`` 0 turns stall detection off).
    """

    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        polite_text: str,
        timeout: float = 20.0,
        turn_deadline: float = 60.0,
        concurrency: int = 32,
        retry_after_budget: float = 2.0,
        failure_threshold: int = 3,
        cooldown: float = 30.0,
        stall_seconds: float = 2.0,
        latency_window: int = 512,
    ) -> None:
        self._polite_text = polite_text
        self._timeout = timeout
        self._turn_deadline = turn_deadline
        self._retry_after_budget = retry_after_budget
        self._slots: list[_Slot] = []
        for provider in providers:
            if any(slot.name == provider.name for slot in self._slots):
                continue  # never the same provider twice
            self._slots.append(
                _Slot(provider, concurrency=concurrency, threshold=max(1, failure_threshold),
                      cooldown=cooldown, latency_window=latency_window, stall_seconds=stall_seconds,
                      timeout=timeout)
            )
        self._asks = self._fallbacks_used = self._polite_answers = self._deadline_exceeded = 0
        self._nursery: trio.Nursery | None = None   # while run() runs: where hedged probes go on
        for slot in self._slots:
            if not slot.provider.available:
                log.warning("LLM provider %s is unavailable (no API key configured): it will be skipped", slot.name)
        if not any(slot.provider.available for slot in self._slots):
            log.error("No LLM provider is available: every answer will be the polite error text")
        else:
            log.info("LLM providers in order: %s", ", ".join(slot.name for slot in self._slots))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the hedged half-open probes (see the module docstring) until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def ask(self, prompt: Prompt) -> Answer:
        """The first successful provider's text, or the polite text when all fail or the turn runs out."""
        self._asks += 1
        answer: Answer | None = None
        with trio.move_on_after(self._turn_deadline) as deadline:
            answer = await self._ask_in_order(prompt)
        if deadline.cancelled_caught:
            self._deadline_exceeded += 1
            log.error("LLM turn deadline of %gs exceeded: answering with the polite text", self._turn_deadline)
        if answer is None:
            self._polite_answers += 1
            return Answer(text=self._polite_text, provider=None)
        if answer.fallback_used:
            self._fallbacks_used += 1
        return answer

    async def _ask_in_order(self, prompt: Prompt) -> Answer | None:
        for index, slot in enumerate(self._slots):
            if not slot.provider.available:
                continue
            fallback = any(later.provider.available for later in self._slots[index + 1:])
            text = await self._attempt(slot, prompt, primary=index == 0, hedge=fallback)
            if text is not None:
                if index > 0:
                    log.info("✅ Respuesta exitosa con proveedor de respaldo: %s", slot.name)
                return Answer(text=text, provider=slot.name, fallback_used=index > 0)
        return None

    async def _attempt(self, slot: _Slot, prompt: Prompt, *, primary: bool, hedge: bool) -> str | None:
        """One provider: the text, or None after logging why it failed (or that its circuit is open).

        ``hedge``: a fallback exists, so a half-open probe that is not answered within the stall limit
        goes on in the chain's nursery while this request moves on."""
        admission = slot.admit(trio.current_time())
        if admission is _Admission.DENY:
            log.debug("LLM provider %s skipped: circuit %s", slot.name, slot.circuit(trio.current_time()))
            return None
        if not primary:
            log.warning("⚠️ Intentando con proveedor de respaldo: %s", slot.name)
        if admission is _Admission.PROBE and hedge and self._nursery is not None:
            return await self._hedged_probe(self._nursery, slot, prompt, primary=primary)
        return await self._decide(slot, prompt, admission, primary=primary)

    async def _hedged_probe(self, nursery: trio.Nursery, slot: _Slot, prompt: Prompt, *, primary: bool) -> str | None:
        """Start the probe in ``nursery``; its text if it is decided within the stall limit, else None."""
        probe = _Probe()

        async def run_probe() -> None:
            try:
                probe.text = await self._decide(slot, prompt, _Admission.PROBE, primary=primary)
            finally:
                probe.done.set()

        nursery.start_soon(run_probe)
        # Nothing known of its latency yet: the stall floor (the fallback answers if the probe is slower).
        patience = slot.stall_after() or slot.stall_seconds or self._timeout
        with trio.move_on_after(patience):
            await probe.done.wait()
        if probe.done.is_set():
            return probe.text
        log.warning("LLM provider %s: half-open probe without an answer after %gs: this message moves on to "
                    "the fallback; the probe goes on (up to %gs) to decide the circuit", slot.name, patience,
                    self._timeout)
        return None

    async def _decide(self, slot: _Slot, prompt: Prompt, admission: _Admission, *, primary: bool) -> str | None:
        """Call the provider (and log a failure with the seed's lines); None when it failed."""
        decided = False
        try:
            text = await self._call_with_retry(slot, prompt, admission)
            decided = True
        except ProviderError as error:
            decided = True
            if primary:
                log.error("Error con LLM provider principal (%s): %s", slot.name, error)
            else:
                log.error("❌ Error también con proveedor de respaldo (%s): %s", slot.name, error)
            return None
        finally:
            if admission is _Admission.PROBE and not decided:
                slot.release_probe()
        return text

    async def _call_with_retry(self, slot: _Slot, prompt: Prompt, admission: _Admission) -> str | None:
        """Call once; after a 429 whose Retry-After fits the budget, wait and call once more.

        Raises ProviderError for the failure that decided; returns None if the circuit opened while
        this call waited for a concurrency slot.
        """
        for attempt in range(2):
            async with slot.limiter:
                if not slot.still_admits(admission, trio.current_time()):
                    log.debug("LLM provider %s skipped: its circuit opened while waiting", slot.name)
                    return None
                error: ProviderError | None = None
                started = trio.current_time()
                timeout = self._timeout   # a probe too: only an answer or a failure decides the circuit
                with trio.CancelScope() as stall_scope:   # cancelled by the slot when the provider stalls
                    call = slot.begin(started, stall_scope)
                    try:
                        with trio.fail_after(timeout):
                            text = await slot.provider.complete(prompt)
                    except trio.TooSlowError:
                        error = ProviderError(ErrorKind.TIMEOUT, f"timeout after {timeout:g}s")
                    except ProviderError as exc:
                        error = exc
                    except Exception as exc:  # an adapter bug must not break the conversation
                        error = ProviderError(ErrorKind.OTHER, f"unexpected error ({type(exc).__name__})")
                    finally:
                        slot.end(call, trio.current_time())
            now = trio.current_time()
            if stall_scope.cancelled_caught:   # counted and logged by the slot when it opened the circuit
                raise ProviderError(ErrorKind.TIMEOUT, f"no answer after {now - started:.1f}s (provider stalled)")
            if error is None:
                slot.record_success(now - started)
                return text
            probe = admission is _Admission.PROBE
            slot.record_failure(error, now, probe=probe)
            retry_after = error.retry_after
            if (
                attempt == 0
                and error.kind is ErrorKind.RATE_LIMIT
                and retry_after is not None
                and retry_after <= self._retry_after_budget
                and slot.circuit(now) == CLOSED
            ):
                log.warning("LLM provider %s: %s; retrying in %gs (Retry-After)", slot.name, error, retry_after)
                await trio.sleep(retry_after)
                admission = _Admission.PASS
                continue
            raise error
        raise AssertionError("unreachable")

    def statistics(self) -> ChainStatistics:
        """A frozen snapshot of every provider's health and the totals."""
        now = trio.current_time()
        return ChainStatistics(
            providers=tuple(slot.statistics(now) for slot in self._slots),
            asks=self._asks,
            fallbacks_used=self._fallbacks_used,
            polite_answers=self._polite_answers,
            deadline_exceeded=self._deadline_exceeded,
        )

    async def aclose(self) -> None:
        """Close every provider's SDK client (one failing to close does not stop the others)."""
        for slot in self._slots:
            try:
                await slot.provider.aclose()
            except Exception as exc:
                log.warning("Closing LLM provider %s failed (%s)", slot.name, type(exc).__name__)


def build_chain(settings: Settings, polite_text: str) -> ProviderChain:
    """The supervisor for ``settings.llm.provider_order``, with every knob from the settings."""
    from .providers import build_provider

    providers = [build_provider(name, settings) for name in settings.llm.provider_order]
    return ProviderChain(
        providers,
        polite_text=polite_text,
        timeout=settings.llm.llm_timeout,
        turn_deadline=settings.llm.turn_deadline_seconds,
        concurrency=settings.llm.llm_concurrency,
        retry_after_budget=settings.llm.llm_retry_after_budget,
        failure_threshold=settings.llm.circuit_failure_threshold,
        cooldown=settings.llm.circuit_cooldown_seconds,
        stall_seconds=settings.llm.circuit_stall_seconds,
    )
