"""The generic-message rule (docs/behaviour.md §3.6): greetings and thanks that need no answer after a booking."""

from __future__ import annotations

import re
import unicodedata

GENERIC_PHRASES = (
    "hola", "hello", "hi", "hey", "buenas", "buenos dias", "buen dia", "buenas tardes", "buenas noches",
    "gracias", "muchas gracias", "mil gracias", "thanks", "thank you", "thx", "ok", "okay", "oki", "okey",
    "dale", "perfecto", "excelente", "genial", "listo", "entendido", "chau", "chao", "adios", "bye",
    "hasta luego", "de nada", "vale", "bueno", "super",
)
_MAX_CHARS = 20
# Longer texts are never generic nor a reset keyword, and are not normalised at all: normalising a
# 65,536-character message costs ~30 ms of the event loop (measured by bench/loop_block.py).
MAX_SCANNED_CHARS = 500
_PHRASES = sorted((tuple(p.split()) for p in GENERIC_PHRASES), key=len, reverse=True)


def normalise(text: str) -> str:
    """Lower case, accents removed, emoji and punctuation dropped, spaces collapsed."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    kept = []
    for char in decomposed:
        if unicodedata.combining(char):
            continue
        kept.append(char if char.isalnum() else " ")
    return " ".join("".join(kept).split())


def _made_of_phrases(words: list[str]) -> bool:
    if not words:
        return False
    reachable = [False] * (len(words) + 1)
    reachable[0] = True
    for start in range(len(words)):
        if not reachable[start]:
            continue
        for phrase in _PHRASES:
            end = start + len(phrase)
            if end <= len(words) and tuple(words[start:end]) == phrase:
                reachable[end] = True
    return reachable[len(words)]


_REPEATS = re.compile(r"(.)\1{2,}")


def is_generic_message(text: str) -> bool:
    """True for short greetings/thanks with no question, e.g. "ok gracias", "Hola!!", "Gracias 🙏".

    Never generic: anything with a "?", 20 or more characters after normalising, or a word
    outside the generic list ("¿puedo cambiar la fecha?" is a real question).
    """
    if "?" in text or "¿" in text or len(text) > MAX_SCANNED_CHARS:
        return False
    normal = normalise(text)
    if not normal or len(normal) >= _MAX_CHARS:
        return False
    words = [_REPEATS.sub(r"\1", word) for word in normal.split()]
    return _made_of_phrases(words) or _made_of_phrases(normal.split())
