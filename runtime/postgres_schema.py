"""The PostgreSQL store's schema and the SQL pieces its modules share.

``MIGRATIONS[n]`` brings a database from version n-1 to version n; a released one is never edited
(runtime/postgres_store.py applies them at ``open``). The store's clock is the database's
(``NOW``): one clock for every machine, which lease expiry depends on.
"""

from __future__ import annotations

import json
from typing import Any, Callable

# MIGRATIONS[n] brings a database from version n-1 to version n (never edit a released one).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE agent_states (key TEXT PRIMARY KEY, data BYTEA NOT NULL)",
        "CREATE TABLE agent_meta (key TEXT PRIMARY KEY, last_activity DOUBLE PRECISION NOT NULL,"
        " size INTEGER NOT NULL DEFAULT 0, title TEXT NOT NULL DEFAULT '', preview TEXT NOT NULL DEFAULT '',"
        " status TEXT NOT NULL DEFAULT '', status_until DOUBLE PRECISION NOT NULL DEFAULT 0,"
        " status_after TEXT NOT NULL DEFAULT '', scope TEXT NOT NULL DEFAULT '', search TEXT NOT NULL DEFAULT '')",
        "CREATE INDEX agent_meta_activity ON agent_meta (last_activity, key)",
        "CREATE INDEX agent_meta_scope ON agent_meta (scope)",
        "CREATE TABLE agent_seqs (key TEXT PRIMARY KEY, last BIGINT NOT NULL)",
        "CREATE TABLE agent_inbox (key TEXT NOT NULL, seq BIGINT NOT NULL, payload TEXT NOT NULL,"
        " PRIMARY KEY (key, seq))",
        "CREATE TABLE agent_seen (dedupe_id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX agent_seen_at ON agent_seen (at)",
        "CREATE TABLE agent_outbox (id BIGSERIAL PRIMARY KEY, key TEXT NOT NULL, kind TEXT NOT NULL,"
        " payload TEXT NOT NULL)",
        "CREATE INDEX agent_outbox_key ON agent_outbox (key)",
        "CREATE TABLE agent_dead_letters (id BIGINT PRIMARY KEY, key TEXT NOT NULL, kind TEXT NOT NULL,"
        " payload TEXT NOT NULL, reason TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)",
    ),
}
MIGRATIONS[2] = (   # shard ownership (runtime/shards.py): leases, node heartbeats, the fence
    "CREATE TABLE agent_config (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE agent_shards (shard INTEGER PRIMARY KEY, owner TEXT, epoch BIGINT NOT NULL DEFAULT 0,"
    " expires_at DOUBLE PRECISION NOT NULL DEFAULT 0)",
    "CREATE TABLE agent_nodes (node TEXT PRIMARY KEY, seen_at DOUBLE PRECISION NOT NULL)",
    # A turn's writes are fenced by its first statement: it locks the shard's row (FOR SHARE, so a
    # takeover waits for the turn to commit) and fails the transaction unless this owner's epoch
    # still holds it.
    "CREATE FUNCTION agent_fence(p_owner TEXT, p_shard INTEGER, p_epoch BIGINT) RETURNS void"
    " LANGUAGE plpgsql AS $$ BEGIN"
    " PERFORM 1 FROM agent_shards WHERE shard = p_shard AND epoch = p_epoch AND owner = p_owner FOR SHARE;"
    " IF NOT FOUND THEN RAISE EXCEPTION 'shard % lease lost (epoch %)', p_shard, p_epoch"
    " USING ERRCODE = 'AG001'; END IF; END $$",
)
MIGRATIONS[3] = (   # several nodes: each row names its key's shard (shard_of, computed in Python)
    "ALTER TABLE agent_inbox ADD COLUMN shard INTEGER NOT NULL DEFAULT -1",
    "ALTER TABLE agent_outbox ADD COLUMN shard INTEGER NOT NULL DEFAULT -1",
    "ALTER TABLE agent_meta ADD COLUMN shard INTEGER NOT NULL DEFAULT -1",
    "CREATE INDEX agent_inbox_shard ON agent_inbox (shard, key, seq)",
    "CREATE INDEX agent_outbox_shard ON agent_outbox (shard, id)",
    "CREATE INDEX agent_meta_shard ON agent_meta (shard, last_activity)",
)
MIGRATIONS[4] = (   # GET /cluster: what each node says of itself with its heartbeat
    "ALTER TABLE agent_nodes ADD COLUMN address TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE agent_nodes ADD COLUMN started_at DOUBLE PRECISION NOT NULL DEFAULT 0",
    "ALTER TABLE agent_nodes ADD COLUMN stats TEXT NOT NULL DEFAULT '{}'",
)
SCHEMA_VERSION = len(MIGRATIONS)
SHARDED = ("agent_inbox", "agent_outbox", "agent_meta")   # tables with a shard column (-1: not computed yet)
FENCED = "AG001"   # the SQLSTATE agent_fence raises
NOW = "extract(epoch FROM clock_timestamp())"   # the store's clock: one for every machine


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class AfterCommit:
    """What an operation returns to read its results once the transaction's one round trip is
    done (reading them inside would add a round trip per read, pipeline mode syncing for each)."""

    __slots__ = ("read",)

    def __init__(self, read: Callable[[], Any]) -> None:
        self.read = read
