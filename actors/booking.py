"""A model's answer: the booking JSON (bare, fenced or embedded) or plain text (docs/behaviour.md §3.5)."""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

_FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL | re.IGNORECASE)
_DECODER = json.JSONDecoder()


@attrs.frozen
class BookingAction:
    motivo: str = ""


def _candidate_objects(text: str) -> list[Any]:
    found: list[Any] = []
    for match in _FENCE.finditer(text):
        try:
            found.append(json.loads(match.group(1)))
        except ValueError:
            pass  # a fenced block that is not JSON is plain text; other candidates are tried
    index = text.find("{")
    while index != -1:
        try:
            obj, _ = _DECODER.raw_decode(text, index)
            found.append(obj)
        except ValueError:
            pass  # not JSON at this brace: keep scanning
        index = text.find("{", index + 1)
    return found


def parse_answer(text: str) -> BookingAction | str:
    """A BookingAction when the answer holds ``{"accion": "reserva", ...}``, else the text unchanged."""
    if "{" not in text:
        return text
    for obj in _candidate_objects(text):
        if isinstance(obj, dict) and str(obj.get("accion", "")).strip().lower() == "reserva":
            motivo = obj.get("motivo")
            return BookingAction(motivo=motivo.strip()[:300] if isinstance(motivo, str) else "")
    return text
