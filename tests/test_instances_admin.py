"""``POST /instances/reload`` and ``GET /instances`` (docs/behaviour.md §8.2, §9.3), through real HTTP:
the app's test client in-process, and one real hypercorn process. The LLM is the real OpenAI SDK
against the fake OpenAI API, which records every request's system prompt."""

from __future__ import annotations

from collections import defaultdict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import signal

import httpx
import pytest
import trio

from actors.conversation_key import ConversationKey
from actors.settings import PROJECT_ROOT
from app import create_app
from runtime.logs import redact
from tests.conftest import LoopbackClient, make_settings, wait_for
from tests.fakes.evolution import FakeEvolution
from tests.fakes.krayin import FakeKrayin
from tests.fakes.llm import OpenAIFake, RecordedRequest, Reply
from tests.fakes.server import running_server
from tests.payloads import upsert
from tests.procs import ServiceProcess

TOKEN = "instances-admin-token-5678"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ACME, BETA, GAMMA = "acme-bot", "beta-shop", "gamma-line"
JID = "5491131376731@s.whatsapp.net"
ACME_EVOLUTION_KEY = "acme-evolution-key-0001"
ACME_OPENAI_KEY = "sk-acme-own-openai-key-0002"   # named only by the reloaded file


def instances_file(acme_prompt: str, *, beta: bool = True, acme_extra: str = "", gamma: bool = False) -> str:
    text = (f'[instances."{ACME}"]\nagent_instruction = "{acme_prompt}"\n'
            f'evolution_api_key_env = "ACME_EVOLUTION_KEY"\n{acme_extra}')
    if beta:
        text += f'\n[instances."{BETA}"]\nagent_instruction = "Beta prompt."\nlanguage = "en"\nmax_messages = 30\n'
    if gamma:
        text += f'\n[instances."{GAMMA}"]\nagent_instruction = "Gamma prompt."\n'
    return text


def echo(request: RecordedRequest) -> Reply:
    return Reply(f"re: {request.json['messages'][-1]['content']}")


def webhook(text: str, instance: str, jid: str = JID, timestamp: int = 1769000000) -> dict[str, Any]:
    payload = upsert(text, jid=jid, instance=instance, timestamp=timestamp)
    payload["data"]["instanceId"] = f"id-{instance}"
    return payload


def system_prompts(llm: OpenAIFake) -> list[str]:
    return [r.json["messages"][0]["content"] for r in llm.requests]


@asynccontextmanager
async def serving(tmp_path: Path, llm_url: str, **env: str) -> AsyncIterator[tuple[Any, Any, Path]]:
    """The app with an instances file in tmp_path (acme-bot, beta-shop), OpenAI against the fake,
    replies in the local outbox; yields (app, loopback test client, the file's path)."""
    path = tmp_path / "instances.toml"
    path.write_text(instances_file("Acme prompt v1."), encoding="utf-8")
    settings = make_settings(tmp_path, INSTANCES_FILE=str(path), LLM_PROVIDER="openai", OPENAI_API_KEY="sk-global-0003",
                             OPENAI_BASE_URL=llm_url + "/v1", ADMIN_TOKEN=TOKEN, **env)
    app = create_app(settings)
    app.test_client_class = LoopbackClient
    async with app.test_app() as test_app:
        yield app, test_app.test_client(), path


def replies(app: Any) -> list[str]:
    return [e.text for e in app.extensions["service"].outbound.outbox_entries(limit=1000)]


async def test_reload_changes_the_next_turns_prompt_and_a_bad_file_keeps_it(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_EVOLUTION_KEY", ACME_EVOLUTION_KEY)
    monkeypatch.setenv("ACME_OPENAI_KEY", ACME_OPENAI_KEY)
    llm = OpenAIFake(default=echo)
    async with running_server(llm) as llm_url, serving(tmp_path, llm_url) as (app, client, path):
        await client.post("/webhook", json=webhook("uno", ACME))
        await wait_for(lambda: len(replies(app)) == 1)
        assert system_prompts(llm) == ["Acme prompt v1."]

        # a good file: the next turn carries the new prompt, and the new secret is redacted from logs
        assert redact(f"key {ACME_OPENAI_KEY}") == f"key {ACME_OPENAI_KEY}"   # not named at start-up
        path.write_text(instances_file("Acme prompt v2.", acme_extra='openai_api_key_env = "ACME_OPENAI_KEY"\n'))
        response = await client.post("/instances/reload", headers=BEARER)
        assert response.status_code == 200, await response.get_data()
        assert await response.get_json() == {
            "status": "reloaded", "file": str(path), "instances": [ACME, BETA], "added": [], "removed": [],
            "changed": {ACME: ["agent_instruction", "openai_api_key"]}}
        assert redact(f"key {ACME_OPENAI_KEY}") == "key [REDACTED]"
        await client.post("/webhook", json=webhook("dos", ACME))
        await wait_for(lambda: len(replies(app)) == 2)
        assert system_prompts(llm)[-1] == "Acme prompt v2."
        assert llm.requests[-1].headers["authorization"] == f"Bearer {ACME_OPENAI_KEY}"   # its own account now

        # a broken file: 400 with the one line, and the settings in force stay
        path.write_text(instances_file("Acme prompt v3.", acme_extra='max_messages = "abc"\n'))
        response = await client.post("/instances/reload", headers=BEARER)
        assert response.status_code == 400
        assert await response.get_json() == {"error": 'Configuration error: INSTANCES_FILE [instances."acme-bot"]'
                                                      ".max_messages: invalid value 'abc' (expected int)"}
        path.write_text("[instances.\"acme-bot\"\n")
        response = await client.post("/instances/reload", headers=BEARER)
        assert response.status_code == 400
        assert (await response.get_json())["error"].startswith(f"Configuration error: INSTANCES_FILE: {path}: not valid TOML (")
        await client.post("/webhook", json=webhook("tres", ACME))
        await client.post("/webhook", json=webhook("hello", BETA))
        await wait_for(lambda: len(replies(app)) == 4)
        assert sorted(system_prompts(llm)[-2:]) == ["Acme prompt v2.", "Beta prompt."]
        log = (tmp_path / "logs" / "agent.log").read_text()
        assert "Instances reload refused, the settings in force are kept: Configuration error: INSTANCES_FILE" in log
        assert ACME_OPENAI_KEY not in log and ACME_EVOLUTION_KEY not in log

        # GET /instances: the default instance and both configured ones, secrets masked, counts right
        response = await client.get("/instances", headers=BEARER)
        assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
        body = await response.get_json()
        rows = {row["name"]: row for row in body["instances"]}
        assert list(rows) == ["default", ACME, BETA]
        default = body["instances"][0]
        assert default["default"] is True and default["configured"] is False
        acme, beta = rows[ACME], rows[BETA]
        assert acme["configured"] is True and acme["default"] is False
        assert acme["settings"]["agent_instruction"] == "Acme prompt v2."
        assert acme["settings"]["evolution_api_key"] == "***" and acme["settings"]["openai_api_key"] == "***"
        assert beta["settings"]["evolution_api_key"] == "" and beta["settings"]["openai_api_key"] == "***"
        assert beta["settings"]["language"] == "en" and beta["settings"]["max_messages"] == 30
        assert "mailbox_size" not in acme["settings"] and "data_dir" not in acme["settings"]   # process-wide
        assert (acme["messages_in"], acme["replies_out"], acme["turns"]) == (3, 3, 3)
        assert (beta["messages_in"], beta["replies_out"], beta["turns"]) == (1, 1, 1)
        assert (default["messages_in"], default["replies_out"]) == (0, 0)
        assert acme["chats"] == {"live": 1, "stored": 1} and beta["chats"] == {"live": 1, "stored": 1}
        assert default["chats"] == {"live": 0, "stored": 0}
        assert [c["account"] for c in acme["circuits"]] == ["openai#2"]       # its own key: its own account
        assert [c["account"] for c in beta["circuits"]] == ["openai"]         # the deployment's
        assert acme["circuits"][0]["circuit"] == "closed"
        assert [a["account"] for a in body["accounts"]] == ["openai", "openai#2"]
        text = await response.get_data(as_text=True)
        for secret in (ACME_OPENAI_KEY, ACME_EVOLUTION_KEY, "sk-global-0003", TOKEN):
            assert secret not in text

        supervisors = await (await client.get("/supervisors", headers=BEARER)).get_json()
        assert [a["account"] for a in supervisors["llm_accounts"]] == ["openai", "openai#2"]
        delivery = await (await client.get("/admin/api/delivery", headers=BEARER)).get_json()
        assert [(p["name"], p["calls"]) for p in delivery["providers"]] == [("openai", 2), ("openai#2", 2)]


async def test_replies_queued_or_in_flight_at_a_reload_all_go_out_once(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """2 instances x 3 chats x 3 messages; the reload lands while turns are in flight and messages
    queued behind them: every reply goes out once, in order per chat, and each chat's prompts go
    from the old one to the new one, never back. A removed instance's queued messages are answered
    (with the global settings); an added one is served."""
    monkeypatch.setenv("ACME_EVOLUTION_KEY", ACME_EVOLUTION_KEY)
    llm = OpenAIFake(default=lambda r: Reply(f"re: {r.json['messages'][-1]['content']}", delay=0.2))
    jids = [f"54911000000{i:02d}@s.whatsapp.net" for i in range(3)]
    async with running_server(llm) as llm_url, serving(tmp_path, llm_url) as (app, client, path):
        for n in range(3):
            for instance in (ACME, BETA):
                for jid in jids:
                    response = await client.post("/webhook", json=webhook(f"{instance}|{jid}|{n}", instance, jid,
                                                                           1769000000 + n))
                    assert response.status_code == 200
        await wait_for(lambda: llm.in_flight >= 1)
        path.write_text(instances_file("Acme prompt v2.", beta=False, gamma=True))
        response = await client.post("/instances/reload", headers=BEARER)
        assert response.status_code == 200
        body = await response.get_json()
        assert (body["added"], body["removed"], body["changed"]) == ([GAMMA], [BETA], {ACME: ["agent_instruction"]})
        assert len(replies(app)) < 18   # the reload came while work was pending
        await client.post("/webhook", json=webhook("gamma-hola", GAMMA))
        await wait_for(lambda: len(replies(app)) == 19, timeout=30)
        await trio.sleep(0.3)
        texts = replies(app)
        assert len(texts) == 19 and len(set(texts)) == 19                   # each once
        per_chat: dict[tuple[str, str], list[str]] = defaultdict(list)
        for text in texts:
            if text.startswith("re: ") and "|" in text:
                instance, jid, n = text[4:].split("|")
                per_chat[(instance, jid)].append(n)
        assert len(per_chat) == 6 and all(order == ["0", "1", "2"] for order in per_chat.values())
        prompts: dict[tuple[str, str], list[str]] = defaultdict(list)
        for request in llm.requests:
            last = request.json["messages"][-1]["content"]
            if "|" in last:
                instance, jid, _ = last.split("|")
                prompts[(instance, jid)].append(request.json["messages"][0]["content"])
        new_seen = False
        for (instance, _), seen in prompts.items():
            old = "Acme prompt v1." if instance == ACME else "Beta prompt."
            new = "Acme prompt v2." if instance == ACME else app.extensions["service"].tenants.default.texts.agent_instruction
            assert seen == sorted(seen, key=lambda p: p == new) and set(seen) <= {old, new}, seen
            new_seen |= new in seen
        assert new_seen                                                       # some turns came after the reload
        assert [r.json["messages"][0]["content"] for r in llm.requests
                if r.json["messages"][-1]["content"] == "gamma-hola"] == ["Gamma prompt."]
        service = app.extensions["service"]
        assert service.tenants.names == (ACME, GAMMA)
        assert service.registry.actor(ConversationKey(GAMMA, JID).key) is not None


async def test_admin_auth_is_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_EVOLUTION_KEY", ACME_EVOLUTION_KEY)
    llm = OpenAIFake(default=echo)
    async with running_server(llm) as llm_url, serving(tmp_path, llm_url) as (app, client, path):
        path.write_text(instances_file("changed without the token"))
        for method, url in (("GET", "/instances"), ("POST", "/instances/reload")):
            for headers in ({}, {"Authorization": "Bearer wrong-token"}):
                response = await client.open(url, method=method, headers=headers)
                assert response.status_code == 401, (method, url, headers)
        assert app.extensions["service"].tenants.for_instance(ACME).settings.conversation.agent_instruction == "Acme prompt v1."
        # a browser riding on a console session needs its CSRF token for the reload
        login = await client.post("/admin/login", json={"token": TOKEN})
        csrf = (await login.get_json())["csrf"]
        assert (await client.post("/instances/reload")).status_code == 403
        assert (await client.get("/instances")).status_code == 200
        assert (await client.post("/instances/reload", headers={"X-CSRF-Token": csrf})).status_code == 200
    # without ADMIN_TOKEN: loopback peers only (the default test client has no loopback peer)
    settings = make_settings(tmp_path / "open")
    app = create_app(settings)
    async with app.test_app() as test_app:
        remote = test_app.test_client()
        assert (await remote.get("/instances")).status_code == 403
        assert (await remote.post("/instances/reload")).status_code == 403


async def test_no_instances_file_is_a_400_and_a_single_tenant_listing(tmp_path: Path) -> None:
    if (PROJECT_ROOT / "instances.toml").exists():
        pytest.skip("a developer's instances.toml is beside config.toml: there is a file to reload")
    app = create_app(make_settings(tmp_path, INSTANCES_FILE=""))
    app.test_client_class = LoopbackClient
    async with app.test_app() as test_app:
        client = test_app.test_client()
        response = await client.post("/instances/reload")
        assert response.status_code == 400
        assert (await response.get_json())["error"].startswith("no instances file to reload: INSTANCES_FILE is unset")
        await client.post("/webhook", json=upsert("hola"))
        await wait_for(lambda: len(replies(app)) == 1)
        body = await (await client.get("/instances")).get_json()
        # the webhook's instance is not configured: served with the global settings, counted as "other"
        assert [row["name"] for row in body["instances"]] == ["default"]
        assert body["other"] == {"messages_in": 1, "replies_out": 1, "turns": 1}
        assert body["instances"][0]["settings"]["llm_provider"] == "offline"
        assert [a["account"] for a in body["accounts"]] == ["offline"]


async def test_the_default_instance_named_in_the_file_is_one_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_EVOLUTION_KEY", ACME_EVOLUTION_KEY)
    llm = OpenAIFake(default=echo)
    async with running_server(llm) as llm_url, serving(tmp_path, llm_url, EVOLUTION_INSTANCE=ACME) as (app, client, _):
        body = await (await client.get("/instances", headers=BEARER)).get_json()
        rows = [(row["name"], row["configured"], row["default"]) for row in body["instances"]]
        assert rows == [(ACME, True, True), (BETA, True, False)]
        assert body["instances"][0]["settings"]["agent_instruction"] == "Acme prompt v1."


async def test_a_reload_turns_lead_registration_on_for_an_instance(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No instance registered leads at start-up (CRM_AUTO_REGISTER=false, Krayin configured); a reload
    turns it on for acme-bot: its next booking registers a lead in Krayin, beta-shop's does not.
    (Before, the CRM supervisor was built off and the reload answered that a restart was needed.)"""
    monkeypatch.setenv("ACME_EVOLUTION_KEY", ACME_EVOLUTION_KEY)

    def booking(request: RecordedRequest) -> Reply:
        if "cita" in request.json["messages"][-1]["content"]:
            return Reply('{"accion": "reserva", "motivo": "turno"}')
        return echo(request)

    llm, krayin = OpenAIFake(default=booking), FakeKrayin(token="krayin-token-0004")
    async with running_server(llm) as llm_url, running_server(krayin) as krayin_url, serving(
            tmp_path, llm_url, KRAYIN_API_URL=krayin_url + "/api/v1", KRAYIN_API_TOKEN="krayin-token-0004",
            CRM_AUTO_REGISTER="false", GOOGLE_BOOKING_URL="https://calendar.app.google/x") as (app, client, path):
        await client.post("/webhook", json=webhook("quiero una cita", ACME, jid="5491100000501@s.whatsapp.net"))
        await wait_for(lambda: len(replies(app)) == 1)
        path.write_text(instances_file("Acme prompt v2.", acme_extra="crm_auto_register = true\n"))
        response = await client.post("/instances/reload", headers=BEARER)
        assert response.status_code == 200
        body = await response.get_json()
        assert body["changed"] == {ACME: ["agent_instruction", "crm_auto_register"]} and "restart_needed" not in body
        await client.post("/webhook", json=webhook("quiero una cita", ACME, jid="5491100000502@s.whatsapp.net"))
        await client.post("/webhook", json=webhook("quiero una cita", BETA, jid="5491100000503@s.whatsapp.net"))
        crm = app.extensions["service"].crm
        # every job the three bookings asked for (each in its turn's commit, before the reply) is done
        await wait_for(lambda: len(replies(app)) == 3 and len(krayin.leads) == 1
                       and crm.statistics().queued == 0 and crm.statistics().running == 0)
        [lead] = krayin.leads.values()
        assert lead["person"]["contact_numbers"][0]["value"] == "+5491100000502" and len(krayin.leads) == 1
        stats = (await (await client.get("/supervisors", headers=BEARER)).get_json())["crm"]
        assert stats["enabled"] is True and stats["leads_created"] == 1


async def test_a_real_process_reloads_its_file(tmp_path: Path) -> None:
    """One hypercorn process with INSTANCES_FILE: edit the prompt, reload, the next turn uses it; a
    broken file is refused with the reason and the prompt in force stays."""
    llm = OpenAIFake(default=echo)
    path = tmp_path / "instances.toml"
    path.write_text(instances_file("Acme prompt v1."), encoding="utf-8")
    async with running_server(llm) as llm_url:
        env = {"INSTANCES_FILE": str(path), "ACME_EVOLUTION_KEY": ACME_EVOLUTION_KEY, "ADMIN_TOKEN": TOKEN,
               "LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-global-0003", "OPENAI_BASE_URL": llm_url + "/v1",
               "EVOLUTION_API_URL": "", "LOG_DIR": str(tmp_path / "logs"), "DATA_DIR": str(tmp_path / "data"),
               "STORE": "sqlite", "OUTBOUND_MIN_GAP_SECONDS": "0", "TYPING_PRESENCE": "false"}
        with ServiceProcess(env, tmp_path / "service.out") as service:
            service.start()
            await service.wait_ready()
            async with httpx.AsyncClient(base_url=service.url, timeout=10, headers=BEARER) as client:
                async def turn(text: str, instance: str = ACME) -> None:
                    before = len(llm.requests)
                    assert (await client.post("/webhook", json=webhook(text, instance))).status_code == 200
                    await wait_for(lambda: len(llm.requests) == before + 1)

                async def sent() -> int:
                    return len((await client.get("/outbox", params={"limit": 1000})).json())

                await turn("uno")
                assert system_prompts(llm) == ["Acme prompt v1."]
                path.write_text(instances_file("Acme prompt v2."))
                reloaded = await client.post("/instances/reload")
                assert reloaded.status_code == 200 and reloaded.json()["changed"] == {ACME: ["agent_instruction"]}
                await turn("dos")
                assert system_prompts(llm)[-1] == "Acme prompt v2."
                path.write_text(instances_file("Acme prompt v3.", acme_extra='max_messages = "abc"\n'))
                refused = await client.post("/instances/reload")
                assert refused.status_code == 400 and refused.json() == {
                    "error": 'Configuration error: INSTANCES_FILE [instances."acme-bot"].max_messages: '
                             "invalid value 'abc' (expected int)"}
                await turn("tres")
                await turn("hello", BETA)
                assert system_prompts(llm)[-2:] == ["Acme prompt v2.", "Beta prompt."]
                with trio.fail_after(10):
                    while await sent() < 4:
                        await trio.sleep(0.05)
                body = (await client.get("/instances")).json()
                rows = {row["name"]: row for row in body["instances"]}
                assert set(rows) == {"default", ACME, BETA}
                assert rows[ACME]["settings"]["evolution_api_key"] == "***"
                assert rows[ACME]["settings"]["agent_instruction"] == "Acme prompt v2."
                assert (rows[ACME]["messages_in"], rows[ACME]["replies_out"]) == (3, 3)
                assert (rows[BETA]["messages_in"], rows[BETA]["replies_out"]) == (1, 1)
                assert rows[ACME]["chats"]["live"] == 1 and rows[BETA]["chats"]["live"] == 1
                assert ACME_EVOLUTION_KEY not in (await client.get("/instances")).text
                assert (await client.get("/instances", headers={"Authorization": ""})).status_code == 401
                assert (await client.post("/instances/reload", headers={"Authorization": ""})).status_code == 401
            assert await service.terminate() == 0
        assert "Instances reload refused, the settings in force are kept" in (tmp_path / "logs" / "agent.log").read_text()


async def test_sighup_loses_nothing_queued_and_answers_nothing_twice(tmp_path: Path) -> None:
    """The other reload: SIGHUP to hypercorn's parent restarts its worker, which reads the file anew.
    Replies queued and in flight when it comes (a slow model) all reach Evolution once, in order per
    chat, each through its own instance; the turns after it use the edited file."""
    llm = OpenAIFake(default=lambda r: Reply(f"re: {r.json['messages'][-1]['content']}", delay=0.3))
    evolution = FakeEvolution(api_key="global-key", instances={ACME, BETA}, instance_keys={ACME: ACME_EVOLUTION_KEY})
    path = tmp_path / "instances.toml"
    path.write_text(instances_file("Acme prompt v1."), encoding="utf-8")
    jids = [f"54911000000{i:02d}@s.whatsapp.net" for i in range(3)]
    async with running_server(llm) as llm_url, running_server(evolution) as evo_url:
        env = {"INSTANCES_FILE": str(path), "ACME_EVOLUTION_KEY": ACME_EVOLUTION_KEY, "ADMIN_TOKEN": TOKEN,
               "LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-global-0003", "OPENAI_BASE_URL": llm_url + "/v1",
               "EVOLUTION_API_URL": evo_url, "EVOLUTION_API_KEY": "global-key", "LOG_DIR": str(tmp_path / "logs"),
               "DATA_DIR": str(tmp_path / "data"), "STORE": "sqlite", "OUTBOUND_MIN_GAP_SECONDS": "0",
               "OUTBOUND_RATE_PER_INSTANCE": "0", "TYPING_PRESENCE": "false"}
        with ServiceProcess(env, tmp_path / "service.out") as service:
            service.start()
            await service.wait_ready()
            assert service.proc is not None
            async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
                for n in range(3):
                    for instance in (ACME, BETA):
                        for jid in jids:
                            response = await client.post("/webhook", json=webhook(f"{instance}|{jid}|{n}", instance,
                                                                                  jid, 1769000000 + n))
                            assert response.status_code == 200
                await wait_for(lambda: llm.in_flight >= 1)
                path.write_text(instances_file("Acme prompt v2."))
                assert len(evolution.sent) < 18                  # work queued and in flight at the signal
                service.proc.send_signal(signal.SIGHUP)
                with trio.fail_after(60):
                    while service.log_path.read_text(errors="replace").count("Service ready") < 2:
                        assert service.proc.poll() is None, service.output()
                        await trio.sleep(0.05)
                await service.wait_ready()
                await wait_for(lambda: len(evolution.sent) >= 18, timeout=30)
                response = await client.post("/webhook", json=webhook("after", ACME))
                assert response.status_code == 200
                await wait_for(lambda: len(evolution.sent) == 19, timeout=30)
                await trio.sleep(0.5)
            assert await service.terminate() == 0
    texts = [text for _, _, text in evolution.texts()]
    assert len(texts) == 19 and len(set(texts)) == 19                             # each once
    per_chat: dict[tuple[str, str], list[str]] = defaultdict(list)
    for instance, number, text in evolution.texts():
        if "|" in text:
            sender, jid, n = text[4:].split("|")
            assert sender == instance and jid.startswith(number)               # through its own instance
            per_chat[(instance, jid)].append(n)
    assert len(per_chat) == 6 and all(order == ["0", "1", "2"] for order in per_chat.values())
    after = [r.json["messages"][0]["content"] for r in llm.requests if r.json["messages"][-1]["content"] == "after"]
    assert after == ["Acme prompt v2."]
