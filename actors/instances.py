"""Which Evolution instance may answer a webhook (docs/security.md): the payload never picks a sender
the operator did not configure.

The deployment *names its instances* when EVOLUTION_INSTANCE or EVOLUTION_INSTANCE_ID is set. A
webhook is then for a known instance when its ``instance`` equals EVOLUTION_INSTANCE or its instance
id equals EVOLUTION_INSTANCE_ID, and its replies go through the configured identifiers only. With
UNKNOWN_INSTANCES=serve, an unknown instance is answered through its own identifiers only. With no
instance named (the local mode), a reply goes through the webhook's own id, then name (docs/behaviour.md §5.4).
"""

from __future__ import annotations

from .inbound import InboundMessage
from .settings import Settings


def is_known(settings: Settings, message: InboundMessage) -> bool:
    """The webhook came for an instance the deployment names."""
    return bool((settings.outbound.evolution_instance and message.instance == settings.outbound.evolution_instance)
                or (settings.outbound.evolution_instance_id and message.instance_id == settings.outbound.evolution_instance_id))


def unknown_instance(settings: Settings, message: InboundMessage) -> bool:
    """The webhook must be ignored: named instances, not one of them, and not served (or not servable)."""
    if not settings.outbound.names_instances or is_known(settings, message):
        return False
    return not (settings.serves_unknown_instances and message.instances)


def sender_instances(settings: Settings, message: InboundMessage) -> tuple[str, ...]:
    """The instance candidates for replies to ``message``, in order."""
    if settings.outbound.names_instances and is_known(settings, message):
        return tuple(i for i in (settings.outbound.evolution_instance_id, settings.outbound.evolution_instance) if i)
    return message.instances
