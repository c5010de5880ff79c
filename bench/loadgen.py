"""Load generator for ``bench/run.py``: one trio process posting Evolution webhooks with httpx.

Run by the harness as ``python bench/loadgen.py '<json config>'``; prints one JSON object (the
scenario's measurements) on its last stdout line. Not meant to be run by hand, but it can be.

Every message text starts with the marker ``m:<user>:<seq>``; the echo LLM fake
(``tests/fakes/llm.py --echo-chars``) puts it back in the reply, and the fake Evolution API (tests/fakes/evolution.py) records each
``sendText`` with its arrival time (``wall``). A poller reads ``GET /_recorded?since=N`` and checks
every reply: its marker must be expected (else ``unexpected``), answered once (else ``duplicates``),
sent to the JID the marker belongs to (else ``misrouted``) and, per JID, come after the replies to
that JID's earlier messages (else ``out_of_order``). A reply without a marker (the polite error text)
is given to the JID's oldest unanswered message and counted as ``polite``. Whatever is still
unanswered when the scenario's drain time runs out is ``lost``.

Times: ``time.time()`` here and in the fake Evolution process (same host clock). Ack latency is the
webhook POST round trip; reply latency is from just before the POST that was accepted... to the
sendText's arrival at the fake; ``overhead`` is reply latency minus the LLM fake's latency.
"""

from __future__ import annotations

import collections
import json
import math
import os
import random
import re
import signal
import sys
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx
import trio

from evolution_shape import EvolutionSender   # bench/ is on sys.path when run as a script
from run import cpu_seconds, status_kb

MARKER = re.compile(r"m:(\d+):(\d+)")
SHARD = 32          # connections per httpx.AsyncClient (see Harness.__init__)
WARMUP_USER = 900_000_000   # warm-up chats: m:<WARMUP_USER + i>:0
FILLER = ("Hola, quisiera saber los horarios de atención y los precios del servicio para esta semana, "
          "gracias de antemano por la ayuda y la paciencia con mis preguntas. ") * 4


def jid_of(user: int) -> str:
    return f"5491{user:09d}@s.whatsapp.net"


def user_of(number: str) -> int | None:
    digits = number.split("@", 1)[0]
    if digits.startswith("5491") and digits[4:].isdigit():
        return int(digits[4:])
    return None


def percentile(samples: list[float], pct: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(pct / 100.0 * len(ordered)) - 1)]


def summary(samples: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p99/max in ms (``scale`` converts seconds)."""
    def sc(v: float | None) -> float | None:
        return None if v is None else round(v * scale, 2)
    return {"p50": sc(percentile(samples, 50)), "p99": sc(percentile(samples, 99)),
            "max": sc(max(samples) if samples else None), "n": len(samples)}


class Msg:
    __slots__ = ("user", "seq", "sent", "acked", "ack_s", "status", "retries", "answered", "reply_at", "event",
                 "llm", "polite")

    def __init__(self, user: int, seq: int, llm: float) -> None:
        self.user, self.seq, self.llm = user, seq, llm
        self.sent = self.acked = self.ack_s = self.reply_at = 0.0
        self.status = 0
        self.retries = 0
        self.answered = 0
        self.polite = False
        self.event: trio.Event | None = None


class Harness:
    """Shared state of one scenario: the HTTP clients, every message sent and every reply seen."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.webhook = cfg["service_url"] + "/webhook"
        self.service = cfg["service_url"]
        self.evolution = cfg.get("evolution_url", "")
        self.llm_latency = float(cfg.get("llm_latency_s", 1.0))
        self.text_chars = int(cfg.get("text_chars", 60))
        self.instance = cfg.get("instance", "bench")
        self.msgs: dict[tuple[int, int], Msg] = {}
        self.unanswered: dict[int, list[Msg]] = {}     # per user, in sending order (for markerless replies)
        self.last_seq: dict[int, int] = {}             # per user, the seq of the last reply seen
        self.counts = {"duplicates": 0, "misrouted": 0, "out_of_order": 0, "unexpected": 0, "polite": 0,
                       "http_errors": 0, "retries_503": 0, "ignored": 0, "unsent": 0}
        self.ack_lat: list[float] = []
        self.error_kinds: collections.Counter[str] = collections.Counter()   # exception class of each failed POST
        self.replies_seen = 0
        self.cursor = 0
        self.first_send = 0.0
        self.last_reply = 0.0
        # "pooled": the httpx clients below; "evolution": one connection per POST in flight, no cap
        # (bench/evolution_shape.py); "evolution-fresh": the same, a new connection for every POST
        self.shape = cfg.get("shape", "pooled")
        # httpcore's pool scans every connection and every queued request on each request start and
        # end (O(n)): one client with 512 connections costs ~20 ms of loadgen CPU per POST under load
        # and steals the service's core. So the connections are split over a few long-lived clients
        # of SHARD connections each; a user always posts through the same one (its order is kept).
        connections = int(cfg.get("connections", 256))
        shards = max(1, math.ceil(connections / SHARD)) if self.shape == "pooled" else 0
        limits = httpx.Limits(max_connections=SHARD, max_keepalive_connections=SHARD)
        self.clients = [httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) for _ in range(shards)]
        # ... and never more requests than connections in a client: the waiting is done in a trio
        # limiter (O(1)), not in httpcore's queue (O(queued x connections) per request event).
        self.slots = [trio.CapacityLimiter(SHARD) for _ in range(shards)]
        self.deadline = trio.current_time() + float(cfg.get("max_s", 600.0))
        self.admin = httpx.AsyncClient(timeout=httpx.Timeout(30.0))
        self.evolution_sender = (EvolutionSender(self.webhook, self.counts, self.error_kinds,
                                                 reuse=self.shape == "evolution")
                                 if self.shape.startswith("evolution") else None)
        self.done_polling = False
        self.pids = [int(p) for p in cfg.get("pids", [])]
        self.cpu_start = [0.0 for _ in self.pids]

    # -- sending ------------------------------------------------------------------------------

    def text_for(self, user: int, seq: int, tag: str = "") -> str:
        head = f"m:{user}:{seq} {tag}"
        return head + FILLER[: max(0, self.text_chars - len(head))]

    def expect(self, user: int, seq: int, *, wait: bool = False, llm: float | None = None) -> Msg:
        msg = Msg(user, seq, self.llm_latency if llm is None else llm)
        if wait:
            msg.event = trio.Event()
        self.msgs[(user, seq)] = msg
        self.unanswered.setdefault(user, []).append(msg)
        return msg

    async def post_after(self, previous: trio.Event | None, done: trio.Event, msg: Msg, text: str) -> None:
        """Open loop, but one POST at a time per chat: wait for the chat's previous POST to be answered
        (as Evolution delivers one chat's webhooks), so the order of intake is the order of ``seq``."""
        try:
            if previous is not None:
                await previous.wait()
            await self.post(msg, text)
        finally:
            done.set()

    async def open_loop(self, per_s: float, total: int, users: int) -> None:
        """Send ``total`` messages at ``per_s``/s, message i from user i % users (its seq: i // users)."""
        last: dict[int, trio.Event] = {}
        start = trio.current_time() + 0.2
        async with trio.open_nursery() as senders:
            for i in range(total):
                await trio.sleep_until(start + i / per_s)
                u, s = i % users, i // users
                msg = self.expect(u, s)
                done = trio.Event()
                senders.start_soon(self.post_after, last.get(u), done, msg, self.text_for(u, s))
                last[u] = done

    async def post(self, msg: Msg, text: str, webhooks: list[str] | None = None) -> None:
        """POST the webhook; on 503 wait Retry-After and post again (like Evolution). Records the ack.
        ``webhooks``: the nodes to try in turn, as a load balancer does when one cannot be reached
        (default: the one service)."""
        targets = webhooks or [self.webhook]
        attempt = 0
        payload = upsert(jid_of(msg.user), text, f"BENCH{msg.user:09d}X{msg.seq:06d}", self.instance)
        body = json.dumps(payload).encode()
        if not self.first_send:
            self.first_send = time.time()
        if self.evolution_sender is not None:
            await self.evolution_sender.send(msg, body, self.deadline)
            if msg.acked:
                self.ack_lat.append(msg.ack_s)
            return
        headers = {"content-type": "application/json"}
        while True:
            started = time.time()
            try:
                shard = msg.user % len(self.clients)
                async with self.slots[shard]:
                    response = await self.clients[shard].post(targets[attempt % len(targets)], content=body,
                                                              headers=headers)
            except httpx.HTTPError as exc:
                self.counts["http_errors"] += 1
                self.error_kinds[type(exc).__name__] += 1
                if trio.current_time() > self.deadline:
                    return                     # never acknowledged: it counts as lost
                attempt += 1
                await trio.sleep(1.0 if len(targets) == 1 else 0.05)   # several nodes: the next one at once
                continue
            now = time.time()
            if response.status_code == 503 and trio.current_time() < self.deadline:
                self.counts["retries_503"] += 1
                msg.retries += 1
                await trio.sleep(float(response.headers.get("retry-after", "1")))
                continue
            msg.sent, msg.acked, msg.status, msg.ack_s = started, now, response.status_code, now - started
            self.ack_lat.append(now - started)
            if response.status_code != 200:
                self.counts["http_errors"] += 1
            elif response.json().get("status") != "accepted":
                self.counts["ignored"] += 1
            return

    async def warmup(self, count: int) -> None:
        """``count`` messages from extra chats (not counted) so that lazy imports, first connections
        and caches are paid before the measured phase; then the service's CPU clock starts."""
        if count and self.evolution:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.poll_forever, 0.05)
                batch = []
                for i in range(count):
                    msg = self.expect(WARMUP_USER + i, 0, wait=True)
                    batch.append(msg)
                    nursery.start_soon(self.post, msg, self.text_for(WARMUP_USER + i, 0))
                    await trio.sleep(0.01)
                for msg in batch:
                    await self.wait_reply(msg, 30.0)
                self.done_polling = True
                nursery.cancel_scope.cancel()
            for msg in batch:
                del self.msgs[(msg.user, msg.seq)]
                self.unanswered.pop(msg.user, None)
                self.last_seq.pop(msg.user, None)
            self.done_polling = False
            self.ack_lat.clear()
            self.first_send = self.last_reply = 0.0
        self.cpu_start = [cpu_seconds(pid) for pid in self.pids]
        self.deadline = trio.current_time() + float(self.cfg.get("max_s", 600.0))

    def service_cpu(self) -> float:
        return sum(cpu_seconds(pid) - start for pid, start in zip(self.pids, self.cpu_start))

    # -- replies ------------------------------------------------------------------------------

    @asynccontextmanager
    async def collecting(self, drain_s: float) -> AsyncIterator[trio.Nursery]:
        """Poll the fake Evolution for replies while the block sends its load; then wait up to
        ``drain_s`` (the scenario's ``drain_s`` overrides it) for the last replies and stop polling.
        The yielded nursery is for background tasks that end when ``done_polling`` is set."""
        async with trio.open_nursery() as background:
            background.start_soon(self.poll_forever, float(self.cfg.get("poll_s", 0.05)))
            yield background
            await self.drain(float(self.cfg.get("drain_s", drain_s)))
            self.done_polling = True

    async def poll_forever(self, interval: float) -> None:
        while not self.done_polling:
            await self.poll_once()
            await trio.sleep(interval)

    async def poll_once(self) -> None:
        try:
            response = await self.admin.get(f"{self.evolution}/_recorded", params={"since": self.cursor})
        except httpx.HTTPError:
            return
        data = response.json()
        for record in data["sent"]:
            self.on_reply(record)
        self.cursor += len(data["sent"])

    def on_reply(self, record: dict[str, Any]) -> None:
        self.replies_seen += 1
        at = float(record["wall"])
        self.last_reply = max(self.last_reply, at)
        body = record.get("json") or {}
        number, text = str(body.get("number", "")), str(body.get("text", ""))
        to_user = user_of(number)
        match = MARKER.search(text)
        if match is None:
            queue = self.unanswered.get(to_user) if to_user is not None else None
            if not queue:
                self.counts["unexpected"] += 1
                return
            msg = queue[0]
            msg.polite = True
            self.counts["polite"] += 1
        else:
            user, seq = int(match.group(1)), int(match.group(2))
            msg = self.msgs.get((user, seq))
            if msg is None:
                self.counts["unexpected"] += 1
                return
            if to_user != user:
                self.counts["misrouted"] += 1
        if msg.answered:
            self.counts["duplicates"] += 1
            msg.answered += 1
            return
        msg.answered = 1
        msg.reply_at = at
        queue = self.unanswered.get(msg.user, [])
        if msg in queue:
            queue.remove(msg)
        last = self.last_seq.get(msg.user, -1)
        if msg.seq < last:
            self.counts["out_of_order"] += 1
        else:
            self.last_seq[msg.user] = msg.seq
        if msg.event is not None:
            msg.event.set()

    async def wait_reply(self, msg: Msg, timeout: float) -> bool:
        assert msg.event is not None
        with trio.move_on_at(min(trio.current_time() + timeout, self.deadline + 30.0)):
            await msg.event.wait()
            return True
        return False

    async def drain(self, timeout: float, messages: list[Msg] | None = None) -> None:
        """Wait until every message is answered (or ``timeout``), then one more poll for late duplicates."""
        pending = messages if messages is not None else list(self.msgs.values())
        deadline = min(trio.current_time() + timeout, max(self.deadline, trio.current_time()) + 30.0)
        while trio.current_time() < deadline and any(not m.answered for m in pending):
            await trio.sleep(0.1)
        await trio.sleep(0.5)
        await self.poll_once()

    # -- results ------------------------------------------------------------------------------

    def results(self, messages: list[Msg] | None = None) -> dict[str, Any]:
        msgs = messages if messages is not None else list(self.msgs.values())
        answered = [m for m in msgs if m.answered]
        latency = [m.reply_at - m.sent for m in answered]
        overhead = [m.reply_at - m.sent - m.llm for m in answered if not m.polite]
        duration = (self.last_reply - self.first_send) if answered else 0.0
        return {
            "messages": len(msgs),
            "answered": len(answered),
            "lost": len(msgs) - len(answered),
            **self.counts,
            "error_kinds": dict(self.error_kinds),
            "ack_ms": summary([m.ack_s for m in msgs if m.acked]),
            # a user's first webhook (in the evolution shapes: on a new connection, the crowd's start)
            # against the rest (a kept-alive connection when there was one)
            "ack_ms_first": summary([m.ack_s for m in msgs if m.acked and m.seq == 0]),
            "ack_ms_rest": summary([m.ack_s for m in msgs if m.acked and m.seq > 0]),
            "reply_ms": summary(latency),
            "overhead_ms": summary(overhead),
            "duration_s": round(duration, 2),
            "answered_per_s": round(len(answered) / duration, 1) if duration > 0 else None,
            "service_cpu_measured_s": round(self.service_cpu(), 2) if self.pids else None,
            "shape": self.shape,
            # the pooled shape waits 60 s and does not re-send: its answers slower than Evolution would wait
            "acks_over_30s": self.counts.get("acks_over_30s", sum(1 for m in msgs if m.acked and m.ack_s > 30.0)),
            **({"connections": self.evolution_sender.connections.stats()} if self.evolution_sender else {}),
        }

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
        await self.admin.aclose()
        if self.evolution_sender is not None:
            await self.evolution_sender.aclose()


def upsert(jid: str, text: str, message_id: str, instance: str) -> dict[str, Any]:
    """Every field of SPEC §9's messages.upsert example (Evolution API v2), as Evolution sends it."""
    return {
        "event": "messages.upsert",
        "instance": instance,
        "data": {
            "key": {"remoteJid": jid, "fromMe": False, "id": message_id, "participant": None,
                    "remoteJidAlt": None, "addressingMode": "pn"},
            "pushName": "Cliente",
            "status": "DELIVERY_ACK",
            "message": {"conversation": text},
            "messageType": "conversation",
            "messageTimestamp": int(time.time()),
            "instanceId": "b6b7c0de-0000-4000-8000-000000000001",
            "source": "android",
        },
        "destination": "http://127.0.0.1/webhook",
        "date_time": "2026-01-20T00:50:06.000Z",
        "sender": "5491100000000@s.whatsapp.net",
        "server_url": "https://evolution.example.com",
        "apikey": None,
    }


# -- scenarios ----------------------------------------------------------------------------------

async def crowd(h: Harness, cfg: dict[str, Any]) -> dict[str, Any]:
    """Closed loop: each user sends its next message only once the previous reply reached Evolution."""
    users, per_user = int(cfg["users"]), int(cfg["messages"])
    stagger = float(cfg.get("stagger_s", 2.0))
    reply_timeout = float(cfg.get("reply_timeout_s", 120.0))
    rng = random.Random(1)
    timed_out = 0

    async def user(u: int) -> None:
        nonlocal timed_out
        await trio.sleep(rng.uniform(0, stagger))
        for s in range(per_user):
            if trio.current_time() > h.deadline:
                h.counts["unsent"] += per_user - s
                return
            msg = h.expect(u, s, wait=True)
            await h.post(msg, h.text_for(u, s))
            if not await h.wait_reply(msg, reply_timeout):
                timed_out += 1
                return

    async with h.collecting(drain_s=10.0):
        async with trio.open_nursery() as users_nursery:
            for u in range(users):
                users_nursery.start_soon(user, u)
    result = h.results()
    result["users_timed_out"] = timed_out
    return result


async def rate(h: Harness, cfg: dict[str, Any]) -> dict[str, Any]:
    """Open loop: ``rate`` messages/s for ``duration`` s from a rotating set of ``users``."""
    per_s, duration, users = float(cfg["rate"]), float(cfg["duration_s"]), int(cfg["users"])
    total = int(per_s * duration)
    async with h.collecting(drain_s=20.0):
        await h.open_loop(per_s, total, users)
    result = h.results()
    result["offered_per_s"] = per_s
    return result


async def burst(h: Harness, cfg: dict[str, Any]) -> dict[str, Any]:
    """``users`` users each post ``messages`` webhooks back to back (next POST right after the ack)."""
    users, per_user = int(cfg["users"]), int(cfg["messages"])

    async def user(u: int) -> None:
        for s in range(per_user):
            msg = h.expect(u, s)
            await h.post(msg, h.text_for(u, s))

    async with h.collecting(drain_s=60.0):
        async with trio.open_nursery() as users_nursery:
            for u in range(users):
                users_nursery.start_soon(user, u)
    return h.results()


async def hot(h: Harness, cfg: dict[str, Any]) -> dict[str, Any]:
    """One JID posts ``hot_messages`` back to back (503 → Retry-After → same message again) while
    ``others`` users chat at a normal pace (send, wait for the reply, think 1-3 s)."""
    hot_messages, others = int(cfg["hot_messages"]), int(cfg["others"])
    hot_llm = float(cfg.get("hot_llm_s", 0.02))
    think = cfg.get("think_s", [1.0, 3.0])
    hot_user = 0
    hot_done = trio.Event()
    rng = random.Random(2)
    hot_msgs: list[Msg] = []
    other_msgs: list[Msg] = []
    hot_span = [0.0, 0.0]

    async def hot_sender() -> None:
        hot_span[0] = time.time()
        for s in range(hot_messages):
            msg = h.expect(hot_user, s, llm=hot_llm)
            hot_msgs.append(msg)
            await h.post(msg, h.text_for(hot_user, s, f"[lat={hot_llm}] "))
        hot_span[1] = time.time()
        hot_done.set()

    async def other(u: int) -> None:
        await trio.sleep(rng.uniform(0, think[1]))
        s = 0
        while not hot_done.is_set() or not all(m.answered for m in hot_msgs[-1:]):
            msg = h.expect(u, s, wait=True)
            other_msgs.append(msg)
            await h.post(msg, h.text_for(u, s))
            await h.wait_reply(msg, 60.0)
            s += 1
            await trio.sleep(rng.uniform(think[0], think[1]))

    async with h.collecting(drain_s=30.0):
        async with trio.open_nursery() as actors:
            actors.start_soon(hot_sender)
            for u in range(1, others + 1):
                actors.start_soon(other, u)
    result = h.results()
    hot_result = h.results(hot_msgs)
    others_result = h.results(other_msgs)
    hot_answered = [m for m in hot_msgs if m.answered]
    result["hot"] = {
        "messages": len(hot_msgs), "answered": hot_result["answered"], "lost": hot_result["lost"],
        "retries_503": sum(m.retries for m in hot_msgs),
        "post_span_s": round(hot_span[1] - hot_span[0], 2),
        "answer_span_s": round(max((m.reply_at for m in hot_answered), default=0) - hot_span[0], 2),
        "llm_s": hot_llm,
    }
    result["others"] = {"messages": len(other_msgs), "answered": others_result["answered"],
                        "overhead_ms": others_result["overhead_ms"], "ack_ms": others_result["ack_ms"]}
    result["overhead_ms"] = others_result["overhead_ms"]
    return result


async def outage(h: Harness, cfg: dict[str, Any]) -> dict[str, Any]:
    """``rate`` msg/s; after ``pre_s`` the primary LLM fake is SIGSTOPped for ``hang_s`` seconds."""
    per_s, users = float(cfg["rate"]), int(cfg["users"])
    pre, hang_s, post = float(cfg["pre_s"]), float(cfg["hang_s"]), float(cfg["post_s"])
    pid = int(cfg["primary_pid"])
    total = int(per_s * (pre + hang_s + post))
    circuit: list[tuple[float, str]] = []
    marks: dict[str, float] = {}

    async def monitor() -> None:
        last = None
        while not h.done_polling:
            try:
                data = (await h.admin.get(h.service + "/supervisors")).json()
                state = data["llm"]["providers"][0]["circuit"]
                if state != last:
                    circuit.append((time.time(), state))
                    last = state
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                pass
            await trio.sleep(0.1)

    async def fault() -> None:
        await trio.sleep(pre)
        marks["hang_start"] = time.time()
        os.kill(pid, signal.SIGSTOP)
        try:
            await trio.sleep(hang_s)
        finally:
            os.kill(pid, signal.SIGCONT)
            marks["hang_end"] = time.time()

    async with h.collecting(drain_s=90.0) as background:
        background.start_soon(monitor)
        background.start_soon(fault)
        await h.open_loop(per_s, total, users)
    try:
        stats = (await h.admin.get(h.service + "/supervisors")).json()["llm"]
    except (httpx.HTTPError, KeyError, ValueError):
        stats = {}
    result = h.results()
    opened = next((t for t, s in circuit if s == "open"), None)
    closed_again = next((t for t, s in circuit if s == "closed" and opened is not None and t > opened), None)
    msgs = [m for m in h.msgs.values()]
    before = [m for m in msgs if m.sent < marks.get("hang_start", 0)]
    caught = [m for m in msgs if marks.get("hang_start", 0) <= m.sent < (opened or float("inf"))]
    while_open = [m for m in msgs if opened is not None and opened <= m.sent < (closed_again or float("inf"))]
    after = [m for m in msgs if closed_again is not None and m.sent >= closed_again]
    base = percentile([m.reply_at - m.sent - m.llm for m in before if m.answered and not m.polite], 50) or 0.0
    added = [m.reply_at - m.sent - m.llm - base for m in while_open if m.answered]
    result["outage"] = {
        "hang_start": marks.get("hang_start"), "hang_end": marks.get("hang_end"),
        "circuit": [(round(t - marks.get("hang_start", t), 2), s) for t, s in circuit],
        "circuit_opened_after_s": round(opened - marks["hang_start"], 2) if opened and "hang_start" in marks else None,
        "before": {"n": len(before), "overhead_ms": h.results(before)["overhead_ms"]},
        "caught_by_hang": {"n": len(caught), "reply_ms": h.results(caught)["reply_ms"]},
        "while_open": {"n": len(while_open), "overhead_ms": h.results(while_open)["overhead_ms"],
                        "added_ms": summary(added)},
        "after_recovery": {"n": len(after), "overhead_ms": h.results(after)["overhead_ms"]},
        "fallbacks_used": stats.get("fallbacks_used"), "polite_answers": stats.get("polite_answers"),
        "deadline_exceeded": stats.get("deadline_exceeded"),
    }
    result["overhead_ms"] = result["outage"]["while_open"]["overhead_ms"]
    return result


async def takeover(h: Harness, cfg: dict[str, Any]) -> dict[str, Any]:
    """Two nodes on one PostgreSQL database (``service_urls``), ``rate`` msg/s from ``users`` chats in
    an open loop, message i of a chat posted to node (chat + i) mod 2 (a load balancer spreading the
    webhooks; a node that cannot be reached is skipped). After ``pre_s`` seconds the second node's
    process group (``victim_pgid``) is SIGKILLed; the load goes on for ``post_s`` more seconds.

    Measures, from the kill: when the survivor holds every shard's unexpired lease (its GET /shards
    ``owners``), when the first reply to a chat of the dead node's shards (``victim_users``) reaches
    Evolution, and which of those chats' messages were acknowledged but not answered at the kill
    (the bound for replies the dead node sent without settling them, which its successor repeats)."""
    per_s, users = float(cfg["rate"]), int(cfg["users"])
    pre, post = float(cfg["pre_s"]), float(cfg["post_s"])
    urls = [u + "/webhook" for u in cfg["service_urls"]]
    survivor, survivor_id, shards = cfg["service_urls"][0], cfg["survivor_id"], int(cfg["shards"])
    victim_users = set(cfg["victim_users"])
    alive = list(urls)
    marks: dict[str, float] = {}
    total = int(per_s * (pre + post))

    async def send(i: int, previous: trio.Event | None, done: trio.Event) -> None:
        u, s = i % users, i // users
        msg = h.expect(u, s)
        try:
            if previous is not None:
                await previous.wait()
            first = alive[(u + s) % len(alive)]
            await h.post(msg, h.text_for(u, s), [first, *[w for w in alive if w != first]])
        finally:
            done.set()

    async def load() -> None:
        last: dict[int, trio.Event] = {}
        start = trio.current_time() + 0.2
        async with trio.open_nursery() as senders:
            for i in range(total):
                await trio.sleep_until(start + i / per_s)
                done = trio.Event()
                senders.start_soon(send, i, last.get(i % users), done)
                last[i % users] = done

    async def kill_and_watch() -> None:
        await trio.sleep(pre)
        marks["kill"] = time.time()
        os.killpg(int(cfg["victim_pgid"]), signal.SIGKILL)
        alive.remove(urls[1])   # the balancer's health check notices (posts to it fail over meanwhile)
        while time.time() - marks["kill"] < post + 60:
            try:
                owners = (await h.admin.get(survivor + "/shards", timeout=2.0)).json().get("owners", {})
            except (httpx.HTTPError, ValueError):
                owners = {}
            if owners.get(survivor_id, 0) == shards:
                marks["owned_all"] = time.time()
                return
            await trio.sleep(0.05)

    async with h.collecting(drain_s=60.0) as background:
        background.start_soon(kill_and_watch)
        await load()
    result = h.results()
    kill = marks.get("kill", 0.0)
    theirs = [m for m in h.msgs.values() if m.user in victim_users]
    after = [m.reply_at for m in theirs if m.answered and m.reply_at > kill]
    result["takeover"] = {
        "kill": kill,
        "owned_all_s": round(marks["owned_all"] - kill, 2) if "owned_all" in marks else None,
        "first_reply_s": round(min(after) - kill, 2) if after else None,
        "victim_chats": len(victim_users),
        "unanswered_at_kill": sum(1 for m in theirs if m.acked and m.acked <= kill
                                  and (not m.answered or m.reply_at > kill)),
    }
    return result


async def memory(h: Harness, cfg: dict[str, Any]) -> dict[str, Any]:
    """Bring ``stages`` (cumulative actor counts) of actors to life (offline provider, local outbox);
    after each stage wait until every reply is out, then read the worker's RSS.

    ``mode`` "seed": the store already holds every chat with a full window (bench/seed_store.py), one
    message per chat spawns its actor (which loads the window, adds the message and the reply and
    truncates back). ``mode`` "fill": ``per_user`` messages per chat from an empty store."""
    per_user = int(cfg["per_user"]) if cfg.get("mode", "seed") == "fill" else 1
    stages = [int(n) for n in cfg["stages"]]
    concurrency = int(cfg.get("concurrency", 64))
    pids = [int(p) for p in cfg["pids"]]
    done_users = 0
    posted = 0
    out: list[dict[str, Any]] = []
    limiter = trio.CapacityLimiter(concurrency)

    async def sent_count() -> int:
        data = (await h.admin.get(h.service + "/supervisors")).json()
        return int(data["outbound"]["sent"])

    async def user(u: int) -> None:
        nonlocal posted
        async with limiter:
            for s in range(per_user):
                msg = Msg(u, s, 0.0)
                await h.post(msg, h.text_for(u, s))
                posted += 1

    for target in stages:
        started = time.time()
        async with trio.open_nursery() as nursery:
            for u in range(done_users, target):
                nursery.start_soon(user, u)
        posted_at = time.time()
        while await sent_count() < posted:
            await trio.sleep(0.2)
        done_users = target
        stage = {"actors": target, "messages": posted, "fill_s": round(time.time() - started, 1),
                 "post_s": round(posted_at - started, 1), "rss_kb": [status_kb(p, "VmRSS") for p in pids]}
        try:
            stage["registry"] = (await h.admin.get(h.service + "/supervisors")).json()["registry"]["live_actors"]
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        out.append(stage)
        print(json.dumps({"progress": stage}), file=sys.stderr, flush=True)
    return {"stages": out, "ack_ms": summary(h.ack_lat), **h.counts}


SCENARIOS = {"crowd": crowd, "rate": rate, "burst": burst, "hot": hot, "outage": outage, "memory": memory,
             "takeover": takeover}


async def main(cfg: dict[str, Any]) -> dict[str, Any]:
    h = Harness(cfg)
    try:
        await h.warmup(int(cfg.get("warmup", 0)))
        return await SCENARIOS[cfg["scenario"]](h, cfg)
    finally:
        await h.aclose()


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    result = trio.run(main, config)
    print(json.dumps(result), flush=True)
