"""Value types for what arrives from WhatsApp (parsed by ``actors.evolution``)."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class InboundMessage:
    """One customer message, validated. ``jid`` is the chat to answer (device suffix stripped)."""

    jid: str
    text: str
    message_id: str
    instance: str = ""            # the webhook's instance name
    instance_id: str = ""         # the webhook's instance id (uuid)
    push_name: str = ""
    timestamp: int = 0            # messageTimestamp, seconds
    alt_jid: str = ""             # remoteJidAlt: the chat's other form (phone JID ↔ @lid), when known
    quoted_text: str = ""         # text of the quoted message, when the customer replied to one
    from_me: bool = False         # typed on the business phone (human takeover)
    kind: str = "text"            # text | media (no readable text) | audio_transcript
    media: str = ""               # image | audio: a media message whose bytes the model may get (actors/media.py)
    mimetype: str = ""            # the media's, as the webhook declared it
    media_bytes: int = 0          # the media's declared size (fileLength), 0 when unknown
    # the media itself when Evolution sends webhooks with base64 on; never stored (see stored_fields)
    media_base64: str = attrs.field(default="", repr=False, eq=False)

    def stored_fields(self) -> dict[str, Any]:
        """The fields an inbox row keeps: all but the media's bytes (after a restart the media is
        fetched from Evolution again, or the caption answers)."""
        return attrs.asdict(self, filter=lambda field, _: field.name != "media_base64")

    @property
    def instances(self) -> tuple[str, ...]:
        """The webhook's instance id and name, for the outbound candidate list."""
        return tuple(i for i in (self.instance_id, self.instance) if i)
