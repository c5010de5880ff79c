"""The admin console in a real browser: Debian's chromium (headless) driven by Playwright, against
the service as a real hypercorn process whose replies go to the Evolution fake (a process too) and
whose model is the OpenAI fake (echoes "re: <message>"). One browser for the module, a fresh
context (cookies) per test.

Screenshots go to docs/ with UPDATE_SCREENSHOTS=1 (to refresh the README's), else to a tmp dir,
so a CI run never dirties the tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from actors.settings import PROJECT_ROOT
from tests.payloads import upsert
from tests.postgres import PASSWORD
from tests.procs import ServiceProcess, free_port

CHROMIUM = "/usr/bin/chromium"
# .ci/run sets REQUIRE_BROWSER_TESTS=1: there a missing browser is a failure, not a skip.
if os.environ.get("REQUIRE_BROWSER_TESTS") != "1":
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
from playwright import sync_api as playwright_api  # noqa: E402

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
TOKEN = "console-test-admin-token-7f3a"
INSTANCE = "prueba-py-agent"
DESKTOP = {"width": 1280, "height": 820}
PHONE = {"width": 390, "height": 844}


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout}s")


class Fake:
    """A fake (tests.fakes.<module>) as its own process on a free port."""

    def __init__(self, module: str, *args: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(self.port), *args],
                                         cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT)

    def wait(self, path: str) -> None:
        def up() -> bool:
            try:
                return httpx.get(self.url + path, timeout=1).status_code < 500
            except httpx.HTTPError:
                return False
        wait_until(up, 15, f"{self.url} up")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Stack:
    """The service and its two fakes, plus what a test needs to drive and observe them."""

    def __init__(self, service: ServiceProcess, evolution: Fake) -> None:
        self.service, self.evolution = service, evolution
        self.url = service.url
        self.http = httpx.Client(base_url=service.url, timeout=10)

    def webhook(self, text: str, jid: str, **extra: Any) -> None:
        response = self.http.post("/webhook", json=upsert(text, jid=jid, **extra))
        assert response.status_code == 200 and response.json()["status"] == "accepted", response.text

    def converse(self, text: str, jid: str) -> None:
        """Post a customer message and wait for the bot's reply to reach Evolution."""
        before = len(self.sent(jid))
        self.webhook(text, jid)
        wait_until(lambda: len(self.sent(jid)) == before + 1, what=f"reply to {text!r}")

    def sent(self, jid: str) -> list[dict[str, Any]]:
        """The sendText calls Evolution accepted for this chat, in arrival order."""
        records = httpx.get(self.evolution.url + "/_recorded", timeout=5).json()["sent"]
        return [r for r in records if r["json"]["number"] == jid]

    def script_evolution(self, **script: Any) -> None:
        httpx.post(self.evolution.url + "/_script", json=script, timeout=5).raise_for_status()

    def settle(self) -> None:
        """Wait until no turn runs or waits and no reply is queued or in flight: whatever the service
        was going to send for what it received has reached Evolution by then."""
        def idle() -> bool:
            body = self.http.get("/supervisors", headers={"Authorization": f"Bearer {TOKEN}"}).json()
            registry, outbound = body["registry"], body["outbound"]
            return (registry["running_actors"] == 0 and registry["mailbox_depth_total"] == 0
                    and outbound["queued"] == 0 and outbound["in_flight"] == 0)
        wait_until(idle, what="service idle")

    def chat(self, jid: str) -> dict[str, Any]:
        response = self.http.get(f"/admin/api/chats/{jid}", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]


def start_service(tmp: Path, name: str, evolution: Fake, llm: Fake, **extra: str) -> ServiceProcess:
    env = {
        "LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-test-console", "OPENAI_BASE_URL": llm.url + "/v1",
        "EVOLUTION_API_URL": evolution.url, "EVOLUTION_API_KEY": "k", "EVOLUTION_INSTANCE": INSTANCE,
        "DATA_DIR": str(tmp / name / "data"), "LOG_DIR": str(tmp / name / "logs"), "STORE": "sqlite",
        "OUTBOUND_MIN_GAP_SECONDS": "0", "OUTBOUND_RATE_PER_INSTANCE": "0", "TYPING_PRESENCE": "false",
        "FLOOD_MAX_PER_MINUTE": "0", "REORDER_DELAY_SECONDS": "0", "OUTBOUND_MAX_ATTEMPTS": "1",
        "LANGUAGE": "es", "LOG_STDERR": "true", **extra,
    }
    service = ServiceProcess(env, tmp / f"{name}.log")
    service.start()

    def ready() -> bool:
        assert service.proc is not None
        if service.proc.poll() is not None:
            raise AssertionError(f"service exited:\n{service.output()}")
        try:
            return httpx.get(service.url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 30, "service ready")
    return service


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fake, Fake, Path]]:
    tmp = tmp_path_factory.mktemp("console")
    evolution = Fake("tests.fakes.evolution", "--api-key", "k", "--instances", INSTANCE, log=tmp / "evolution.log")
    llm = Fake("tests.fakes.llm", "--echo-chars", "300", log=tmp / "llm.log")
    try:
        evolution.wait("/_recorded")
        llm.wait("/v1/models")
        yield evolution, llm, tmp
    finally:
        evolution.stop()
        llm.stop()


@pytest.fixture(scope="module")
def stack(fakes: tuple[Fake, Fake, Path]) -> Iterator[Stack]:
    evolution, llm, tmp = fakes
    service = start_service(tmp, "token", evolution, llm, ADMIN_TOKEN=TOKEN)
    with service:
        yield Stack(service, evolution)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        # Playwright gives every launch a fresh temporary profile (its own --user-data-dir).
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Watched:
    """A page plus every console error, uncaught exception and dialog it produced."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., Watched]]:
    contexts = []

    def make(viewport: dict[str, int] = DESKTOP) -> Watched:
        context = browser.new_context(viewport=viewport)
        contexts.append(context)
        return Watched(context.new_page())

    yield make
    for context in contexts:
        context.close()


def log_in(watched: Watched, stack: Stack, token: str = TOKEN) -> None:
    page = watched.page
    page.goto(stack.url + "/admin")
    page.wait_for_selector("#login-form", state="visible")
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")


def logged_in(new_page: Callable[..., Watched], stack: Stack, viewport: dict[str, int] = DESKTOP) -> Watched:
    watched = new_page(viewport)
    log_in(watched, stack)
    watched.page.wait_for_selector("#view-chats", state="visible")
    return watched


def open_chat(watched: Watched, stack: Stack, jid: str) -> None:
    watched.page.goto(f"{stack.url}/admin#/chat/{jid}")
    watched.page.wait_for_selector("#transcript li")


# -- tests --------------------------------------------------------------------------------------


def test_login_with_the_token_wrong_token_refused_logout_ends_the_session(
        stack: Stack, new_page: Callable[..., Watched]) -> None:
    watched = new_page()
    page = watched.page
    log_in(watched, stack, token="not-the-token")
    page.wait_for_selector("#login-error", state="visible")
    assert page.text_content("#login-error") == "Token incorrecto."
    assert page.is_hidden("#view-chats")
    assert page.context.cookies() == []

    page.fill("#token", TOKEN)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#view-chats", state="visible")
    (cookie,) = page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] > time.time() + 3600
    assert TOKEN not in page.content() and TOKEN not in cookie["value"]
    assert page.context.request.get(stack.url + "/admin/api/chats").status == 200

    page.click("#logout")
    page.wait_for_selector("#login-form", state="visible")
    assert page.context.request.get(stack.url + "/admin/api/chats").status == 401
    page.reload()
    page.wait_for_selector("#login-form", state="visible")   # the session is gone on the server too
    # The only console errors are the browser's notes of the refused login (401) and logout check.
    assert all("401" in e for e in watched.errors), watched.errors


def test_a_webhook_makes_a_new_chat_appear_without_reload_with_its_transcript(
        stack: Stack, new_page: Callable[..., Watched]) -> None:
    watched = logged_in(new_page, stack)
    page = watched.page
    jid = "5491100000101@s.whatsapp.net"
    sent_at = time.monotonic()
    stack.webhook("Hola, quiero precios", jid, push_name="Lucía")
    row = page.wait_for_selector(f'tr[data-jid="{jid}"]', timeout=2000)
    assert time.monotonic() - sent_at < 2.0
    assert "Lucía" in row.text_content()
    row.click()
    page.wait_for_selector("#transcript li.msg.assistant")
    texts = page.locator("#transcript li .text").all_text_contents()
    assert texts == ["Hola, quiero precios", "re: Hola, quiero precios"]
    assert page.locator("#transcript li.msg.user").count() == 1
    assert watched.errors == [] and watched.dialogs == []


def test_pause_from_the_page_silences_the_bot_and_resume_answers_again(
        stack: Stack, new_page: Callable[..., Watched]) -> None:
    watched = logged_in(new_page, stack)
    page = watched.page
    jid = "5491100000102@s.whatsapp.net"
    stack.converse("primero", jid)
    open_chat(watched, stack, jid)

    page.click("#pause-forever")
    page.wait_for_selector("#chat-facts .state.paused")
    stack.webhook("¿hay alguien?", jid)
    page.wait_for_selector("#transcript li.msg.user >> nth=1")   # recorded, but not answered
    stack.settle()
    assert [r["json"]["text"] for r in stack.sent(jid)] == ["re: primero"]

    page.click("#resume")
    page.wait_for_selector("#chat-facts .state.waiting")
    stack.converse("ahora sí", jid)
    assert stack.sent(jid)[-1]["json"]["text"] == "re: ahora sí"
    assert watched.errors == []


def test_an_operator_reply_goes_out_after_the_bots_and_the_bot_stays_silent(
        stack: Stack, new_page: Callable[..., Watched]) -> None:
    watched = logged_in(new_page, stack)
    page = watched.page
    jid = "5491100000103@s.whatsapp.net"
    stack.converse("hola", jid)
    open_chat(watched, stack, jid)

    stack.webhook("pregunta lenta [lat=1.0]", jid)   # the model takes 1 s to answer this one
    page.fill("#reply-text", "Soy Marta, te ayudo yo")
    page.click("#reply-send")
    wait_until(lambda: len(stack.sent(jid)) == 3, what="bot reply and operator reply")
    texts = [r["json"]["text"] for r in stack.sent(jid)]
    assert texts == ["re: hola", "re: pregunta lenta [lat=1.0]", "Soy Marta, te ayudo yo"]
    page.wait_for_selector("#transcript li.msg.operator")
    page.wait_for_selector("#chat-facts .state.takeover")
    paused_until = stack.chat(jid)["paused_until"]
    assert paused_until > time.time() + 50 * 60   # HUMAN_TAKEOVER_MINUTES (60)

    # Evolution echoes our send as a fromMe message with the id it gave: not a second operator message.
    operator_id = stack.sent(jid)[-1]["message_id"]
    stack.webhook("Soy Marta, te ayudo yo", jid, from_me=True, message_id=operator_id)
    stack.webhook("¿y el precio?", jid)
    wait_until(lambda: len(stack.chat(jid)["messages"]) == 6, what="customer message recorded")
    stack.settle()
    chat = stack.chat(jid)
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant", "user", "assistant", "operator", "user"]
    assert chat["paused_until"] == paused_until and chat["state"] == "takeover"
    assert len(stack.sent(jid)) == 3   # the bot stayed silent
    assert watched.errors == []


def test_a_dead_letter_is_retried_from_the_page_and_delivered(
        stack: Stack, new_page: Callable[..., Watched]) -> None:
    jid = "5491100000104@s.whatsapp.net"
    stack.script_evolution(statuses={INSTANCE: 400})
    try:
        stack.webhook("esto no sale", jid)
        wait_until(lambda: stack.chat(jid)["messages"][-1:] and stack.chat(jid)["replies_out"] == 1, what="turn")
        watched = logged_in(new_page, stack)
        page = watched.page
        page.click('nav a[data-view="delivery"]')
        row = page.wait_for_selector(f'#dead-rows tr:has-text("{jid}")')
        assert "all candidates rejected" in row.text_content()
    finally:
        stack.script_evolution(statuses={})
    assert stack.sent(jid) == []
    row.query_selector('button[data-action="retry"]').click()
    wait_until(lambda: len(stack.sent(jid)) == 1, what="retried reply delivered")
    assert stack.sent(jid)[0]["json"]["text"] == "re: esto no sale"
    page.wait_for_selector(f'#dead-rows tr:has-text("{jid}")', state="detached")
    assert watched.errors == []


def test_hostile_customer_text_is_shown_as_text_and_runs_nothing(
        stack: Stack, new_page: Callable[..., Watched]) -> None:
    watched = logged_in(new_page, stack)
    page = watched.page
    jid = "5491100000105@s.whatsapp.net"
    hostile = '<script>alert("xss")</script><img src=x onerror="alert(1);window.__pwned=1">'
    stack.webhook(hostile, jid, push_name='<img src=x onerror="window.__pwned=2">')
    row = page.wait_for_selector(f'tr[data-jid="{jid}"]')
    assert hostile in row.text_content()
    row.click()
    page.wait_for_selector("#transcript li.msg.assistant")
    assert page.locator("#transcript li.msg.user .text").text_content() == hostile
    assert page.text_content("#chat-title") == '<img src=x onerror="window.__pwned=2">'
    assert page.locator("#transcript img, #chat-rows img, #chat-title img").count() == 0
    time.sleep(0.5)
    assert page.evaluate("window.__pwned") is None
    assert watched.dialogs == [] and watched.errors == []


def test_a_state_changing_request_without_the_csrf_token_is_refused(
        stack: Stack, new_page: Callable[..., Watched]) -> None:
    watched = logged_in(new_page, stack)
    page = watched.page
    jid = "5491100000106@s.whatsapp.net"
    stack.converse("hola", jid)
    url = f"{stack.url}/admin/api/chats/{jid}/pause"
    # The browser carries the session cookie, but the request lacks (or forges) the CSRF header.
    for headers in ({}, {"X-CSRF-Token": "forged"}):
        status, body = page.evaluate(
            """async ([url, headers]) => {
                 const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json", ...headers},
                                             body: "{}"});
                 return [r.status, await r.json()];
               }""", [url, headers])
        assert status == 403 and "CSRF" in body["error"]
    assert stack.chat(jid)["paused_until"] == 0.0
    assert all("403" in e for e in watched.errors), watched.errors


def test_the_page_loads_without_console_errors_and_screenshots(
        stack: Stack, new_page: Callable[..., Watched], tmp_path: Path) -> None:
    target = PROJECT_ROOT / "docs" if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    people = [("5491100000201@s.whatsapp.net", "Ana Gómez", "¿Tienen turnos para el sábado?"),
              ("5491100000202@s.whatsapp.net", "Carlos Ruiz", "quiero agendar una cita"),
              ("5491100000203@s.whatsapp.net", "María López", "Hola, ¿cuánto cuesta el plan básico?")]
    for jid, name, text in people:
        stack.webhook(text, jid, push_name=name)
    wait_until(lambda: all(len(stack.sent(jid)) == 1 for jid, _, _ in people), what="replies")
    bearer = {"Authorization": f"Bearer {TOKEN}"}   # Bearer clients need no CSRF token
    assert stack.http.post(f"/admin/api/chats/{people[1][0]}/pause", json={"minutes": 0}, headers=bearer).status_code == 200
    assert stack.http.post(f"/admin/api/chats/{people[0][0]}/reply", json={"text": "Sí, a las 10 o a las 12."},
                           headers=bearer).status_code == 200
    for size, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        watched = logged_in(new_page, stack, viewport)
        page = watched.page
        page.wait_for_selector(f'tr[data-jid="{people[2][0]}"]')
        page.screenshot(path=str(target / f"admin-{size}.png"))
        open_chat(watched, stack, people[0][0])
        page.wait_for_selector("#transcript li.msg.assistant")
        page.screenshot(path=str(target / f"admin-chat-{size}.png"), full_page=size == "phone")
        for view in ("delivery", "overview"):
            page.click(f'nav a[data-view="{view}"]')
            page.wait_for_selector(f"#view-{view}", state="visible")
            page.wait_for_selector("#provider-rows tr" if view == "delivery" else "#chart svg")
        assert page.is_hidden("#nodes-card")   # one process on SQLite: no nodes to list
        page.screenshot(path=str(target / f"admin-overview-{size}.png"))
        assert watched.errors == [], watched.errors
        assert (target / f"admin-{size}.png").stat().st_size > 10_000


def test_without_admin_token_loopback_opens_the_console_directly(
        fakes: tuple[Fake, Fake, Path], new_page: Callable[..., Watched]) -> None:
    evolution, llm, tmp = fakes
    with start_service(tmp, "loopback", evolution, llm) as service:
        watched = new_page()
        page = watched.page
        page.goto(service.url + "/admin")
        page.wait_for_selector("#view-chats", state="visible")
        assert page.is_hidden("#view-login") and page.is_hidden("#logout")
        assert page.get_attribute("html", "lang") == "es"
        httpx.post(service.url + "/webhook", json=upsert("hola desde curl", jid="5491100000301@s.whatsapp.net"))
        page.wait_for_selector('tr[data-jid="5491100000301@s.whatsapp.net"]', timeout=2000)
        # curl (no browser headers) still uses the JSON endpoints as before, without a session
        assert httpx.post(service.url + "/actors/5491100000301@s.whatsapp.net/pause").status_code in (200, 202)
        # but a browser request without the console's session is refused (cross-site request forgery)
        response = httpx.post(service.url + "/actors/5491100000301@s.whatsapp.net/resume",
                              headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
        assert response.status_code == 403 and "session" in response.json()["error"]
        headers = httpx.get(service.url + "/admin").headers
        assert "default-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
        assert watched.errors == []


def test_the_overview_lists_the_nodes_sharing_a_postgresql_database(
        fakes: tuple[Fake, Fake, Path], new_page: Callable[..., Watched], postgres_cluster: Any) -> None:
    """Two nodes on one PostgreSQL database: the overview of either shows both, with their address,
    liveness and shards (GET /cluster's), in Spanish; a single-process store shows no such table (above)."""
    evolution, llm, tmp = fakes
    url = postgres_cluster.create_database()
    extra = {"STORE_URL": url, "SHARD_LEASE_SECONDS": "3", "ADMIN_TOKEN": TOKEN}
    with start_service(tmp, "node-a", evolution, llm, **extra) as a, start_service(tmp, "node-b", evolution, llm, **extra) as b:
        stack = Stack(a, evolution)
        bearer = {"Authorization": f"Bearer {TOKEN}"}

        def balanced() -> bool:
            nodes = stack.http.get("/cluster", headers=bearer).json()["nodes"]
            return [n["shards_owned"] for n in nodes] == [512, 512]
        wait_until(balanced, 30, "two nodes with 512 shards each")
        watched = logged_in(new_page, stack)
        page = watched.page
        page.click('nav a[data-view="overview"]')
        page.wait_for_selector("#node-rows tr:nth-child(2)")
        rows = page.eval_on_selector_all("#node-rows tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
        addresses = sorted(row[1] for row in rows)
        assert addresses == sorted(s.url.removeprefix("http://") for s in (a, b)), rows
        assert [row[2] for row in rows] == ["activo", "activo"] and [row[4] for row in rows] == ["512", "512"]
        assert sum("(este nodo)" in row[0] for row in rows) == 1
        assert watched.errors == [], watched.errors
    assert PASSWORD not in (tmp / "node-a.log").read_text(errors="replace")
