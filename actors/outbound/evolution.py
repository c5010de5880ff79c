"""The Evolution API v2 transport: ``sendText``, ``sendPresence`` and ``getBase64FromMediaMessage`` over
HTTP, bounded and timed out.

A thin adapter: it knows the paths, the bodies, the ``apikey`` header and how Evolution words its
errors, and never raises for an HTTP or network failure (the outcome carries it). Which instance to
try, when to retry and how fast to send is the supervisor's (sender.py). The wire format is
docs/behaviour.md §5.2 and §5.3.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator
from urllib.parse import quote

import base64
import binascii
import json

import httpx
import trio

from actors.settings import Settings
from runtime.retry import parse_retry_after

from .transport import STATUS_NETWORK_ERROR, MediaOutcome, SendOutcome

log = logging.getLogger(__name__)

HTTP_LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=30.0)
# sendText requests in flight to Evolution at once. Kept below the HTTP pool's size on purpose: httpcore's
# pool scans every queued request against every connection on each event, so thousands of chats queueing
# inside the pool cost O(queued × connections) CPU each; waiting here in FIFO order costs nothing.
HTTP_CONCURRENCY = 48
# sendPresence calls in flight, a bound of their own: each holds its request for its delay, so in
# sendText's slots they would delay replies. Beyond it "typing…" is skipped (best effort), never queued.
# 48 + 12 (+ the CRM's 4) fit the HTTP pools (64 connections) without queueing inside them.
PRESENCE_CONCURRENCY = 12
# getBase64FromMediaMessage calls in flight (customers' photos and voice notes), apart from the sends:
# a slow download never holds a reply back. The service's shared pool has room for these too.
MEDIA_CONCURRENCY = 4


class EvolutionTransport:
    """Sends through Evolution API v2. Uses ``http`` if given, else owns a client while open."""

    mode: str = "evolution"
    paced: bool = True
    presence_slots: int = PRESENCE_CONCURRENCY
    fixed_candidate: str | None = None

    def __init__(self, settings: Settings, http: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        self._http = http
        self._base = settings.outbound.evolution_api_url.rstrip("/")
        self._headers = {"apikey": settings.outbound.evolution_api_key, "Content-Type": "application/json",
                         "Accept": "application/json"}
        self._timeout = settings.server.http_timeout
        self._limiter = trio.CapacityLimiter(HTTP_CONCURRENCY)
        self._presence_limiter = trio.CapacityLimiter(PRESENCE_CONCURRENCY)
        self._media_limiter = trio.CapacityLimiter(MEDIA_CONCURRENCY)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        """Create (and close) the HTTP client if none was given."""
        owned: httpx.AsyncClient | None = None
        if self._http is None:
            owned = self._http = httpx.AsyncClient(timeout=httpx.Timeout(self._timeout), limits=HTTP_LIMITS)
        try:
            s = self._settings
            log.info("Outbound: sending through Evolution API at %s (rate %s msg/s per instance, "
                     "min gap %s s per chat)", s.outbound.evolution_api_url, s.outbound.outbound_rate_per_instance,
                     s.outbound.outbound_min_gap_seconds)
            yield
        finally:
            if owned is not None:
                self._http = None
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await owned.aclose()

    async def send_text(self, candidate: str, number: str, text: str, *, api_key: str | None = None) -> SendOutcome:
        """``POST /message/sendText/{candidate}`` with the v2 body ``{"number", "text"}``."""
        outcome = await self._post(f"/message/sendText/{quote(candidate, safe='')}", {"number": number, "text": text},
                                   self._timeout, self._limiter, api_key)
        log.debug("Tried sendText with candidate=%s status=%s%s", candidate, outcome.status,
                  f" error={outcome.error}" if outcome.error else "")
        return outcome

    async def send_presence(self, candidate: str, number: str, presence: str, delay_ms: int, *,
                            api_key: str | None = None) -> SendOutcome:
        """``POST /chat/sendPresence/{candidate}``; Evolution answers only after ``delay_ms``.

        Bounded by its own PRESENCE_CONCURRENCY slots, never sendText's."""
        outcome = await self._post(f"/chat/sendPresence/{quote(candidate, safe='')}",
                                   {"number": number, "presence": presence, "delay": delay_ms},
                                   self._timeout + delay_ms / 1000, self._presence_limiter, api_key)
        log.debug("Tried sendPresence with candidate=%s status=%s", candidate, outcome.status)
        return outcome

    async def fetch_media(self, candidate: str, message_id: str, max_bytes: int) -> MediaOutcome:
        """``POST /chat/getBase64FromMediaMessage/{candidate}`` with ``{"message": {"key": {"id"}},
        "convertToMp4": false}`` → ``{"mimetype", "base64", ...}``. The answer is streamed and given up
        past what ``max_bytes`` of media takes in base64; Evolution answers 400 when it did not keep
        the message."""
        assert self._http is not None, "EvolutionTransport used outside open()"
        path = f"/chat/getBase64FromMediaMessage/{quote(candidate, safe='')}"
        body = {"message": {"key": {"id": message_id}}, "convertToMp4": False}
        cap = (max_bytes + 2) // 3 * 4 + 64 * 1024   # the base64 of max_bytes, plus the JSON around it
        try:
            async with self._media_limiter:
                with trio.fail_after(self._timeout + 1):
                    async with self._http.stream("POST", self._base + path, json=body, headers=self._headers,
                                                 timeout=httpx.Timeout(self._timeout)) as response:
                        raw = bytearray()
                        async for chunk in response.aiter_bytes():
                            raw += chunk
                            if len(raw) > cap:
                                return MediaOutcome(413, error=f"media larger than {max_bytes} bytes")
                        status = response.status_code
        except (trio.TooSlowError, httpx.TimeoutException):
            return MediaOutcome(STATUS_NETWORK_ERROR, error="timeout")
        except httpx.HTTPError as exc:
            return MediaOutcome(STATUS_NETWORK_ERROR, error=f"{type(exc).__name__}: {exc}"[:200])
        if not 200 <= status < 300:
            return MediaOutcome(status, error=_error_summary(httpx.Response(status, content=bytes(raw))))
        try:
            payload = json.loads(raw)
            data = base64.b64decode(payload["base64"], validate=True)
            mimetype = str(payload.get("mimetype") or "")
        except (ValueError, KeyError, TypeError, binascii.Error):
            return MediaOutcome(502, error="getBase64FromMediaMessage answered without valid base64")
        if len(data) > max_bytes:
            return MediaOutcome(413, error=f"media larger than {max_bytes} bytes")
        return MediaOutcome(status, mimetype=mimetype, data=data)

    async def _post(self, path: str, body: dict[str, Any], deadline: float,
                    limiter: trio.CapacityLimiter, api_key: str | None) -> SendOutcome:
        assert self._http is not None, "EvolutionTransport used outside open()"
        headers = self._headers if api_key is None else {**self._headers, "apikey": api_key}
        try:
            async with limiter:  # waiting for a slot is not part of the request's timeout
                with trio.fail_after(deadline + 1):  # hard bound over httpx's per-phase timeouts
                    response = await self._http.post(self._base + path, json=body, headers=headers,
                                                     timeout=httpx.Timeout(deadline))
        except trio.TooSlowError:
            return SendOutcome(STATUS_NETWORK_ERROR, error="timeout")
        except httpx.HTTPError as exc:
            return SendOutcome(STATUS_NETWORK_ERROR, error=f"{type(exc).__name__}: {exc}"[:200])
        if 200 <= response.status_code < 300:
            message_id = ""
            try:
                payload = response.json()
                if isinstance(payload, dict) and isinstance(payload.get("key"), dict):
                    message_id = str(payload["key"].get("id") or "")
            except ValueError:
                pass
            return SendOutcome(response.status_code, message_id=message_id)
        return SendOutcome(response.status_code, error=_error_summary(response),
                           retry_after=parse_retry_after(response.headers))


def _error_summary(response: httpx.Response) -> str:
    """A short, key-free description of an Evolution error body."""
    try:
        payload = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:120]}"
    if isinstance(payload, dict):
        detail = payload.get("response", {})
        message = detail.get("message") if isinstance(detail, dict) else detail
        return f"HTTP {response.status_code} {payload.get('error', '')}: {str(message)[:160]}".strip()
    return f"HTTP {response.status_code}: {str(payload)[:120]}"
