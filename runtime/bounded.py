"""Bounded tables keyed by what a request sent: past the bound, new keys collapse into one ``other``."""

from __future__ import annotations

from typing import Collection

OTHER = "other"


def bounded_key(table: Collection[str], key: str, limit: int) -> str:
    """``key`` when ``table`` already has it or has room (fewer than ``limit`` keys), else ``other``.

    A table filled only through this function holds at most ``limit + 1`` keys, whatever arrives.
    """
    return key if key in table or len(table) < limit else OTHER
