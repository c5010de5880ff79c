"""Replies to WhatsApp: one transport-agnostic supervisor and the transports that carry its sends.

- sender.py: ``OutboundSender``, the policy (per-chat order, candidates, retries, pacing, split,
  dead letters, statistics, typing), and the values it takes and gives.
- transport.py: the ``Transport`` interface and ``SendOutcome``.
- evolution.py: the Evolution API v2 transport over HTTP.
- local.py: the in-process local outbox (``EVOLUTION_API_URL`` empty).
- pacing.py: the per-instance rate and the per-chat min gap.
- split.py: cutting a long reply into WhatsApp-sized parts.
"""

from .evolution import HTTP_CONCURRENCY, PRESENCE_CONCURRENCY, EvolutionTransport
from .local import LocalOutbox, OutboxEntry
from .sender import DeadLetter, Delivery, OutboundMessage, OutboundSender, OutboundStatistics
from .transport import SendOutcome, Transport

__all__ = [
    "HTTP_CONCURRENCY", "PRESENCE_CONCURRENCY", "DeadLetter", "Delivery", "EvolutionTransport", "LocalOutbox",
    "OutboundMessage", "OutboundSender", "OutboundStatistics", "OutboxEntry", "SendOutcome", "Transport",
]
