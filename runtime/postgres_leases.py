"""Shard leases and node heartbeats in PostgreSQL (``runtime.shards.LeaseStore``), a part of
``PostgresStore``: every operation runs on the store's lease connection (``lease=True``), so a
renewal never waits behind a burst of webhooks in the pool's queue.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Sequence

from .postgres_schema import NOW, AfterCommit, dumps
from .shards import Lease, LeaseRow, NodeInfo, NodeRow

NODES_KEPT_SECONDS = 3600.0   # a silent node's heartbeat row is kept this long (shown as not live)


class PostgresLeases:
    """The lease half of ``PostgresStore`` (a mixin: it needs the store's ``_run``)."""

    _run: Callable[..., Awaitable[Any]]

    async def heartbeat(self, node: str, ttl: float, info: NodeInfo) -> list[str]:
        """Record that ``node`` is alive, with what it says of itself; the live nodes (seen within
        ``ttl`` seconds), sorted. Nodes silent for ``NODES_KEPT_SECONDS`` are forgotten (until then
        admins see them as not live)."""
        args = {"node": node, "address": info.address, "started": info.started_at, "stats": dumps(dict(info.stats)),
                "ttl": ttl, "kept": max(NODES_KEPT_SECONDS, 10 * ttl)}

        def op(conn: Any) -> AfterCommit:
            conn.execute(f"INSERT INTO agent_nodes (node, seen_at, address, started_at, stats)"
                         f" VALUES (%(node)s, {NOW}, %(address)s, %(started)s, %(stats)s)"
                         " ON CONFLICT (node) DO UPDATE SET seen_at = excluded.seen_at, address = excluded.address,"
                         " started_at = excluded.started_at, stats = excluded.stats", args)
            conn.execute(f"DELETE FROM agent_nodes WHERE seen_at < {NOW} - %(kept)s", args)
            live = conn.execute(f"SELECT node FROM agent_nodes WHERE seen_at >= {NOW} - %(ttl)s ORDER BY node", args)
            return AfterCommit(lambda: [name for (name,) in live.fetchall()])

        return await self._run(op, mode="batch", lease=True)

    async def nodes(self, ttl: float) -> list[NodeRow]:
        """Every node heard of lately, by name: what it said with its last heartbeat, how long ago,
        whether that is within ``ttl``, and the unexpired leases it holds."""

        def op(conn: Any) -> list[NodeRow]:
            rows = conn.execute(
                f"SELECT n.node, n.address, n.started_at, {NOW} - n.seen_at, n.stats,"
                f" (SELECT count(*) FROM agent_shards s WHERE s.owner = n.node AND s.expires_at > {NOW})"
                " FROM agent_nodes n ORDER BY n.node").fetchall()
            return [NodeRow(node, NodeInfo(address, float(started), json.loads(stats)), float(ago), float(ago) <= ttl,
                            int(owned)) for node, address, started, ago, stats, owned in rows]

        return await self._run(op, mode="statement", lease=True)

    async def acquire(self, node: str, shards: Sequence[int], lease_seconds: float, limit: int) -> list[Lease]:
        """Take up to ``limit`` of ``shards`` that are free or expired, lowest first (epoch + 1);
        rows another node is taking at the same moment are skipped, never waited for. A lease whose
        row still named another owner (it expired: that node died or was cut off) says so."""

        def op(conn: Any) -> list[Lease]:
            rows = conn.execute(
                "WITH taken AS (SELECT shard, owner FROM agent_shards WHERE shard = ANY(%(wanted)s)"
                f" AND (owner IS NULL OR expires_at < {NOW}) ORDER BY shard LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                f" UPDATE agent_shards s SET owner = %(node)s, epoch = s.epoch + 1, expires_at = {NOW} + %(lease)s"
                " FROM taken WHERE s.shard = taken.shard RETURNING s.shard, s.epoch, taken.owner",
                {"node": node, "lease": lease_seconds, "wanted": list(shards), "limit": limit}).fetchall()
            return sorted(Lease(int(shard), int(epoch), taken_from=previous if previous != node else None)
                          for shard, epoch, previous in rows)

        return await self._run(op, mode="statement", lease=True)

    async def renew(self, node: str, leases: Sequence[Lease], lease_seconds: float) -> list[Lease]:
        """Extend the leases ``node`` still holds under their epochs; the ones renewed."""
        if not leases:
            return []

        def op(conn: Any) -> list[Lease]:
            rows = conn.execute(
                f"UPDATE agent_shards s SET expires_at = {NOW} + %s FROM unnest(%s::int[], %s::bigint[])"
                " AS l(shard, epoch) WHERE s.shard = l.shard AND s.epoch = l.epoch AND s.owner = %s"
                " RETURNING s.shard, s.epoch",
                (lease_seconds, [x.shard for x in leases], [x.epoch for x in leases], node)).fetchall()
            return sorted(Lease(int(shard), int(epoch)) for shard, epoch in rows)

        return await self._run(op, mode="statement", lease=True)

    async def release(self, node: str, leases: Sequence[Lease]) -> None:
        """Free the leases ``node`` still holds under their epochs, for any node to take at once."""
        if not leases:
            return
        await self._run(lambda conn: conn.execute(
            "UPDATE agent_shards s SET owner = NULL, expires_at = 0 FROM unnest(%s::int[], %s::bigint[])"
            " AS l(shard, epoch) WHERE s.shard = l.shard AND s.epoch = l.epoch AND s.owner = %s",
            ([x.shard for x in leases], [x.epoch for x in leases], node)), mode="statement", lease=True)

    async def leave(self, node: str) -> None:
        """Forget ``node``'s heartbeat (it is going away): the others' fair shares grow at once."""
        await self._run(lambda conn: conn.execute("DELETE FROM agent_nodes WHERE node = %s", (node,)),
                        mode="statement", lease=True)

    async def next_expiry(self, node: str) -> float | None:
        """Seconds until the first unexpired lease of another node runs out, on the store's clock
        (None: there is none): a node wakes up then to take a dead node's shards."""

        def op(conn: Any) -> float | None:
            (left,) = conn.execute(f"SELECT min(expires_at) - {NOW} FROM agent_shards"
                                   f" WHERE owner <> %s AND expires_at >= {NOW}", (node,)).fetchone()
            return None if left is None else max(0.0, float(left))

        return await self._run(op, mode="statement", lease=True)

    async def lease_rows(self) -> list[LeaseRow]:
        """Every shard's lease, by shard."""

        def op(conn: Any) -> list[LeaseRow]:
            rows = conn.execute(f"SELECT shard, owner, epoch, expires_at - {NOW} FROM agent_shards"
                                " ORDER BY shard").fetchall()
            return [LeaseRow(int(s), owner, int(epoch), float(left)) for s, owner, epoch, left in rows]

        return await self._run(op, mode="statement", lease=True)
