"""Who can reach this process: the addresses hypercorn listens on, and the start-up refusal.

The service refuses to start on a non-loopback bind with an open webhook or open admin endpoints
(docs/security.md). The bind is hypercorn's own: its command line (``--bind``/``-b``, repeatable, plus
``--insecure-bind`` and ``--quic-bind``; its default ``127.0.0.1:8000`` when none is given), or the
``bind`` of its ``-c/--config`` file read with hypercorn's own ``Config`` loader. hypercorn's workers
are started with multiprocessing's spawn, which hands them the parent's ``sys.argv``. When the app is
not run by hypercorn (tests calling ``create_app``), ``HOST``/``PORT`` stand for the bind.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import multiprocessing
import os
import signal
import sys
from multiprocessing.synchronize import SemLock
from pathlib import Path
from typing import Sequence

from .settings import ConfigError, Settings

HYPERCORN_DEFAULT_BIND = "127.0.0.1:8000"


def run_by_hypercorn(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is hypercorn's command line (its console script, or ``python -m hypercorn``)."""
    if not argv:
        return False
    program = Path(argv[0])
    return program.name == "hypercorn" or program.parts[-2:] == ("hypercorn", "__main__.py")


def _hypercorn_config_binds(path: str) -> list[str]:
    """The binds of hypercorn's ``-c`` config (TOML, ``file:`` Python file or ``python:`` module)."""
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


def stop_hypercorn_parent() -> None:
    """In a hypercorn worker, end the parent too, so the process's failure is seen as one.

    hypercorn 0.18's parent exits 0 whatever its worker's exit status (its run() re-reads the exit
    codes of a list it already emptied), which would tell systemd and the manager script that all
    went well. SIGKILL is the one signal its handlers cannot turn into an orderly exit 0.
    """
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None and run_by_hypercorn(sys.argv):
        # The parent's named semaphores (its shutdown Event, handed to this worker) would outlive it:
        # unlink them here, as its exit would have, so its resource tracker finds nothing to warn about.
        for lock in [o for o in gc.get_objects() if isinstance(o, SemLock)]:
            with contextlib.suppress(OSError):
                SemLock._cleanup(lock._semlock.name)  # type: ignore[attr-defined]
        os.kill(parent.pid, signal.SIGKILL)


def refuse_to_start(line: str, code: int = 2) -> None:
    """Print ``line`` on stderr and end the process with ``code``, before anything is served
    (the hypercorn parent too: see ``stop_hypercorn_parent``)."""
    print(line, file=sys.stderr, flush=True)
    stop_hypercorn_parent()
    raise SystemExit(code)
