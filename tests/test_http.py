"""The HTTP surface through the real ASGI app (QuartTrio test client): webhook, health, admin endpoints."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest

from app import create_app
from tests.conftest import LoopbackClient, make_settings, wait_for
from tests.payloads import upsert

JID = "5491131376731@s.whatsapp.net"


@asynccontextmanager
async def client_for(tmp_path, **env: Any) -> AsyncIterator[Any]:  # type: ignore[no-untyped-def]
    app = create_app(make_settings(tmp_path, **env))
    app.test_client_class = LoopbackClient
    async with app.test_app() as test_app:
        yield app, test_app.test_client()


async def outbox(client: Any, jid: str = JID, **headers: str) -> list[dict[str, Any]]:
    response = await client.get("/outbox", query_string={"jid": jid}, headers=headers)
    assert response.status_code == 200
    return await response.get_json()


async def test_webhook_to_reply_and_seed_endpoints(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path) as (app, client):
        response = await client.post("/webhook", json=upsert("Hola, necesito ayuda"))
        assert response.status_code == 200
        assert await response.get_json() == {"status": "accepted", "jid": JID, "instance": "prueba-py-agent"}
        response = await client.post("/webhook/messages-upsert", json=upsert("Segundo mensaje"))
        assert response.status_code == 200
        await wait_for(lambda: len(app.extensions["service"].outbound.outbox_entries(jid=JID)) == 2)
        replies = await outbox(client)
        assert "Hola, necesito ayuda" in replies[0]["text"]
        assert [r["instance"] for r in replies] == ["prueba-py-agent"] * 2   # the number it answers from

        assert await (await client.get("/health")).get_json() == {"status": "ok"}
        assert await (await client.get("/ready")).get_json() == {"status": "ready"}
        assert await (await client.get("/memory")).get_json() == {JID: 4}
        detail = await (await client.get(f"/memory/{JID}")).get_json()
        assert detail["user_id"] == JID and detail["count"] == 4
        assert [m["role"] for m in detail["messages"]] == ["HumanMessage", "AIMessage"] * 2
        assert detail["messages"][0]["content"] == "Hola, necesito ayuda"

        rows = (await (await client.get("/actors")).get_json())["actors"]
        assert len(rows) == 1 and rows[0]["jid"] == JID and rows[0]["window_size"] == 4
        assert {"booking_sent", "mailbox_depth", "last_activity", "expires_at"} <= set(rows[0])
        actor = await (await client.get(f"/actors/{JID}")).get_json()
        assert actor["live"] is True and actor["state"]["window_size"] == 4
        assert [m["content"] for m in actor["state"]["messages"]][0] == "Hola, necesito ayuda"
        supervisors = await (await client.get("/supervisors")).get_json()
        assert supervisors["llm"]["providers"][0]["name"] == "offline"
        assert supervisors["registry"]["live_actors"] == 1


BAD_BODIES: list[tuple[str, Any]] = [
    ("not json", b"hola"),
    ("truncated json", b'{"event": "messages.upsert", "data": {'),
    ("array", [1, 2, 3]),
    ("string", "messages.upsert"),
    ("no event", {"data": upsert()["data"]}),
    ("no data", {"event": "messages.upsert", "instance": "x"}),
    ("data not object", {"event": "messages.upsert", "data": "x"}),
    ("no key", {"event": "messages.upsert", "data": {"message": {"conversation": "hola"}}}),
    ("no remoteJid", {"event": "messages.upsert", "data": {"key": {"id": "A1", "fromMe": False}}}),
    ("jid without @", upsert(jid="5491131376731")),
    ("jid letters", upsert(jid="juan@s.whatsapp.net")),
    ("jid spaces", upsert(jid="549 113 137@s.whatsapp.net")),
    ("jid path", upsert(jid="../admin@s.whatsapp.net")),
    ("jid huge", upsert(jid="1" * 5000 + "@s.whatsapp.net")),
    ("jid unknown server", upsert(jid="5491131376731@example.com")),
    ("fromMe not bool", {**upsert(), "data": {**upsert()["data"], "key": {**upsert()["data"]["key"], "fromMe": "false"}}}),
    ("id missing", {**upsert(), "data": {**upsert()["data"], "key": {"remoteJid": JID, "fromMe": False}}}),
    ("timestamp text", {**upsert(), "data": {**upsert()["data"], "messageTimestamp": "yesterday"}}),
    ("deep nesting", json.loads("[" * 40 + "]" * 40)),
]


@pytest.mark.parametrize(("name", "body"), BAD_BODIES, ids=[n for n, _ in BAD_BODIES])
async def test_bad_webhook_bodies_are_4xx_and_change_nothing(tmp_path, name: str, body: Any) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path) as (app, client):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await client.post("/webhook", data=data, headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, name
        assert "error" in await response.get_json()
        assert await (await client.get("/health")).get_json() == {"status": "ok"}
        assert (await (await client.get("/actors")).get_json())["actors"] == []
        assert await (await client.get("/memory")).get_json() == {}


async def test_body_over_limit_is_413(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path) as (app, client):
        big = upsert("x" * (1024 * 1024 + 10))
        response = await client.post("/webhook", json=big)
        assert response.status_code == 413
        assert "error" in await response.get_json()
        assert (await (await client.get("/actors")).get_json())["actors"] == []


async def test_ignored_payloads_answer_200_with_reason(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path) as (app, client):
        cases = {
            "group": upsert(jid="120363025246125486@g.us", participant=JID),
            "broadcast": upsert(jid="status@broadcast"),
            "newsletter": upsert(jid="120363111111111111@newsletter"),
            "event connection.update": {**upsert(), "event": "connection.update"},
            "no text (reaction, edit or protocol message)": upsert(None, message={"reactionMessage": {"text": "👍"}}),
        }
        for reason, payload in cases.items():
            response = await client.post("/webhook", json=payload)
            assert response.status_code == 200
            assert await response.get_json() == {"status": "ignored", "reason": reason}
        payload = upsert("hola", message_id="SAME-ID")
        bodies = [await (await client.post("/webhook", json=payload)).get_json() for _ in range(3)]
        assert [b["status"] for b in bodies] == ["accepted", "ignored", "ignored"]
        assert (await (await client.get("/actors")).get_json())["actors"] != []


async def test_admin_paths_validate_jids(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path) as (app, client):
        for path in ("/memory/garbage", "/actors/12", "/memory/5491131376731@evil.com", "/actors/a%20b@lid"):
            response = await client.get(path)
            assert response.status_code == 400, path
        for path in (f"/memory/{JID}", f"/actors/{JID}"):
            response = await client.get(path)
            assert response.status_code == 404, path
            assert "error" in await response.get_json()


ADMIN_PATHS = ["/memory", f"/memory/{JID}", "/actors", f"/actors/{JID}", "/supervisors", "/outbox"]


async def test_admin_token_required_when_set(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path, ADMIN_TOKEN="s3cret-admin-token") as (app, client):
        await client.post("/webhook", json=upsert("hola"))
        for path in ADMIN_PATHS:
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers={"Authorization": "Bearer wrong"})).status_code == 401, path
            ok = await client.get(path, headers={"Authorization": "Bearer s3cret-admin-token"})
            assert ok.status_code in (200, 404), path
            assert "s3cret-admin-token" not in (await ok.get_data(as_text=True))
        assert (await client.get("/health")).status_code == 200


async def test_admin_loopback_only_without_token(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path) as (app, client):
        for path in ADMIN_PATHS:
            response = await client.get(path, scope_base={"client": ("203.0.113.9", 5555)})
            assert response.status_code == 403, path


async def test_webhook_secret_header_or_query(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path, WEBHOOK_SECRET="hook-secret-123") as (app, client):
        assert (await client.post("/webhook", json=upsert("a"))).status_code == 401
        assert (await client.post("/webhook", json=upsert("b"), headers={"x-webhook-token": "nope"})).status_code == 401
        assert (await client.post("/webhook", json=upsert("c"), query_string={"token": "nope"})).status_code == 401
        assert (await (await client.get("/actors")).get_json())["actors"] == []
        assert (await client.post("/webhook", json=upsert("d"), headers={"x-webhook-token": "hook-secret-123"})).status_code == 200
        assert (await client.post("/webhook", json=upsert("e"), query_string={"token": "hook-secret-123"})).status_code == 200
        await wait_for(lambda: len(app.extensions["service"].outbound.outbox_entries(jid=JID)) == 2)


async def test_metrics_parse_and_count_this_traffic(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client.parser import text_string_to_metric_families

    async with client_for(tmp_path) as (app, client):
        for i in range(3):
            await client.post("/webhook", json=upsert(f"hola {i}"))
        await client.post("/webhook", json=upsert(jid="status@broadcast"))
        await client.post("/webhook", json=upsert("dup", message_id="D1"))
        await client.post("/webhook", json=upsert("dup", message_id="D1"))
        await wait_for(lambda: len(app.extensions["service"].outbound.outbox_entries(jid=JID)) == 4)
        response = await client.get("/metrics")
        assert response.status_code == 200
        text = await response.get_data(as_text=True)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert samples[("agent_messages_received_total", ())] == 5
        assert samples[("agent_messages_ignored_total", (("reason", "broadcast"),))] == 1
        assert samples[("agent_messages_ignored_total", (("reason", "duplicate"),))] == 1
        assert samples[("agent_live_actors", ())] == 1
        assert samples[("agent_llm_calls_total", (("outcome", "success"), ("provider", "offline")))] == 4
        assert samples[("agent_llm_circuit_state", (("provider", "offline"), ("state", "closed")))] == 1
        assert samples[("agent_turn_seconds_count", ())] == 4
        assert samples[("agent_outbound_messages_total", (("outcome", "sent"),))] == 4
        assert (await client.get("/metrics", scope_base={"client": ("203.0.113.9", 1)})).status_code == 403


async def test_actors_are_listed_in_pages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path) as (app, client):
        jids = [f"54911000{i:05d}@s.whatsapp.net" for i in range(25)]
        for jid in jids:
            assert (await client.post("/webhook", json=upsert("hola", jid=jid))).status_code == 200
        service = app.extensions["service"]
        await wait_for(lambda: len(service.outbound.outbox_entries(limit=1000)) == 25)
        seen, cursor, pages = [], None, 0
        while True:
            query = {"limit": "10", **({"cursor": cursor} if cursor else {})}
            body = await (await client.get("/actors", query_string=query)).get_json()
            seen.extend(row["jid"] for row in body["actors"])
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted(jids) and pages == 3
        for bad in ("0", "1001", "x"):
            response = await client.get("/actors", query_string={"limit": bad})
            assert response.status_code == 400 and "limit" in (await response.get_json())["error"]


async def test_a_fatal_service_error_fails_health_and_exits_non_zero(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Whatever kills the service after start-up (here: a supervisor's bug) must not leave a process
    that answers /health 200 while every webhook gets 503: /health fails and the process exits."""
    import trio

    from actors.service import Service

    class DyingService(Service):
        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
            async with trio.open_nursery() as nursery:
                await nursery.start(super().run)
                task_status.started()
                await trio.sleep(0.05)
                raise RuntimeError("a supervisor's bug")

    exits: list[int] = []
    settings = make_settings(tmp_path)
    app = create_app(settings, DyingService(settings), exit_process=exits.append)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        await wait_for(lambda: exits != [])
        assert exits == [70]
        response = await client.get("/health")
        assert response.status_code == 503
        body = await response.get_json()
        assert body["status"] == "failed" and "a supervisor's bug" in body["error"]


async def test_ack_seconds_histogram_counts_each_outcome(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every webhook's time from the handler's start to its answer lands in one outcome's histogram,
    whose buckets run from 1 ms to Evolution's 30 s."""
    from prometheus_client.parser import text_string_to_metric_families

    async with client_for(tmp_path, WEBHOOK_SECRET="hook-secret-123") as (app, client):
        token = {"token": "hook-secret-123"}
        assert (await client.post("/webhook", json=upsert("hola"), query_string=token)).status_code == 200
        assert (await client.post("/webhook", json=upsert("otra"), query_string=token)).status_code == 200
        assert (await client.post("/webhook", json=upsert(jid="status@broadcast"), query_string=token)).status_code == 200
        assert (await client.post("/webhook", json=upsert("sin token"))).status_code == 401
        assert (await client.post("/webhook", data=b"{not json", query_string=token)).status_code == 400
        assert (await client.post("/webhook", json=upsert("x" * 1_100_000), query_string=token)).status_code == 413
        text = await (await client.get("/metrics")).get_data(as_text=True)
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples
               if s.name.startswith("agent_webhook_ack_seconds")]
    counts = {s.labels["outcome"]: s.value for s in samples if s.name.endswith("_count")}
    assert counts == {"accepted": 2, "ignored": 1, "refused": 3, "unavailable": 0}
    bounds = sorted({float(s.labels["le"]) for s in samples if s.name.endswith("_bucket")})
    assert bounds[0] == 0.001 and bounds[-2] == 30.0 and bounds[-1] == float("inf")
    fast = {s.labels["outcome"]: s.value for s in samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0"}
    assert fast["accepted"] == 2   # an in-memory accept answers well within a second


async def test_the_local_outbox_names_the_instance_each_reply_goes_out_through(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Local mode serving several numbers: the same customer writes to two instances, and each reply
    in GET /outbox names the instance (the business number) it would have been sent from."""
    async with client_for(tmp_path) as (app, client):
        for instance in ("tienda-centro", "tienda-norte"):
            response = await client.post("/webhook", json=upsert(f"Hola {instance}", instance=instance))
            assert response.status_code == 200, await response.get_json()
        await wait_for(lambda: len(app.extensions["service"].outbound.outbox_entries(jid=JID)) == 2)
        replies = await outbox(client)
    assert sorted(r["instance"] for r in replies) == ["tienda-centro", "tienda-norte"]
