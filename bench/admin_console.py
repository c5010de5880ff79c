"""The admin console with many stored chats: list endpoint and page load times, update latency.

    .venv/bin/python bench/admin_console.py [--chats 10000] [--samples 30]

Seeds ``--chats`` conversations (full 50-message windows, as bench/seed_store.py writes them, plus
the listing meta the conversation actor writes with each commit) into a fresh SQLite store, starts
the service on it as a real hypercorn process (offline provider, local outbox, loopback admin), then
prints:

* ``Store.listing`` alone (the SQL a list request runs on the event loop);
* ``GET /admin/api/chats`` wall times (first page, a page 100 pages deep by cursor, a search, a
  state filter), measured from this process over HTTP;
* the page load in Debian's chromium (navigation until the first chat row is drawn);
* the update latency: a webhook for a new chat posted while the page is open, until its row is
  drawn (the page polls every second, so this is about half a second plus the turn).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from actors.conversation_key import ConversationKey  # noqa: E402
from runtime.sqlite_store import SqliteStore  # noqa: E402
from runtime.store import StateMeta  # noqa: E402
from seed_store import state_for  # noqa: E402
from loadgen import jid_of  # noqa: E402
from tests.payloads import upsert  # noqa: E402
from tests.procs import ServiceProcess  # noqa: E402

STATES = ("", "", "", "finished", "paused", "takeover")


async def seed(path: Path, chats: int) -> None:
    store = SqliteStore(path, synchronous="NORMAL")
    await store.open()
    now = time.time()
    try:
        async def writer(start: int, stop: int) -> None:
            for user in range(start, stop):
                state = state_for(user, 50, 150, now - user)   # distinct activity times: a real order
                status = STATES[user % len(STATES)]
                await store.commit(ConversationKey("prueba-py-agent", jid_of(user)).key, state.to_bytes(), StateMeta(
                    last_activity=state.last_activity, size=len(state.window),
                    title=f"Cliente {user}", preview=state.window.last_content()[:120], status=status,
                    status_until=now + 3600 if status in ("paused", "takeover") else 0.0, scope="prueba-py-agent"))

        step = max(1, chats // 64)
        async with trio.open_nursery() as nursery:
            for start in range(0, chats, step):
                nursery.start_soon(writer, start, min(chats, start + step))
    finally:
        await store.close()


async def store_figures(path: Path, samples: int) -> None:
    """Store.listing alone, in process: the SQL the event loop runs per list request."""
    store = SqliteStore(path)
    await store.open()
    now = time.time()
    try:
        for name, query in (("first page", {}), ("search by name", {"search": "cliente 9999"}),
                            ("state=paused", {"status": "paused"})):
            times = []
            for _ in range(samples):
                started = time.perf_counter()
                await store.listing(now=now, limit=50, **query)
                times.append((time.perf_counter() - started) * 1000)
            summary(f"Store.listing, {name}", times)
    finally:
        await store.close()


def timed(client: httpx.Client, url: str, params: dict[str, str], samples: int) -> tuple[list[float], dict]:
    times, body = [], {}
    for _ in range(samples):
        started = time.perf_counter()
        response = client.get(url, params=params)
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        body = response.json()
    return times, body


def summary(name: str, times: list[float], extra: str = "") -> None:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    print(f"{name:<44} median {statistics.median(ordered):7.1f} ms   p95 {p95:7.1f} ms   max {ordered[-1]:7.1f} ms"
          f"   (n={len(ordered)}){extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chats", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        started = time.perf_counter()
        trio.run(seed, data / "agent.sqlite3", args.chats)
        print(f"seeded {args.chats} chats in {time.perf_counter() - started:.1f} s "
              f"({(data / 'agent.sqlite3').stat().st_size / 1e6:.0f} MB)")
        trio.run(store_figures, data / "agent.sqlite3", args.samples)
        env = {"STORE": "sqlite", "DATA_DIR": str(data), "LOG_DIR": str(Path(tmp) / "logs"), "LOG_STDERR": "false",
               "REORDER_DELAY_SECONDS": "0", "LLM_PROVIDER": "offline", "EVOLUTION_API_URL": ""}
        with ServiceProcess(env, Path(tmp) / "service.log") as service:
            service.start()
            trio.run(service.wait_ready)
            with httpx.Client(base_url=service.url, timeout=30) as client:
                api = "/admin/api/chats"
                times, body = timed(client, api, {"limit": "50"}, args.samples)
                summary("chats, first page (50 rows)", times, f"   total={body['total']}")
                cursor = body["next"]
                for _ in range(99):
                    cursor = client.get(api, params={"limit": "50", "after": cursor}).json()["next"]
                times, body = timed(client, api, {"limit": "50", "after": cursor}, args.samples)
                summary("chats, page 101 by cursor", times, f"   first={body['chats'][0]['name']}")
                times, body = timed(client, api, {"q": f"Cliente {args.chats - 1}"}, args.samples)
                summary("chats, search by name (scans 10,000)", times, f"   found={body['total']}")
                times, body = timed(client, api, {"q": jid_of(1234).split("@")[0]}, args.samples)
                summary("chats, search by number (scans 10,000)", times, f"   found={body['total']}")
                times, body = timed(client, api, {"state": "paused"}, args.samples)
                summary("chats, state=paused", times, f"   total={body['total']}")
            browser_figures(service.url, args.samples)


def browser_figures(url: str, samples: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        loads = []
        for _ in range(min(samples, 10)):
            started = time.perf_counter()
            page.goto(url + "/admin")
            page.wait_for_selector("#chat-rows tr")
            loads.append((time.perf_counter() - started) * 1000)
        summary("page load until the first row is drawn", loads)
        latencies = []
        with httpx.Client(base_url=url, timeout=10) as client:
            for i in range(samples):
                jid = f"5491199{i:06d}@s.whatsapp.net"
                started = time.perf_counter()
                client.post("/webhook", json=upsert(f"hola {i}", jid=jid)).raise_for_status()
                page.wait_for_selector(f'tr[data-jid="{jid}"]', timeout=5000)
                latencies.append((time.perf_counter() - started) * 1000)
                time.sleep(0.13 * (i % 7))   # spread the posts over the 1 s polling phase
        summary("update latency (webhook -> row drawn)", latencies)
        browser.close()


if __name__ == "__main__":
    main()
