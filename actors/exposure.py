"""Who can reach this process and how many there are: the addresses hypercorn listens on, its
worker count, and the start-up refusal that ends the whole hypercorn server.

The service refuses to start on a non-loopback bind with an open webhook or open admin endpoints
(docs/security.md). The bind is hypercorn's own: its command line (``--bind``/``-b``, repeatable, plus
``--insecure-bind`` and ``--quic-bind``; its default ``127.0.0.1:8000`` when none is given), or the
``bind`` of its ``-c/--config`` file read with hypercorn's own ``Config`` loader. hypercorn's workers
are started with multiprocessing's spawn, which hands them the parent's ``sys.argv``. When the app is
not run by hypercorn (tests calling ``create_app``), ``HOST``/``PORT`` stand for the bind.
Several workers are several nodes: they need a store several processes share (PostgreSQL).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import ipaddress
import multiprocessing
import os
import select
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.synchronize import SemLock
from pathlib import Path
from typing import Any, Sequence

from .settings import ConfigError, Settings

HYPERCORN_DEFAULT_BIND = "127.0.0.1:8000"
PARENT_END_WAIT = 2.0   # seconds a refusing worker waits for the hypercorn parent it killed to be gone


def run_by_hypercorn(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is hypercorn's command line (its console script, or ``python -m hypercorn``)."""
    if not argv:
        return False
    program = Path(argv[0])
    return program.name == "hypercorn" or program.parts[-2:] == ("hypercorn", "__main__.py")


def _hypercorn_config(path: str) -> Any:
    """hypercorn's ``-c`` config (TOML, ``file:`` Python file or ``python:`` module), read by its own loader."""
    from hypercorn.config import Config

    try:
        if path.startswith("python:"):
            config = Config.from_object(path[len("python:"):])
        elif path.startswith("file:"):
            config = Config.from_pyfile(path[len("file:"):])
        else:
            config = Config.from_toml(path)
    except Exception as exc:  # hypercorn itself would fail on it too: refuse rather than guess
        raise ConfigError(f"hypercorn config {path}: cannot be read ({type(exc).__name__})") from None
    return config


def _hypercorn_config_binds(path: str) -> list[str]:
    """The binds of hypercorn's ``-c`` config."""
    config = _hypercorn_config(path)
    return [*config.bind, *config.insecure_bind, *config.quic_bind]


def hypercorn_binds(argv: Sequence[str]) -> list[str]:
    """Every address hypercorn's command line ``argv`` makes it listen on."""
    parser = argparse.ArgumentParser(add_help=False)
    for flags, dest in ((("-b", "--bind"), "binds"), (("--insecure-bind",), "insecure"), (("--quic-bind",), "quic")):
        parser.add_argument(*flags, dest=dest, action="append", default=[])
    parser.add_argument("-c", "--config", default=None)
    args, _ = parser.parse_known_args(list(argv[1:]))
    config_binds = _hypercorn_config_binds(args.config) if args.config else []
    # As hypercorn does: command-line binds replace the config file's, which replace the default.
    binds = args.binds or config_binds or [HYPERCORN_DEFAULT_BIND]
    return [*binds, *args.insecure, *args.quic]


def served_binds(settings: Settings, argv: Sequence[str] | None = None) -> list[str]:
    """hypercorn's binds when it runs this process, else ``HOST:PORT``."""
    argv = sys.argv if argv is None else argv
    if run_by_hypercorn(argv):
        return hypercorn_binds(argv)
    return [f"[{settings.server.host}]:{settings.server.port}" if ":" in settings.server.host else f"{settings.server.host}:{settings.server.port}"]


def advertised_address(settings: Settings, argv: Sequence[str] | None = None) -> str:
    """Where this process is reached, for admins (GET /cluster): NODE_ADDRESS, else its first bind,
    a wildcard host replaced by the machine's name."""
    if settings.storage.node_address.strip():
        return settings.storage.node_address.strip()
    bind = served_binds(settings, argv)[0]
    if bind.startswith(("unix:", "fd://")):
        return bind
    host, _, port = bind.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


def is_loopback_address(host: str | None) -> bool:
    """``host`` is an address in 127.0.0.0/8 or ::1 (also IPv4-mapped), or ``localhost``; anything
    else (a name, ``<local>`` for a unix socket, empty) is not."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def is_loopback_bind(bind: str) -> bool:
    """A TCP bind on 127.0.0.0/8, ::1 or localhost. ``unix:`` and ``fd://`` binds are not loopback:
    a reverse proxy usually sits in front of them, and the service cannot tell who connects."""
    if bind.startswith(("unix:", "fd://")):
        return False
    host = bind
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return is_loopback_address(host)


def exposure_error(settings: Settings, binds: Sequence[str]) -> str | None:
    """Why ``settings`` must not be served on ``binds`` (one line), or None."""
    public = [b for b in binds if not is_loopback_bind(b)]
    if not public:
        return None
    where = ", ".join(public)
    if not settings.security.webhook_secret and not settings.security.allow_open_webhook:
        return (f"WEBHOOK_SECRET: required on a non-loopback bind ({where}): set WEBHOOK_SECRET (and send it "
                f"from Evolution as x-webhook-token), or accept an open webhook with ALLOW_OPEN_WEBHOOK=true")
    if not settings.security.admin_token and not settings.security.admin_loopback_only:
        return (f"ADMIN_TOKEN: required on a non-loopback bind ({where}): set ADMIN_TOKEN, or serve the admin "
                f"endpoints to loopback peers only with ADMIN_LOOPBACK_ONLY=true")
    return None


def check_exposure(settings: Settings, argv: Sequence[str] | None = None) -> None:
    """Raise ConfigError when ``settings`` must not be served on this process's binds."""
    if (reason := exposure_error(settings, served_binds(settings, argv))) is not None:
        raise ConfigError(reason)


def hypercorn_workers(argv: Sequence[str]) -> int:
    """How many worker processes hypercorn's command line ``argv`` starts (``-w/--workers``, else its
    ``-c`` config's, else 1; 0 serves in hypercorn's own process)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-w", "--workers", type=int, default=None)
    parser.add_argument("-c", "--config", default=None)
    args, _ = parser.parse_known_args(list(argv[1:]))
    if args.workers is not None:
        return int(args.workers)
    return _hypercorn_config(args.config).workers if args.config else 1


def check_single_process_store(settings: Settings, argv: Sequence[str] | None = None) -> None:
    """Raise ConfigError when hypercorn runs several workers on a store that serves one process
    (SQLite, memory): each worker is a node, and only PostgreSQL is shared by several."""
    argv = sys.argv if argv is None else argv
    if settings.storage.kind == "postgresql" or not run_by_hypercorn(argv):
        return
    workers = hypercorn_workers(argv)
    if workers > 1:
        raise ConfigError(f"STORE_URL: hypercorn --workers {workers} runs {workers} processes, and one "
                          f"{'SQLite file' if settings.storage.kind == 'sqlite' else 'memory store'} serves one "
                          "process: several workers need STORE_URL=postgresql://… (README, Running several nodes)")


def _hypercorn_parent() -> int | None:
    """The pid of the hypercorn parent that spawned this worker process, or None."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None or not run_by_hypercorn(sys.argv):
        return None
    return parent.pid


def _workers_of(pid: int) -> list[int]:
    """The other worker processes hypercorn ``pid`` spawned (Linux /proc): its children started by
    multiprocessing's ``spawn_main``, not its resource tracker."""
    workers = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after its last ")"
            if (int((proc / "stat").read_text().rpartition(")")[2].split()[1]) == pid
                    and b"spawn_main" in (proc / "cmdline").read_bytes()):
                workers.append(int(proc.name))
    return workers


def _wait_ended(pid: int, timeout: float) -> None:
    """Wait until process ``pid`` has exited (a zombie counts: its children are reparented by then),
    at most ``timeout`` seconds (a pidfd becomes readable when the process exits; Linux 5.3+, else
    its /proc state is polled)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:   # no pidfd_open in this kernel
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.01)
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (its /proc state is not Z, zombie, or X, dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def end_hypercorn_server(last_words: str | None = None) -> None:
    """Print ``last_words`` on stderr, then, in a hypercorn worker, end its sibling workers and the
    hypercorn parent.

    hypercorn 0.18's parent exits 0 whatever its worker's exit status (its run() re-reads the exit
    codes of a list it already emptied), which would tell systemd and the manager script that all
    went well, and a sibling worker would go on serving alone. SIGKILL is the one signal its
    handlers cannot turn into an orderly exit 0. With several workers each one may get here: a lock
    named after the parent lets the first one speak and end the others, so the line is said once:
    a sibling that gets the lock after the parent was ended (it was still starting when the first
    one looked for its siblings, so it was not ended with them) finds it has a new parent and says
    nothing. Outside a hypercorn worker (``--workers 0``, tests) the words are all."""
    parent = _hypercorn_parent()
    if parent is None:
        if last_words is not None:
            print(last_words, file=sys.stderr, flush=True)
        return
    path = Path(tempfile.gettempdir()) / f"python-agent-hypercorn-{parent}.stopping"
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # a sibling holding it ends this process before releasing it
        if os.getppid() != parent:   # a sibling spoke and ended the parent (this process was reparented)
            return
        if last_words is not None:
            print(last_words, file=sys.stderr, flush=True)
        siblings = _workers_of(parent)   # before the parent goes: they are then reparented
        # The parent's named semaphores (its shutdown Event, handed to this worker) would outlive it:
        # unlink them here, as its exit would have, so its resource tracker finds nothing to warn about.
        for semaphore in [o for o in gc.get_objects() if isinstance(o, SemLock)]:
            with contextlib.suppress(OSError):
                SemLock._cleanup(semaphore._semlock.name)  # type: ignore[attr-defined]
        # The parent first: it would see a sibling's death and exit 0 before its own SIGKILL came.
        for pid in (parent, *siblings):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_ended(parent, PARENT_END_WAIT)   # before the lock goes: a late sibling must see a new parent
        path.unlink(missing_ok=True)


def refuse_to_start(line: str, code: int = 2) -> None:
    """Print ``line`` on stderr and end the process with ``code``, before anything is served
    (the whole hypercorn server too, the line said once: see ``end_hypercorn_server``)."""
    end_hypercorn_server(line)
    raise SystemExit(code)
