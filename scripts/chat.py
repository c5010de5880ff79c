#!/usr/bin/env python3
"""Talk to the running service as a WhatsApp customer, in the terminal.

Each line you type is POSTed to /webhook as a real Evolution API ``messages.upsert`` payload;
the bot's replies are read back from the local outbox (``/outbox``, the embedded default when
EVOLUTION_API_URL is unset). Commands: ``/image PATH [caption]`` sends a photo (an ``imageMessage``
carrying its bytes in ``message.base64``, as Evolution does with webhook base64 on), ``/state``
shows the conversation state, ``/quit`` exits. ``--image PATH`` (with ``--caption``) sends one photo
first. A photo reaches the model only with a vision provider configured (e.g. OPENAI_VISION=true).
``--instance`` is the Evolution instance (WhatsApp number) the messages come to: with an instances
file, one of its instances, so that its assistant answers.

    python scripts/chat.py [--url http://127.0.0.1:5000] [--phone 5491131376731] [--name Juan] [--instance acme-bot]
                           [--image photo.jpg [--caption "¿tiene arreglo?"]]
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import mimetypes
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def payload(jid: str, text: str, name: str, message_id: str, instance: str) -> dict[str, Any]:
    return {
        "event": "messages.upsert",
        "instance": instance,
        "data": {
            "key": {"remoteJid": jid, "fromMe": False, "id": message_id},
            "pushName": name,
            "message": {"conversation": text},
            "messageType": "conversation",
            "messageTimestamp": int(time.time()),
        },
    }


def image_payload(jid: str, path: Path, caption: str, name: str, message_id: str, instance: str) -> dict[str, Any]:
    """An ``imageMessage`` upsert with the file's bytes in ``message.base64``."""
    data = path.read_bytes()
    mimetype = mimetypes.guess_type(path.name)[0] or "image/jpeg"
    image: dict[str, Any] = {"mimetype": mimetype, "fileLength": str(len(data))}
    if caption:
        image["caption"] = caption
    body = payload(jid, "", name, message_id, instance)
    body["data"]["message"] = {"imageMessage": image, "base64": base64.b64encode(data).decode()}
    body["data"]["messageType"] = "imageMessage"
    return body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("AGENT_URL", f"http://127.0.0.1:{os.environ.get('PORT', '5000')}"))
    parser.add_argument("--phone", default="5491131376731", help="the customer's phone digits")
    parser.add_argument("--name", default="Juan", help="the customer's WhatsApp name (pushName)")
    parser.add_argument("--instance", default="chat-console",
                        help="the Evolution instance the messages come to (an instances file's name)")
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a turn to finish")
    parser.add_argument("--image", type=Path, help="send this photo first (then chat on)")
    parser.add_argument("--caption", default="", help="the --image's caption")
    parser.add_argument("--once", action="store_true", help="exit after the --image's answer")
    args = parser.parse_args()

    jid = f"{args.phone}@s.whatsapp.net"
    headers = {"Authorization": f"Bearer {os.environ['ADMIN_TOKEN']}"} if os.environ.get("ADMIN_TOKEN") else {}
    if os.environ.get("WEBHOOK_SECRET"):
        headers["x-webhook-token"] = os.environ["WEBHOOK_SECRET"]
    client = httpx.Client(base_url=args.url, headers=headers, timeout=10.0)
    try:
        client.get("/health").raise_for_status()
    except httpx.HTTPError as exc:
        print(f"The service is not reachable at {args.url}: {exc}", file=sys.stderr)
        return 1

    def state() -> httpx.Response:
        """This conversation (the chat in ``--instance``) as ``/actors/{jid}`` shows it."""
        return client.get(f"/actors/{jid}", params={"instance": args.instance})

    def counters() -> tuple[int, int, bool]:
        """(messages handled, replies sent, a turn under way or queued) of this chat's conversation.
        The counters of a live chat move during its turn (messages first, replies when the model has
        answered): they are only final once the actor is no longer busy."""
        response = state()
        if response.status_code == 404:
            return 0, 0, False
        response.raise_for_status()
        body = response.json()
        fields = body["state"]
        busy = body.get("status") == "running" or bool(body.get("mailbox_depth"))
        return int(fields["messages_in"]), int(fields["replies_out"]), busy

    def outbox_after(seq: int) -> list[dict[str, Any]]:
        response = client.get("/outbox", params={"jid": jid, "after": seq})
        response.raise_for_status()
        return response.json()

    last_seq = max((e["seq"] for e in outbox_after(0)), default=0)
    ids = (f"CHAT{int(time.time())}{n:06d}" for n in itertools.count())
    print(f"Chatting as {args.name} ({jid}) with {args.url}, instance {args.instance}. /image PATH [caption] "
          "sends a photo, /state shows the conversation, /quit exits.")
    first = f"/image {shlex.quote(str(args.image))} {args.caption}".strip() if args.image else None
    while True:
        if first is not None:
            text, first = first, None
        elif args.once and args.image:
            return 0
        else:
            try:
                text = input("tú> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
        if not text:
            continue
        if text == "/quit":
            return 0
        if text == "/state":
            print(json.dumps(state().json(), ensure_ascii=False, indent=2))
            continue
        if text.startswith("/image"):
            words = shlex.split(text[len("/image"):])
            path = Path(words[0]) if words else None
            if path is None or not path.is_file():
                print("[usage: /image PATH [caption], PATH an image file]")
                continue
            body = image_payload(jid, path, " ".join(words[1:]), args.name, next(ids), args.instance)
            print(f"[photo {path.name}, {path.stat().st_size} bytes]")
        else:
            body = payload(jid, text, args.name, next(ids), args.instance)
        handled, replied, _ = counters()
        response = client.post("/webhook", json=body)
        if response.status_code != 200 or response.json().get("status") != "accepted":
            print(f"[webhook answered {response.status_code}: {response.text}]")
            continue
        deadline = time.monotonic() + args.wait
        while ((now := counters())[0] <= handled or now[2]) and time.monotonic() < deadline:
            time.sleep(0.1)
        expected = now[1] - replied
        entries: list[dict[str, Any]] = []
        while len(entries) < expected and time.monotonic() < deadline:
            entries = outbox_after(last_seq)
            if len(entries) < expected:
                time.sleep(0.1)
        for entry in entries:
            print(f"bot> {entry['text']}")
            last_seq = entry["seq"]
        if now[0] <= handled:
            print(f"[no answer within {args.wait:.0f}s]")
        elif not expected:
            print("[no reply: the conversation is finished after the booking link (a generic message)]")


if __name__ == "__main__":
    sys.exit(main())
