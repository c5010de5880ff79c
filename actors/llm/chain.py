"""The fallback supervisor: one per provider order, shared by every conversation actor that uses it.

Tries LLM_PROVIDER, then each LLM_PROVIDER_FALLBACK in order (never the same provider twice), then
answers the polite error text. Per provider (a ``ProviderSlot``, slot.py) it bounds concurrent calls
(FIFO), applies a timeout per call, honours a short Retry-After once, and keeps a circuit breaker
(circuit.py) so a dead provider does not add its timeout to every message, with a stall detector
(stall.py) that opens it when the provider hangs, long before its calls time out. The stall check
runs whenever a call asks that provider for a slot. All timing uses ``trio.current_time()`` (tests
run it on a MockClock).

The half-open probe after the cool-down may take the whole call timeout: only an answer (or a
failure) decides the circuit, whatever the provider's latency. So that during a long outage the
customer whose message triggers the probe does not wait that timeout every cool-down, the probe is
*hedged* when a fallback exists: it runs in the chain's own nursery (``run()``, started by the
service), the customer waits for it at most the stall limit and then moves on to the fallback,
while the probe goes on until it is answered or times out. Without a fallback, or before ``run()``
started, the probe runs in the customer's task.

Two things keep the customer's wait short while the primary goes down, before and after its circuit
opens. A call that has had no answer after ``hedge_factor`` x its provider's recent p95 is *hedged*:
the rest of the chain is asked too, in the customer's task; the first answer wins and the other call
is cancelled (a cancelled call is neither a failure nor a completion for the stall detector, so it
makes no circuit look better or worse). And a provider carries the bound of every earlier provider
whose circuit is not closed (``concurrency`` x (1 + that many)): the fallback takes the rerouted load
without queueing it behind its own slots.

A chain's providers may be shared with other chains (actors/llm/accounts.py: one ``ProviderSlot``
per provider account, whatever instance uses it): a ``Link`` brings such a slot and the model this
chain asks it for, and the owner of the slots sizes their bounds across every chain (``size_bounds``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Sequence

import attrs
import trio

from runtime.retry import RetryPolicy

from ..settings import Settings
from .base import ErrorKind, Prompt, Provider, ProviderError
from .circuit import Admission
from .slot import LATENCY_WINDOW, ProviderSlot, ProviderStatistics

log = logging.getLogger(__name__)


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
class ChainStatistics:
    """A snapshot of the supervisor; ``attrs.asdict`` of it is JSON-serialisable."""

    providers: tuple[ProviderStatistics, ...]
    asks: int
    fallbacks_used: int
    polite_answers: int
    deadline_exceeded: int
    hedges: int        # calls without an answer after hedge_factor x p95, so the rest of the chain was asked too
    hedges_won: int    # of those, the ones the rest of the chain answered first


@attrs.frozen(eq=False)
class Link:
    """A provider as one chain uses it: its slot, possibly shared with other chains (one per provider
    account), and the model this chain asks it for (None: the provider's configured one)."""

    slot: ProviderSlot
    model: str | None = None


Precedence = dict[ProviderSlot, tuple[ProviderSlot, ...]]


def precedence(orders: Iterable[Sequence[ProviderSlot]]) -> Precedence:
    """Each slot of ``orders``, with every distinct slot before it in any of them: those whose load
    comes to it when their circuit is not closed."""
    earlier: dict[ProviderSlot, dict[ProviderSlot, None]] = {}
    for slots in orders:
        for index, slot in enumerate(slots):
            earlier.setdefault(slot, {}).update(dict.fromkeys(slots[:index]))
    return {slot: tuple(before) for slot, before in earlier.items()}


def size_bounds(precedence: Precedence) -> None:
    """Size each slot's bound: its own slots, plus those of every slot before it (``precedence``)
    that is configured and whose circuit is not closed."""
    for slot, before in precedence.items():
        slot.size_bound(1 + sum(1 for other in before if other.provider.available and not other.breaker.closed))


@attrs.define
class _Probe:
    """A hedged probe's outcome, for the customer waiting on it."""

    done: trio.Event = attrs.field(factory=trio.Event)
    text: str | None = None


class ProviderChain:
    """Asks providers in order; never raises for a provider failure.

    ``timeout`` is per call, ``turn_deadline`` bounds a whole ``ask`` (then the polite text),
    ``concurrency`` bounds calls in flight per provider, a 429 whose Retry-After is at most
    ``retry_after_budget`` seconds is retried once on the same provider, and ``failure_threshold``
    consecutive provider-level failures (or one auth failure) open a provider's circuit for ``cooldown``
    seconds (a per-request failure, ``ProviderError.per_request``, only sends its request on),
    and so does a stall (see stall.py; ``stall_seconds`` 0 turns stall detection off). A call
    without an answer after ``hedge_factor`` x its provider's p95 is hedged (0: never).

    Each of ``providers`` is a Provider, which gets a slot of its own (built from the knobs here,
    closed by ``aclose``), or a ``Link`` to a slot its owner shares, sizes (``sized_by``) and closes.
    """

    def __init__(
        self,
        providers: Sequence[Provider | Link],
        *,
        polite_text: str,
        timeout: float = 20.0,
        turn_deadline: float = 60.0,
        concurrency: int = 32,
        retry_after_budget: float = 2.0,
        failure_threshold: int = 3,
        cooldown: float = 30.0,
        stall_seconds: float = 2.0,
        latency_window: int = LATENCY_WINDOW,
        hedge_factor: float = 2.0,
        sized_by: Callable[[], None] | None = None,
    ) -> None:
        self._polite_text = polite_text
        self._hedge_factor = hedge_factor
        self._timeout = timeout
        self._turn_deadline = turn_deadline
        # A 429 whose Retry-After fits the budget is retried once on the same provider, after exactly that wait.
        self._rate_limit_retry = RetryPolicy(attempts=2, base=0.0, cap=math.inf, jitter=0.0,
                                             retry_after_budget=retry_after_budget)
        self._slots: list[ProviderSlot] = []
        self._models: dict[ProviderSlot, str | None] = {}
        self._owned: list[ProviderSlot] = []   # the slots built here, whose providers aclose() closes
        for item in providers:
            if isinstance(item, Link):
                slot, model = item.slot, item.model
            else:
                slot, model = ProviderSlot(item, concurrency=concurrency, threshold=max(1, failure_threshold),
                                           cooldown=cooldown, latency_window=latency_window,
                                           stall_seconds=stall_seconds, timeout=timeout), None
            if any(s.provider.name == slot.provider.name for s in self._slots):
                continue  # never the same provider twice
            if not isinstance(item, Link):
                self._owned.append(slot)
            self._slots.append(slot)
            self._models[slot] = model
        own = precedence([self._slots])
        self._size_bounds = sized_by or (lambda: size_bounds(own))
        self._asks = self._fallbacks_used = self._polite_answers = self._deadline_exceeded = 0
        self._hedges = self._hedges_won = 0
        self._nursery: trio.Nursery | None = None   # while run() runs: where hedged probes go on
        for slot in self._slots:
            if not slot.provider.available:
                log.warning("LLM provider %s is unavailable (no API key configured): it will be skipped", slot.name)
        if not any(slot.provider.available for slot in self._slots):
            log.error("No LLM provider is available: every answer will be the polite error text")
        else:
            log.info("LLM providers in order: %s", ", ".join(slot.name for slot in self._slots))

    @property
    def slots(self) -> tuple[ProviderSlot, ...]:
        """The providers in order, as their slots."""
        return tuple(self._slots)

    def use_nursery(self, nursery: trio.Nursery | None) -> None:
        """Where hedged half-open probes go on (None: in the customer's task). ``run`` sets its own;
        a ChainPool sets its one nursery for all its chains."""
        self._nursery = nursery

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the hedged half-open probes (see the module docstring) until cancelled."""
        async with trio.open_nursery() as nursery:
            self.use_nursery(nursery)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.use_nursery(None)

    async def ask(self, prompt: Prompt, *, turn: bool = True) -> Answer:
        """The first successful provider's text, or the polite text when all fail or the turn runs out.

        ``turn=False`` for a call no customer waits on (a summary fold): the providers count it as
        any call, the chain's turn counters (asks, fallbacks, polite answers, deadlines) do not."""
        self._asks += turn
        answer: Answer | None = None
        with trio.move_on_after(self._turn_deadline) as deadline:
            answer = await self._ask_in_order(prompt)
        if deadline.cancelled_caught:
            self._deadline_exceeded += turn
            log.error("LLM turn deadline of %gs exceeded: answering with the polite text", self._turn_deadline)
        if answer is None:
            self._polite_answers += turn
            return Answer(text=self._polite_text, provider=None)
        if answer.fallback_used:
            self._fallbacks_used += turn
        return answer

    async def _ask_in_order(self, prompt: Prompt, start: int = 0) -> Answer | None:
        """The providers from index ``start`` on, in order: the first answer, or None."""
        for index in range(start, len(self._slots)):
            slot = self._slots[index]
            if not slot.provider.available:
                continue
            fallback = any(later.provider.available for later in self._slots[index + 1:])
            self._size_bounds()
            admission = slot.admit(trio.current_time())
            if admission is Admission.DENY:
                log.debug("LLM provider %s skipped: circuit %s", slot.name, slot.breaker.state(trio.current_time()))
                continue
            if index > 0:
                log.warning("⚠️ Intentando con proveedor de respaldo: %s", slot.name)
            hedge_after = self._hedge_after(slot) if fallback and admission is Admission.PASS else None
            if hedge_after is not None:
                return await self._hedged(index, prompt, hedge_after)
            if admission is Admission.PROBE and fallback and self._nursery is not None:
                # a probe is not answered within the stall limit: it goes on in the chain's nursery
                text = await self._hedged_probe(self._nursery, slot, prompt, primary=index == 0)
            else:
                text = await self._decide(slot, prompt, admission, primary=index == 0)
            if text is not None:
                return self._answer(index, text)
        return None

    def _answer(self, index: int, text: str) -> Answer:
        slot = self._slots[index]
        if index > 0:
            log.info("✅ Respuesta exitosa con proveedor de respaldo: %s", slot.name)
        return Answer(text=text, provider=slot.name, fallback_used=index > 0)

    def _hedge_after(self, slot: ProviderSlot) -> float | None:
        """Seconds after which a call to ``slot`` is hedged: hedge_factor x its typical latency, the
        larger of its p95 and its slowest recent answer (as for the stall limit: a provider that became
        slower but answers is not hedged away for good); None: never (off, or no latency known yet)."""
        latencies = slot.latencies
        if self._hedge_factor <= 0 or not latencies:
            return None
        return self._hedge_factor * max(latencies.p95_ms(), latencies.slowest_recent_ms()) / 1000.0

    async def _hedged(self, index: int, prompt: Prompt, hedge_after: float) -> Answer | None:
        """Call provider ``index``; without an answer after ``hedge_after`` seconds, ask the providers
        after it too. The first answer wins and the other call is cancelled; a failure waits for the other."""
        slot = self._slots[index]
        winner: Answer | None = None
        async with trio.open_nursery() as nursery:
            called = trio.Event()

            async def call() -> None:
                nonlocal winner
                try:
                    text = await self._decide(slot, prompt, Admission.PASS, primary=index == 0)
                    if text is not None:
                        winner = self._answer(index, text)
                        nursery.cancel_scope.cancel()   # the rest of the chain, if it was asked
                finally:
                    called.set()

            nursery.start_soon(call)
            with trio.move_on_after(hedge_after):
                await called.wait()
            hedged = not called.is_set()
            if hedged:
                self._hedges += 1
                log.info("LLM provider %s: no answer after %.2fs (%g x its p95): asking the fallback too",
                         slot.name, hedge_after, self._hedge_factor)
            rest = await self._ask_in_order(prompt, index + 1)
            if rest is not None:
                winner = rest
                self._hedges_won += hedged
                nursery.cancel_scope.cancel()   # the slower call: cancelled, neither a failure nor an answer
        return winner

    async def _hedged_probe(self, nursery: trio.Nursery, slot: ProviderSlot, prompt: Prompt, *, primary: bool) -> str | None:
        """Start the probe in ``nursery``; its text if it is decided within the stall limit, else None."""
        probe = _Probe()

        async def run_probe() -> None:
            try:
                probe.text = await self._decide(slot, prompt, Admission.PROBE, primary=primary)
            finally:
                probe.done.set()

        nursery.start_soon(run_probe)
        # Nothing known of its latency yet: the stall floor (the fallback answers if the probe is slower).
        patience = slot.stall.limit() or slot.stall.floor or self._timeout
        with trio.move_on_after(patience):
            await probe.done.wait()
        if probe.done.is_set():
            return probe.text
        log.warning("LLM provider %s: half-open probe without an answer after %gs: this message moves on to "
                    "the fallback; the probe goes on (up to %gs) to decide the circuit", slot.name, patience,
                    self._timeout)
        return None

    async def _decide(self, slot: ProviderSlot, prompt: Prompt, admission: Admission, *, primary: bool) -> str | None:
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
            if admission is Admission.PROBE and not decided:
                slot.breaker.release_probe()
        return text

    async def _call_with_retry(self, slot: ProviderSlot, prompt: Prompt, admission: Admission) -> str | None:
        """Call once; after a 429 whose Retry-After fits the budget, wait and call once more.

        Raises ProviderError for the failure that decided; returns None if the circuit opened while
        this call waited for a concurrency slot.
        """
        first_started, attempt = trio.current_time(), 0
        while True:
            attempt += 1
            async with slot.limiter:
                if not slot.breaker.still_admits(admission, trio.current_time()):
                    log.debug("LLM provider %s skipped: its circuit opened while waiting", slot.name)
                    return None
                error: ProviderError | None = None
                started = trio.current_time()
                timeout = self._timeout   # a probe too: only an answer or a failure decides the circuit
                with trio.CancelScope() as stall_scope:   # cancelled by the slot when the provider stalls
                    call = slot.begin(started, stall_scope)
                    completed = True   # unless cancelled: by a stall, a won hedge or the turn deadline
                    try:
                        with trio.fail_after(timeout):
                            text = await slot.provider.complete(prompt.seen_by(slot.provider.name),
                                                                model=self._models[slot])
                    except trio.Cancelled:
                        completed = False
                        raise
                    except trio.TooSlowError:
                        error = ProviderError(ErrorKind.TIMEOUT, f"timeout after {timeout:g}s")
                    except ProviderError as exc:
                        error = exc
                    except Exception as exc:  # an adapter bug must not break the conversation
                        error = ProviderError(ErrorKind.OTHER, f"unexpected error ({type(exc).__name__})")
                    finally:
                        slot.end(call, trio.current_time(), completed=completed)
            now = trio.current_time()
            if stall_scope.cancelled_caught:   # counted and logged by the slot when it opened the circuit
                raise ProviderError(ErrorKind.TIMEOUT, f"no answer after {now - started:.1f}s (provider stalled)")
            if error is None:
                slot.record_success(now - started)
                return text
            slot.record_failure(error, now, probe=admission is Admission.PROBE)
            delay = None
            if error.kind is ErrorKind.RATE_LIMIT and error.retry_after is not None and slot.breaker.closed:
                delay = self._rate_limit_retry.delay(attempt, elapsed=now - first_started,
                                                     retry_after=error.retry_after)
            if delay is None:
                raise error
            log.warning("LLM provider %s: %s; retrying in %gs (Retry-After)", slot.name, error, delay)
            await trio.sleep(delay)
            admission = Admission.PASS

    def statistics(self) -> ChainStatistics:
        """A frozen snapshot of every provider's health and the totals."""
        now = trio.current_time()
        return ChainStatistics(
            providers=tuple(slot.statistics(now) for slot in self._slots),
            asks=self._asks,
            fallbacks_used=self._fallbacks_used,
            polite_answers=self._polite_answers,
            deadline_exceeded=self._deadline_exceeded,
            hedges=self._hedges,
            hedges_won=self._hedges_won,
        )

    async def aclose(self) -> None:
        """Close the SDK client of every provider this chain built (shared ones are their owner's)."""
        await close_providers(self._owned)


async def close_providers(slots: Iterable[ProviderSlot]) -> None:
    """Close each slot's provider (one failing to close does not stop the others)."""
    for slot in slots:
        try:
            await slot.provider.aclose()
        except Exception as exc:
            log.warning("Closing LLM provider %s failed (%s)", slot.name, type(exc).__name__)


def chain_options(settings: Settings) -> dict[str, Any]:
    """A chain's knobs from the settings (all process-wide: the same for every instance)."""
    llm = settings.llm
    return dict(timeout=llm.llm_timeout, turn_deadline=llm.turn_deadline_seconds, concurrency=llm.llm_concurrency,
                retry_after_budget=llm.llm_retry_after_budget, failure_threshold=llm.circuit_failure_threshold,
                cooldown=llm.circuit_cooldown_seconds, stall_seconds=llm.circuit_stall_seconds,
                hedge_factor=llm.llm_hedge_factor)


def build_chain(settings: Settings, polite_text: str) -> ProviderChain:
    """The supervisor for ``settings.llm.provider_order`` with providers of its own (a single-tenant
    service; several instances share their accounts' providers through actors/llm/accounts.py)."""
    from .providers import build_provider

    providers = [build_provider(name, settings) for name in settings.llm.provider_order]
    return ProviderChain(providers, polite_text=polite_text, **chain_options(settings))
