"""Split a long reply into WhatsApp-sized parts at the most natural boundary available."""

from __future__ import annotations

import re
import unicodedata

# Ends of a sentence: terminal punctuation (optionally closed by quotes/brackets) followed by whitespace.
_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’»)\]]*(?=\s)")
# Characters a hard cut must not land in front of (they attach to the previous character).
_JOINERS = {"\u200d", "\ufe0f", "\ufe0e"}


def split_text(text: str, limit: int) -> list[str]:
    """Return ``text`` as parts of at most ``limit`` characters, in order.

    A text of ``limit`` characters or fewer comes back unchanged as the only part. A longer one is cut at
    the last paragraph break (blank line) that fits, else the last line break, else the last sentence end,
    else the last space, else hard at ``limit`` (never between a character and its combining mark or
    joiner). Whitespace at a cut is dropped and no part is empty or whitespace only.
    Raises ``ValueError`` when ``limit`` is less than 1.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if len(text) <= limit:
        return [text]
    parts: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut, resume = _cut_point(rest, limit)
        part = rest[:cut].rstrip()
        if part:
            parts.append(part)
        rest = rest[resume:].lstrip()
    if rest:
        parts.append(rest)
    return parts


def _cut_point(text: str, limit: int) -> tuple[int, int]:
    """Where to end the current part and where the next one starts (``len(text) > limit``)."""
    window = text[: limit + 1]  # a separator right after the limit still allows a full-length part
    for separator in ("\n\n", "\n"):
        index = window.rfind(separator, 1, limit + 1)
        if index > 0 and text[:index].strip():
            return index, index + len(separator)
    last_sentence = None
    for match in _SENTENCE_END.finditer(text, 0, limit + 1):
        if match.end() <= limit:
            last_sentence = match
    if last_sentence is not None:
        return last_sentence.end(), last_sentence.end()
    index = max(window.rfind(" ", 1, limit + 1), window.rfind("\t", 1, limit + 1))
    if index > 0 and text[:index].strip():
        return index, index + 1
    cut = limit
    while cut > 1 and (unicodedata.combining(text[cut]) or text[cut] in _JOINERS or text[cut - 1] == "\u200d"
                       or _is_low_surrogate(text[cut])):
        cut -= 1
    return cut, cut


def _is_low_surrogate(char: str) -> bool:
    return "\udc00" <= char <= "\udfff"
