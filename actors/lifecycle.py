"""The process around one Service: its start, its death by a fatal error, and its orderly stop.

app.py hands ``Lifecycle.start`` and ``Lifecycle.stop`` to the web server's lifespan (hypercorn
turns SIGTERM and SIGINT into that lifespan's shutdown). Every way out of the process that is not
an orderly stop ends it with one readable line and a non-zero status, never a traceback:

- a bad setting, a bad instances file (actors/settings/instances.py), or settings unsafe on this
  process's binds (actors/exposure.py): exit 2;
- a store that cannot be opened (corrupt file, a newer schema): exit STORE_EXIT_CODE;
- the service dying of an error after start-up: /health answers 503 and the process exits
  FATAL_EXIT_CODE, so systemd's Restart= (or the manager script) brings it back.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, TypeVar

import trio

from runtime.logs import configure_logging, redact
from runtime.store import StoreError

from .exposure import check_exposure, check_single_process_store, end_hypercorn_server, refuse_to_start
from .service import Service
from .settings import ConfigError, Settings, configured_instances, load_settings

FATAL_EXIT_CODE = 70   # EX_SOFTWARE: the service died of an error
STORE_EXIT_CODE = 3
log = logging.getLogger(__name__)
T = TypeVar("T")


def exit_process(code: int) -> None:
    """End the process at once (hypercorn would otherwise keep serving a dead service), and its
    hypercorn parent with it, so the exit is seen as a failure (see actors/exposure.py)."""
    logging.shutdown()
    end_hypercorn_server()
    os._exit(code)


def configured_or_exit(build: Callable[[Settings], T]) -> T:
    """``build`` applied to the environment's settings; when they are wrong (a ConfigError from
    loading or from ``build``), the one line ``Configuration error: …`` on stderr and exit 2."""
    try:
        return build(load_settings())
    except ConfigError as exc:
        refuse_to_start(error_line(exc))
        raise  # not reached: refuse_to_start raises SystemExit


def error_line(error: ConfigError) -> str:
    """The one line a configuration mistake is shown as (start-up, scripts/check_config.py, a reload)."""
    return f"Configuration error: {_shown(error)}"


def _shown(error: ConfigError) -> str:
    """A ConfigError as stderr shows it: ``<VAR>: <why>`` (or ``<subject>: <why>``, e.g. a place in the
    instances file) with the reason redacted, never the name. (Redacting the whole line would take
    ``WEBHOOK_SECRET: required …`` for a credential pair.)"""
    if error.subject is not None and error.reason is not None:
        return f"{error.subject}: {redact(error.reason)}"
    text = str(error)
    name, sep, reason = text.partition(": ")
    if sep and name.replace("_", "").isalnum() and name.upper() == name:
        return f"{name}{sep}{redact(reason)}"
    return redact(text)


def _root_cause(exc: BaseException) -> BaseException:
    """The first real error inside nested exception groups (what an operator needs to read)."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        if not inner:
            break
        exc = inner[0]
    return exc


class Lifecycle:
    """Starts, watches and stops one Service inside the web server's lifespan."""

    def __init__(self, settings: Settings, service: Service | None = None, *,
                 instances: dict[str, Settings] | None = None,
                 exit_process: Callable[[int], None] = exit_process) -> None:
        """Raises ConfigError when ``settings`` must not be served on this process's binds, or when
        the instances file (actors/settings/instances.py) is wrong: before anything is served.
        ``instances`` defaults to that file's (``{}`` without one: single-tenant); ``service`` to
        the configured one; ``exit_process`` is called with FATAL_EXIT_CODE when the service dies
        of an error after start-up (tests pass their own)."""
        check_exposure(settings)
        check_single_process_store(settings)
        self.settings = settings
        self.instances = instances if instances is not None else configured_instances(settings)
        self.service = service if service is not None else Service(settings, instances=self.instances)
        self._exit_process = exit_process

    async def start(self, nursery: trio.Nursery) -> None:
        """Set up logging and open the store, then run the service in ``nursery`` until it is ready."""
        settings = self.settings
        logs = settings.logging
        configure_logging(
            log_dir=logs.log_dir, log_file=logs.log_file, level=logs.log_level, max_bytes=logs.log_max_bytes,
            backup_count=logs.log_backup_count, json_lines=logs.log_json, secrets=self.secret_values(),
            stderr=logs.log_stderr, names=dict.fromkeys(("actors", "runtime", "app", "__main__"), "python-agent"),
            key_field="jid",   # the actor key is the chat's JID, as the seed's lines name it
        )
        try:
            await self.service.store.open()   # Service.run opens it too (idempotent); first here for the one line
        except StoreError as exc:
            # One clear line, then stop the worker at once: raising here would make hypercorn print a
            # traceback, and SystemExit would make it carry on serving without lifespan support.
            hint = ""
            if settings.storage.kind == "sqlite" and "locked by another running process" in str(exc):
                hint = ("; several workers or processes need STORE_URL=postgresql://… "
                        "(one SQLite file serves one process: README, Running several nodes)")
            logging.shutdown()
            end_hypercorn_server(f"Store error: {exc}{hint}")
            os._exit(STORE_EXIT_CODE)
        await nursery.start(self._run)

    def secret_values(self) -> list[str]:
        """Every secret in force, the instances' own included (the log redaction filter's list)."""
        return [*self.settings.secret_values(),
                *(value for instance in self.instances.values() for value in instance.secret_values())]

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the service; if it dies of an error, /health says so and the process exits non-zero."""
        svc = self.service
        try:
            await svc.run(task_status=task_status)
        except Exception as exc:  # noqa: BLE001 - reported, then the process ends
            cause = _root_cause(exc)
            svc.failure = f"{type(cause).__name__}: {cause}"[:300]
            log.critical("Service stopped by a fatal error: %s", svc.failure, exc_info=exc)
            self._exit_process(FATAL_EXIT_CODE)

    async def stop(self) -> None:
        """Stop accepting, give the work in flight SHUTDOWN_GRACE_SECONDS, then stop the service."""
        await self.service.shutdown(self.settings.server.shutdown_grace_seconds)
