"""Run the service as a real hypercorn process (the way operators launch it) for tests and benches."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from actors.settings import PROJECT_ROOT

HYPERCORN = str(Path(sys.executable).parent / "hypercorn")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """``hypercorn --worker-class trio app:app`` in its own process group, configured by ``env``.

    ``host`` is the address it binds (``--bind HOST:PORT``); it is always probed over 127.0.0.1."""

    def __init__(self, env: dict[str, str], log_path: Path, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.bind = f"{host}:{self.port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [HYPERCORN, "--worker-class", "trio", "--bind", self.bind, "app:app"],
            cwd=PROJECT_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ``/ready`` until 200; fail with the process output when it dies or times out."""
        async with httpx.AsyncClient(timeout=2.0) as client:
            with trio.move_on_after(timeout):
                while True:
                    assert self.proc is not None
                    if self.proc.poll() is not None:
                        raise AssertionError(f"service exited {self.proc.returncode}:\n{self.output()}")
                    try:
                        if (await client.get(self.url + "/ready")).status_code == 200:
                            return
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.05)
        raise AssertionError(f"service not ready within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL the whole process group (parent and worker): no chance to flush anything."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM the hypercorn parent (as systemd/the manager script do) and wait for the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.05)
        return self.proc.returncode

    def __enter__(self) -> "ServiceProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
