"""A fake Evolution API v2 (plain ASGI, no framework): ``sendText``, ``sendPresence`` and
``getBase64FromMediaMessage``, scriptable.

In a test::

    fake = FakeEvolution(api_key="k", instances={"prueba-py-agent"})
    async with running_server(fake) as url: ...
    fake.texts()  # [(instance, number, text), ...] in arrival order
    fake.media["3EB0..."] = StoredMedia("image/png", png_bytes)   # what getBase64FromMediaMessage serves

As a process (for the benchmark)::

    python -m tests.fakes.evolution --port 8081 [--api-key k] [--instances a,b] [--fail-every 3] [--latency-ms 20]

``GET /_recorded?since=N`` dumps the accepted ``sendText`` calls (with arrival times), ``DELETE /_recorded``
clears them, ``POST /_script`` with ``{"fail_every", "down_for", "latency", "statuses"}`` changes behaviour.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import time
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, unquote

import attrs
import trio

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@attrs.frozen
class Recorded:
    """One request the fake received. ``at`` is ``trio.current_time()`` (MockClock-friendly), ``wall`` unix time."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    at: float
    wall: float
    status: int
    instance: str = ""
    message_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class StoredMedia:
    """A media message Evolution kept, as ``getBase64FromMediaMessage`` answers it."""

    mimetype: str
    data: bytes
    media_type: str = "imageMessage"
    caption: str | None = None

    def answer(self, message_id: str) -> dict[str, Any]:
        """The body Evolution answers (whatsapp.baileys.service.ts, getBase64FromMediaMessage)."""
        ext = self.mimetype.partition("/")[2].partition(";")[0] or "bin"
        return {"mediaType": self.media_type, "fileName": f"{message_id}.{ext}", "caption": self.caption,
                "size": {"fileLength": str(len(self.data)), "height": None, "width": None},
                "mimetype": self.mimetype, "base64": base64.b64encode(self.data).decode(), "buffer": None}


@attrs.define
class FakeEvolution:
    """Scriptable Evolution API. Instances not in ``instances`` answer 404 (unless ``instances`` is empty:
    then every instance exists). ``statuses`` forces a status per instance; ``fail_every`` k makes every
    k-th ``sendText`` a 500; before ``down_until`` (trio time) every call is a 503; ``invalid_numbers``
    get Evolution's 400 "exists: false". ``instance_keys`` gives an instance its own API key (Evolution's
    per-instance token): sends through that instance are accepted with that key only."""

    api_key: str = "k"
    instance_keys: dict[str, str] = attrs.field(factory=dict)
    instances: set[str] = attrs.field(factory=set, converter=set)
    statuses: dict[str, int] = attrs.field(factory=dict)
    fail_every: int = 0
    down_until: float = float("-inf")
    latency: float = 0.0
    invalid_numbers: set[str] = attrs.field(factory=set)
    presence_blocks: bool = True
    media: dict[str, StoredMedia] = attrs.field(factory=dict)   # key.id → the media Evolution kept
    requests: list[Recorded] = attrs.field(factory=list)
    keep_requests: bool = True      # the benchmark turns this off: only accepted sendText are kept
    sent: list[Recorded] = attrs.field(factory=list)
    _send_count: int = 0
    _ids: Any = attrs.field(factory=lambda: itertools.count(0x3EB0A0C1D2E3))

    # ------------------------------------------------------------------ helpers for tests

    def texts(self) -> list[tuple[str, str, str]]:
        """Accepted sendText calls as (instance, number, text), in arrival order."""
        return [(r.instance, r.json["number"], r.json["text"]) for r in self.sent]

    def calls(self, prefix: str) -> list[Recorded]:
        """Every recorded request whose path starts with ``prefix`` (any status)."""
        return [r for r in self.requests if r.path.startswith(prefix)]

    def down_for(self, seconds: float) -> None:
        self.down_until = trio.current_time() + seconds

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if path == "/_recorded":
            await self._recorded(method, scope, send)
            return
        if path == "/_script" and method == "POST":
            self._script(_json_or_none(body) or {})
            await _respond(send, 200, {"ok": True})
            return
        payload = _json_or_none(body)
        arrived, wall = trio.current_time(), time.time()
        status, answer, instance, message_id = await self._handle(method, path, headers, payload)
        record = Recorded(method, path, headers, payload, arrived, wall, status, instance, message_id)
        if self.keep_requests:
            self.requests.append(record)
        if path.startswith("/message/sendText/") and 200 <= status < 300:
            self.sent.append(record)
        await _respond(send, status, answer)

    async def _handle(self, method: str, path: str, headers: dict[str, str],
                      payload: Any) -> tuple[int, Any, str, str]:
        if self.latency:
            await trio.sleep(self.latency)
        parts = path.strip("/").split("/")
        if method != "POST" or len(parts) != 3 or (parts[0], parts[1]) not in (
                ("message", "sendText"), ("chat", "sendPresence"), ("chat", "getBase64FromMediaMessage")):
            return 404, _error(404, "Not Found", [f"Cannot {method} {path}"]), "", ""
        instance = unquote(parts[2])
        if trio.current_time() < self.down_until:
            return 503, {"status": 503, "error": "Service Unavailable", "response": {"message": "down"}}, instance, ""
        if headers.get("apikey") != self.instance_keys.get(instance, self.api_key):
            return 401, _error(401, "Unauthorized", "Unauthorized"), instance, ""
        if self.instances and instance not in self.instances:
            return 404, _error(404, "Not Found", [f'The "{instance}" instance does not exist']), instance, ""
        forced = self.statuses.get(instance)
        if forced is not None:
            return forced, _error(forced, "Forced", [f"scripted {forced}"]), instance, ""
        if parts[1] == "getBase64FromMediaMessage":
            return self._media(payload, instance)
        if not isinstance(payload, dict) or not isinstance(payload.get("number"), str) or not payload["number"]:
            return 400, _error(400, "Bad Request", ["number must be a string"]), instance, ""
        number = payload["number"]
        if parts[1] == "sendPresence":
            if payload.get("presence") not in ("composing", "recording", "paused", "available", "unavailable"):
                return 400, _error(400, "Bad Request", ["presence is invalid"]), instance, ""
            delay = payload.get("delay")
            if self.presence_blocks and isinstance(delay, (int, float)) and delay > 0:
                await trio.sleep(delay / 1000)  # like Evolution: the call returns after the delay
            return 201, {"presence": payload["presence"]}, instance, ""
        if not isinstance(payload.get("text"), str) or not payload["text"]:
            return 400, _error(400, "Bad Request", ["text is required"]), instance, ""  # e.g. the v1 body
        if number in self.invalid_numbers:
            jid = number if "@" in number else f"{number}@s.whatsapp.net"
            return 400, _error(400, "Bad Request", [{"jid": jid, "exists": False, "number": number}]), instance, ""
        self._send_count += 1
        if self.fail_every and self._send_count % self.fail_every == 0:
            return 500, _error(500, "Internal Server Error", "scripted failure"), instance, ""
        message_id = f"{next(self._ids):X}"
        remote = number if "@" in number else f"{number}@s.whatsapp.net"
        return 201, {
            "key": {"remoteJid": remote, "fromMe": True, "id": message_id},
            "pushName": "",
            "status": "PENDING",
            "message": {"conversation": payload["text"]},
            "contextInfo": None,
            "messageType": "conversation",
            "messageTimestamp": int(time.time()),
            "instanceId": "00000000-0000-4000-8000-000000000000",
            "source": "unknown",
        }, instance, message_id

    def _media(self, payload: Any, instance: str) -> tuple[int, Any, str, str]:
        """``{"message": {"key": {"id"}}, "convertToMp4": bool}`` → 201 with the media; Evolution's
        400 (its BadRequestException) when it did not keep the message."""
        message = payload.get("message") if isinstance(payload, dict) else None
        key = message.get("key") if isinstance(message, dict) else None
        message_id = key.get("id") if isinstance(key, dict) else None
        if not isinstance(message_id, str) or not message_id:
            return 400, _error(400, "Bad Request", ["TypeError: Cannot read properties of undefined (reading 'key')"]), \
                instance, ""
        stored = self.media.get(message_id)
        if stored is None:
            return 400, _error(400, "Bad Request", ["Message not found"]), instance, message_id
        return 201, stored.answer(message_id), instance, message_id

    async def _recorded(self, method: str, scope: Scope, send: Send) -> None:
        if method == "DELETE":
            self.sent.clear()
            self.requests.clear()
            await _respond(send, 200, {"ok": True})
            return
        query = parse_qs(scope.get("query_string", b"").decode())
        since = int(query.get("since", ["0"])[0])
        sent = [r.to_dict() for r in self.sent[since:]]
        await _respond(send, 200, {"sent": sent, "total": len(self.sent), "requests": len(self.requests)})

    def _script(self, script: dict[str, Any]) -> None:
        if "fail_every" in script:
            self.fail_every = int(script["fail_every"])
        if "down_for" in script:
            self.down_for(float(script["down_for"]))
        if "latency" in script:
            self.latency = float(script["latency"])
        if "statuses" in script:
            self.statuses = {str(k): int(v) for k, v in dict(script["statuses"]).items()}


def _error(status: int, error: str, message: Any) -> dict[str, Any]:
    return {"status": status, "error": error, "response": {"message": message}}


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        event = await receive()
        if event["type"] != "http.request":
            break
        chunks.append(event.get("body", b""))
        if not event.get("more_body"):
            break
    return b"".join(chunks)


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


async def _respond(send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


def main(argv: list[str] | None = None) -> None:
    from hypercorn.trio import serve

    from tests.fakes.server import hypercorn_config

    parser = argparse.ArgumentParser(description="Fake Evolution API v2 (sendText, sendPresence)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", default="k")
    parser.add_argument("--instances", default="", help="comma-separated; empty: every instance exists")
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--record-all", action="store_true", help="also keep every request, not only accepted sends")
    args = parser.parse_args(argv)
    fake = FakeEvolution(api_key=args.api_key, instances={i for i in args.instances.split(",") if i},
                         fail_every=args.fail_every, latency=args.latency_ms / 1000, keep_requests=args.record_all)
    print(f"fake evolution listening on http://{args.host}:{args.port}", flush=True)
    trio.run(serve, fake, hypercorn_config(f"{args.host}:{args.port}"))


if __name__ == "__main__":
    main()
