"""Several nodes on one PostgreSQL database (issue 16): real hypercorn processes, a throwaway
PostgreSQL cluster, the Evolution and LLM fakes. Every node is started as operators do
(``hypercorn --worker-class trio --bind 127.0.0.1:PORT app:app``) with the same environment except
DATA_DIR and LOG_DIR; webhooks go to the nodes round-robin, as a load balancer would send them."""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import pytest
import trio

from tests.fakes.evolution import FakeEvolution
from tests.fakes.llm import OpenAIFake, RecordedRequest, Reply
from tests.fakes.server import running_server
from tests.payloads import upsert
from tests.postgres import PASSWORD
from tests.procs import ServiceProcess

pytestmark = pytest.mark.slow

LEASE = 3.0     # SHARD_LEASE_SECONDS: takeovers within LEASE + 2 s
SHARDS = 1024
CHATS = 30
MESSAGES = 10
INSTANCE = "prueba-py-agent"


def echo(delay: float) -> Callable[[RecordedRequest], Reply]:
    """The fake model answers ``ok <last user text>`` after ``delay`` seconds."""

    def behave(request: RecordedRequest) -> Reply:
        return Reply(f"ok {request.json['messages'][-1]['content']}", delay=delay)

    return behave


def node_env(tmp_path: Path, name: str, store_url: str, llm_url: str, evo_url: str) -> dict[str, str]:
    return {
        "LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-test-nodes", "OPENAI_BASE_URL": llm_url + "/v1",
        "EVOLUTION_API_URL": evo_url, "EVOLUTION_API_KEY": "k", "EVOLUTION_INSTANCE": INSTANCE,
        "STORE_URL": store_url, "SHARD_LEASE_SECONDS": str(LEASE), "INBOX_POLL_SECONDS": "1",
        "DATA_DIR": str(tmp_path / name / "data"), "LOG_DIR": str(tmp_path / name / "logs"),
        "OUTBOUND_MIN_GAP_SECONDS": "0", "OUTBOUND_RATE_PER_INSTANCE": "0", "TYPING_PRESENCE": "false",
        "FLOOD_MAX_PER_MINUTE": "0", "REORDER_DELAY_SECONDS": "0", "LLM_TIMEOUT": "30",
        "NEW_CHATS_PER_MINUTE": "0", "LOG_STDERR": "true", "SHUTDOWN_GRACE_SECONDS": "5",
        "GOOGLE_BOOKING_URL": "https://calendar.app.google/example",
    }


def jids() -> list[str]:
    return [f"5491100{i:06d}@s.whatsapp.net" for i in range(CHATS)]


class Cluster:
    """The nodes of one test, their shared fakes, and what was acknowledged per chat."""

    def __init__(self, tmp_path: Path, store_url: str, llm_url: str, evo_url: str, evolution: FakeEvolution) -> None:
        self.tmp_path, self.store_url, self.llm_url, self.evo_url = tmp_path, store_url, llm_url, evo_url
        self.evolution = evolution
        self.nodes: list[ServiceProcess] = []
        self.accepted: dict[str, list[str]] = defaultdict(list)

    async def add(self, count: int) -> list[ServiceProcess]:
        new = []
        for _ in range(count):
            name = f"node{len(self.nodes)}"
            node = ServiceProcess(node_env(self.tmp_path, name, self.store_url, self.llm_url, self.evo_url),
                                  self.tmp_path / f"{name}.log")
            node.start()
            self.nodes.append(node)
            new.append(node)
        async with trio.open_nursery() as nursery:
            for node in new:
                nursery.start_soon(node.wait_ready)
        return new

    def alive(self) -> list[ServiceProcess]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None and not getattr(n, "stopped", False)]

    async def shards(self, node: ServiceProcess) -> dict[str, Any]:
        """The node's /shards (``owned`` 0 while it cannot answer, e.g. the database just returned)."""
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(node.url + "/shards")
            return response.json() if response.status_code == 200 else {"owned": 0}

    async def wait_balanced(self, nodes: list[ServiceProcess], timeout: float = 30.0) -> float:
        """Wait until ``nodes`` own every shard between them, each its fair share; the seconds it took."""
        started = trio.current_time()
        with trio.fail_after(timeout):
            while True:
                views = [await self.shards(n) for n in nodes]
                owned = [v["owned"] for v in views]
                if sum(owned) == SHARDS and max(owned) - min(owned) <= 1:
                    return trio.current_time() - started
                await trio.sleep(0.1)

    async def post(self, client: httpx.AsyncClient, order: int, jid: str, text: str) -> None:
        """Post one message to the node ``order`` picks (round-robin), trying the next live node when a
        node cannot be reached, as a load balancer does; recorded once acknowledged."""
        payload = upsert(text, jid=jid, message_id=f"{jid}:{text}")
        for attempt in range(12):
            alive = self.alive()
            node = alive[(order + attempt) % len(alive)]
            try:
                response = await client.post(node.url + "/webhook", json=payload)
            except httpx.HTTPError:
                await trio.sleep(0.1)
                continue
            if response.status_code == 200:
                body = response.json()
                if body["status"] != "accepted":   # each message is posted once: an earlier attempt that
                    # timed out (its node paused or killed before answering) stored it, and it is answered
                    assert body == {"status": "ignored", "reason": "duplicate"}, body
                self.accepted[jid].append(text)
                return
            await trio.sleep(0.2)   # 503: retried, as Evolution does
        raise AssertionError(f"{jid} {text}: no node accepted it")

    async def traffic(self, messages: range, pause: float = 0.0) -> None:
        """Every chat sends ``messages`` one after another (the next once the previous was acked,
        then ``pause`` seconds); message k of chat c goes to node (c + k) mod the live nodes."""
        async with httpx.AsyncClient(timeout=10) as client:
            async def chat(index: int, jid: str) -> None:
                for k in messages:
                    await self.post(client, index + k, jid, f"m{k}")
                    await trio.sleep(pause)

            async with trio.open_nursery() as nursery:
                for index, jid in enumerate(jids()):
                    nursery.start_soon(chat, index, jid)

    def replies(self) -> dict[str, list[str]]:
        per_jid: dict[str, list[str]] = defaultdict(list)
        for _, number, text in self.evolution.texts():
            per_jid[number].append(text.removeprefix("ok "))
        return per_jid

    async def wait_answered(self, timeout: float = 40.0) -> None:
        total = sum(len(self.accepted[jid]) for jid in jids())
        chats = set(jids())
        with trio.move_on_after(timeout):
            while len({(n, t) for _, n, t in self.evolution.texts() if n in chats}) < total:
                await trio.sleep(0.05)
        answered = {(n, t.removeprefix("ok ")) for _, n, t in self.evolution.texts()}
        missing = [(jid, text) for jid in jids() for text in self.accepted[jid] if (jid, text) not in answered]
        assert not missing, f"not answered within {timeout}s: {missing}"
        await trio.sleep(0.5)   # a late duplicate would show up now

    def check_order(self) -> int:
        """Every acknowledged message answered, in per-chat order; the repeats (a reply sent again
        right after itself: in flight when a node died), at most one per chat (one send in flight)."""
        repeats = 0
        got = self.replies()
        for jid in jids():
            replies = got[jid]
            deduped = [t for i, t in enumerate(replies) if i == 0 or t != replies[i - 1]]
            assert len(replies) - len(deduped) <= 1, (jid, replies)
            repeats += len(replies) - len(deduped)
            assert deduped == self.accepted[jid], (jid, replies, self.accepted[jid])
        return repeats

    def takeover_seconds(self, survivors: list[str], url: str, killed: float, timeout: float) -> float:
        """Seconds from ``killed`` (time.monotonic) until ``survivors`` (node ids) hold every shard's
        unexpired lease between them, as ``url``'s GET /shards ``owners`` reports. Blocking: run in a
        thread (trio.to_thread), so that this test process's own busy loop (it serves the fakes) does
        not delay the reading."""
        with httpx.Client(timeout=2) as client:
            while time.monotonic() - killed < timeout:
                try:
                    owners = client.get(url + "/shards").json().get("owners", {})
                except (httpx.HTTPError, ValueError):
                    owners = {}
                if sum(owners.get(node, 0) for node in survivors) == SHARDS:
                    return time.monotonic() - killed
                time.sleep(0.02)
        raise AssertionError(f"the survivors did not own every shard within {timeout}s of the kill")

    def close(self) -> None:
        for node in self.nodes:
            if getattr(node, "stopped", False) and node.proc is not None and node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGCONT)
            node.__exit__()


@pytest.fixture
async def cluster(tmp_path: Path, postgres_cluster: Any) -> AsyncIterator[Cluster]:
    llm = OpenAIFake(default=echo(0.05), record=False)
    evolution = FakeEvolution(api_key="k", instances={INSTANCE})
    async with running_server(llm) as llm_url, running_server(evolution) as evo_url:
        group = Cluster(tmp_path, postgres_cluster.create_database(), llm_url, evo_url, evolution)
        group.llm = llm   # type: ignore[attr-defined]
        try:
            yield group
        finally:
            group.close()
    for node in group.nodes:
        assert PASSWORD not in node.log_path.read_text(errors="replace")


async def test_three_nodes_answer_every_message_once_in_order(cluster: Cluster) -> None:
    nodes = await cluster.add(3)
    await cluster.wait_balanced(nodes)
    await cluster.traffic(range(MESSAGES))
    await cluster.wait_answered()
    assert cluster.check_order() == 0
    assert sum(map(len, cluster.replies().values())) == CHATS * MESSAGES
    views = [await cluster.shards(n) for n in nodes]
    assert all(v["forwarded"] > 0 for v in views), views   # each node took messages of others' chats
    assert sum(v["fenced_refused"] for v in views) == 0 and sum(v["lost"] for v in views) == 0, views


async def test_sigkill_one_node_under_load(cluster: Cluster) -> None:
    nodes = await cluster.add(3)
    await cluster.wait_balanced(nodes)
    survivors = [nodes[0], nodes[2]]
    ids = [(await cluster.shards(n))["node"] for n in survivors]
    took: list[float] = []
    in_flight: list[int] = []

    async def measure(killed: float) -> None:
        seconds = await trio.to_thread.run_sync(cluster.takeover_seconds, ids, survivors[0].url, killed, LEASE + 20)
        took.append(seconds)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cluster.traffic, range(MESSAGES))
        with trio.fail_after(30):
            while sum(map(len, cluster.accepted.values())) < CHATS * MESSAGES // 3:
                await trio.sleep(0.01)
        in_flight.append(sum(map(len, cluster.accepted.values())) - len(cluster.evolution.texts()))
        killed = time.monotonic()   # taken just before the signal: the figure errs on the long side
        nodes[1].kill()
        nursery.start_soon(measure, killed)
    await cluster.wait_balanced(survivors, timeout=LEASE + 10)
    await cluster.wait_answered()
    repeats = cluster.check_order()
    print(f"\nSIGKILL of 1 of 3 nodes: {sum(map(len, cluster.accepted.values()))} acked messages all answered in "
          f"per-chat order; its shards taken over {took[0]:.1f}s after the kill "
          f"(SHARD_LEASE_SECONDS={LEASE:g}); {repeats} replies repeated, {in_flight[0]} unanswered at the kill")
    assert took[0] <= LEASE + 2, took   # the bound
    assert repeats <= in_flight[0]


async def test_sigstop_past_the_lease_then_sigcont_is_fenced(cluster: Cluster) -> None:
    """A node paused past its lease (a GC pause, a frozen VM) must not write or send when it wakes:
    its shards were taken over, its late commits are refused, its queued sends dropped."""
    nodes = await cluster.add(3)
    await cluster.wait_balanced(nodes)
    cluster.llm.default = echo(1.5)   # type: ignore[attr-defined]  # turns in flight when it is stopped
    paused = nodes[1]
    assert paused.proc is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cluster.traffic, range(0, 2))
        await trio.sleep(0.5)
        os.killpg(paused.proc.pid, signal.SIGSTOP)
        paused.stopped = True   # type: ignore[attr-defined]
    await cluster.wait_balanced([nodes[0], nodes[2]], timeout=LEASE + 10)
    cluster.llm.default = echo(0.05)   # type: ignore[attr-defined]
    os.killpg(paused.proc.pid, signal.SIGCONT)
    paused.stopped = False   # type: ignore[attr-defined]
    await cluster.traffic(range(2, 4))
    await cluster.wait_answered()
    repeats = cluster.check_order()
    view = await cluster.shards(paused)
    others = [await cluster.shards(n) for n in (nodes[0], nodes[2])]
    print(f"\nSIGSTOP past the lease: paused node lost {view['lost']} shards, {view['fenced_refused']} late commits "
          f"refused, {view['outbound_dropped']} sends dropped; {repeats} replies repeated")
    assert view["lost"] >= SHARDS // 3 - 1, (view, others)
    # One CI run (stop 23) had 1 repeat: most likely a reply on the wire while the survivors rebalanced
    # (a hand-back now waits for its replies, tests/test_races.py, but only for a third of the lease,
    # which a loaded machine can exceed; the new owner then sends what is left). More than one fails.
    assert repeats <= 1
    log = paused.log_path.read_text(errors="replace")
    assert view["fenced_refused"] == log.count("Fenced: a commit of")


def echo_or_book(delay: float) -> Callable[[RecordedRequest], Reply]:
    """``echo``, except that a request for an appointment ("cita") gets the booking action."""

    def behave(request: RecordedRequest) -> Reply:
        last = request.json["messages"][-1]["content"]
        if "cita" in last:
            return Reply('{"accion": "reserva", "motivo": "demo"}', delay=delay)
        return Reply(f"ok {last}", delay=delay)

    return behave


async def test_a_fourth_node_joins_and_the_chats_it_takes_keep_their_state(cluster: Cluster) -> None:
    """Shards move to a newcomer by graceful handoff; the chats it takes over keep their windows
    and booking flags (it loads what the previous owner committed)."""
    cluster.llm.default = echo_or_book(0.05)   # type: ignore[attr-defined]
    nodes = await cluster.add(3)
    await cluster.wait_balanced(nodes)
    booker = "5491199999999@s.whatsapp.net"
    async with httpx.AsyncClient(timeout=10) as client:
        for n, text in enumerate(("hola", "quiero una cita")):
            await cluster.post(client, n, booker, text)
    await cluster.traffic(range(0, 5))
    await cluster.wait_answered()
    fourth = (await cluster.add(1))[0]
    took = await cluster.wait_balanced(cluster.nodes)
    await cluster.traffic(range(5, MESSAGES))
    await cluster.wait_answered()
    assert cluster.check_order() == 0
    view = await cluster.shards(fourth)
    print(f"\n4th node joined: balanced in {took:.1f}s, it owns {view['owned']} shards")
    assert view["owned"] == SHARDS // 4
    async with httpx.AsyncClient(timeout=10) as client:
        moved = 0
        for jid in jids():
            for node in cluster.nodes:   # any node answers from the live actor or the database
                window = (await client.get(f"{node.url}/memory/{jid}")).json()
                assert window["count"] == 2 * MESSAGES, (jid, node.url, window)
            moved += (await client.get(f"{fourth.url}/actors/{jid}")).json()["live"] is True
        assert moved > 0   # the newcomer runs some of the chats now
        for node in cluster.nodes:
            assert (await client.get(f"{node.url}/actors/{booker}")).json()["state"]["booking_sent"] is True


async def test_rolling_restart_of_every_node_under_load(cluster: Cluster) -> None:
    """SIGTERM each node in turn (it drains, hands its shards back, leaves) and start a new one in
    its place, while every chat keeps writing: nothing lost, order kept."""
    nodes = await cluster.add(3)
    await cluster.wait_balanced(nodes)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cluster.traffic, range(MESSAGES), 0.6)
        for node in nodes:
            await trio.sleep(0.5)
            assert await node.terminate() == 0, node.output()
            await cluster.add(1)
    await cluster.wait_answered()
    repeats = cluster.check_order()
    print(f"\nrolling restart of 3 nodes under load: {sum(map(len, cluster.accepted.values()))} acked messages "
          f"answered in order, {repeats} repeated")
    for node in nodes:
        assert "Shards: handed back" in node.log_path.read_text(errors="replace")


async def refused_while_down(client: httpx.AsyncClient, node: ServiceProcess) -> None:
    response = await client.post(node.url + "/webhook", json=upsert("down", jid=jids()[0], message_id="down"))
    assert response.status_code == 503 and response.headers["Retry-After"], response.text


async def test_database_down_for_10_seconds(cluster: Cluster, postgres_cluster: Any) -> None:
    """Webhooks answer 503 with Retry-After while the database is down, nothing acked is lost, and
    the nodes recover by themselves when it returns."""
    nodes = await cluster.add(3)
    await cluster.wait_balanced(nodes)
    await cluster.traffic(range(0, 3))
    await trio.to_thread.run_sync(postgres_cluster.pg_ctl, "stop")
    try:
        down = trio.current_time()
        async with httpx.AsyncClient(timeout=30) as client:   # each waits up to the store's connect timeout
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(refused_while_down, client, node)
        await trio.sleep(max(0.0, 10 - (trio.current_time() - down)))
    finally:
        await trio.to_thread.run_sync(postgres_cluster.pg_ctl, "start")
    took = await cluster.wait_balanced(nodes, timeout=30)
    await cluster.traffic(range(3, 6))
    await cluster.wait_answered()
    repeats = cluster.check_order()
    print(f"\ndatabase down 10s: shards owned again {took:.1f}s after it returned; every acked message answered "
          f"in order, {repeats} replies repeated (sent, not yet settled when the database went away)")
