"""Reloading the instances file into a running service (``POST /instances/reload``).

The file is found by start-up's own rules (INSTANCES_FILE, else ``instances.toml`` beside
``config.toml``: actors/settings/instances.py) and read the same way, its ``<setting>_env`` secrets
from the process environment, then ``.env`` read anew. Only when the whole file is good are the
instances swapped (``Tenants.replace``): a turn reads its instance's settings once, at its start, so
every conversation uses the new ones from its next turn, and nothing queued or in flight is dropped
or repeated. A bad file (or none) changes nothing: :class:`ReloadRefused` carries the one line
start-up would print.

What a reload cannot change: the process-wide settings (config.toml, .env and the environment are
not re-read, and the file refuses them). An instance's CRM switch is one of its settings: a reload
turns lead registration on or off for it (the Krayin server and token are process-wide).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from runtime.logs import add_secret

from .lifecycle import error_line
from .settings import DEFAULT_CONFIG_FILE, ConfigError, Settings, instances_path, load_instances
from .settings.loading import Dotenv
from .settings.instances import DEFAULT_NAME
from .settings.sections import setting_fields

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)


class ReloadRefused(Exception):
    """The file is missing or wrong: the settings in force are kept. ``str()`` is the one line to show."""


@attrs.frozen
class Reloaded:
    """What a reload put in force, compared with what was."""

    file: str
    instances: tuple[str, ...]                   # in file order
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: dict[str, tuple[str, ...]]         # instance -> the settings that differ (names, never values)


async def reload_instances(service: "Service", settings: Settings, *, config_file: Path = DEFAULT_CONFIG_FILE,
                           dotenv_file: Dotenv = ...) -> Reloaded:
    """Read the instances file again and put it in force in ``service``; raises ReloadRefused."""
    path = instances_path(settings, config_file)
    if path is None:
        raise _refused("no instances file to reload: INSTANCES_FILE is unset and there is no "
                       f"{config_file.parent / DEFAULT_NAME} (copy instances.example.toml there)")
    try:   # file and .env reads off the event loop
        new = await trio.to_thread.run_sync(lambda: load_instances(settings, path, dotenv_file=dotenv_file))
    except ConfigError as exc:
        raise _refused(error_line(exc)) from None
    tenants = service.tenants
    old = tenants.configured()
    for instance in new.values():          # before anything can log with them
        for secret in instance.secret_values():
            add_secret(secret)
    tenants.replace(new)
    result = Reloaded(
        file=str(path), instances=tuple(new),
        added=tuple(name for name in new if name not in old),
        removed=tuple(name for name in old if name not in new),
        changed={name: fields for name in new if name in old and (fields := changed_settings(old[name], new[name]))},
    )
    log.info("Instances file reloaded from %s: %d instance(s) (added: %s; removed: %s; changed: %s)",
             path, len(new), ", ".join(result.added) or "none", ", ".join(result.removed) or "none",
             ", ".join(result.changed) or "none")
    return result


def changed_settings(before: Settings, after: Settings) -> tuple[str, ...]:
    """The per-instance settings whose values differ (by name: a secret's value is never shown)."""
    return tuple(f.name for section, f in setting_fields() if f.metadata["per_instance"]
                 and getattr(getattr(before, section), f.name) != getattr(getattr(after, section), f.name))


def _refused(line: str) -> ReloadRefused:
    log.warning("Instances reload refused, the settings in force are kept: %s", line)
    return ReloadRefused(line)
