"""Read models of the admin console: the chat list, one chat, delivery health and the overview.

Each function turns the service's snapshots (the store's listing, conversation views, registry and
supervisor statistics) into JSON-able dicts; nothing here changes state. Errors and reasons shown
to the operator go through the log redaction, so no secret reaches the page.
"""

from __future__ import annotations

import time
from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable

import attrs

from runtime.logs import redact
from runtime.store import Cursor, MetaRow

from .conversation_key import ConversationKey
from .jid import phone_of
from .payload_guard import map_strings

if TYPE_CHECKING:
    from .service import Service

CHAT_STATES = ("answering", "waiting", "paused", "takeover", "finished", "failed")
LIVE_STATES = ("answering", "failed")           # known to the registry only
PAGE_MAX = 200
STARTED = time.time()


class Activity:
    """Messages in and replies out per minute over the last hour (one bucket per wall-clock minute)."""

    MINUTES = 60

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: dict[int, list[int]] = {}

    def count(self, *, inbound: int = 0, outbound: int = 0) -> None:
        minute = int(self._clock() // 60)
        bucket = self._buckets.get(minute)
        if bucket is None:
            bucket = self._buckets[minute] = [0, 0]
            for old in [m for m in self._buckets if m <= minute - self.MINUTES]:
                del self._buckets[old]
        bucket[0] += inbound
        bucket[1] += outbound

    def series(self) -> list[dict[str, Any]]:
        """The last hour, oldest minute first: ``{"at": unix minute start, "in": n, "out": n}``."""
        now = int(self._clock() // 60)
        return [{"at": m * 60, "in": self._buckets.get(m, (0, 0))[0], "out": self._buckets.get(m, (0, 0))[1]}
                for m in range(now - self.MINUTES + 1, now + 1)]


def parse_cursor(text: str) -> Cursor | None:
    """``"<last_activity>|<key>"`` (the ``next`` of a previous page); ValueError when malformed."""
    if not text:
        return None
    at, sep, key = text.partition("|")
    if not sep or not key:
        raise ValueError("cursor must be <last_activity>|<key>")
    return float(at), key


def _chat_row(svc: "Service", row: MetaRow, now: float) -> dict[str, Any]:
    registry = svc.registry
    stats = registry.actor_statistics(row.key) if registry is not None else None
    meta = row.meta
    state = meta.status_at(now) or "waiting"
    window, depth = meta.size, 0
    expires = meta.last_activity + svc.settings.conversation.actor_idle_ttl
    if stats is not None:
        if stats.status == "failed":
            state = "failed"
        elif stats.status == "running" or stats.mailbox_depth:
            state = "answering"
        window, depth, expires = stats.state.window_size, stats.mailbox_depth, stats.expires_at
    parts = ConversationKey.parse(row.key)
    return {
        "jid": parts.jid, "number": phone_of(parts.jid) or parts.jid, "name": meta.title,
        "instance": parts.instance, "state": state, "preview": meta.preview,
        "last_activity": meta.last_activity, "mailbox_depth": depth, "window_size": window,
        "expires_at": expires, "live": stats is not None,
    }


def _live_keys(svc: "Service", state: str) -> list[str]:
    """The live chats in a state only the registry knows: failed, or answering (a turn running)."""
    registry = svc.registry
    if registry is None:
        return []
    return registry.keys_with_status("failed" if state == "failed" else "running")


async def chat_list(svc: "Service", *, search: str = "", state: str = "", instance: str = "",
                    after: Cursor | None = None, limit: int = 50) -> dict[str, Any]:
    """One page of chats, most recent activity first, with the cursor of the next page."""
    now = time.time()
    query: dict[str, Any] = {"now": now, "search": search.strip(), "scope": instance or None,
                             "after": after, "limit": max(1, min(limit, PAGE_MAX))}
    if state in LIVE_STATES:
        query["keys"] = _live_keys(svc, state)
    elif state:
        query["status"] = "" if state == "waiting" else state
    page = await svc.store.listing(**query)
    rows = [_chat_row(svc, row, now) for row in page.rows]
    if state:  # a stored status can be overtaken by a live one (a paused chat being answered)
        rows = [r for r in rows if r["state"] == state]
    last = page.rows[-1] if page.rows else None
    more = last is not None and len(page.rows) == query["limit"]
    return {"chats": rows, "total": page.total, "instances": page.scopes, "now": now,
            "next": f"{last.meta.last_activity!r}|{last.key}" if more and last else None}


async def chat_detail(svc: "Service", key: str) -> dict[str, Any] | None:
    """One conversation (by its key): its transcript (role user | assistant | operator, text, unix
    time) and its flags."""
    chat = await svc.conversation(key)
    if chat is None:
        return None
    jid = chat.jid
    stats = chat.actor
    page = await svc.store.listing(now=time.time(), keys=[key], limit=1)
    row = _chat_row(svc, page.rows[0], time.time()) if page.rows else {"state": "answering"}
    last_error = stats.last_error if stats is not None else None
    return {
        "jid": jid, "number": phone_of(jid) or jid, "name": chat.lead.nombre,
        "instance": chat.instance, "state": row["state"], "live": chat.live,
        "messages": [{"role": e.role, "text": e.content, "at": e.at} for e in chat.window],
        "booking_sent": chat.booking_sent, "lead_id": chat.lead.lead_id,
        "paused_until": chat.paused_until, "pause_reason": chat.pause_reason,
        "crashes": max(chat.crashes, stats.crashes if stats is not None else 0),
        "last_error": redact(last_error) if last_error else None,
        "mailbox_depth": stats.mailbox_depth if stats is not None else 0,
        "messages_in": chat.messages_in, "replies_out": chat.replies_out,
        "summary": chat.summary,
    }


async def delivery(svc: "Service") -> dict[str, Any]:
    """LLM providers (every provider account of every instance: the default instance's first), the
    outbound and CRM supervisors, and the dead letters (no payload text)."""
    body: dict[str, Any] = {"providers": [], "outbound": None, "crm": None}
    if svc.pool is not None:
        providers = [account.health for account in svc.pool.statistics()]
    else:
        providers = list(svc.chain.statistics().providers) if svc.chain is not None else []
    for p in providers:
        body["providers"].append({
            "name": p.name, "configured": p.configured, "circuit": p.circuit, "in_flight": p.in_flight,
            "waiting": p.waiting, "calls": p.calls, "successes": p.successes, "failures": dict(p.failures),
            "latency_p50_ms": p.latency_p50_ms, "latency_p95_ms": p.latency_p95_ms,
            "last_error": redact(p.last_error) if p.last_error else None,
        })
    if svc.outbound is not None:
        o = svc.outbound.statistics()
        body["outbound"] = {k: v for k, v in attrs.asdict(o).items()
                            if k in ("mode", "queued", "in_flight", "active_jids", "sent", "retried", "failed")}
    if svc.crm is not None:
        c = svc.crm.statistics()
        body["crm"] = {k: v for k, v in attrs.asdict(c).items()
                       if k in ("enabled", "queued", "running", "retrying", "leads_created", "notes_added",
                                "skipped", "failed", "auth_failing")}
    body["dead_letters"] = [{"id": d.id, "jid": ConversationKey.parse(d.key).jid,
                             "instance": ConversationKey.parse(d.key).instance, "kind": d.kind,
                             "reason": redact(d.reason), "at": d.at}
                            for d in await svc.store.dead_letters(100)]
    return body


def _version() -> str:
    try:
        return metadata.version("whatsapp-actor-agent")
    except metadata.PackageNotFoundError:
        return "unknown"


async def nodes(svc: "Service") -> list[dict[str, Any]]:
    """Every node sharing this PostgreSQL database (none with a single-process store): address, last
    heartbeat, shards owned and counters, as each node last told them with its heartbeat (this node's
    own counters are current). One read of the nodes table: the console's overview asks every second."""
    owner = svc.owner
    if owner is None:
        return []
    now, mine = time.time(), svc.describe_node().stats
    return map_strings([{
        "id": n.node, "address": n.info.address, "live": n.live, "this_node": n.node == owner.node,
        "last_heartbeat": round(now - n.seconds_ago, 3), "seconds_since_heartbeat": round(n.seconds_ago, 3),
        "started_at": n.info.started_at, "shards_owned": n.owned,
        "stats": dict(mine if n.node == owner.node else n.info.stats),
    } for n in await svc.store.nodes(owner.lease_seconds)], redact)  # type: ignore[attr-defined]


async def overview(svc: "Service") -> dict[str, Any]:
    """The last hour's traffic per minute, live actors, stored chats, uptime, version, and the nodes
    sharing the database (``nodes``)."""
    registry = svc.registry
    stored = (await svc.store.listing(now=time.time(), limit=0)).total
    return {
        "series": svc.activity.series(), "live_actors": len(registry) if registry is not None else 0,
        "stored_chats": stored, "uptime_seconds": time.time() - STARTED, "version": _version(),
        "ready": svc.ready, "received": svc.received, "nodes": await nodes(svc),
    }
