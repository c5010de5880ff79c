"""bench/evolution_shape.py sends like Evolution: an attempt unanswered past the timeout is counted
and re-sent with the same body, and the service's duplicate answer to the re-send counts as acked."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import h11
import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import evolution_shape  # noqa: E402


class Msg:
    retries = 0
    sent = acked = ack_s = 0.0
    status = 0


async def test_a_timed_out_webhook_is_resent_and_its_duplicate_answer_acks_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evolution_shape, "TIMEOUT_S", 0.3)
    monkeypatch.setattr(evolution_shape, "BACKOFF_S", 0.05)
    bodies: list[bytes] = []

    async def server(stream: trio.SocketStream) -> None:
        """Answers the first POST after 1 s (past the timeout), the next ones at once as duplicates."""
        conn = h11.Connection(h11.SERVER)
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                bodies.append(body)
                first = len(bodies) == 1
                answer = json.dumps({"status": "accepted"} if first else
                                    {"status": "ignored", "reason": "duplicate"}).encode()
                if first:
                    await trio.sleep(1.0)
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                    ("Content-Length", str(len(answer)))])) + conn.send(h11.Data(data=answer))
                    + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
                body = b""

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, server, 0)
        port = listeners[0].socket.getsockname()[1]
        counts = {"http_errors": 0, "retries_503": 0, "ignored": 0}
        sender = evolution_shape.EvolutionSender(f"http://127.0.0.1:{port}/webhook", counts, collections.Counter())
        msg = Msg()
        await sender.send(msg, b'{"k": 1}', trio.current_time() + 60)
        await sender.aclose()
        nursery.cancel_scope.cancel()
    assert bodies == [b'{"k": 1}', b'{"k": 1}']
    assert counts == {"http_errors": 0, "retries_503": 0, "ignored": 0, "acks_over_30s": 1, "resends": 1,
                      "resend_duplicates": 1, "gave_up": 0}
    assert msg.status == 200 and msg.retries == 1 and msg.ack_s < 0.3 and msg.acked > msg.sent
    assert sender.connections.stats()["opened"] == 2   # the timed-out connection is not reused
