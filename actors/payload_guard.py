"""A webhook body from bytes to a JSON value the service can trust the shape of.

JSON is UTF-8 (RFC 8259; a BOM is tolerated), nested at most MAX_JSON_DEPTH levels (a deep body
would make every later walk over it costly), and free of unpaired UTF-16 surrogates: ``\\ud800`` is
valid JSON but not Unicode, and would fail every later encode (logs, the store, the LLM SDKs).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

MAX_JSON_DEPTH = 32
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadPayload(ValueError):
    """The body is not one the service reads; the message says why (it is answered with a 400)."""


def decode_payload(raw: bytes) -> Any:
    """The JSON value in ``raw``, with unpaired surrogates replaced by U+FFFD; BadPayload otherwise."""
    try:
        text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError:
        raise BadPayload("body is not valid UTF-8") from None
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        raise BadPayload("body is not valid JSON") from None
    if _depth(payload, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise BadPayload(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(text):
        payload = map_strings(payload, _without_surrogates)
    return payload


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping at ``limit + 1``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        if isinstance(node, dict):
            stack.extend((child, level + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, level + 1) for child in node)
    return deepest


def map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """``value`` (decoded JSON) with ``change`` applied to every string in it, keys included."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [map_strings(item, change) for item in value]
    if isinstance(value, dict):
        return {map_strings(k, change): map_strings(v, change) for k, v in value.items()}
    return value


def _without_surrogates(text: str) -> str:
    """Every unpaired UTF-16 surrogate (valid in JSON, not in Unicode) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)
