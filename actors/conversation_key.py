"""What names one conversation: the Evolution instance (one WhatsApp number) and the chat JID.

A customer who writes to two numbers behind one deployment has two conversations. Its actor key,
and every store row, is the one string ``"<instance>/<jid>"``; ``runtime/`` only sees that string.
It is split at the LAST "/": a JID never contains one, an instance name may.
"""

from __future__ import annotations

import attrs

SEPARATOR = "/"


@attrs.frozen
class ConversationKey:
    """(instance, jid) and the actor key they make."""

    instance: str
    jid: str

    @property
    def key(self) -> str:
        return f"{self.instance}{SEPARATOR}{self.jid}"

    @classmethod
    def parse(cls, key: str) -> "ConversationKey":
        """The key's parts; a key without a separator (never written since the schema 6 migration)
        is a JID with an empty instance."""
        instance, _, jid = key.rpartition(SEPARATOR)
        return cls(instance, jid)


def jid_of(key: str) -> str:
    """The customer's chat JID of an actor key (what logs and JSON bodies show as ``jid``)."""
    return ConversationKey.parse(key).jid


def instance_of(key: str) -> str:
    return ConversationKey.parse(key).instance
