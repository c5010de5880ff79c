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
