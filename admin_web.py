"""The admin console's HTTP surface: the page (``static/admin/``), its login sessions and its JSON API.

Sessions live in memory (a restart logs everyone out): ``POST /admin/login`` exchanges ADMIN_TOKEN
(or, without one, a loopback connection) for a random id in an HttpOnly, SameSite=Strict cookie and
a per-session CSRF token that admin.js sends in ``X-CSRF-Token`` with every state-changing request.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import attrs
from quart import Response, request
from quart_trio import QuartTrio

from actors import admin_view
from actors.jid import is_chat_jid
from actors.service import Service
from actors.settings import Settings
from runtime.registry import MailboxFull, ShuttingDown

COOKIE = "agent_admin"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
SESSIONS_KEPT = 1000
REPLY_MAX_CHARS = 4096
PAUSE_MAX_MINUTES = 7 * 24 * 60
PAGE = Path(__file__).resolve().parent / "static" / "admin" / "index.html"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
       " object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer", "Cross-Origin-Opener-Policy": "same-origin",
}

Handler = Callable[..., Awaitable[Response]]


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, ensure_ascii=False, default=str), status=status,
                    content_type="application/json", headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


@attrs.define
class Session:
    id: str
    csrf: str
    expires_at: float


class Sessions:
    """The console's logins, in memory, each expiring ``ttl`` seconds after it was made."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self._clock = clock
        self._by_id: dict[str, Session] = {}

    def create(self) -> Session:
        now = self._clock()
        self._by_id = {k: s for k, s in self._by_id.items() if s.expires_at > now}
        while len(self._by_id) >= SESSIONS_KEPT:  # the oldest login goes first
            self._by_id.pop(next(iter(self._by_id)))
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self.ttl)
        self._by_id[session.id] = session
        return session

    def current(self) -> Session | None:
        """The request's session (from its cookie), unless unknown or expired."""
        session = self._by_id.get(request.cookies.get(COOKIE, ""))
        if session is None:
            return None
        if session.expires_at <= self._clock():
            del self._by_id[session.id]
            return None
        return session

    def end(self, session: Session) -> None:
        self._by_id.pop(session.id, None)

    def csrf_refusal(self, session: Session | None) -> Response | None:
        """403 for a state-changing request that a browser could have been tricked into sending:
        one riding on the session cookie without its CSRF token, or (no session) one with a
        browser's Origin / Sec-Fetch-Site headers. Bearer and plain loopback clients (curl) pass."""
        if request.method in SAFE_METHODS:
            return None
        if session is not None:
            supplied = request.headers.get(CSRF_HEADER, "")
            if hmac.compare_digest(supplied.encode(), session.csrf.encode()):
                return None
            return _error(403, f"CSRF token missing or wrong (send the {CSRF_HEADER} header of your session)")
        if request.headers.get("Authorization") or not (
                request.headers.get("Origin") or request.headers.get("Sec-Fetch-Site")):
            return None
        return _error(403, "a browser's state-changing request needs the admin console's session and CSRF token")


def _cookie(response: Response, value: str, max_age: int) -> None:
    https = request.scheme == "https" or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
    response.set_cookie(COOKIE, value, max_age=max_age, path="/", httponly=True, samesite="Strict", secure=https)


async def _body() -> dict[str, Any] | Response:
    """The request's JSON object, or a 400 (415 when it is not JSON: a cross-site form cannot send JSON)."""
    if not request.is_json:
        return _error(415, "send a JSON body (Content-Type: application/json)")
    body = await request.get_json(silent=True)
    if body is None and not (await request.get_data()).strip():
        body = {}
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object")
    return body


def register_console(app: QuartTrio, settings: Settings, svc: Service, admin: Callable[[Handler], Handler],
                     sessions: Sessions, is_loopback: Callable[[], bool]) -> None:
    """Add ``/admin`` (the page), its session endpoints and its JSON API to ``app``."""
    page = PAGE.read_text(encoding="utf-8").replace('<html lang="en">', f'<html lang="{settings.language}">', 1)

    @app.after_request
    async def console_headers(response: Response) -> Response:
        if request.path.startswith(("/admin", "/static/admin")):
            for name, value in PAGE_HEADERS.items():
                if name not in response.headers:
                    response.headers[name] = value
            if request.path.startswith("/static/admin"):
                response.headers["Cache-Control"] = "no-cache"   # revalidate: a new release shows at once
        return response

    @app.get("/admin")
    async def console_page() -> Response:
        if not settings.admin_token and not is_loopback():
            return _error(403, "the admin console is served to loopback clients only when ADMIN_TOKEN is unset")
        return Response(page, content_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})

    def session_body(session: Session) -> dict[str, Any]:
        return {"csrf": session.csrf, "expires_at": session.expires_at, "auth_required": bool(settings.admin_token)}

    @app.get("/admin/session")
    async def console_session() -> Response:
        # 200 either way: the page asks on load, and a 401 would be logged as an error in its console
        session = sessions.current()
        if session is None or (not settings.admin_token and not is_loopback()):
            return _json({"authenticated": False, "auth_required": bool(settings.admin_token)})
        return _json({"authenticated": True, **session_body(session)})

    @app.post("/admin/login")
    async def console_login() -> Response:
        body = await _body()
        if isinstance(body, Response):
            return body
        if settings.admin_token:
            token = body.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(token.encode(), settings.admin_token.encode()):
                return _error(401, "wrong admin token")
        elif not is_loopback():
            return _error(403, "the admin console is served to loopback clients only when ADMIN_TOKEN is unset")
        session = sessions.create()
        response = _json(session_body(session))
        _cookie(response, session.id, int(sessions.ttl))
        return response

    @app.post("/admin/logout")
    @admin
    async def console_logout() -> Response:
        session = sessions.current()
        if session is not None:
            sessions.end(session)
        response = _json({"status": "logged out"})
        _cookie(response, "", 0)
        return response

    # -- the console's API -------------------------------------------------------------------

    @app.get("/admin/api/chats")
    @admin
    async def console_chats() -> Response:
        args = request.args
        state = args.get("state", "")
        if state and state not in admin_view.CHAT_STATES:
            return _error(400, f"state must be one of {', '.join(admin_view.CHAT_STATES)}")
        try:
            after = admin_view.parse_cursor(args.get("after", ""))
            limit = int(args.get("limit", "50"))
        except ValueError as exc:
            return _error(400, f"bad paging parameter: {exc}")
        return _json(await admin_view.chat_list(svc, search=args.get("q", "")[:100], state=state,
                                                instance=args.get("instance", ""), after=after, limit=limit))

    @app.get("/admin/api/chats/<path:jid>")
    @admin
    async def console_chat(jid: str) -> Response:
        if not is_chat_jid(jid):
            return _error(400, "not a chat JID")
        detail = await admin_view.chat_detail(svc, jid)
        return _json(detail) if detail is not None else _error(404, "no conversation for this JID")

    @app.post("/admin/api/chats/<path:jid>/<command>")
    @admin
    async def console_command(jid: str, command: str) -> Response:
        if command not in ("pause", "resume", "reset", "reply"):
            return _error(404, "unknown command (pause, resume, reset or reply)")
        if not is_chat_jid(jid):
            return _error(400, "not a chat JID")
        body = await _body()
        if isinstance(body, Response):
            return body
        value: Any = None
        if command == "pause":
            value = body.get("minutes")
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not 0 <= value <= PAUSE_MAX_MINUTES):
                return _error(400, f"minutes must be a number from 0 (until resumed) to {PAUSE_MAX_MINUTES}, or null")
        elif command == "reply":
            value = body.get("text")
            if not isinstance(value, str) or not value.strip() or len(value) > REPLY_MAX_CHARS:
                return _error(400, f"text must be a non-empty string of at most {REPLY_MAX_CHARS} characters")
        if await svc.conversation_state(jid) is None:
            return _error(404, "no conversation for this JID")
        try:
            order = await svc.command(jid, command, value)
        except (MailboxFull, ShuttingDown):
            return _error(503, "the chat's mailbox is full or the service is stopping")
        if not order.done.is_set():
            return _json({"status": "queued", "command": command}, 202)
        if not order.applied:
            return _error(409, "the chat's actor is stopped after repeated crashes: nothing was done, try again later")
        return _json({"status": "applied", "command": command, "chat": await admin_view.chat_detail(svc, jid)})

    @app.get("/admin/api/delivery")
    @admin
    async def console_delivery() -> Response:
        return _json(await admin_view.delivery(svc))

    @app.post("/admin/api/dead-letters/<int:dead_letter_id>/<action>")
    @admin
    async def console_dead_letter(dead_letter_id: int, action: str) -> Response:
        if action not in ("retry", "discard"):
            return _error(404, "unknown action (retry or discard)")
        if svc.outbound is None:
            return _error(503, "starting up")
        done = (await svc.retry_dead_letter(dead_letter_id) if action == "retry"
                else await svc.store.discard(dead_letter_id))
        if not done:
            return _error(404, "no such dead letter")
        return _json({"status": "retried" if action == "retry" else "discarded", "id": dead_letter_id})

    @app.get("/admin/api/overview")
    @admin
    async def console_overview() -> Response:
        return _json(await admin_view.overview(svc))
