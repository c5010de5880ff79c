"""Evolution API's webhook traffic shape for ``bench/loadgen.py`` (``bench/run.py --shape evolution``).

Evolution POSTs each webhook as it happens, with no limit on the requests in flight, waits 30 s for
the answer and then sends the same body again (2.3.x: up to 10 attempts, backoff 5 s doubling to
300 s; 400/401/403/404/422 are not retried). ``EvolutionSender`` does the same: every POST gets a
connection of its own at once (an idle kept-alive one when there is one, else a new one: no cap),
over a minimal h11 client on trio sockets (an httpx pool costs the load generator O(connections) per
request event, which at thousands of connections would make it the bottleneck).

``--shape evolution-fresh`` is the same without keep-alive: a new connection for every POST, sent
with ``Connection: close`` (what an HTTP client without a keep-alive agent does), so every webhook
costs the server a TCP accept and a connection set-up.
"""

from __future__ import annotations

import json
import time
from typing import Any

import h11
import trio

TIMEOUT_S = 30.0        # Evolution's per-attempt timeout
ATTEMPTS = 10           # Evolution 2.3's attempts per webhook
BACKOFF_S = 5.0         # first wait between attempts, doubling ...
BACKOFF_MAX_S = 300.0   # ... up to this
NOT_RETRIED = {400, 401, 403, 404, 422}
# hypercorn closes a connection idle for its --keep-alive (default 5 s); a client that reuses one
# just then gets a reset. Like Node's keep-alive agents, idle connections older than this are dropped.
IDLE_REUSE_S = 4.0


class Failed(Exception):
    """An attempt that got no HTTP answer (connection refused, reset or closed before the answer)."""


class Connections:
    """Kept-alive HTTP/1.1 connections to one server: a free list of idle ones, never a cap."""

    def __init__(self, host: str, port: int, reuse: bool = True) -> None:
        self.host, self.port, self.reuse = host, port, reuse
        self.idle: list[tuple[float, trio.SocketStream, h11.Connection]] = []
        self.opened = 0
        self.reused = 0
        self.open_now = 0
        self.open_max = 0

    async def _acquire(self) -> tuple[trio.SocketStream, h11.Connection]:
        now = trio.current_time()
        while self.idle:
            since, stream, conn = self.idle.pop()
            if now - since < IDLE_REUSE_S:
                self.reused += 1
                return stream, conn
            await self._close(stream)
        stream = await trio.open_tcp_stream(self.host, self.port)
        self.opened += 1
        self.open_now += 1
        self.open_max = max(self.open_max, self.open_now)
        return stream, h11.Connection(h11.CLIENT)

    async def _close(self, stream: trio.SocketStream) -> None:
        self.open_now -= 1
        with trio.CancelScope(shield=True):
            await stream.aclose()

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """POST ``body`` (JSON); status, lower-cased headers and body. Raises ``Failed`` without an
        answer; a cancellation (the caller's timeout) closes the connection."""
        try:
            stream, conn = await self._acquire()
        except OSError as exc:
            raise Failed(type(exc).__name__) from exc
        reusable = False
        try:
            out = conn.send(h11.Request(method="POST", target=path, headers=[
                ("Host", f"{self.host}:{self.port}"), ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))), *([] if self.reuse else [("Connection", "close")])]))
            out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            await stream.send_all(out)
            status, headers, chunks = 0, {}, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise Failed("ConnectionClosed")
            reusable = self.reuse and conn.our_state is h11.DONE and conn.their_state is h11.DONE
            if reusable:
                conn.start_next_cycle()
            return status, headers, b"".join(chunks)
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise Failed(type(exc).__name__) from exc
        finally:
            if reusable:
                self.idle.append((trio.current_time(), stream, conn))
            else:
                await self._close(stream)

    def stats(self) -> dict[str, int]:
        return {"opened": self.opened, "reused": self.reused, "open_max": self.open_max}

    async def aclose(self) -> None:
        while self.idle:
            await self._close(self.idle.pop()[1])


class EvolutionSender:
    """Sends one webhook the way Evolution does; the harness's ``post`` in the ``evolution`` shape."""

    def __init__(self, url: str, counts: dict[str, int], error_kinds: Any, reuse: bool = True) -> None:
        rest = url.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        self.path = "/" + path
        self.connections = Connections(host, int(port or 80), reuse)
        self.counts, self.error_kinds = counts, error_kinds
        for key in ("acks_over_30s", "resends", "resend_duplicates", "gave_up"):
            counts.setdefault(key, 0)

    async def send(self, msg: Any, body: bytes, deadline: float) -> None:
        """POST until answered (at most ``ATTEMPTS``), backing off like Evolution; sets ``msg.sent``
        (the first attempt's start: the reply latency counts Evolution's waits), ``msg.ack_s`` (the
        answered attempt's round trip), ``msg.acked`` and ``msg.status``."""
        first = 0.0
        for attempt in range(ATTEMPTS):
            if attempt:
                self.counts["resends"] += 1
                msg.retries += 1
                await trio.sleep(min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (attempt - 1)))
            started = time.time()
            first = first or started
            status = 0
            try:
                with trio.fail_after(TIMEOUT_S):
                    status, headers, answer = await self.connections.post(self.path, body)
            except trio.TooSlowError:
                self.counts["acks_over_30s"] += 1
            except Failed as exc:
                self.counts["http_errors"] += 1
                self.error_kinds[str(exc)] += 1
            if status and (status < 500 or status in NOT_RETRIED):
                now = time.time()
                msg.sent, msg.acked, msg.status, msg.ack_s = first, now, status, now - started
                if status != 200:
                    self.counts["http_errors"] += 1
                    return
                reply = json.loads(answer)
                if reply.get("status") == "accepted":
                    return
                if attempt and reply.get("reason") == "duplicate":
                    self.counts["resend_duplicates"] += 1   # an earlier attempt was accepted
                else:
                    self.counts["ignored"] += 1
                return
            if status:
                self.counts["retries_503" if status == 503 else "http_errors"] += 1
            if trio.current_time() > deadline:
                break
        self.counts["gave_up"] += 1   # never acknowledged: it counts as lost

    async def aclose(self) -> None:
        await self.connections.aclose()
