"""The CRM side: booking leads registered in Krayin CRM without ever delaying a conversation
(docs/behaviour.md §6).

- ``records``: the value types (``LeadRequest`` in; ``CrmStatistics``, ``PendingJob``, ``CrmFailure`` out).
- ``krayin``: the Krayin REST adapter (``KrayinClient``, ``KrayinError`` and what a status means).
- ``payloads``: the Krayin payload shapes of a request (person, lead title/description/value, note).
- ``persons``: find the chat's person in Krayin before creating one, and reuse a duplicate.
- ``supervisor``: ``CrmSupervisor``, the policy (per-chat order, idempotence, retries, bookkeeping).

``KRAYIN_PIPELINE_ID`` is accepted and ignored: Krayin derives a lead's pipeline from its stage
(``KRAYIN_STAGE_ID``), so only the stage is sent.
"""

from .records import CrmFailure, CrmStatistics, LeadRequest, PendingJob
from .supervisor import CONCURRENT_JOBS, LEAD_RECORD_TIMEOUT_SECONDS, QUEUE_CAPACITY, CrmSupervisor

__all__ = [
    "CONCURRENT_JOBS", "LEAD_RECORD_TIMEOUT_SECONDS", "QUEUE_CAPACITY",
    "CrmFailure", "CrmStatistics", "CrmSupervisor", "LeadRequest", "PendingJob",
]
