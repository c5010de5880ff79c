"""Refused webhooks must not wedge the client's keep-alive connection (Evolution reuses connections)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.payloads import upsert
from tests.procs import ServiceProcess

pytestmark = pytest.mark.slow


async def test_refused_requests_leave_the_connection_usable(tmp_path: Path) -> None:
    env = {"WEBHOOK_SECRET": "hook-secret-0123", "DATA_DIR": str(tmp_path / "data"), "LOG_DIR": str(tmp_path / "logs")}
    with ServiceProcess(env, tmp_path / "service.out") as service:
        service.start()
        await service.wait_ready()
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)  # every request on one connection
        async with httpx.AsyncClient(base_url=service.url, timeout=5, limits=limits) as client:
            with trio.fail_after(20):
                assert (await client.post("/webhook", json=upsert("sin token"))).status_code == 401
                assert (await client.get("/health")).status_code == 200
                assert (await client.post("/webhook", json=upsert("x" * 2_000_000),
                                          headers={"x-webhook-token": "hook-secret-0123"})).status_code == 413
                assert (await client.get("/health")).status_code == 200
                assert (await client.post("/webhook", content=b"{not json",
                                          headers={"x-webhook-token": "hook-secret-0123"})).status_code == 400
                ok = await client.post("/webhook", json=upsert("hola"), headers={"x-webhook-token": "hook-secret-0123"})
                assert ok.status_code == 200 and ok.json()["status"] == "accepted"
                # the webhook's ack time, measured inside the service, by outcome (docs/behaviour.md §2.9)
                metrics = (await client.get("/metrics")).text
        counts = {s.labels["outcome"]: s.value for family in text_string_to_metric_families(metrics)
                  for s in family.samples if s.name == "agent_webhook_ack_seconds_count"}
        assert counts == {"accepted": 1, "ignored": 0, "refused": 3, "unavailable": 0}
        await service.terminate()
