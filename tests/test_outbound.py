"""actors.outbound: the outbound supervisor, against a fake Evolution over real HTTP on 127.0.0.1.

The policy tests (order per chat, split, settling, statistics, dead letters) take the ``wire``
fixture and run once per transport: Evolution (the fake) and the local outbox.
"""

from __future__ import annotations

import logging
import socket
from collections import defaultdict
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import attrs
import pytest
import trio
import trio.testing

from actors.outbound import PRESENCE_CONCURRENCY, Delivery, OutboundMessage, OutboundSender
from actors.outbound.sender import QUEUE_CAPACITY
from actors.settings import Settings, load_settings
from runtime.postgres_store import PostgresStore
from runtime.shards import ShardOwner
from tests.fakes.evolution import FakeEvolution
from tests.fakes.server import running_server

KEY = "evo-secret-key-4711"
INSTANCE = "prueba-py-agent"
JID = "5491131376731@s.whatsapp.net"


def make_settings(url: str, **env: str) -> Settings:
    values = {
        "EVOLUTION_API_URL": url,
        "EVOLUTION_API_KEY": KEY,
        "EVOLUTION_INSTANCE": INSTANCE,
        "OUTBOUND_MIN_GAP_SECONDS": "0",
        "OUTBOUND_RATE_PER_INSTANCE": "0",
        "HTTP_TIMEOUT": "5",
    }
    values.update(env)
    return load_settings(values, dotenv_file=None)


class Settled:
    """The on_settled callback: records (message, delivery) and lets a test wait for a count."""

    def __init__(self) -> None:
        self.items: list[tuple[OutboundMessage, Delivery]] = []
        self._changed = trio.Event()

    async def __call__(self, message: OutboundMessage, delivery: Delivery) -> None:
        self.items.append((message, delivery))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int, timeout: float = 120) -> None:
        with trio.fail_after(timeout):
            while len(self.items) < count:
                await self._changed.wait()


@asynccontextmanager
async def sender_for(settings: Settings) -> AsyncIterator[tuple[OutboundSender, Settled]]:
    settled = Settled()
    sender = OutboundSender(settings, on_settled=settled)
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        yield sender, settled
        nursery.cancel_scope.cancel()


@attrs.frozen
class Wire:
    """One transport for the policy tests: its settings and what it accepted, read the same way."""

    name: str                       # "evolution" | "local"
    settings: Settings
    fake: FakeEvolution | None      # None: the local outbox
    candidate: str                  # the candidate a reply is sent through

    def sent(self, sender: OutboundSender) -> list[tuple[str, str, str]]:
        """Accepted sends as (number, text, message id), in the order they were accepted."""
        if self.fake is not None:
            return [(r.json["number"], r.json["text"], r.message_id) for r in self.fake.sent]
        return [(e.jid, e.text, f"local-{e.seq}") for e in sender.outbox_entries(limit=100_000)]


@pytest.fixture(params=["evolution", "local"])
async def wire(request: pytest.FixtureRequest) -> AsyncIterator[Wire]:
    if request.param == "local":
        yield Wire("local", make_settings(""), None, "local")
        return
    fake = FakeEvolution(api_key=KEY, instances={INSTANCE})
    async with running_server(fake) as url:
        yield Wire("evolution", make_settings(url), fake, INSTANCE)


@asynccontextmanager
async def evolution(fake: FakeEvolution, **env: str) -> AsyncIterator[tuple[OutboundSender, Settled]]:
    async with running_server(fake) as url:
        async with sender_for(make_settings(url, **env)) as pair:
            yield pair


async def test_send_text_wire_format_and_delivery(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="actors")
    fake = FakeEvolution(api_key=KEY, instances={INSTANCE})
    async with evolution(fake) as (sender, settled):
        sender.submit(OutboundMessage(JID, "Hola, ¿en qué te ayudo?", instances=(), outbox_id=7))
        await settled.wait_for(1)
    [call] = fake.calls("/message/")
    assert call.method == "POST"
    assert call.path == f"/message/sendText/{INSTANCE}"
    assert call.headers["apikey"] == KEY
    assert call.headers["content-type"] == "application/json"
    assert call.json == {"number": JID, "text": "Hola, ¿en qué te ayudo?"}
    message, delivery = settled.items[0]
    assert message.outbox_id == 7
    assert delivery.status == "sent"
    assert delivery.candidate == INSTANCE
    assert delivery.attempts == 1
    assert delivery.message_id == fake.sent[0].message_id != ""
    assert f"Tried sendText with candidate={INSTANCE} status=201" in caplog.text
    assert KEY not in caplog.text
    stats = sender.statistics()
    assert (stats.mode, stats.sent, stats.failed, stats.queued, stats.active_jids) == ("evolution", 1, 0, 0, 0)


async def test_typing_sends_presence_without_delaying_the_reply(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEvolution(api_key=KEY, instances={INSTANCE})  # sendPresence blocks for its delay, like Evolution
    async with evolution(fake) as (sender, settled):
        before = trio.current_time()
        await sender.typing(JID, ())
        assert trio.current_time() == before  # returned at once: the call runs in the supervisor's nursery
        sender.submit(OutboundMessage(JID, "respuesta"))
        await settled.wait_for(1)
        sent_at = trio.current_time()
        with trio.fail_after(10):
            while sender.statistics().typing_in_flight:
                await trio.sleep(0.01)
    [presence] = fake.calls("/chat/sendPresence/")
    assert presence.path == f"/chat/sendPresence/{INSTANCE}"
    assert presence.headers["apikey"] == KEY
    assert presence.json == {"number": JID, "presence": "composing", "delay": 3000}
    assert settled.items[0][1].status == "sent"
    assert sent_at - before < 1.0  # the reply did not wait for the 3 s presence call


async def test_typing_presence_never_delays_replies_of_many_concurrent_turns() -> None:
    # Evolution answers sendPresence only after its delay (3 s): presence calls hold their request
    # for that long. Sixty turns at once each show "typing…" and then reply.
    fake = FakeEvolution(api_key=KEY, instances={INSTANCE})
    jids = [f"54911{i:08d}@s.whatsapp.net" for i in range(60)]
    async with evolution(fake) as (sender, settled):
        for jid in jids:
            await sender.typing(jid, ())
        await trio.sleep(0.05)   # the presence calls are on their way
        submitted = trio.current_time()
        for jid in jids:
            sender.submit(OutboundMessage(jid, "respuesta"))
        await settled.wait_for(len(jids), timeout=30)
        settle = trio.current_time() - submitted
        typing_peak = sender.statistics().typing_in_flight
    assert all(delivery.status == "sent" for _, delivery in settled.items)
    presences = fake.calls("/chat/sendPresence/")   # recorded when answered, i.e. after their 3 s delay
    # every reply reached Evolution before the first presence call was even answered: none waited for one
    assert len(fake.sent) == len(jids)
    assert max(r.at for r in fake.sent) < submitted + 3.0
    assert settle < 3.0 and not presences
    assert 0 < typing_peak <= PRESENCE_CONCURRENCY   # presence has its own small bound: the rest is skipped


async def test_typing_is_off_when_disabled() -> None:
    fake = FakeEvolution(api_key=KEY, instances={INSTANCE})
    async with evolution(fake, TYPING_PRESENCE="false") as (sender, settled):
        await sender.typing(JID, ())
        sender.submit(OutboundMessage(JID, "hola"))
        await settled.wait_for(1)
    assert fake.calls("/chat/") == []
    assert len(fake.sent) == 1


async def test_candidates_order_without_duplicates_or_empties() -> None:
    """The message's own candidates (actors/instances.py chose them), never the configured ones after
    them; the configured ones when it has none."""
    settings = make_settings("http://127.0.0.1:9", EVOLUTION_INSTANCE_ID="uuid-1", EVOLUTION_INSTANCE="name-1")
    sender = OutboundSender(settings)
    message = OutboundMessage(JID, "x", instances=("uuid-webhook", "", "name-1", "uuid-webhook"))
    assert sender.candidates(message) == ["uuid-webhook", "name-1"]
    assert sender.candidates(OutboundMessage(JID, "x")) == ["uuid-1", "name-1"]


async def test_candidate_fallback_then_preferred_first(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="actors")
    fake = FakeEvolution(api_key=KEY, instances={"good-name"})
    instances = ("bad-id", "good-name")
    async with evolution(fake) as (sender, settled):
        sender.submit(OutboundMessage(JID, "uno", instances=instances))
        await settled.wait_for(1)
        first_round = [(c.path, c.status) for c in fake.calls("/message/")]
        sender.submit(OutboundMessage(JID, "dos", instances=instances))
        await settled.wait_for(2)
    assert first_round == [("/message/sendText/bad-id", 404), ("/message/sendText/good-name", 201)]
    assert [(c.path, c.status) for c in fake.calls("/message/")][2:] == [("/message/sendText/good-name", 201)]
    assert fake.texts() == [("good-name", JID, "uno"), ("good-name", JID, "dos")]
    assert [d.candidate for _, d in settled.items] == ["good-name", "good-name"]
    assert sender.statistics().preferred_candidates == {"bad-id": "good-name"}
    assert "Tried sendText with candidate=bad-id status=404" in caplog.text


async def test_per_jid_order_under_retries(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEvolution(api_key=KEY, instances={INSTANCE}, fail_every=3)
    jids = [f"54911000000{i}@s.whatsapp.net" for i in range(5)]
    async with evolution(fake) as (sender, settled):
        for n in range(20):
            for jid in jids:
                sender.submit(OutboundMessage(jid, f"{jid} #{n}"))
        assert sender.statistics().queued + sender.statistics().in_flight == 100
        await settled.wait_for(100)
        stats = sender.statistics()
    per_jid: dict[str, list[str]] = defaultdict(list)
    for _, number, text in fake.texts():
        per_jid[number].append(text)
    for jid in jids:
        assert per_jid[jid] == [f"{jid} #{n}" for n in range(20)]  # in order, each exactly once
    assert all(d.status == "sent" for _, d in settled.items)
    assert stats.retried >= 30  # a third of the requests failed and were retried
    assert (stats.sent, stats.failed, stats.queued, stats.in_flight, stats.active_jids) == (100, 0, 0, 0, 0)
    assert len(fake.calls("/message/")) == 100 + stats.retried


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_evolution_down_then_up_delivers_everything_in_order(autojump_clock: trio.testing.MockClock) -> None:
    port = _free_port()
    fake = FakeEvolution(api_key=KEY, instances={INSTANCE})
    jids = ["5491100000001@s.whatsapp.net", "5491100000002@s.whatsapp.net"]
    async with sender_for(make_settings(f"http://127.0.0.1:{port}")) as (sender, settled):
        start = trio.current_time()
        for n in range(5):
            for jid in jids:
                sender.submit(OutboundMessage(jid, f"{jid} #{n}"))
        await trio.sleep(10)  # nothing listens: connection refused, retried with backoff
        assert settled.items == [] and sender.statistics().retried >= 2
        async with running_server(fake, bind=f"127.0.0.1:{port}"):
            await settled.wait_for(10)
    assert all(d.status == "sent" for _, d in settled.items)
    assert min(r.at for r in fake.sent) >= start + 10
    for jid in jids:
        assert [t for _, n, t in fake.texts() if n == jid] == [f"{jid} #{n}" for n in range(5)]


async def test_server_errors_end_in_a_dead_letter(autojump_clock: trio.testing.MockClock,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeEvolution(api_key=KEY, instances={INSTANCE}, statuses={INSTANCE: 500})
    async with evolution(fake, OUTBOUND_MAX_ATTEMPTS="3") as (sender, settled):
        started = trio.current_time()
        sender.submit(OutboundMessage(JID, "se pierde", outbox_id=1))
        sender.submit(OutboundMessage(JID, "llega"))
        await settled.wait_for(1)
        assert trio.current_time() - started <= 1 + 2 + 0.1  # two backoffs, each capped by its ceiling
        fake.statuses.clear()
        await settled.wait_for(2)
        stats = sender.statistics()
    dead, ok = settled.items[0][1], settled.items[1][1]
    assert (dead.status, dead.attempts) == ("dead", 3)
    assert "500" in dead.error
    assert ok.status == "sent"
    assert len(fake.calls("/message/")) == 3 + 1
    assert fake.texts() == [(INSTANCE, JID, "llega")]
    assert stats.failed == 1 and stats.retried == 2
    [letter] = stats.dead_letters
    assert (letter.jid, letter.attempts, letter.text_length, letter.outbox_id) == (JID, 3, len("se pierde"), 1)
    assert KEY not in repr(stats) and KEY not in caplog.text
    assert any(r.levelno == logging.ERROR and "dead letter" in r.getMessage() for r in caplog.records)


async def test_retry_window_bounds_the_attempts(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEvolution(api_key=KEY, instances={INSTANCE}, statuses={INSTANCE: 503})
    async with evolution(fake, OUTBOUND_MAX_ATTEMPTS="100", OUTBOUND_MAX_RETRY_SECONDS="20") as (sender, settled):
        started = trio.current_time()
        sender.submit(OutboundMessage(JID, "x"))
        await settled.wait_for(1)
        elapsed = trio.current_time() - started
    delivery = settled.items[0][1]
    assert delivery.status == "dead"
    assert elapsed <= 20
    assert 3 <= delivery.attempts < 10


async def test_all_candidates_rejected_is_dead_at_once() -> None:
    fake = FakeEvolution(api_key="another-key", instances={INSTANCE})
    async with evolution(fake, EVOLUTION_INSTANCE_ID="uuid-x") as (sender, settled):
        sender.submit(OutboundMessage(JID, "hola", instances=("uuid-webhook", "uuid-x", INSTANCE)))
        await settled.wait_for(1)
        stats = sender.statistics()
    delivery = settled.items[0][1]
    assert delivery.status == "dead"
    assert [c.status for c in fake.calls("/message/")] == [401, 401, 401]  # each candidate once, no retry
    assert stats.retried == 0 and stats.failed == 1
    assert "all candidates rejected" in delivery.error


async def test_long_reply_is_split_into_ordered_parts(wire: Wire) -> None:
    paragraphs = [(f"Párrafo {i:02d}: " + "palabra " * 70)[:497] + "." for i in range(18)]
    text = "\n\n".join(paragraphs) + "!!"
    assert len(text) == 9000
    async with sender_for(wire.settings) as (sender, settled):
        sender.submit(OutboundMessage(JID, text))
        sender.submit(OutboundMessage(JID, "corto"))
        await settled.wait_for(2)
    texts = [t for _, t, _ in wire.sent(sender)]
    assert len(texts) == 4 and texts[-1] == "corto"
    assert all(len(t) <= 4000 for t in texts[:3])
    assert "\n\n".join(texts[:3]) == text
    delivery = settled.items[0][1]
    assert (delivery.status, delivery.parts) == ("sent", 3)
    assert list(delivery.message_ids) == [i for _, _, i in wire.sent(sender)[:3]]


async def test_instance_rate_holds_under_a_burst(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEvolution(api_key=KEY, instances={INSTANCE})
    async with evolution(fake, OUTBOUND_RATE_PER_INSTANCE="20") as (sender, settled):
        for i in range(40):
            sender.submit(OutboundMessage(f"54911{i:08d}@s.whatsapp.net", "promo"))
        await settled.wait_for(40)
    arrivals = sorted(r.at for r in fake.sent)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert min(gaps) >= 0.05 - 1e-6
    assert arrivals[-1] - arrivals[0] == pytest.approx(39 / 20, abs=0.05)


async def test_min_gap_per_jid_does_not_hold_back_other_chats(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEvolution(api_key=KEY, instances={INSTANCE})
    a, b = "5491100000001@s.whatsapp.net", "5491100000002@s.whatsapp.net"
    async with evolution(fake, OUTBOUND_MIN_GAP_SECONDS="1") as (sender, settled):
        for n in range(4):
            sender.submit(OutboundMessage(a, f"a{n}"))
        sender.submit(OutboundMessage(b, "b0"))
        await settled.wait_for(5)
    times = {r.json["text"]: r.at for r in fake.sent}
    gaps = [times[f"a{n + 1}"] - times[f"a{n}"] for n in range(3)]
    assert all(gap >= 1.0 - 1e-6 for gap in gaps)
    assert times["b0"] < times["a1"]


async def test_pacing_gap_and_api_key_are_each_instances(autojump_clock: trio.testing.MockClock) -> None:
    """A reply is paced, spaced and authenticated by its own instance's settings (settings_for); the
    same customer in two instances is two chats for the gap."""
    fake = FakeEvolution(api_key=KEY, instances={"acme", "beta"}, instance_keys={"acme": "acme-key", "beta": "beta-key"})
    async with running_server(fake) as url:
        base = make_settings(url)
        per_instance = {"acme": make_settings(url, EVOLUTION_API_KEY="acme-key", OUTBOUND_RATE_PER_INSTANCE="2",
                                              OUTBOUND_MIN_GAP_SECONDS="3"),
                        "beta": make_settings(url, EVOLUTION_API_KEY="beta-key")}
        settled = Settled()
        sender = OutboundSender(base, on_settled=settled, settings_for=lambda name: per_instance.get(name, base))
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            for n in range(3):
                for name in ("acme", "beta"):
                    sender.submit(OutboundMessage(JID, f"{name}{n}", instances=(name,), key=f"{name}/{JID}"))
            sender.submit(OutboundMessage("5491100000002@s.whatsapp.net", "acme-other", instances=("acme",),
                                          key="acme/5491100000002@s.whatsapp.net"))
            await settled.wait_for(7)
            nursery.cancel_scope.cancel()
    assert all(d.status == "sent" for _, d in settled.items)
    times = {r.json["text"]: r.at for r in fake.sent}
    assert {r.instance: r.headers["apikey"] for r in fake.sent} == {"acme": "acme-key", "beta": "beta-key"}
    assert times["beta2"] - times["beta0"] < 0.1                               # beta: no pacing, no gap
    assert times["acme1"] - times["acme0"] >= 3 - 1e-6 and times["acme2"] - times["acme1"] >= 3 - 1e-6
    assert 0.5 - 1e-6 <= abs(times["acme-other"] - times["acme0"]) < 3         # acme's rate, not its chat gap


async def test_submit_before_run_is_delivered_once_running(wire: Wire) -> None:
    settled = Settled()
    sender = OutboundSender(wire.settings, on_settled=settled)
    sender.submit(OutboundMessage(JID, "temprano"))
    assert sender.statistics().queued == 1
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await settled.wait_for(1)
        nursery.cancel_scope.cancel()
    assert [(n, t) for n, t, _ in wire.sent(sender)] == [(JID, "temprano")]
    assert settled.items[0][1].candidate == wire.candidate


async def test_per_chat_order_each_message_settled_once_in_order(wire: Wire) -> None:
    jids = [f"54911000000{i}@s.whatsapp.net" for i in range(5)]
    async with sender_for(wire.settings) as (sender, settled):
        for n in range(20):
            for jid in jids:
                sender.submit(OutboundMessage(jid, f"{jid} #{n}", outbox_id=n))
        queued = sender.statistics()
        with trio.fail_after(60):
            await sender.drain()
        after = sender.statistics()
    assert (queued.queued, queued.max_queued_per_jid, queued.active_jids, queued.in_flight) == (100, 20, 5, 0)
    sent = wire.sent(sender)
    for jid in jids:
        expected = [f"{jid} #{n}" for n in range(20)]
        assert [t for number, t, _ in sent if number == jid] == expected          # in order, each exactly once
        assert [m.text for m, _ in settled.items if m.jid == jid] == expected     # settled once each, in order
    assert all((d.status, d.candidate, d.attempts, d.parts) == ("sent", wire.candidate, 1, 1) for _, d in settled.items)
    assert sorted(d.message_id for _, d in settled.items) == sorted(i for _, _, i in sent)
    assert len({i for _, _, i in sent}) == 100 and "" not in {i for _, _, i in sent}
    assert (after.mode, after.sent, after.failed, after.retried, after.dead_letters) == (wire.name, 100, 0, 0, ())
    assert (after.queued, after.max_queued_per_jid, after.active_jids, after.in_flight) == (0, 0, 0, 0)
    assert after.preferred_candidates == ({INSTANCE: INSTANCE} if wire.fake is not None else {})
    assert after.outbox_size == (0 if wire.fake is not None else 100)


async def test_a_failing_on_settled_is_logged_and_the_chat_goes_on(wire: Wire,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="actors")
    calls: list[str] = []

    async def on_settled(message: OutboundMessage, delivery: Delivery) -> None:
        calls.append(message.text)
        if message.text == "uno":
            raise RuntimeError("store down")

    sender = OutboundSender(wire.settings, on_settled=on_settled)
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        sender.submit(OutboundMessage(JID, "uno"))
        sender.submit(OutboundMessage(JID, "dos"))
        with trio.fail_after(10):
            await sender.drain()
        nursery.cancel_scope.cancel()
    assert calls == ["uno", "dos"]
    assert [t for _, t, _ in wire.sent(sender)] == ["uno", "dos"]
    assert f"Outbound: on_settled callback failed for {JID}" in caplog.text
    assert (sender.statistics().sent, sender.statistics().failed) == (2, 0)


async def test_a_full_chat_queue_dead_letters_the_overflow(wire: Wire, caplog: pytest.LogCaptureFixture) -> None:
    """Past QUEUE_CAPACITY waiting replies in one chat, submit() neither raises nor drops: the reply is
    a dead letter, counted, logged and settled once; the chat's queued replies and other chats go on."""
    caplog.set_level(logging.INFO, logger="actors")
    other = "5491100000009@s.whatsapp.net"
    async with sender_for(wire.settings) as (sender, settled):
        for n in range(QUEUE_CAPACITY + 1):
            sender.submit(OutboundMessage(JID, f"#{n}", outbox_id=n))
        sender.submit(OutboundMessage(other, "otro chat"))
        queued = sender.statistics()
        with trio.fail_after(120):
            await sender.drain()    # also waits for the refused reply to be settled
        stats = sender.statistics()
    assert (queued.queued, queued.max_queued_per_jid, queued.failed) == (QUEUE_CAPACITY + 1, QUEUE_CAPACITY, 1)
    assert len(settled.items) == QUEUE_CAPACITY + 2
    [(refused, dead)] = [(m, d) for m, d in settled.items if d.status == "dead"]
    assert (refused.jid, refused.outbox_id, dead.attempts) == (JID, QUEUE_CAPACITY, 0)
    assert f"{QUEUE_CAPACITY} replies already waiting" in dead.error
    assert [m.outbox_id for m, d in settled.items if m.jid == JID and d.status == "sent"] == list(range(QUEUE_CAPACITY))
    assert [t for n, t, _ in wire.sent(sender) if n == JID] == [f"#{n}" for n in range(QUEUE_CAPACITY)]
    assert [t for n, t, _ in wire.sent(sender) if n == other] == ["otro chat"]
    assert (stats.sent, stats.failed, stats.queued, stats.active_jids) == (QUEUE_CAPACITY + 1, 1, 0, 0)
    [letter] = stats.dead_letters
    assert (letter.jid, letter.outbox_id, letter.attempts, letter.error) == (JID, QUEUE_CAPACITY, 0, dead.error)
    assert any(r.levelno == logging.ERROR and "queue full" in r.getMessage() for r in caplog.records)


async def test_local_mode_outbox(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="actors")
    settings = load_settings({"EVOLUTION_API_URL": "", "OUTBOUND_MIN_GAP_SECONDS": "5"}, dotenv_file=None)
    other = "5491100000009@s.whatsapp.net"
    async with sender_for(settings) as (sender, settled):
        await sender.typing(JID, ())  # a no-op without Evolution
        sender.submit(OutboundMessage(JID, "hola"))
        sender.submit(OutboundMessage(other, "buenas"))
        sender.submit(OutboundMessage(JID, "¿algo más?"))
        sender.submit(OutboundMessage(JID, "x " * 2500))  # 5000 characters: two entries
        with trio.fail_after(1):  # no pacing in local mode despite the 5 s gap
            await settled.wait_for(4)
        stats = sender.statistics()
    entries = sender.outbox_entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    mine = sender.outbox_entries(jid=JID)
    assert [e.text for e in mine[:2]] == ["hola", "¿algo más?"]  # per-chat order (chats run concurrently)
    assert " ".join(e.text for e in mine[2:]).split() == ["x"] * 2500
    assert all(len(e.text) <= 4000 for e in entries)
    assert [(e.jid, e.text) for e in sender.outbox_entries(jid=other)] == [(other, "buenas")]
    assert sender.outbox_entries(jid=JID, after=mine[0].seq, limit=2) == mine[1:3]
    assert sender.outbox_entries(after=5) == []
    assert all(isinstance(e.at, float) and e.at > 1.7e9 for e in entries)
    assert [d.status for _, d in settled.items] == ["sent"] * 4
    assert (stats.mode, stats.sent, stats.outbox_size, stats.typing_in_flight) == ("local", 4, 5, 0)
    assert f"[OUTBOX] -> {JID}: hola" in caplog.text
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        entries[0].text = "changed"  # type: ignore[misc]


class StepCounter(trio.abc.Instrument):
    """Counts the steps (wake-ups) of the outbound supervisor's per-chat workers."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.startswith("Outbound:"):
            self.steps += 1


async def test_replies_waiting_for_pacing_sleep_without_polling_or_a_connection() -> None:
    """A pacing backlog is one timer per waiting chat: no worker wakes until its slot, none holds an
    HTTP slot or connection meanwhile, and the backlog's depth and oldest wait are in the statistics."""
    fake = FakeEvolution(api_key=KEY, instances={INSTANCE})
    async with evolution(fake, OUTBOUND_RATE_PER_INSTANCE="0.2") as (sender, settled):   # a slot every 5 s
        for i in range(5):
            sender.submit(OutboundMessage(f"54911{i:08d}@s.whatsapp.net", "promo"))
        await settled.wait_for(1)          # the first took the free slot; four wait for theirs
        await trio.testing.wait_all_tasks_blocked()
        counter = StepCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            await trio.sleep(1.0)
        finally:
            trio.lowlevel.remove_instrument(counter)
        stats = sender.statistics()
        assert counter.steps == 0                                   # nothing woke while waiting
        assert (stats.backlog, stats.pacing_waiting, stats.in_flight) == (4, 4, 4)
        assert 1.0 <= stats.backlog_oldest_seconds < 5.0
        assert sender._transport._limiter.borrowed_tokens == 0      # no sendText slot held ...
        assert len(fake.sent) == 1                                  # ... and no request made


async def test_a_second_copy_of_a_sent_stored_reply_is_settled_not_sent(wire: Wire) -> None:
    """Several nodes: a shard recovered again while one of its replies was still queued or being
    settled here resubmits it; the copy is settled (so the row goes) but never sent twice."""
    async with sender_for(wire.settings) as (sender, settled):
        jid = "5491100000001@s.whatsapp.net"
        sender.submit(OutboundMessage(jid, "hola", outbox_id=7, key="i/" + jid))
        sender.submit(OutboundMessage(jid, "hola", outbox_id=7, key="i/" + jid))
        with trio.fail_after(10):
            await sender.drain()
    assert [t for number, t, _ in wire.sent(sender) if number == jid] == ["hola"]
    assert [(m.outbox_id, d.status, d.repeat) for m, d in settled.items] == [(7, "sent", False), (7, "sent", True)]


async def test_a_reply_waits_for_a_late_lease_renewal_instead_of_being_dropped(wire: Wire,
                                                                               postgres_cluster: Any) -> None:
    """Several nodes: before each send the sender asks whether this node still owns the chat's
    shard (``may_send``: ShardOwner.holds). A renewal that comes back late (the local deadline
    passed, the lease still held in the store) must not drop the reply: the node keeps the shard,
    so nobody would ever re-send its outbox row. Seen failing with the former synchronous check
    (``owns``): the reply was dropped ("Processing" on the new owner, never answered: the flake of
    tests/test_nodes.py's SIGKILL test)."""
    store = PostgresStore(postgres_cluster.create_database(), shards=8, node="a")
    await store.open()
    try:
        async def nothing(shards: list[int]) -> None:
            return None

        owner = ShardOwner(store, "a", shards=8, lease_seconds=5.0, on_gained=nothing, on_lost=nothing,
                           on_release=nothing, max_acquire=8)
        await owner.step()
        owner._deadline = trio.current_time()   # the renewal is late
        settled = Settled()
        sender = OutboundSender(wire.settings, on_settled=settled, may_send=owner.holds)
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            sender.submit(OutboundMessage(JID, "hola", key=f"{INSTANCE}/{JID}", outbox_id=1))
            with trio.fail_after(5):            # being delivered, and held at may_send
                while sender.statistics().in_flight != 1:
                    await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert wire.sent(sender) == []      # held until the renewal's outcome
            await owner.step()
            await settled.wait_for(1, timeout=10)
            nursery.cancel_scope.cancel()
        assert [(n, t) for n, t, _ in wire.sent(sender)] == [(JID, "hola")]
        assert sender.dropped == 0 and settled.items[0][1].status == "sent"
    finally:
        await store.close()
