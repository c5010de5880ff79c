"""What of a customer's (or the model's) text a log line may carry: LOG_CUSTOMER_TEXT.

Messages are personal data (GDPR, Argentina's Ley 25.326, Brazil's LGPD), so by default a log line
shows only their first 40 characters, with phone-number-like digit runs masked but for their last 4.
The admin endpoints, behind auth, still show the whole window.
"""

from __future__ import annotations

import re

TRUNCATED_CHARS = 40
KEPT_DIGITS = 4
# Seven or more digits, possibly split by spaces, dots, dashes or parentheses, with an optional "+".
_PHONE_LIKE = re.compile(r"\+?\d(?:[\s().-]*\d){6,}")


def _mask(match: re.Match[str]) -> str:
    run = match.group()
    digits = sum(c.isdigit() for c in run)
    hidden = digits - KEPT_DIGITS
    out = []
    for c in run:
        if c.isdigit() and hidden > 0:
            out.append("*")
            hidden -= 1
        else:
            out.append(c)
    return "".join(out)


def log_text(text: str, mode: str) -> str:
    """``text`` as LOG_CUSTOMER_TEXT ``mode`` (full | truncated | off) lets a log line show it."""
    if mode == "full":
        return text
    if mode == "off":
        return f"[{len(text)} characters withheld]"
    # Mask before cutting (a cut run must not show its first digits), but only a prefix twice the
    # shown length: a run ending inside it is masked exactly, a longer one even more (its kept last
    # digits fall past the cut), and a 65,536-character message costs no more than a short one.
    masked = _PHONE_LIKE.sub(_mask, text[:2 * TRUNCATED_CHARS])
    return masked if len(text) <= TRUNCATED_CHARS else masked[:TRUNCATED_CHARS] + "…"
