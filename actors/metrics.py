"""Prometheus metrics, built at scrape time from the supervisors' snapshots (never live state).

Only the two latency histograms (a turn's, a webhook's ack) are recorded as they happen; everything
else is read from the ``statistics()`` snapshots of the registry, the LLM chain, the outbound and
CRM supervisors and the intake counters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .service import Service

CIRCUIT_STATES = ("closed", "half_open", "open")
TURN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)
# 1 ms to Evolution's 30 s timeout: a fast ack is a few ms, one past 30 s is a webhook Evolution sends again.
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)
ACK_OUTCOMES = ("accepted", "ignored", "refused", "unavailable")   # 200 accepted, 200 ignored, 4xx, 5xx


class ServiceCollector(Collector):
    """Reads one Service's snapshots on every scrape."""

    def __init__(self, service: "Service") -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        svc = self._service
        received = CounterMetricFamily("agent_messages_received", "Webhook messages that parsed as customer or operator messages")
        received.add_metric([], svc.received)
        yield received
        ignored = CounterMetricFamily("agent_messages_ignored", "Webhooks answered 200 ignored", labels=["reason"])
        for reason, count in sorted(svc.ignored.items()):
            ignored.add_metric([reason], count)
        yield ignored
        refused = CounterMetricFamily("agent_new_chats_refused", "Webhooks answered 429 past NEW_CHATS_PER_MINUTE")
        refused.add_metric([], svc.new_chats_refused)
        yield refused
        busy = CounterMetricFamily("agent_intake_refused", "Webhooks answered 503 before any state changed "
                                   "(busy: INTAKE_MAX_IN_FLIGHT; backlog: OUTBOUND_MAX_BACKLOG)", labels=["reason"])
        for reason, count in sorted(svc.intake_refused.items()):
            busy.add_metric([reason], count)
        yield busy

        per_instance = sorted(svc.per_instance.items())
        for index, (name, doc) in enumerate((
            ("agent_instance_messages_in", "Customer and operator messages accepted, by instance"),
            ("agent_instance_replies_out", "Replies sent, by instance"),
            ("agent_instance_turns", "Turns answered, by instance"),
        )):
            counter = CounterMetricFamily(name, doc + " (configured instances and the default one; the rest: other)",
                                          labels=["instance"])
            for instance, counts in per_instance:
                counter.add_metric([instance], counts[index])
            yield counter

        registry = svc.registry
        if registry is not None:
            stats = registry.statistics()
            for name, doc, value in (
                ("agent_live_actors", "Conversation actors in memory", stats.live_actors),
                ("agent_running_actors", "Actors handling a turn right now", stats.running_actors),
                ("agent_failed_actors", "Actors stopped for crashing too often", stats.failed_actors),
                ("agent_mailbox_depth_total", "Messages queued in all mailboxes", stats.mailbox_depth_total),
                ("agent_mailbox_depth_max", "Messages queued in the fullest mailbox", stats.mailbox_depth_max),
            ):
                gauge = GaugeMetricFamily(name, doc)
                gauge.add_metric([], value)
                yield gauge
            for name, doc, value in (
                ("agent_actor_spawns", "Actors spawned", stats.spawned),
                ("agent_actor_expiries", "Actors expired after ACTOR_IDLE_TTL", stats.expired),
                ("agent_actor_restarts", "Crashed turns (each is a supervised restart)", stats.crashes),
            ):
                counter = CounterMetricFamily(name, doc)
                counter.add_metric([], value)
                yield counter

        chain = svc.chain
        if chain is not None:
            cstats = chain.statistics()
            calls = CounterMetricFamily("agent_llm_calls", "LLM calls by provider and outcome", labels=["provider", "outcome"])
            circuit = GaugeMetricFamily("agent_llm_circuit_state", "1 for the provider's current circuit state",
                                        labels=["provider", "state"])
            in_flight = GaugeMetricFamily("agent_llm_in_flight", "LLM calls in flight", labels=["provider"])
            tokens = CounterMetricFamily("agent_llm_prompt_tokens", "Prompt tokens the providers reported, by "
                                         "provider and kind: all, cached (read from the provider's prompt cache), "
                                         "cache_write (written to it)", labels=["provider", "kind"])
            for p in cstats.providers:
                if p.prompt_cache is not None:
                    tokens.add_metric([p.name, "all"], p.prompt_cache["prompt_tokens"])
                    tokens.add_metric([p.name, "cached"], p.prompt_cache["cached_tokens"])
                    tokens.add_metric([p.name, "cache_write"], p.prompt_cache["cache_write_tokens"])
                calls.add_metric([p.name, "success"], p.successes)
                for kind, count in sorted(p.failures.items()):
                    calls.add_metric([p.name, kind], count)
                for state in CIRCUIT_STATES:
                    circuit.add_metric([p.name, state], 1.0 if p.circuit == state else 0.0)
                in_flight.add_metric([p.name], p.in_flight)
            yield calls
            yield circuit
            yield in_flight
            yield tokens
            for name, doc, value in (
                ("agent_llm_fallbacks", "Answers given by a fallback provider", cstats.fallbacks_used),
                ("agent_llm_polite_answers", "Turns answered with the polite error text", cstats.polite_answers),
                ("agent_llm_hedges", "Slow LLM calls that also asked the fallback", cstats.hedges),
            ):
                counter = CounterMetricFamily(name, doc)
                counter.add_metric([], value)
                yield counter

        outbound = svc.outbound
        if outbound is not None:
            ostats = outbound.statistics()
            queue = GaugeMetricFamily("agent_outbound_queued", "Replies waiting to be sent")
            queue.add_metric([], ostats.queued)
            yield queue
            for name, doc, value in (
                ("agent_outbound_backlog", "Replies handed over and not yet settled (OUTBOUND_MAX_BACKLOG)", ostats.backlog),
                ("agent_outbound_backlog_oldest_seconds", "How long the oldest unsettled reply has waited",
                 ostats.backlog_oldest_seconds),
                ("agent_outbound_pacing_waiting", "Sends waiting for their per-instance pacing slot", ostats.pacing_waiting),
            ):
                gauge = GaugeMetricFamily(name, doc)
                gauge.add_metric([], value)
                yield gauge
            sends = CounterMetricFamily("agent_outbound_messages", "Replies by outcome", labels=["outcome"])
            sends.add_metric(["sent"], ostats.sent)
            sends.add_metric(["dead_letter"], ostats.failed)
            sends.add_metric(["retried"], ostats.retried)
            yield sends

        crm = svc.crm
        if crm is not None:
            rstats = crm.statistics()
            queue = GaugeMetricFamily("agent_crm_jobs_pending", "CRM jobs queued or running")
            queue.add_metric([], rstats.queued + rstats.running)
            yield queue
            jobs = CounterMetricFamily("agent_crm_jobs", "CRM jobs by outcome", labels=["outcome"])
            for outcome, value in (("lead_created", rstats.leads_created), ("note_added", rstats.notes_added),
                                   ("skipped", rstats.skipped), ("failed", rstats.failed)):
                jobs.add_metric([outcome], value)
            yield jobs


class Metrics:
    """The app's own registry (not the global one): the collector plus the two latency histograms."""

    def __init__(self, service: "Service") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServiceCollector(service))
        self.turn_seconds = Histogram("agent_turn_seconds", "Time from a message's arrival to its committed reply",
                                      buckets=TURN_BUCKETS, registry=self.registry)
        self.ack_seconds = Histogram("agent_webhook_ack_seconds", "A webhook's time from the handler's start to its "
                                     "answer, by outcome", ["outcome"], buckets=ACK_BUCKETS, registry=self.registry)
        for outcome in ACK_OUTCOMES:   # every outcome shows from the first scrape, at 0
            self.ack_seconds.labels(outcome)

    def observe_ack(self, status: int, body: dict[str, object], seconds: float) -> None:
        """One webhook answered with ``status`` and ``body`` after ``seconds``."""
        if status < 300:
            outcome = "accepted" if body.get("status") == "accepted" else "ignored"
        else:
            outcome = "refused" if status < 500 else "unavailable"
        self.ack_seconds.labels(outcome).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
