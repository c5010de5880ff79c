"""The admin console's JSON API and sessions through the real ASGI app (QuartTrio test client):
login, CSRF, validation, the operator reply's order and takeover, paging and filters, dead letters.
The page itself is tested in a real browser (tests/test_admin_console.py)."""

from __future__ import annotations

from typing import Any

from tests.conftest import key_of, wait_for
from tests.payloads import upsert
from tests.test_http import JID, client_for

TOKEN = "api-test-admin-token-1234"


async def login(client: Any, token: str = TOKEN) -> str:
    response = await client.post("/admin/login", json={"token": token})
    assert response.status_code == 200, await response.get_data()
    return (await response.get_json())["csrf"]  # type: ignore[no-any-return]


def texts(app: Any, jid: str = JID) -> list[str]:
    return [e.text for e in app.extensions["service"].outbound.outbox_entries(jid=jid)]


async def test_login_session_cookie_csrf_and_logout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path, ADMIN_TOKEN=TOKEN) as (app, client):
        assert (await client.post("/admin/login", json={"token": "wrong"})).status_code == 401
        assert (await client.post("/admin/login", data="token=" + TOKEN)).status_code == 415   # a form post
        assert (await client.get("/admin/api/chats")).status_code == 401
        assert await (await client.get("/admin/session")).get_json() == {"authenticated": False, "auth_required": True}

        response = await client.post("/admin/login", json={"token": TOKEN})
        cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=28800" in cookie
        assert "Secure" not in cookie   # plain http here
        csrf = (await response.get_json())["csrf"]
        assert TOKEN not in cookie and TOKEN not in csrf
        assert (await client.get("/admin/api/chats")).status_code == 200
        assert (await client.get("/supervisors")).status_code == 200   # the JSON endpoints take the session too

        await client.post("/webhook", json=upsert("hola"))
        await wait_for(lambda: len(texts(app)) == 1)
        refused = await client.post(f"/admin/api/chats/{JID}/pause", json={})
        assert refused.status_code == 403 and "CSRF" in (await refused.get_json())["error"]
        forged = await client.post(f"/admin/api/chats/{JID}/pause", json={}, headers={"X-CSRF-Token": "x" + csrf})
        assert forged.status_code == 403
        assert (await client.post("/admin/logout")).status_code == 403
        state = app.extensions["service"].registry.actor(key_of(JID)).state
        assert state.paused_until == 0.0

        ok = await client.post(f"/admin/api/chats/{JID}/pause", json={"minutes": 5}, headers={"X-CSRF-Token": csrf})
        assert ok.status_code == 200 and (await ok.get_json())["chat"]["state"] == "paused"
        bearer = await client.post(f"/actors/{JID}/resume", headers={"Authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200

        out = await client.post("/admin/logout", headers={"X-CSRF-Token": csrf})
        assert out.status_code == 200 and "Max-Age=0" in out.headers["Set-Cookie"]
        assert (await client.get("/admin/api/chats")).status_code == 401


async def test_loopback_mode_refuses_a_browsers_write_without_the_session(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path) as (app, client):
        await client.post("/webhook", json=upsert("hola"))
        await wait_for(lambda: len(texts(app)) == 1)
        cross = await client.post(f"/actors/{JID}/pause", headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403
        assert app.extensions["service"].registry.actor(key_of(JID)).state.paused_until == 0.0
        assert (await client.post(f"/actors/{JID}/pause")).status_code == 200    # curl, as before
        csrf = await login(client, token="")                                       # no token to give
        resumed = await client.post(f"/admin/api/chats/{JID}/resume", json={},
                                    headers={"X-CSRF-Token": csrf, "Origin": "http://127.0.0.1:5000"})
        assert resumed.status_code == 200


async def test_operator_reply_follows_the_bots_reply_and_is_a_takeover(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path, HUMAN_TAKEOVER_MINUTES=30) as (app, client):
        csrf = await login(client, token="")
        headers = {"X-CSRF-Token": csrf}
        await client.post("/webhook", json=upsert("hola"))
        response = await client.post(f"/admin/api/chats/{JID}/reply", json={"text": "Soy Ana, te ayudo"}, headers=headers)
        assert response.status_code in (200, 202)
        await wait_for(lambda: len(texts(app)) == 2)
        assert texts(app)[1] == "Soy Ana, te ayudo" and "hola" in texts(app)[0]
        chat = await (await client.get(f"/admin/api/chats/{JID}")).get_json()
        assert [m["role"] for m in chat["messages"]] == ["user", "assistant", "operator"]
        assert chat["state"] == "takeover" and chat["pause_reason"] == "takeover"
        await client.post("/webhook", json=upsert("¿sigues ahí?"))
        await wait_for(lambda: app.extensions["service"].registry.actor(key_of(JID)).state.ignored == 1)
        assert len(texts(app)) == 2
        listed = await (await client.get("/admin/api/chats", query_string={"state": "takeover"})).get_json()
        assert [c["jid"] for c in listed["chats"]] == [JID] and listed["chats"][0]["preview"] == "¿sigues ahí?"


async def test_bad_console_requests_get_a_4xx_and_change_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path) as (app, client):
        headers = {"X-CSRF-Token": await login(client, token="")}
        await client.post("/webhook", json=upsert("hola"))
        await wait_for(lambda: len(texts(app)) == 1)
        for command, body in (("pause", {"minutes": -1}), ("pause", {"minutes": "5"}), ("pause", {"minutes": True}),
                              ("reply", {"text": "  "}), ("reply", {"text": "x" * 5000}), ("reply", {})):
            response = await client.post(f"/admin/api/chats/{JID}/{command}", json=body, headers=headers)
            assert response.status_code == 400, (command, body)
        assert (await client.post(f"/admin/api/chats/{JID}/explode", json={}, headers=headers)).status_code == 404
        assert (await client.post("/admin/api/chats/5490000000009@s.whatsapp.net/reply", json={"text": "hola"},
                                  headers=headers)).status_code == 404
        assert (await client.post("/admin/api/chats/not-a-jid/reply", json={"text": "x"}, headers=headers)).status_code == 400
        assert (await client.post("/admin/api/dead-letters/999/retry", json={}, headers=headers)).status_code == 404
        assert (await client.post("/admin/api/dead-letters/999/discard", json={}, headers=headers)).status_code == 404
        assert (await client.get("/admin/api/chats", query_string={"state": "nope"})).status_code == 400
        assert (await client.get("/admin/api/chats", query_string={"after": "garbage"})).status_code == 400
        state = app.extensions["service"].registry.actor(key_of(JID)).state
        assert (state.paused_until, len(state.window), texts(app)[1:]) == (0.0, 2, [])


async def test_chat_list_pages_searches_and_filters(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path) as (app, client):
        await login(client, token="")
        jids = [f"54911000000{i:02d}@s.whatsapp.net" for i in range(5)]
        for i, jid in enumerate(jids):
            await client.post("/webhook", json=upsert(f"hola {i}", jid=jid, push_name=f"Cliente {i}"))
            await wait_for(lambda: len(texts(app, jid)) == 1)
        first = await (await client.get("/admin/api/chats", query_string={"limit": 2})).get_json()
        assert first["total"] == 5 and len(first["chats"]) == 2 and first["next"]
        second = await (await client.get("/admin/api/chats", query_string={"limit": 10, "after": first["next"]})).get_json()
        assert [c["jid"] for c in first["chats"] + second["chats"]] == jids[::-1] and second["next"] is None
        found = await (await client.get("/admin/api/chats", query_string={"q": "cliente 3"})).get_json()
        assert [c["name"] for c in found["chats"]] == ["Cliente 3"]
        waiting = await (await client.get("/admin/api/chats", query_string={"state": "waiting"})).get_json()
        assert waiting["total"] == 5 and waiting["instances"] == ["prueba-py-agent"]
        assert (await (await client.get("/admin/api/chats", query_string={"state": "paused"})).get_json())["chats"] == []
        overview = await (await client.get("/admin/api/overview")).get_json()
        assert overview["stored_chats"] == 5 and sum(p["in"] for p in overview["series"]) == 5
        assert sum(p["out"] for p in overview["series"]) == 5 and len(overview["series"]) == 60


async def test_a_reply_to_a_stopped_actor_is_refused_not_lost_silently(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import trio

    async with client_for(tmp_path) as (app, client):
        headers = {"X-CSRF-Token": await login(client, token="")}
        await client.post("/webhook", json=upsert("hola"))
        await wait_for(lambda: len(texts(app)) == 1)
        registry = app.extensions["service"].registry
        registry._cells[key_of(JID)].failed_at = trio.current_time()   # as after RESTART_INTENSITY crashes
        response = await client.post(f"/admin/api/chats/{JID}/reply", json={"text": "hola"}, headers=headers)
        assert response.status_code == 409 and "stopped" in (await response.get_json())["error"]
        listed = await (await client.get("/admin/api/chats", query_string={"state": "failed"})).get_json()
        assert [c["jid"] for c in listed["chats"]] == [JID]
        await trio.sleep(0.2)
        assert texts(app) == [texts(app)[0]] and not any(
            e.text == "hola" for e in app.extensions["service"].outbound.outbox_entries(jid=JID))


async def test_the_page_follows_language_and_the_cookie_is_secure_over_https(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with client_for(tmp_path, LANGUAGE="en") as (app, client):
        page = await client.get("/admin")
        assert page.status_code == 200 and '<html lang="en">' in (await page.get_data(as_text=True))
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Frame-Options"] == "DENY"
        response = await client.post("/admin/login", json={}, headers={"X-Forwarded-Proto": "https"})
        assert "Secure" in response.headers["Set-Cookie"]
    async with client_for(tmp_path) as (app, client):
        assert '<html lang="es">' in (await (await client.get("/admin")).get_data(as_text=True))
