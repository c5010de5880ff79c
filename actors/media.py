"""A customer's photo for the model: whether it goes to the model at all, where its bytes come from,
and what the window keeps instead of them (docs/behaviour.md §3.6).

An image goes to the model as an image part (the caption as its text) when some provider of the
chain takes images (``*_VISION``) and it is at most MEDIA_MAX_BYTES. Its bytes come from the
webhook's own ``message.base64`` (Evolution's webhook with base64 on; the only source in local mode),
else from Evolution's ``getBase64FromMediaMessage`` through the outbound transport (bounded and timed
out there). Anything else, a failed fetch included, is logged and leaves the caption alone; the
window always keeps ``[imagen] <caption>``, never the bytes.
"""

from __future__ import annotations

import base64
import binascii
import logging

import attrs

from .inbound import InboundMessage
from .llm.base import ImagePart, ProviderError
from .llm.transcribe import Transcriber
from .outbound.transport import Transport
from .prompts import Texts
from .settings import Settings

log = logging.getLogger(__name__)
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})   # what all three APIs take


def vision_providers(settings: Settings) -> frozenset[str]:
    """The providers of the chain whose configured model may be sent images."""
    return frozenset(name for name in settings.llm.provider_order if settings.llm.vision(name))


def wants_model(settings: Settings, message: InboundMessage) -> bool:
    """Whether ``message``'s media is for the model: an image some provider can see, not declared
    larger than MEDIA_MAX_BYTES, or a voice note with TRANSCRIBE_PROVIDER on."""
    if message.media == "audio":
        return settings.conversation.transcribe_provider != "off"
    if message.media != "image" or message.media_bytes > settings.conversation.media_max_bytes:
        return False
    return bool(vision_providers(settings))


def window_text(texts: Texts, message: InboundMessage) -> str:
    """What the window keeps of ``message``: ``[imagen] <caption>`` for an image, else its text."""
    if message.media == "image":
        return f"{texts.image_label} {message.text}".rstrip()
    return message.text


class MediaSource:
    """Fetches a message's media bytes: the webhook's base64, else the transport (Evolution). Each
    call gets the settings of the message's instance (MEDIA_MAX_BYTES, TRANSCRIBE_PROVIDER, *_VISION)."""

    def __init__(self, transport: Transport | None, transcriber: Transcriber | None = None) -> None:
        self._transport = transport
        self._transcriber = transcriber

    async def transcribed(self, message: InboundMessage, texts: Texts, settings: Settings) -> InboundMessage:
        """A voice note as the text message ``[audio] <transcript>`` (TRANSCRIBE_PROVIDER); unchanged
        (answered as unreadable media) when it is off, too large or the audio or transcript cannot be had."""
        if message.media != "audio" or self._transcriber is None or not wants_model(settings, message):
            return message
        if message.media_bytes > settings.conversation.media_max_bytes:
            log.info("Media: %s's voice note is over MEDIA_MAX_BYTES: not transcribed", message.jid)
            return message
        media = await self.fetch(message, settings)
        if media is None:
            return message
        mimetype, data = media
        try:
            text = await self._transcriber.transcribe(data, mimetype or message.mimetype or "audio/ogg")
        except ProviderError as exc:
            log.warning("Media: transcribing %s's voice note with %s failed: %s", message.jid, self._transcriber.name, exc)
            return message
        log.info("Media: transcribed %s's voice note (%d bytes → %d characters)", message.jid, len(data), len(text))
        return attrs.evolve(message, text=f"{texts.audio_label} {text}", kind="audio_transcript", media="")

    async def image(self, message: InboundMessage, texts: Texts, settings: Settings) -> ImagePart | None:
        """The image of ``message`` for the model, or None (logged: the caption answers alone)."""
        media = await self.fetch(message, settings)
        if media is None:
            return None
        mimetype, data = media
        mimetype = mimetype.partition(";")[0].strip().lower() or message.mimetype
        if mimetype not in IMAGE_TYPES:
            log.warning("Media: image of %s has type %r, which the models do not take: caption alone",
                        message.jid, mimetype[:40])
            return None
        return ImagePart(mimetype, data, alt=texts.image_label)

    async def fetch(self, message: InboundMessage, settings: Settings) -> tuple[str, bytes] | None:
        """(mimetype, bytes) of ``message``'s media, or None when it cannot be had (logged)."""
        limit = settings.conversation.media_max_bytes
        if message.media_base64:
            try:
                data = base64.b64decode(message.media_base64, validate=True)
            except (binascii.Error, ValueError):
                log.warning("Media: the webhook's base64 for %s (%s) is not valid base64", message.jid, message.message_id)
                return None
            if len(data) > limit:
                log.info("Media: %s's %s is %d bytes, over MEDIA_MAX_BYTES (%d): caption alone",
                         message.jid, message.media, len(data), limit)
                return None
            return message.mimetype, data
        if self._transport is None:
            return None
        error = ""
        for candidate in dict.fromkeys(i for i in (message.instance, message.instance_id) if i):
            outcome = await self._transport.fetch_media(candidate, message.message_id, limit)
            if outcome.ok:
                return outcome.mimetype or message.mimetype, outcome.data
            error = outcome.error or f"HTTP {outcome.status}"
            if outcome.status in (400, 413) or outcome.status == 0 and "local mode" in error:
                break   # not kept by Evolution, too large, or nothing to fetch from: no other candidate helps
        log.warning("Media: could not fetch the %s of %s (%s): %s", message.media or "media", message.jid,
                    message.message_id, error or "no instance to fetch it through")
        return None


async def turn_images(source: MediaSource | None, settings: Settings, texts: Texts,
                      messages: list[InboundMessage]) -> tuple[ImagePart, ...] | None:
    """The images of a turn's messages for the model; None when the turn is only images without a
    caption and none of them could be had (it is answered with the media-failed text)."""
    wanted = [m for m in messages if m.media == "image" and wants_model(settings, m)]
    images = []
    for message in wanted:
        image = await source.image(message, texts, settings) if source is not None else None
        if image is not None:
            images.append(image)
    if not images and wanted and all(not m.text for m in messages):
        return None
    return tuple(images)
