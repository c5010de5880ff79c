"""WhatsApp JID grammar (docs/behaviour.md §2.4): which chats exist and how they are addressed."""

from __future__ import annotations

import re

_USER = re.compile(r"^(\d{5,20})(?::\d{1,4})?@s\.whatsapp\.net$")
_LID = re.compile(r"^(\d{5,20})(?::\d{1,4})?@lid$")
_GROUP = re.compile(r"^[\d-]{5,40}@g\.us$")
_NEWSLETTER = re.compile(r"^\d{5,30}@newsletter$")
_BROADCAST = re.compile(r"^[\w.-]{1,40}@broadcast$")


class InvalidJid(ValueError):
    """The remoteJid is outside the grammar: the webhook answers 400."""


def classify(jid: str) -> tuple[str, str]:
    """Return (kind, normalised jid) where kind is user | lid | group | newsletter | broadcast.

    A ``:device`` suffix is stripped. Raises InvalidJid for anything else.
    """
    if not isinstance(jid, str) or len(jid) > 80:
        raise InvalidJid("remoteJid must be a WhatsApp JID")
    if m := _USER.match(jid):
        return "user", f"{m.group(1)}@s.whatsapp.net"
    if m := _LID.match(jid):
        return "lid", f"{m.group(1)}@lid"
    if _GROUP.match(jid):
        return "group", jid
    if _NEWSLETTER.match(jid):
        return "newsletter", jid
    if _BROADCAST.match(jid):
        return "broadcast", jid
    raise InvalidJid("remoteJid must be <digits>@s.whatsapp.net, <digits>@lid, a group, broadcast or newsletter JID")


def is_chat_jid(jid: str) -> bool:
    """Whether ``jid`` is a normalised one-to-one chat JID (for admin path validation)."""
    try:
        kind, normal = classify(jid)
    except InvalidJid:
        return False
    return kind in ("user", "lid", "group") and normal == jid


def phone_of(jid: str) -> str | None:
    """The phone digits of a ``@s.whatsapp.net`` JID; None for @lid and anything else (never guessed)."""
    m = _USER.match(jid)
    return m.group(1) if m else None


def is_group(jid: str) -> bool:
    """Whether ``jid`` is a group chat."""
    return jid.endswith("@g.us")
