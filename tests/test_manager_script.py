"""scripts/agent-manager.sh against real processes: start, status, stop, a bad setting, stale pid files."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "agent-manager.sh"
VENV_BIN = Path(sys.executable).parent  # the interpreter running the tests: the project's virtualenv

needs_app = pytest.mark.skipif(not (ROOT / "app.py").exists(), reason="app.py does not exist yet (the service entry point)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A hermetic environment: a free loopback port, temp DATA_DIR/LOG_DIR, the venv's bin first on PATH."""
    environ = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PID_FILE")}
    environ.update(
        PATH=f"{VENV_BIN}{os.pathsep}{environ.get('PATH', '')}",
        HOST="127.0.0.1",
        PORT=str(free_port()),
        DATA_DIR=str(tmp_path / "data"),
        LOG_DIR=str(tmp_path / "logs"),
        ADMIN_TOKEN="test-admin-token-4711",
        LLM_PROVIDER="offline",
        LLM_PROVIDER_FALLBACK="",
        EVOLUTION_API_URL="",
        CRM_AUTO_REGISTER="false",
        START_TIMEOUT="40",
        STOP_TIMEOUT="30",
    )
    return environ


def manager(command: str, environ: dict[str, str], cwd: Path | None = None,
            *args: str) -> subprocess.CompletedProcess[str]:
    """Run the script (from an unrelated directory by default, as it must work from anywhere)."""
    return subprocess.run(
        ["bash", str(SCRIPT), command, *args],
        env=environ,
        cwd=cwd or Path(environ["DATA_DIR"]).parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def cleanup(env: dict[str, str]) -> Iterator[None]:
    """Never leave a service behind, whatever the test did."""
    yield
    pid_file = Path(env["DATA_DIR"]) / "agent.pid"
    if pid_file.exists():
        manager("stop", env)
        if pid_file.exists():
            pid = int(pid_file.read_text().strip())
            if pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)


@pytest.mark.slow
@needs_app
def test_start_status_stop_lifecycle(env: dict[str, str], cleanup: None) -> None:
    port = int(env["PORT"])
    started = manager("start", env)
    assert started.returncode == 0, started.stdout + started.stderr
    match = re.search(r"started \(pid (\d+)\) on 127\.0\.0\.1:" + str(port), started.stdout)
    assert match, started.stdout
    pid = int(match.group(1))
    assert (Path(env["DATA_DIR"]) / "agent.pid").read_text().strip() == str(pid)
    assert (Path(env["LOG_DIR"]) / "hypercorn.out").exists()

    again = manager("start", env)
    assert f"already running (pid {pid})" in again.stdout

    status = manager("status", env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"running (pid {pid})" in status.stdout
    assert re.search(r"^health: .*\bok\b", status.stdout, re.MULTILINE), status.stdout
    assert re.search(r"^actors: \d+ live$", status.stdout, re.MULTILINE), status.stdout
    assert re.search(r"^memory: \d+ MB RSS", status.stdout, re.MULTILINE), status.stdout

    stopped = manager("stop", env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"stopped (pid {pid})" in stopped.stdout
    assert "SIGKILL" not in stopped.stderr  # the graceful path was enough
    assert not pid_alive(pid)
    assert wait_until(lambda: port_is_free(port))

    after = manager("status", env)
    assert after.returncode == 3
    assert after.stdout.strip() == "not running"
    assert not (Path(env["DATA_DIR"]) / "agent.pid").exists()


@pytest.mark.slow
@needs_app
def test_start_with_bad_setting_fails_and_names_it(env: dict[str, str], cleanup: None) -> None:
    env["MAX_MESSAGES"] = "abc"
    result = manager("start", env)
    assert result.returncode != 0
    assert "MAX_MESSAGES" in result.stdout + result.stderr
    assert "started" not in result.stdout
    assert not (Path(env["DATA_DIR"]) / "agent.pid").exists()
    assert manager("status", env).returncode == 3
    assert port_is_free(int(env["PORT"]))


def test_not_running_status_stop_and_stale_pid_file(env: dict[str, str]) -> None:
    pid_file = Path(env["DATA_DIR"]) / "agent.pid"
    pid_file.parent.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file.write_text(f"{dead.pid}\n")

    status = manager("status", env)
    assert (status.returncode, status.stdout.strip()) == (3, "not running")
    assert not pid_file.exists()  # the stale pid file was removed

    stop = manager("stop", env)
    assert (stop.returncode, stop.stdout.strip()) == (0, "not running")


def test_help_usage_and_bad_port(env: dict[str, str]) -> None:
    help_ = manager("help", env)
    assert help_.returncode == 0 and "start|stop|restart|status|logs|help" in help_.stdout
    assert manager("bogus", env).returncode == 2
    env["PORT"] = "abc"
    bad = manager("start", env)
    assert bad.returncode == 6 and "PORT" in bad.stderr


def test_several_workers_need_postgresql(env: dict[str, str]) -> None:
    """One SQLite file serves one process: --workers 2 without STORE_URL is refused in one line."""
    refused = manager("start", env, None, "--workers", "2")
    assert refused.returncode == 6, refused.stdout + refused.stderr
    assert refused.stderr.strip() == ("--workers 2: several workers need STORE_URL=postgresql://… "
                                      "(one SQLite file serves one process)")
    assert not (Path(env["DATA_DIR"]) / "agent.pid").exists()


@pytest.mark.slow
@needs_app
def test_two_workers_on_postgresql_share_the_shards(env: dict[str, str], cleanup: None,
                                                    postgres_cluster: Any) -> None:
    """``start --workers 2`` with STORE_URL: one command, two worker processes, each a node owning
    half of the shards; stop ends both."""
    import httpx

    from tests.postgres import PASSWORD

    env["STORE_URL"] = postgres_cluster.create_database()
    started = manager("start", env, None, "--workers", "2")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "2 worker(s)" in started.stdout
    url = f"http://127.0.0.1:{env['PORT']}/shards"
    headers = {"Authorization": f"Bearer {env['ADMIN_TOKEN']}"}
    views: list[dict[str, Any]] = []

    def balanced() -> bool:
        views.append(httpx.get(url, headers=headers).json())
        return sorted(views[-1]["owners"].values()) == [512, 512]   # two nodes, half each

    assert wait_until(balanced, timeout=30), views[-1]
    assert env["STORE_URL"] not in str(views) and PASSWORD not in str(views)
    assert manager("stop", env).returncode == 0


@pytest.mark.slow
@needs_app
def test_public_host_generates_missing_secrets_never_starts_open(env: dict[str, str], cleanup: None,
                                                                 tmp_path: Path) -> None:
    """HOST=0.0.0.0 with no WEBHOOK_SECRET/ADMIN_TOKEN: both are generated into ENV_FILE (mode 600), the
    path is printed, the service starts with them (webhook 401 without the secret), a restart keeps them."""
    import httpx

    env_file = tmp_path / "agent.env"
    env_file.write_text("# operator's settings\nMAX_MESSAGES=7\nLANGUAGE=es")          # no newline at the end
    env.pop("ADMIN_TOKEN")
    env.update(HOST="0.0.0.0", ENV_FILE=str(env_file))
    started = manager("start", env)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"generated WEBHOOK_SECRET into {env_file} (mode 600)" in started.stdout
    assert f"generated ADMIN_TOKEN into {env_file} (mode 600)" in started.stdout
    assert env_file.stat().st_mode & 0o777 == 0o600
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines()[1:])
    assert values["LANGUAGE"] == "es"
    assert all(re.fullmatch(r"[0-9a-f]{64}", values[name]) for name in ("WEBHOOK_SECRET", "ADMIN_TOKEN"))
    url = f"http://127.0.0.1:{env['PORT']}"
    body = {"event": "messages.upsert", "instance": "x", "data": {"key": {
        "remoteJid": "5491131376731@s.whatsapp.net", "fromMe": False, "id": "M1"}, "message": {"conversation": "hola"}}}
    assert httpx.post(url + "/webhook", json=body, timeout=5).status_code == 401
    assert httpx.post(url + "/webhook", json=body, headers={"x-webhook-token": values["WEBHOOK_SECRET"]},
                      timeout=5).status_code == 200
    status = manager("status", env)
    assert re.search(r"^actors: \d+ live$", status.stdout, re.MULTILINE), status.stdout   # status used the token
    instances = httpx.get(url + "/instances", headers={"Authorization": f"Bearer {values['ADMIN_TOKEN']}"}, timeout=5)
    assert instances.json()["instances"][0]["settings"]["max_messages"] == 7   # the service reads ENV_FILE too
    assert manager("stop", env).returncode == 0
    again = manager("start", env)
    assert again.returncode == 0 and "generated" not in again.stdout, again.stdout
    assert env_file.read_text().count("WEBHOOK_SECRET=") == 1


def test_public_host_with_no_env_file_to_write_refuses_in_one_line(env: dict[str, str]) -> None:
    """ENV_FILE empty means no env file (as the service reads it): a secret that would be generated
    has nowhere to go, so the start is refused, saying so."""
    env.pop("ADMIN_TOKEN")
    env.update(HOST="0.0.0.0", ENV_FILE="")
    refused = manager("start", env)
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("WEBHOOK_SECRET: needed on HOST 0.0.0.0, and ENV_FILE is empty "
                                      "(no env file to generate it into)")


@pytest.mark.slow
@needs_app
def test_public_host_with_explicit_overrides_generates_nothing(env: dict[str, str], cleanup: None,
                                                                tmp_path: Path) -> None:
    env_file = tmp_path / "agent.env"
    env.pop("ADMIN_TOKEN")
    env.update(HOST="0.0.0.0", ENV_FILE=str(env_file), ALLOW_OPEN_WEBHOOK="true", ADMIN_LOOPBACK_ONLY="true")
    started = manager("start", env)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "generated" not in started.stdout and not env_file.exists()
