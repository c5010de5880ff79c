"""Parse Evolution API ``messages.upsert`` webhooks, v2 and v1 (docs/behaviour.md §2.2)."""

from __future__ import annotations

from typing import Any

import attrs

from .inbound import InboundMessage
from .jid import InvalidJid, classify

MAX_TEXT_CHARS = 65536


class WebhookError(ValueError):
    """The payload is malformed: answer 400 with this message; nothing is stored."""


@attrs.frozen
class Ignored:
    """A well-formed payload that needs no answer (answered 200 ``ignored``)."""

    reason: str


_CAPTIONED = ("imageMessage", "videoMessage", "documentMessage", "documentWithCaptionMessage")
_SILENT = ("reactionMessage", "protocolMessage", "editedMessage", "senderKeyDistributionMessage",
           "messageContextInfo", "pollUpdateMessage", "keepInChatMessage", "pinInChatMessage")


def _str(obj: dict[str, Any], name: str, *, required: bool = False, where: str = "") -> str:
    value = obj.get(name)
    if value is None:
        if required:
            raise WebhookError(f"missing field {where}{name}")
        return ""
    if not isinstance(value, str):
        raise WebhookError(f"field {where}{name} must be a string")
    return value


def _dict(obj: dict[str, Any], name: str, *, required: bool = False, where: str = "") -> dict[str, Any]:
    value = obj.get(name)
    if value is None:
        if required:
            raise WebhookError(f"missing field {where}{name}")
        return {}
    if not isinstance(value, dict):
        raise WebhookError(f"field {where}{name} must be an object")
    return value


def _text_field(obj: Any, *names: str) -> str:
    if not isinstance(obj, dict):
        return ""
    for name in names:
        value = obj.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return ""


def extract_text(message: dict[str, Any]) -> tuple[str, str]:
    """(text, kind): kind is text | transcript | media (no readable text) | silent."""
    if text := _text_field(message, "conversation"):
        return text, "text"
    if text := _text_field(message.get("extendedTextMessage"), "text"):
        return text, "text"
    if text := _text_field(message, "speechToText"):
        return text, "transcript"
    for name in _CAPTIONED:
        inner = message.get(name)
        if name == "documentWithCaptionMessage" and isinstance(inner, dict):
            inner = _dict(inner, "message").get("documentMessage")
        if text := _text_field(inner, "caption"):
            return text, "text"
    if text := _text_field(message.get("buttonsResponseMessage"), "selectedDisplayText", "selectedButtonId"):
        return text, "text"
    list_reply = message.get("listResponseMessage")
    if text := _text_field(list_reply, "title"):
        return text, "text"
    if isinstance(list_reply, dict) and (text := _text_field(list_reply.get("singleSelectReply"), "selectedRowId")):
        return text, "text"
    if text := _text_field(message.get("templateButtonReplyMessage"), "selectedDisplayText", "selectedId"):
        return text, "text"
    if any(name in message for name in _SILENT):
        return "", "silent"
    return "", "media"


def media_of(message: dict[str, Any], text_kind: str) -> tuple[str, str, int, str]:
    """(media, mimetype, declared size, inline base64) of an image or a voice note (audio without
    Evolution's speechToText); ("", "", 0, "") for anything else. ``message.base64`` is there when
    the webhook is configured with base64 on (Evolution's ``webhookBase64``)."""
    inline = message.get("base64")
    if inline is not None and not isinstance(inline, str):
        raise WebhookError("field data.message.base64 must be a string")
    for name, media in (("imageMessage", "image"), ("audioMessage", "audio")):
        inner = message.get(name)
        if not isinstance(inner, dict) or (media == "audio" and text_kind == "transcript"):
            continue
        mimetype = inner.get("mimetype")
        size = inner.get("fileLength")
        if isinstance(size, str) and size.isdigit():
            size = int(size)
        if isinstance(size, dict):   # protobuf Long as JSON: {"low", "high", "unsigned"}
            low, high = size.get("low", 0), size.get("high", 0)
            size = (high << 32) + (low & 0xFFFFFFFF) if isinstance(low, int) and isinstance(high, int) else 0
        return (media, mimetype[:100] if isinstance(mimetype, str) else "",
                size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0, inline or "")
    return "", "", 0, ""


def _quoted_text(message: dict[str, Any]) -> str:
    for holder in (message.get("extendedTextMessage"), message):
        if not isinstance(holder, dict):
            continue
        context = holder.get("contextInfo")
        if isinstance(context, dict) and isinstance(context.get("quotedMessage"), dict):
            text, _ = extract_text(context["quotedMessage"])
            return text[:2000]
    return ""


def parse_webhook(payload: Any, *, groups_enabled: bool = False) -> InboundMessage | Ignored:
    """Validate a webhook body. Raises WebhookError (→ 400); returns Ignored (→ 200) or the message."""
    if not isinstance(payload, dict):
        raise WebhookError("body must be a JSON object")
    event = payload.get("event")
    if not isinstance(event, str):
        raise WebhookError("missing field event")
    if event.lower().replace("_", ".") != "messages.upsert":
        return Ignored(f"event {event[:40]}")
    instance = _str(payload, "instance")
    data = _dict(payload, "data", required=True)
    key = _dict(data, "key", required=True, where="data.")
    remote = _str(key, "remoteJid", required=True, where="data.key.")
    message_id = _str(key, "id", required=True, where="data.key.")
    if not message_id or len(message_id) > 128:
        raise WebhookError("field data.key.id must be a non-empty string of at most 128 characters")
    from_me = key.get("fromMe", False)
    if not isinstance(from_me, bool):
        raise WebhookError("field data.key.fromMe must be a boolean")
    try:
        kind, jid = classify(remote)
    except InvalidJid as exc:
        raise WebhookError(str(exc)) from None
    message = _dict(data, "message", where="data.")
    push_name = _str(data, "pushName", where="data.")[:100]
    instance_id = _str(data, "instanceId", where="data.")[:100]
    timestamp = data.get("messageTimestamp", 0)
    if isinstance(timestamp, str) and timestamp.isdigit():
        timestamp = int(timestamp)
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or timestamp < 0:
        raise WebhookError("field data.messageTimestamp must be a non-negative number")
    alt = key.get("remoteJidAlt")
    alt_jid = ""
    if isinstance(alt, str) and alt:
        try:
            alt_kind, alt_norm = classify(alt)
            alt_jid = alt_norm if alt_kind in ("user", "lid") else ""
        except InvalidJid:
            alt_jid = ""
    if kind in ("broadcast", "newsletter"):
        return Ignored(kind)
    if kind == "group" and not groups_enabled:
        return Ignored("group")
    text, text_kind = extract_text(message)
    if text_kind == "silent":
        return Ignored("no text (reaction, edit or protocol message)")
    media, mimetype, media_bytes, inline = media_of(message, text_kind)
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS]
    if kind == "group":
        participant = key.get("participant")
        if not isinstance(participant, str) or not participant:
            raise WebhookError("group message without data.key.participant")
    return InboundMessage(
        jid=jid,
        text=text,
        message_id=message_id,
        instance=instance[:100],
        instance_id=instance_id,
        push_name=push_name,
        timestamp=int(timestamp),
        alt_jid=alt_jid,
        quoted_text=_quoted_text(message),
        from_me=from_me,
        kind="media" if text_kind == "media" else ("audio_transcript" if text_kind == "transcript" else "text"),
        media=media,
        mimetype=mimetype,
        media_bytes=media_bytes,
        media_base64=inline,
    )
