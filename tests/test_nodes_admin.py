"""Admin on any of several nodes (issue 16): a command given on a node that does not run the chat
reaches its owner through the chat's inbox, in order with the chat's messages; GET /cluster shows
the same nodes on every node. Real hypercorn processes on a throwaway PostgreSQL (tests/test_nodes.py)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from runtime.shards import shard_of
from tests.procs import ServiceProcess
from tests.test_nodes import INSTANCE, SHARDS, Cluster, cluster, jids

pytestmark = pytest.mark.slow
__all__ = ["cluster"]   # the fixture, used by name


async def owner_of(cluster: Cluster, key: str) -> str:
    """The node holding ``key``'s shard lease, read from the database."""
    import psycopg

    def read() -> str:
        with psycopg.connect(cluster.store_url) as conn:
            row = conn.execute("SELECT owner FROM agent_shards WHERE shard = %s", (shard_of(key, SHARDS),)).fetchone()
            return str(row[0])

    return await trio.to_thread.run_sync(read)


async def pending_outbox(cluster: Cluster, key: str) -> int:
    """``key``'s replies and jobs written and not settled yet, read from the database."""
    import psycopg

    def read() -> int:
        with psycopg.connect(cluster.store_url) as conn:
            return int(conn.execute("SELECT count(*) FROM agent_outbox WHERE key = %s", (key,)).fetchone()[0])

    return await trio.to_thread.run_sync(read)


async def get(client: httpx.AsyncClient, node: ServiceProcess, path: str) -> Any:
    response = await client.get(node.url + path)
    assert response.status_code == 200, response.text
    return response.json()


async def balanced_with_owner(cluster: Cluster, client: httpx.AsyncClient, count: int,
                              jid: str) -> tuple[list[ServiceProcess], dict[str, ServiceProcess], ServiceProcess]:
    """``count`` nodes started and balanced, by node id, and the one that owns ``jid``'s chat."""
    nodes = await cluster.add(count)
    await cluster.wait_balanced(nodes)
    names = {(await get(client, n, "/shards"))["node"]: n for n in nodes}
    return nodes, names, names[await owner_of(cluster, f"{INSTANCE}/{jid}")]


async def test_commands_on_any_node_reach_the_owner_in_order(cluster: Cluster) -> None:
    jid = jids()[0]
    async with httpx.AsyncClient(timeout=10) as client:
        nodes, names, owner = await balanced_with_owner(cluster, client, 3, jid)
        one, two = [n for n in nodes if n is not owner]

        async def reply_texts() -> list[str]:
            return [t for _, number, t in cluster.evolution.texts() if number == jid]

        await cluster.post(client, nodes.index(one), jid, "m0")
        with trio.fail_after(15):
            while await reply_texts() != ["ok m0"]:
                await trio.sleep(0.05)

        paused = await client.post(f"{one.url}/actors/{jid}/pause")
        assert (paused.status_code, paused.json()) == (202, {"status": "queued", "command": "pause"})
        await cluster.post(client, nodes.index(two), jid, "m1")   # accepted after the pause: not answered
        with trio.fail_after(15):   # the owner carried the pause out: every node reads it from the database
            while (await get(client, two, f"/actors/{jid}"))["state"]["pause_reason"] != "operator":
                await trio.sleep(0.1)
        resumed = await client.post(f"{two.url}/actors/{jid}/resume")
        assert resumed.status_code == 202, resumed.text
        await cluster.post(client, nodes.index(one), jid, "m2")   # after the resume: answered
        with trio.fail_after(15):
            while len(await reply_texts()) < 2:
                await trio.sleep(0.05)
        # m2 is answered, so m1 (earlier in the chat's order) was handled already: unanswered
        assert await reply_texts() == ["ok m0", "ok m2"]
        stored = await get(client, one, f"/actors/{jid}")
        assert [m["content"] for m in stored["state"]["messages"]] == ["m0", "ok m0", "m1", "m2", "ok m2"]

        reset = await client.post(f"{one.url}/actors/{jid}/reset")
        assert reset.status_code == 202, reset.text
        with trio.fail_after(15):
            while (await get(client, two, f"/actors/{jid}"))["state"]["window_size"] != 0:
                await trio.sleep(0.1)
        on_owner = await client.post(f"{owner.url}/actors/{jid}/pause")   # the owner carries it out at once
        assert on_owner.status_code == 200 and on_owner.json()["status"] == "applied", on_owner.text

        # three commands were given off the owner (pause and reset on one, resume on two); a node shows
        # its own counts live and the others' as of their last heartbeat (every lease/3): wait until
        # every node's view has them all
        with trio.fail_after(15):
            while True:
                views = [await get(client, n, "/cluster") for n in nodes]
                if all(sum(m["stats"]["commands_forwarded"] for m in v["nodes"]) == 3 for v in views):
                    break
                await trio.sleep(0.1)
    assert [[(m["id"], m["address"], m["live"], m["shards_owned"]) for m in v["nodes"]] for v in views] == [
        [(name, names[name].url.removeprefix("http://"), True, SHARDS // 3 + (1 if i < SHARDS % 3 else 0))
         for i, name in enumerate(sorted(names))]] * 3
    assert views[0]["leases"] == {"shards": SHARDS, "lease_seconds": 3.0, "held": SHARDS, "expired": 0, "free": 0,
                                  "max_epoch": views[0]["leases"]["max_epoch"]}
    assert views[0]["takeovers"] == 0 and views[0]["fenced_writes_refused"] == 0
    forwarded = {m["id"]: m["stats"]["commands_forwarded"] for m in views[0]["nodes"]}
    assert forwarded == {name: 2 if node is one else 1 if node is two else 0 for name, node in names.items()}


async def test_a_dead_letter_retried_on_another_node_is_sent_by_the_chats_owner(cluster: Cluster) -> None:
    """The console's dead letters are read from the database on any node (behind a load balancer, any
    node may get the click): a retry on a node that does not run the chat revives the row and the
    owner, told through the chat's inbox, sends it once, in order with the chat's replies."""
    jid = jids()[1]
    async with httpx.AsyncClient(timeout=10) as client:
        nodes, _, owner = await balanced_with_owner(cluster, client, 2, jid)
        other = next(n for n in nodes if n is not owner)
        cluster.evolution.statuses = {INSTANCE: 400}   # every send refused for good: a dead letter
        await cluster.post(client, nodes.index(owner), jid, "m0")
        with trio.fail_after(15):
            while not (dead := [d for d in (await get(client, other, "/admin/api/delivery"))["dead_letters"]
                                if d["jid"] == jid]):
                await trio.sleep(0.1)
        cluster.evolution.statuses = {}
        retried = await client.post(f"{other.url}/admin/api/dead-letters/{dead[0]['id']}/retry")
        assert (retried.status_code, retried.json()) == (200, {"status": "retried", "id": dead[0]["id"]})
        with trio.fail_after(15):
            while [t for _, number, t in cluster.evolution.texts() if number == jid] != ["ok m0"]:
                await trio.sleep(0.05)
        await cluster.post(client, nodes.index(other), jid, "m1")   # the chat goes on, in order
        with trio.fail_after(15):
            while len([t for _, number, t in cluster.evolution.texts() if number == jid]) < 2:
                await trio.sleep(0.05)
        with trio.fail_after(15):   # every reply of the chat settled: none left that could go out again
            while await pending_outbox(cluster, f"{INSTANCE}/{jid}"):
                await trio.sleep(0.05)
        assert [t for _, number, t in cluster.evolution.texts() if number == jid] == ["ok m0", "ok m1"]
        assert (await get(client, owner, "/admin/api/delivery"))["dead_letters"] == []
