"""The bodies of the operator's JSON API (``/memory/{jid}``, ``/actors...``, ``/supervisors``, ``/instances``).

Each function turns the service's snapshots (conversation views, registry and supervisor
statistics) into JSON-able dicts; nothing here changes state. The admin console's own bodies are
in admin_view.py.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from runtime.bounded import OTHER
from runtime.logs import redact

from . import admin_view
from .conversation_key import ConversationKey
from .payload_guard import map_strings
from .reload import Reloaded
from .settings import Settings, setting_fields

if TYPE_CHECKING:
    from .service import Service

DEAD_LETTERS_SHOWN = 20


async def memory_of(svc: "Service", key: str) -> dict[str, Any] | None:
    """A conversation's window in the seed's shape (plus its instance), None when there is none."""
    chat = await svc.conversation(key)
    if chat is None:
        return None
    return {"user_id": chat.jid, "instance": chat.instance, "count": chat.window_size,
            "messages": chat.seed_messages()}


def actor_list(svc: "Service", cursor: str | None, limit: int, instance: str | None = None) -> dict[str, Any]:
    """One page of live actors in key order (only ``instance``'s when given), with the cursor of
    the next page (None on the last)."""
    page, next_cursor = svc.live_actors(cursor, limit, instance)
    rows = [{
        "jid": stats.state.jid, "instance": stats.state.instance, "key": stats.key, "status": stats.status, "window_size": stats.state.window_size,
        "booking_sent": stats.state.booking_sent, "mailbox_depth": stats.mailbox_depth,
        "last_activity": stats.last_activity, "expires_at": stats.expires_at, "crashes": stats.crashes,
    } for stats in page]
    return {"actors": rows, "next_cursor": next_cursor}


async def actor_detail(svc: "Service", key: str) -> dict[str, Any] | None:
    """A live chat's runtime facts and snapshot with its timed transcript, else its stored state
    (every field but the window) with its transcript in the seed's shape; None when there is none."""
    chat = await svc.conversation(key)
    if chat is None:
        return None
    if chat.actor is not None:
        body = {"live": True, **attrs.asdict(chat.actor)}
        body["state"]["messages"] = chat.timed_messages()
        return body
    parts = ConversationKey.parse(key)
    return {"live": False, "key": key, "jid": parts.jid, "instance": parts.instance, "status": "stored", "state": {
        **chat.state_fields(), "window_size": chat.window_size, "messages": chat.seed_messages(),
    }}


async def control_applied(svc: "Service", key: str, command: str) -> dict[str, Any]:
    """The answer to a command the chat's actor carried out: the flags it changes, as they are now."""
    chat = await svc.conversation(key)
    if chat is None:   # none any more
        return {"status": "applied", "command": command, "paused_until": None, "window_size": 0, "booking_sent": None}
    return {"status": "applied", "command": command, "paused_until": chat.paused_until,
            "window_size": chat.window_size, "booking_sent": chat.booking_sent}


async def supervisors(svc: "Service") -> dict[str, Any]:
    """Readiness, the statistics of the registry and of every supervisor, intake counters and the
    latest dead letters, with every text (last errors, dead letter reasons) redacted."""
    body: dict[str, Any] = {"ready": svc.ready}
    if svc.registry is not None:
        body["registry"] = attrs.asdict(svc.registry.statistics())
    if svc.chain is not None:
        body["llm"] = attrs.asdict(svc.chain.statistics())
    if svc.pool is not None:   # every instance's provider accounts (``llm`` is the default instance's chain)
        body["llm_accounts"] = [attrs.asdict(account) for account in svc.pool.statistics()]
    if svc.outbound is not None:
        body["outbound"] = attrs.asdict(svc.outbound.statistics())
    if svc.crm is not None:
        body["crm"] = attrs.asdict(svc.crm.statistics())
    if svc.summariser is not None:
        body["summary"] = svc.summariser.statistics()   # MEMORY_SUMMARY's folds: calls, failures, in progress
    body["intake"] = {"received": svc.received, "ignored": dict(svc.ignored),
                      "new_chats_refused": svc.new_chats_refused, "refused": dict(svc.intake_refused),
                      "storing": svc.storing}
    body["dead_letters"] = [attrs.asdict(row) for row in await svc.store.dead_letters(DEAD_LETTERS_SHOWN)]
    return map_strings(body, redact)


SECRET_SHOWN = "***"


def instance_settings(settings: Settings) -> dict[str, Any]:
    """Every per-instance setting by its name in the instances file; a secret as ``***`` when set,
    ``""`` when not."""
    shown: dict[str, Any] = {}
    for section, f in setting_fields():
        if f.metadata["per_instance"]:
            value = getattr(getattr(settings, section), f.name)
            shown[f.name] = (SECRET_SHOWN if value else "") if f.metadata["secret"] else value
    return shown


async def instances(svc: "Service") -> dict[str, Any]:
    """Each instance (the default one, then the configured ones in file order) with its effective
    settings, live and stored chats, messages in and replies out, and the LLM accounts its chain
    uses (their circuits); the counters of unconfigured instances as ``other``; every account."""
    tenants = svc.tenants
    live = collections.Counter(ConversationKey.parse(key).instance
                               for key in (svc.registry.keys() if svc.registry is not None else ()))
    now, clock = time.time(), trio.current_time()
    rows = []
    default = tenants.default_instance
    shown = tenants.all() if default not in tenants.names else tenants.all()[1:]
    for tenant in shown:
        counts = svc.per_instance.get(tenant.name, [0, 0, 0])
        circuits = []
        for slot in tenant.chain.slots:
            health = slot.statistics(clock)
            circuits.append({"account": slot.name, "circuit": health.circuit, "available": health.available,
                             "in_flight": health.in_flight, "waiting": health.waiting})
        rows.append({
            "name": tenant.name, "configured": tenant.configured, "default": tenant.name == default,
            "settings": instance_settings(tenant.settings),
            "chats": {"live": live[tenant.name],
                      "stored": (await svc.store.listing(now=now, scope=tenant.name, limit=0)).total},
            "messages_in": counts[0], "replies_out": counts[1], "turns": counts[2],
            "circuits": circuits,
        })
    other = svc.per_instance.get(OTHER, [0, 0, 0])
    body: dict[str, Any] = {
        "instances": rows,
        "other": {"messages_in": other[0], "replies_out": other[1], "turns": other[2]},
        "accounts": [attrs.asdict(a) for a in svc.pool.statistics()] if svc.pool is not None else [],
    }
    return map_strings(body, redact)


def reloaded(result: Reloaded) -> dict[str, Any]:
    """The answer to a reload that put the file in force."""
    return {"status": "reloaded", **attrs.asdict(result)}


async def cluster(svc: "Service") -> dict[str, Any]:
    """Every node sharing this PostgreSQL database (GET /cluster, the same on any node): address,
    last heartbeat, shards owned and counters, as each node last told it with its heartbeat (this
    node's own counters are current); the leases; and the cluster's handoffs, takeovers and fenced
    writes refused, summed over the nodes heard of within the last hour. Never the database URL."""
    owner = svc.owner
    if owner is None:
        return {"enabled": False, "store": svc.settings.storage.kind}
    shown = await admin_view.nodes(svc)
    leases = await svc.store.lease_rows()  # type: ignore[attr-defined]
    held = sum(1 for r in leases if r.owner is not None and r.expires_in > 0)
    expired = sum(1 for r in leases if r.owner is not None and r.expires_in <= 0)

    def total(name: str) -> int:
        return sum(int(node["stats"].get(name, 0)) for node in shown)

    return {
        "enabled": True,
        "node": owner.node,
        "nodes": shown,
        "live_nodes": sum(1 for node in shown if node["live"]),
        "leases": {"shards": owner.shards, "lease_seconds": owner.lease_seconds, "held": held, "expired": expired,
                   "free": len(leases) - held - expired, "max_epoch": max((r.epoch for r in leases), default=0)},
        "handoffs": total("handed_back"),
        "takeovers": total("taken_over"),
        "fenced_writes_refused": total("fenced_refused"),
    }


async def shards(svc: "Service") -> dict[str, Any]:
    """Shard ownership (several nodes on one PostgreSQL database): this node, what it owns, the live
    nodes, lease changes and fenced writes refused, and every owner's count from the lease table.
    Never the database URL."""
    owner = svc.owner
    if owner is None:
        return {"enabled": False, "store": svc.settings.storage.kind}
    rows = await svc.store.lease_rows()  # type: ignore[attr-defined]
    owners: dict[str, int] = {}
    for row in rows:
        if row.owner is not None and row.expires_in > 0:
            owners[row.owner] = owners.get(row.owner, 0) + 1
    feed = svc.feed
    return map_strings({
        "enabled": True,
        "node": owner.node,
        "shards": owner.shards,
        "owned": len(owner.owned),
        "balanced": owner.balanced,
        "lease_seconds": owner.lease_seconds,
        "live_nodes": list(owner.live),
        "owners": dict(sorted(owners.items())),
        "free": sum(1 for row in rows if row.owner is None or row.expires_in <= 0),
        "acquired": owner.acquired,
        "lost": owner.lost,
        "handed_back": owner.handed_back,
        "fenced_refused": svc.fenced.refused if svc.fenced is not None else 0,
        "forwarded": svc.forwarded,
        "inbox": {"polls": feed.polls, "wakeups": feed.wakeups, "carried": feed.carried,
                  "caught_up": feed.caught_up, "keys_tracked": len(feed.delivered)} if feed is not None else None,
        "outbound_dropped": svc.outbound.dropped if svc.outbound is not None else 0,
    }, redact)
