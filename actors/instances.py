"""Which Evolution instance may answer a webhook (docs/security.md): the payload never picks a sender
the operator did not configure, and a reply never goes out through another tenant's number.

The deployment *names its instances* when it has an instances file with at least one instance, or
EVOLUTION_INSTANCE or EVOLUTION_INSTANCE_ID is set (``Tenants.names_instances``). A webhook is then
for a known instance when its ``instance`` is one of the file's, equals EVOLUTION_INSTANCE, or its
instance id equals EVOLUTION_INSTANCE_ID. Replies go through the webhook's own instance: its id and
name, and EVOLUTION_INSTANCE_ID / EVOLUTION_INSTANCE only for the instance they name (with only those
named, its replies go through the configured identifiers alone, as before instances files). With
UNKNOWN_INSTANCES=serve an unknown instance is answered through its own identifiers only. With no
instance named (the local mode), a reply goes through the webhook's own id, then name
(docs/behaviour.md §5.4).
"""

from __future__ import annotations

from .inbound import InboundMessage
from .tenants import Tenants


def _names_env_instance(tenants: Tenants, message: InboundMessage) -> bool:
    """The webhook came for the instance EVOLUTION_INSTANCE / EVOLUTION_INSTANCE_ID name."""
    out = tenants.base.outbound
    return bool((out.evolution_instance and message.instance == out.evolution_instance)
                or (out.evolution_instance_id and message.instance_id == out.evolution_instance_id))


def is_known(tenants: Tenants, message: InboundMessage) -> bool:
    """The webhook came for an instance the deployment names."""
    return (bool(message.instance) and tenants.for_instance(message.instance).configured) \
        or _names_env_instance(tenants, message)


def serves_unknown(tenants: Tenants) -> bool:
    """UNKNOWN_INSTANCES, resolved: empty means ignore when instances are named, serve when none are."""
    chosen = tenants.base.security.unknown_instances
    return chosen == "serve" if chosen else not tenants.names_instances


def unknown_instance(tenants: Tenants, message: InboundMessage) -> bool:
    """The webhook must be ignored: named instances, not one of them, and not served (or not servable)."""
    if not tenants.names_instances or is_known(tenants, message):
        return False
    return not (serves_unknown(tenants) and message.instances)


def sender_instances(tenants: Tenants, message: InboundMessage) -> tuple[str, ...]:
    """The instance candidates for replies to ``message``, in order."""
    out = tenants.base.outbound
    if _names_env_instance(tenants, message):
        configured = tuple(i for i in (out.evolution_instance_id, out.evolution_instance) if i)
        if not tenants.for_instance(message.instance).configured:
            return configured          # EVOLUTION_INSTANCE* alone: its identifiers only, as always
        return tuple(dict.fromkeys((*message.instances, *configured)))
    return message.instances
