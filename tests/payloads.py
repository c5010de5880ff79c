"""Builders of real Evolution API webhook payloads for tests and benchmarks."""

from __future__ import annotations

import itertools
from typing import Any

_ids = itertools.count(1)


def upsert(
    text: str | None = "Hola",
    *,
    jid: str = "5491131376731@s.whatsapp.net",
    message_id: str | None = None,
    from_me: bool = False,
    instance: str = "prueba-py-agent",
    push_name: str = "Juan",
    timestamp: int = 1769000000,
    message: dict[str, Any] | None = None,
    **key_extra: Any,
) -> dict[str, Any]:
    """A real Evolution API v2 ``messages.upsert`` payload (docs/behaviour.md §2.2)."""
    return {
        "event": "messages.upsert",
        "instance": instance,
        "data": {
            "key": {"remoteJid": jid, "fromMe": from_me, "id": message_id or f"3EB0{next(_ids):012X}",
                    "participant": None, "addressingMode": "pn", **key_extra},
            "pushName": push_name,
            "status": "DELIVERY_ACK",
            "message": message if message is not None else {"conversation": text},
            "messageType": "conversation",
            "messageTimestamp": timestamp,
            "instanceId": "b6b7c0de-0000-4000-8000-000000000001",
            "source": "android",
        },
        "destination": "http://127.0.0.1:5000/webhook",
        "date_time": "2026-01-20T00:50:06.000Z",
        "sender": "5491100000000@s.whatsapp.net",
        "server_url": "https://evolution.example.com",
        "apikey": None,
    }


def image_upsert(caption: str | None = None, *, mimetype: str = "image/png", file_length: int = 67,
                 inline: bytes | None = None, **kw: Any) -> dict[str, Any]:
    """An ``imageMessage`` upsert as Evolution v2 posts it (the URL is encrypted WhatsApp media);
    ``inline``: the bytes as ``message.base64``, as Evolution sends them with webhook base64 on."""
    import base64

    image: dict[str, Any] = {"url": "https://mmg.whatsapp.net/o1/v/t62.7118-24/f1/m232/enc", "mimetype": mimetype,
                             "fileSha256": "x0V0", "fileLength": str(file_length), "height": 1, "width": 1,
                             "mediaKey": "k3y", "directPath": "/o1/v/t62.7118-24/f1/m232/enc"}
    if caption is not None:
        image["caption"] = caption
    message: dict[str, Any] = {"imageMessage": image}
    if inline is not None:
        message["base64"] = base64.b64encode(inline).decode()
    payload = upsert(None, message=message, **kw)
    payload["data"]["messageType"] = "imageMessage"
    return payload


def audio_upsert(*, mimetype: str = "audio/ogg; codecs=opus", file_length: int = 4000, seconds: int = 3,
                 inline: bytes | None = None, **kw: Any) -> dict[str, Any]:
    """A voice note (``audioMessage`` with ``ptt``) upsert, without Evolution's speechToText."""
    import base64

    message: dict[str, Any] = {"audioMessage": {"url": "https://mmg.whatsapp.net/v/t62.7117-24/enc", "mimetype": mimetype,
                                                "fileLength": str(file_length), "seconds": seconds, "ptt": True,
                                                "mediaKey": "k3y"}}
    if inline is not None:
        message["base64"] = base64.b64encode(inline).decode()
    payload = upsert(None, message=message, **kw)
    payload["data"]["messageType"] = "audioMessage"
    return payload
