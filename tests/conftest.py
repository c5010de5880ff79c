"""Shared fixtures: settings for tests, a running service, webhook payload builders."""

from __future__ import annotations

import os
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio
from quart_trio.testing import TrioClient

from actors.conversation_key import ConversationKey
from actors.llm.base import Provider
from actors.llm.chain import ProviderChain
from actors.prompts import texts_for
from actors.service import Service
from actors.settings import Settings, load_settings

# Tests are hermetic: an instances.toml a developer copied beside config.toml (as the README's
# walk-through does) is not theirs. Every test's settings, and every service process a test starts,
# read this empty instances file unless the test names its own.
NO_INSTANCES_FILE = Path(tempfile.mkdtemp(prefix="agent-tests-")) / "no-instances.toml"
NO_INSTANCES_FILE.write_text("# no instances: single-tenant\n")
os.environ.setdefault("INSTANCES_FILE", str(NO_INSTANCES_FILE))
# Likewise a developer's .env (with real keys, a real Evolution URL): no test reads it (ENV_FILE empty).
os.environ.setdefault("ENV_FILE", "")



def key_of(jid: str, instance: str = "prueba-py-agent") -> str:
    """The conversation key of ``jid`` in ``instance`` (the instance of tests/payloads.py's webhooks)."""
    return ConversationKey(instance, jid).key


def make_settings(tmp_path: Path, **env: Any) -> Settings:
    """Settings for tests: memory store, no pacing, logs and data in tmp_path; ``env`` overrides."""
    base = {
        "STORE": "memory",
        "DATA_DIR": str(tmp_path / "data"),
        "LOG_DIR": str(tmp_path / "logs"),
        "OUTBOUND_MIN_GAP_SECONDS": "0",
        "OUTBOUND_RATE_PER_INSTANCE": "0",
        "REORDER_DELAY_SECONDS": "0",
        "FLOOD_MAX_PER_MINUTE": "0",
        "TYPING_PRESENCE": "false",
        "INSTANCES_FILE": os.environ["INSTANCES_FILE"],
    }
    base.update({k.upper(): str(v) for k, v in env.items()})
    return load_settings(base, dotenv_file=None)


class LoopbackClient(TrioClient):
    """A test client whose requests come from 127.0.0.1:50000, as a local operator's do (the ASGI scope's
    client; without one Quart reports ``<local>``, which the admin endpoints never serve)."""

    async def open(self, *args: Any, scope_base: dict[str, Any] | None = None,  # type: ignore[override]
                   **kwargs: Any) -> Any:
        scope = {"client": ("127.0.0.1", 50000), **(scope_base or {})}
        return await super().open(*args, scope_base=scope, **kwargs)


def chain_of(settings: Settings, *providers: Provider) -> ProviderChain:
    return ProviderChain(list(providers), polite_text=texts_for(settings.conversation.language).polite_error,
                         timeout=settings.llm.llm_timeout)


@asynccontextmanager
async def running_service(settings: Settings, *providers: Provider, chain: Any = None) -> AsyncIterator[Service]:
    """A started Service (no HTTP) whose chain uses ``providers`` (the configured chain if none)."""
    if chain is None and providers:
        chain = chain_of(settings, *providers)
    service = Service(settings, chain=chain)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        try:
            yield service
        finally:
            nursery.cancel_scope.cancel()


async def wait_for(condition, *, timeout: float = 10.0, interval: float = 0.005) -> None:  # type: ignore[no-untyped-def]
    """Poll ``condition()`` until true; fail the test after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(interval)
        return
    pytest.fail(f"condition not met within {timeout}s")


@pytest.fixture(scope="session")
def postgres_cluster() -> Any:
    """One throwaway PostgreSQL cluster for the session (tests/postgres.py). Skipped with the reason
    when none can be started here, unless REQUIRE_POSTGRES_TESTS=1 (CI), where that is a failure."""
    import os

    from tests.postgres import PostgresCluster, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("REQUIRE_POSTGRES_TESTS") == "1":
            pytest.fail(f"PostgreSQL tests required but: {reason}")
        pytest.skip(reason)
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def durable_store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of each durable store, for real-process tests that run against both: SQLite in
    DATA_DIR, or a fresh database of the session's PostgreSQL cluster through STORE_URL."""
    if request.param == "sqlite":
        return {"STORE": "sqlite"}
    return {"STORE_URL": request.getfixturevalue("postgres_cluster").create_database()}
