"""Who can reach what, against real hypercorn processes: the start-up refusal on a public bind, admin
through a reverse proxy on the same host, the unix-socket bind, the security headers (docs/security.md)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from actors.exposure import _running, _wait_ended, advertised_address, hypercorn_binds, hypercorn_workers, is_loopback_bind
from actors.settings import PROJECT_ROOT, load_settings
from tests.fakes.server import running_server
from tests.payloads import upsert
from tests.procs import HYPERCORN, ServiceProcess, free_port

pytestmark = pytest.mark.slow
ADMIN = "admin-FAKE-token-0123456789"
SECRET = "hook-FAKE-secret-0123456789"


def hermetic(tmp_path: Path, **env: str) -> dict[str, str]:
    """The process environment without any security setting of the caller's, plus ``env``."""
    names = ("WEBHOOK_SECRET", "ADMIN_TOKEN", "ALLOW_OPEN_WEBHOOK", "ADMIN_LOOPBACK_ONLY", "HOST", "PORT")
    base = {k: v for k, v in os.environ.items() if k not in names}
    return {**base, "DATA_DIR": str(tmp_path / "data"), "LOG_DIR": str(tmp_path / "logs"), "STORE": "memory", **env}


def start_refused(tmp_path: Path, bind: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HYPERCORN, "--worker-class", "trio", "--bind", bind, "app:app"], cwd=PROJECT_ROOT,
                          env=hermetic(tmp_path, **env), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("env", "variable", "override"), [
    ({"ADMIN_TOKEN": ADMIN}, "WEBHOOK_SECRET", {"ALLOW_OPEN_WEBHOOK": "true"}),
    ({"WEBHOOK_SECRET": SECRET}, "ADMIN_TOKEN", {"ADMIN_LOOPBACK_ONLY": "true"}),
], ids=["webhook", "admin"])
async def test_public_bind_without_secret_refuses_to_start_unless_overridden(
        tmp_path: Path, env: dict[str, str], variable: str, override: dict[str, str]) -> None:
    port = free_port()
    result = start_refused(tmp_path, f"0.0.0.0:{port}", **env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"Configuration error: {variable}: "), result.stderr
    assert (next(iter(override)) in lines[0]) and variable in lines[0]
    with ServiceProcess(hermetic(tmp_path, **env, **override), tmp_path / "service.out", host="0.0.0.0") as service:
        service.start()
        await service.wait_ready()
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            headers = {"x-webhook-token": SECRET} if "WEBHOOK_SECRET" in env else {}
            assert (await client.post("/webhook", json=upsert("hola"), headers=headers)).status_code == 200
            if "ADMIN_TOKEN" not in env:   # ADMIN_LOOPBACK_ONLY: this client is a loopback peer, unless proxied
                assert (await client.get("/supervisors")).status_code == 200
                assert (await client.get("/supervisors", headers={"X-Forwarded-For": "203.0.113.9"})).status_code == 403
        assert await service.terminate() == 0


def test_every_hypercorn_bind_counts(tmp_path: Path) -> None:
    """A second, public --bind refuses even when the first is loopback (the README's loopback command,
    with no secret, starts: see the proxy test below)."""
    two = subprocess.run([HYPERCORN, "--worker-class", "trio", "-b", f"127.0.0.1:{free_port()}",
                          "--bind", f"0.0.0.0:{free_port()}", "app:app"], cwd=PROJECT_ROOT,
                         env=hermetic(tmp_path), capture_output=True, text=True, timeout=60)
    assert two.returncode != 0 and two.stderr.startswith("Configuration error: WEBHOOK_SECRET: ")
    # the reason is readable: the word after the variable's name is not taken for a credential
    assert "WEBHOOK_SECRET: required on a non-loopback bind" in two.stderr and "[REDACTED]" not in two.stderr


def test_bind_parsing_follows_hypercorn(tmp_path: Path) -> None:
    config = tmp_path / "hypercorn.toml"
    config.write_text('bind = ["0.0.0.0:5000"]\n')
    assert hypercorn_binds(["/x/hypercorn", "app:app"]) == ["127.0.0.1:8000"]
    assert hypercorn_binds(["/x/hypercorn", "-c", str(config), "app:app"]) == ["0.0.0.0:5000"]
    assert hypercorn_binds(["/x/hypercorn", "-c", str(config), "-b", "[::1]:1", "app:app"]) == ["[::1]:1"]
    assert hypercorn_binds(["/x/hypercorn", "-w", "2", "--bind=127.0.0.1:5", "-b", "unix:/s", "app:app"]) \
        == ["127.0.0.1:5", "unix:/s"]
    loopback = ["127.0.0.1:5000", "127.8.9.1:1", "[::1]:5000", "localhost:80", "127.0.0.1"]
    public = ["0.0.0.0:5000", "[::]:5000", "10.0.0.2:80", "example.com:80", "unix:/run/agent.sock", "fd://3"]
    assert all(map(is_loopback_bind, loopback)) and not any(map(is_loopback_bind, public))


def test_worker_count_and_advertised_address_follow_hypercorn(tmp_path: Path) -> None:
    config = tmp_path / "hypercorn.toml"
    config.write_text('bind = ["0.0.0.0:5000"]\nworkers = 3\n')
    assert hypercorn_workers(["/x/hypercorn", "app:app"]) == 1
    assert hypercorn_workers(["/x/hypercorn", "-w", "4", "app:app"]) == 4
    assert hypercorn_workers(["/x/hypercorn", "--workers=0", "app:app"]) == 0
    assert hypercorn_workers(["/x/hypercorn", "-c", str(config), "app:app"]) == 3
    assert hypercorn_workers(["/x/hypercorn", "-c", str(config), "--workers", "2", "app:app"]) == 2
    settings = load_settings({"NODE_ADDRESS": ""}, dotenv_file=None)
    assert advertised_address(settings, ["/x/hypercorn", "-b", "127.0.0.1:5001", "app:app"]) == "127.0.0.1:5001"
    assert advertised_address(settings, ["/x/hypercorn", "-c", str(config), "app:app"]) == f"{socket.gethostname()}:5000"
    assert advertised_address(settings, ["/x/hypercorn", "-b", "unix:/run/a.sock", "app:app"]) == "unix:/run/a.sock"
    named = load_settings({"NODE_ADDRESS": "node-2.internal:5000"}, dotenv_file=None)
    assert advertised_address(named, ["/x/hypercorn", "app:app"]) == "node-2.internal:5000"


def nginx_like_proxy(upstream: str) -> Any:
    """A reverse proxy on the same host: forwards every request to ``upstream`` with the headers nginx's
    usual configuration adds (X-Real-IP, X-Forwarded-For, Forwarded), from a loopback socket."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        client_ip = scope["client"][0]
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k.lower() != b"host"]
        headers += [("X-Real-IP", client_ip), ("X-Forwarded-For", client_ip), ("Forwarded", f"for={client_ip}")]
        async with httpx.AsyncClient(base_url=upstream, timeout=10) as client:
            answer = await client.request(scope["method"], scope["path"], content=body, headers=headers)
        await send({"type": "http.response.start", "status": answer.status_code,
                    "headers": [(k.encode(), v.encode()) for k, v in answer.headers.items()
                                if k.lower() not in ("content-length", "transfer-encoding", "server", "date")]})
        await send({"type": "http.response.body", "body": answer.content})
    return app


async def test_admin_through_a_same_host_reverse_proxy_needs_the_token(tmp_path: Path) -> None:
    """Loopback bind, no ADMIN_TOKEN: a local curl is served, the same request through the proxy is not,
    nor one that carries any single proxy header. The security headers are on every answer."""
    with ServiceProcess(hermetic(tmp_path), tmp_path / "service.out") as service:
        service.start()
        await service.wait_ready()
        async with running_server(nginx_like_proxy(service.url)) as proxy_url, \
                httpx.AsyncClient(timeout=10) as client:
            direct = await client.get(service.url + "/supervisors")
            assert direct.status_code == 200
            assert direct.headers["cache-control"] == "no-store"
            assert direct.headers["x-content-type-options"] == "nosniff"
            proxied = await client.get(proxy_url + "/supervisors")
            assert proxied.status_code == 403 and "error" in proxied.json()
            for header in ("Forwarded", "X-Forwarded-For", "X-Real-IP"):
                spoofed = await client.get(service.url + "/memory", headers={header: "127.0.0.1"})
                assert spoofed.status_code == 403, header
            assert (await client.post(proxy_url + "/webhook", json=upsert("hola"))).status_code == 200
            for path, method in (("/health", "GET"), ("/webhook", "POST"), ("/nope", "GET")):
                response = await client.request(method, service.url + path, content=b"{" if method == "POST" else None)
                assert response.headers["x-content-type-options"] == "nosniff", path
                assert response.headers["server"] == "hypercorn-h11"   # a protocol name, no version
            big = await client.post(service.url + "/webhook", content=b"x" * (1024 * 1024 + 1))
            assert big.status_code == 413 and big.headers["x-content-type-options"] == "nosniff"


async def test_unix_socket_bind_is_not_loopback(tmp_path: Path) -> None:
    """``unix:`` refuses to start without the secrets; with ADMIN_LOOPBACK_ONLY its peers (``<local>``)
    are not served the admin endpoints, with ADMIN_TOKEN they are, with the token."""
    sock = tmp_path / "agent.sock"
    refused = start_refused(tmp_path, f"unix:{sock}")
    assert refused.returncode != 0 and refused.stderr.startswith("Configuration error: WEBHOOK_SECRET: ")
    for env, admin_status in (({"ADMIN_LOOPBACK_ONLY": "true"}, 403), ({"ADMIN_TOKEN": ADMIN}, 200)):
        process = subprocess.Popen([HYPERCORN, "--worker-class", "trio", "--bind", f"unix:{sock}", "app:app"],
                                   cwd=PROJECT_ROOT, env=hermetic(tmp_path, WEBHOOK_SECRET=SECRET, **env),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            transport = httpx.AsyncHTTPTransport(uds=str(sock))
            async with httpx.AsyncClient(transport=transport, base_url="http://agent", timeout=5) as client:
                with trio.fail_after(30):
                    while True:
                        try:
                            if (await client.get("/ready")).status_code == 200:
                                break
                        except httpx.HTTPError:
                            pass
                        await trio.sleep(0.1)
                headers = {"Authorization": f"Bearer {ADMIN}"} if "ADMIN_TOKEN" in env else {}
                assert (await client.get("/supervisors", headers=headers)).status_code == admin_status
                assert (await client.get("/supervisors")).status_code in (401, 403)
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_a_killed_process_counts_as_ended_before_it_is_reaped() -> None:
    """A refusing hypercorn worker waits for the parent it killed to be gone before releasing its lock
    (end_hypercorn_server): an exited process not yet reaped (a zombie) already counts, since its
    children have been reparented by then; a live one is waited for up to the timeout."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = time.monotonic()
        _wait_ended(child.pid, 0.3)                  # still running: the whole timeout
        assert time.monotonic() - started >= 0.25 and _running(child.pid)
        child.kill()
        started = time.monotonic()
        _wait_ended(child.pid, 5.0)                  # exited, not reaped yet: at once
        assert time.monotonic() - started < 2.0 and not _running(child.pid)
        assert child.poll() is not None              # reaped only now
    finally:
        child.kill()
        child.wait()
