#!/usr/bin/env python3
"""Check the configuration as start-up reads it, without starting anything.

Reads ``config.toml``, ``.env``, the environment and the instances file (INSTANCES_FILE, or
``instances.toml`` beside ``config.toml``) exactly as the service does at start-up, and prints what
it found; a mistake prints the same one line start-up would (``Configuration error: ...``) and exits 2.
Run it before sending SIGHUP to hypercorn's parent: its restarted workers read the file anew, and
one that refuses it ends the process (docs/behaviour.md §9.3).

    .venv/bin/python scripts/check_config.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.lifecycle import configured_or_exit  # noqa: E402
from actors.settings import Settings, configured_instances, instances_path  # noqa: E402


def summary(settings: Settings) -> str:
    """One line: the instances file and its instances, or single-tenant."""
    instances = configured_instances(settings)
    path = instances_path(settings)
    if path is None:
        return "Configuration OK: no instances file (single-tenant)"
    names = ", ".join(instances) or "none"
    return f"Configuration OK: {path}: {len(instances)} instance(s): {names}"


if __name__ == "__main__":
    print(configured_or_exit(summary))
