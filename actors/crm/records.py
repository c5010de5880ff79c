"""The CRM's value types: what a chat asks for (``LeadRequest``) and what the supervisor reports.

Frozen attrs values, so a request can travel through the durable outbox (``attrs.asdict``) and a
snapshot can be handed to ``/supervisors`` and the metrics without sharing live state.
"""

from __future__ import annotations

import attrs

from actors.conversation_key import instance_of


@attrs.frozen
class LeadRequest:
    """Ask the CRM to register a lead for a chat (or, with ``lead_id``, to add a note to it)."""

    jid: str
    name: str
    phone: str | None                # digits from an @s.whatsapp.net JID; None for @lid
    motivo: str = ""
    lead_id: int | None = None       # existing lead: add a note instead
    alt_jid: str = ""                # remoteJidAlt of an @lid chat, when known
    job_id: int | None = None        # durable outbox row id
    empresa: str = ""
    rubro: str = ""
    volumen_mensajes: int | None = None
    email: str = ""                  # a real address when known; otherwise a placeholder is generated
    key: str = ""                    # the conversation key "<instance>/<jid>" (empty: the JID alone)
    recovered: bool = False          # resubmitted from the store (a restart, a takeover): may have run before

    @property
    def chat(self) -> str:
        """What "one lead per chat" counts: the conversation key."""
        return self.key or self.jid

    @property
    def instance(self) -> str:
        """The instance whose Krayin ids the lead gets."""
        return instance_of(self.key) if self.key else ""


@attrs.frozen
class CrmFailure:
    """A job that was given up. Never holds the token."""

    jid: str
    error: str
    attempts: int
    at: float                        # unix time
    job_id: int | None = None


@attrs.frozen
class PendingJob:
    jid: str
    kind: str                        # "lead" | "note"
    attempts: int
    last_error: str
    waiting_seconds: float           # since submitted
    job_id: int | None = None


@attrs.frozen
class CrmStatistics:
    """A snapshot of the CRM supervisor for ``/supervisors`` and metrics."""

    enabled: bool
    queued: int                      # jobs not yet started, all JIDs
    running: int                     # jobs in progress (including those waiting to retry)
    retrying: int                    # jobs sleeping before a retry
    leads_created: int
    notes_added: int
    skipped: int                     # duplicate requests for a JID whose lead exists
    failed: int                      # given up (permanent error, CRM_GIVE_UP_SECONDS or a full queue)
    auth_failing: bool               # the last Krayin answer said the token is bad
    pending: tuple[PendingJob, ...]  # running jobs, oldest first
    failures: tuple[CrmFailure, ...]
