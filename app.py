"""The HTTP surface (QuartTrio): translates HTTP into service calls and snapshots into JSON.

Run with ``hypercorn --worker-class trio --bind 127.0.0.1:5000 app:app``.
"""

from __future__ import annotations

import hmac
import json
from functools import wraps
from pathlib import Path
from typing import Any, Awaitable, Callable

import attrs
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from actors import admin_api, admin_view, lifecycle
from actors.admin_sessions import Session, Sessions
from actors.conversation_reads import AmbiguousChat
from actors.evolution import WebhookError
from actors.exposure import is_loopback_address
from actors.jid import is_chat_jid
from actors.memory_summary import MAX_SUMMARY_CHARS
from actors.payload_guard import BadPayload, decode_payload
from actors.reload import ReloadRefused, reload_instances
from actors.service import IntakeResult, Service
from actors.settings import Settings, load_settings
from runtime.registry import MailboxFull, ShuttingDown
from runtime.store import StoreError

PAGE_DEFAULT, PAGE_MAX = 100, 1000
# Set by reverse proxies: a request carrying one came through a proxy, whatever its socket peer is.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False, default=str), status=status,
                    headers=headers or {}, content_type="application/json")


def _error(status: int, message: str, **headers: str) -> Response:
    return _json({"error": message}, status, headers)


def _loopback_peer(remote_addr: str | None, headers: Any) -> bool:
    """The socket peer is 127.0.0.0/8 or ::1 (never ``<local>``, a unix socket) and no proxy header came."""
    if any(name in headers for name in PROXY_HEADERS):
        return False
    return remote_addr != "localhost" and is_loopback_address(remote_addr)


def _no_store(response: Response) -> Response:
    """Admin answers are never kept by a browser or a proxy cache."""
    response.headers["Cache-Control"] = "no-store"
    return response


# -- the admin console: the page (static/admin/), its login sessions and its JSON API ----------------
#
# A login (actors/admin_sessions.py) puts its session id in an HttpOnly, SameSite=Strict cookie;
# admin.js sends the session's CSRF token in ``X-CSRF-Token`` with every state-changing request.

COOKIE = "agent_admin"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
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


def _session(sessions: Sessions) -> Session | None:
    """The request's session (from its cookie), unless unknown or expired."""
    return sessions.find(request.cookies.get(COOKIE, ""))


def _csrf_refusal(session: Session | None) -> Response | None:
    """403 for a state-changing request that a browser could have been tricked into sending:
    one riding on the session cookie without its CSRF token, or (no session) one with a
    browser's Origin / Sec-Fetch-Site headers. Bearer and plain loopback clients (curl) pass."""
    if request.method in SAFE_METHODS:
        return None
    if session is not None:
        if session.csrf_matches(request.headers.get(CSRF_HEADER, "")):
            return None
        return _private_error(403, f"CSRF token missing or wrong (send the {CSRF_HEADER} header of your session)")
    if request.headers.get("Authorization") or not (
            request.headers.get("Origin") or request.headers.get("Sec-Fetch-Site")):
        return None
    return _private_error(403, "a browser's state-changing request needs the admin console's session and CSRF token")


def _cookie(response: Response, value: str, max_age: int) -> None:
    https = request.scheme == "https" or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
    response.set_cookie(COOKIE, value, max_age=max_age, path="/", httponly=True, samesite="Strict", secure=https)


async def _chat_key(svc: Service, jid: str, private: bool = False) -> str | Response:
    """The conversation key a chat path names: ``jid`` in ``?instance=``, or in the one instance it
    is known in. 400 for a bad JID, 404 for none, 409 (with the instances) for a JID known in several."""
    make = _private_json if private else _json
    if not is_chat_jid(jid):
        return make({"error": "not a chat JID (expected <digits>@s.whatsapp.net, <digits>@lid or a group JID)"}, 400)
    instance = request.args.get("instance") or None
    try:
        key = await svc.resolve(jid, instance)
    except AmbiguousChat as exc:
        return make({"error": "this JID has conversations in several instances: choose one with ?instance=",
                     "instances": exc.instances}, 409)
    if key is None:
        return make({"error": "no conversation for this JID" + (" in this instance" if instance else "")}, 404)
    return key


async def _body() -> dict[str, Any] | Response:
    """The request's JSON object, or a 400 (415 when it is not JSON: a cross-site form cannot send JSON)."""
    if not request.is_json:
        return _private_error(415, "send a JSON body (Content-Type: application/json)")
    body = await request.get_json(silent=True)
    if body is None and not (await request.get_data()).strip():
        body = {}
    if not isinstance(body, dict):
        return _private_error(400, "body must be a JSON object")
    return body


def register_console(app: QuartTrio, settings: Settings, svc: Service, admin: Callable[[Handler], Handler],
                     sessions: Sessions, is_loopback: Callable[[], bool]) -> None:
    """Add ``/admin`` (the page), its session endpoints and its JSON API to ``app``."""
    page = PAGE.read_text(encoding="utf-8").replace('<html lang="en">', f'<html lang="{settings.conversation.language}">', 1)

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
        if not settings.security.admin_token and not is_loopback():
            return _private_error(403, "the admin console is served to loopback clients only when ADMIN_TOKEN is unset")
        return Response(page, content_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})

    def session_body(session: Session) -> dict[str, Any]:
        return {"csrf": session.csrf, "expires_at": session.expires_at, "auth_required": bool(settings.security.admin_token)}

    @app.get("/admin/session")
    async def console_session() -> Response:
        # 200 either way: the page asks on load, and a 401 would be logged as an error in its console
        session = _session(sessions)
        if session is None or (not settings.security.admin_token and not is_loopback()):
            return _private_json({"authenticated": False, "auth_required": bool(settings.security.admin_token)})
        return _private_json({"authenticated": True, **session_body(session)})

    @app.post("/admin/login")
    async def console_login() -> Response:
        body = await _body()
        if isinstance(body, Response):
            return body
        if settings.security.admin_token:
            token = body.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(token.encode(), settings.security.admin_token.encode()):
                return _private_error(401, "wrong admin token")
        elif not is_loopback():
            return _private_error(403, "the admin console is served to loopback clients only when ADMIN_TOKEN is unset")
        session = sessions.create()
        response = _private_json(session_body(session))
        _cookie(response, session.id, int(sessions.ttl))
        return response

    @app.post("/admin/logout")
    @admin
    async def console_logout() -> Response:
        session = _session(sessions)
        if session is not None:
            sessions.end(session)
        response = _private_json({"status": "logged out"})
        _cookie(response, "", 0)
        return response

    # -- the console's API -------------------------------------------------------------------

    @app.get("/admin/api/chats")
    @admin
    async def console_chats() -> Response:
        args = request.args
        state = args.get("state", "")
        if state and state not in admin_view.CHAT_STATES:
            return _private_error(400, f"state must be one of {', '.join(admin_view.CHAT_STATES)}")
        try:
            after = admin_view.parse_cursor(args.get("after", ""))
            limit = int(args.get("limit", "50"))
        except ValueError as exc:
            return _private_error(400, f"bad paging parameter: {exc}")
        return _private_json(await admin_view.chat_list(svc, search=args.get("q", "")[:100], state=state,
                                                instance=args.get("instance", ""), after=after, limit=limit))

    @app.get("/admin/api/chats/<path:jid>")
    @admin
    async def console_chat(jid: str) -> Response:
        key = await _chat_key(svc, jid, private=True)
        if isinstance(key, Response):
            return key
        detail = await admin_view.chat_detail(svc, key)
        return _private_json(detail) if detail is not None else _private_error(404, "no conversation for this JID")

    @app.post("/admin/api/chats/<path:jid>/<command>")
    @admin
    async def console_command(jid: str, command: str) -> Response:
        if command not in ("pause", "resume", "reset", "reply"):
            return _private_error(404, "unknown command (pause, resume, reset or reply)")
        if not is_chat_jid(jid):
            return _private_error(400, "not a chat JID")
        body = await _body()
        if isinstance(body, Response):
            return body
        value: Any = None
        if command == "pause":
            value = body.get("minutes")
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not 0 <= value <= PAUSE_MAX_MINUTES):
                return _private_error(400, f"minutes must be a number from 0 (until resumed) to {PAUSE_MAX_MINUTES}, or null")
        elif command == "reply":
            value = body.get("text")
            if not isinstance(value, str) or not value.strip() or len(value) > REPLY_MAX_CHARS:
                return _private_error(400, f"text must be a non-empty string of at most {REPLY_MAX_CHARS} characters")
        key = await _chat_key(svc, jid, private=True)
        if isinstance(key, Response):
            return key
        try:
            order = await svc.command(key, command, value)
        except (MailboxFull, ShuttingDown):
            return _private_error(503, "the chat's mailbox is full or the service is stopping")
        if not order.done.is_set():
            return _private_json({"status": "queued", "command": command}, 202)
        if not order.applied:
            return _private_error(409, "the chat's actor is stopped after repeated crashes: nothing was done, try again later")
        return _private_json({"status": "applied", "command": command, "chat": await admin_view.chat_detail(svc, key)})

    @app.get("/admin/api/delivery")
    @admin
    async def console_delivery() -> Response:
        return _private_json(await admin_view.delivery(svc))

    @app.post("/admin/api/dead-letters/<int:dead_letter_id>/<action>")
    @admin
    async def console_dead_letter(dead_letter_id: int, action: str) -> Response:
        if action not in ("retry", "discard"):
            return _private_error(404, "unknown action (retry or discard)")
        if svc.outbound is None:
            return _private_error(503, "starting up")
        done = (await svc.retry_dead_letter(dead_letter_id) if action == "retry"
                else await svc.store.discard(dead_letter_id))
        if not done:
            return _private_error(404, "no such dead letter")
        return _private_json({"status": "retried" if action == "retry" else "discarded", "id": dead_letter_id})

    @app.get("/admin/api/overview")
    @admin
    async def console_overview() -> Response:
        return _private_json(await admin_view.overview(svc))


def _private_json(body: Any, status: int = 200) -> Response:
    """JSON for the console: never kept by a browser or proxy cache."""
    return _no_store(_json(body, status))


def _private_error(status: int, message: str) -> Response:
    return _private_json({"error": message}, status)


def create_app(settings: Settings | None = None, service: Service | None = None, *,
               exit_process: Callable[[int], None] = lifecycle.exit_process) -> QuartTrio:
    """Build the app for ``settings`` (default: loaded from the environment) around ``service``
    (default: the configured one), started and stopped by actors/lifecycle.py.

    Raises ConfigError when the settings must not be served on this process's bind (actors/exposure.py).
    ``exit_process`` is called when the service dies of an error after start-up (tests pass their
    own; the default ends the process with FATAL_EXIT_CODE so a supervisor restarts it).
    """
    settings = settings if settings is not None else load_settings()
    life = lifecycle.Lifecycle(settings, service, exit_process=exit_process)
    svc = life.service
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_bytes
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = settings.server.shutdown_grace_seconds + 5
    app.extensions["service"] = svc

    @app.before_serving
    async def start() -> None:
        await life.start(app.nursery)

    app.after_serving(life.stop)

    @app.after_request
    async def security_headers(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    sessions = Sessions(settings.security.admin_session_minutes * 60)

    def is_loopback() -> bool:
        return _loopback_peer(request.remote_addr, request.headers)

    def admin(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        """Bearer ADMIN_TOKEN (or the admin console's session) when set; otherwise loopback peers
        only, never through a proxy (docs/behaviour.md §8.1). A state-changing request on the console's session
        needs its CSRF token. Every answer is ``Cache-Control: no-store``."""

        @wraps(handler)
        async def guarded(*args: Any, **kwargs: Any) -> Response:
            session = _session(sessions)
            if settings.security.admin_token:
                supplied = request.headers.get("Authorization", "")
                expected = f"Bearer {settings.security.admin_token}"
                if hmac.compare_digest(supplied.encode(), expected.encode()):
                    session = None   # the Bearer token is no ambient credential: no CSRF token needed
                elif session is None:
                    return _no_store(_error(401, "admin token required (Authorization: Bearer <ADMIN_TOKEN>)"))
            elif not is_loopback():
                return _no_store(_error(403, "admin endpoints are served to loopback clients only when "
                                             "ADMIN_TOKEN is unset (never through a proxy or a unix socket)"))
            if (refused := _csrf_refusal(session)) is not None:
                return _no_store(refused)
            return _no_store(await handler(*args, **kwargs))

        return guarded

    def chat_jid(jid: str) -> Response | None:
        if not is_chat_jid(jid):
            return _error(400, "not a chat JID (expected <digits>@s.whatsapp.net, <digits>@lid or a group JID)")
        return None

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        # The request body may be unread (e.g. 413): close the connection rather than reuse it.
        return _error(error.code or 500, error.description or error.name, Connection="close")

    @app.errorhandler(StoreError)
    async def store_error(error: StoreError) -> Response:
        # An admin read while the database is unreachable (the webhook answers its own 503).
        return _error(503, "store unavailable", **{"Retry-After": "5"})

    # -- webhook -----------------------------------------------------------------------------

    async def answer_webhook() -> IntakeResult:
        # The (size-limited) body is read first, even for a refusal: unread, it stalls the keep-alive connection.
        raw = await request.get_data(as_text=False)
        if settings.security.webhook_secret:
            supplied = request.headers.get("x-webhook-token") or request.args.get("token") or ""
            if not hmac.compare_digest(supplied.encode(), settings.security.webhook_secret.encode()):
                return IntakeResult(401, {"error": "webhook token missing or wrong"})
        try:
            return await svc.intake(decode_payload(raw))
        except (BadPayload, WebhookError) as exc:   # not JSON we read, or not a webhook we know
            return IntakeResult(400, {"error": str(exc)})

    @app.post("/webhook")
    @app.post("/webhook/<path:event>")
    async def webhook(event: str = "") -> Response:
        started = trio.current_time()     # the ack histogram (/metrics): from here to the answer
        result = IntakeResult(500, {})    # counted as such if answering raises
        try:
            result = await answer_webhook()
            headers = {"Retry-After": str(result.retry_after)} if result.retry_after else None
            return _json(result.body, result.status, headers)
        except HTTPException as exc:      # 413 from get_data, answered by http_error
            result = IntakeResult(exc.code or 500, {})
            raise
        finally:
            svc.metrics.observe_ack(result.status, result.body, trio.current_time() - started)

    # -- health ------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok"}) if svc.failure is None else _json({"status": "failed", "error": svc.failure}, 503)

    @app.get("/ready")
    async def ready() -> Response:
        return _json({"status": "ready"}) if svc.ready else _json({"status": "not ready"}, 503)

    # -- admin -------------------------------------------------------------------------------

    @app.get("/memory")
    @admin
    async def memory() -> Response:
        """``{jid: count}``; with several instances ``{instance: {jid: count}}``; ``?instance=``: that one's."""
        return _json(await svc.memory(request.args.get("instance") or None))

    @app.get("/memory/<path:jid>")
    @admin
    async def memory_of(jid: str) -> Response:
        key = await _chat_key(svc, jid)
        if isinstance(key, Response):
            return key
        detail = await admin_api.memory_of(svc, key)
        return _json(detail) if detail is not None else _error(404, "no conversation for this JID")

    @app.get("/actors")
    @admin
    async def actors() -> Response:
        """Live actors in key order, a page at a time: ``?limit=`` (default 100, at most 1000),
        ``?cursor=`` (the ``next_cursor`` of the previous page) and ``?instance=`` (that one's only)."""
        try:
            limit = int(request.args.get("limit", str(PAGE_DEFAULT)))
        except ValueError:
            return _error(400, "limit must be an integer")
        if not 1 <= limit <= PAGE_MAX:
            return _error(400, f"limit must be between 1 and {PAGE_MAX}")
        return _json(admin_api.actor_list(svc, request.args.get("cursor") or None, limit,
                                          request.args.get("instance") or None))

    @app.get("/actors/<path:jid>")
    @admin
    async def actor(jid: str) -> Response:
        key = await _chat_key(svc, jid)
        if isinstance(key, Response):
            return key
        detail = await admin_api.actor_detail(svc, key)
        return _json(detail) if detail is not None else _error(404, "no conversation for this JID")

    @app.post("/actors/<path:jid>/<command>")
    @admin
    async def actor_command(jid: str, command: str) -> Response:
        if command not in ("pause", "resume", "reset"):
            return _error(404, "unknown command (pause, resume or reset)")
        key = await _chat_key(svc, jid)
        if isinstance(key, Response):
            return key
        try:
            applied = await svc.control(key, command)
        except (MailboxFull, ShuttingDown):
            return _error(503, "the chat's mailbox is full or the service is stopping", **{"Retry-After": "5"})
        if not applied:
            return _json({"status": "queued", "command": command}, 202)
        return _json(await admin_api.control_applied(svc, key, command))

    @app.put("/actors/<path:jid>/summary")
    @admin
    async def actor_summary(jid: str) -> Response:
        """Replace a chat's running summary (MEMORY_SUMMARY): ``{"summary": "<text>"}``, "" clears it."""
        body = await _body()
        if isinstance(body, Response):
            return body
        text = body.get("summary")
        if not isinstance(text, str) or len(text) > MAX_SUMMARY_CHARS:
            return _error(400, f"body must be {{\"summary\": <a string of at most {MAX_SUMMARY_CHARS} characters>}}")
        key = await _chat_key(svc, jid)
        if isinstance(key, Response):
            return key
        try:
            order = await svc.command(key, "summary", text.strip())
        except (MailboxFull, ShuttingDown):
            return _error(503, "the chat's mailbox is full or the service is stopping", **{"Retry-After": "5"})
        if not order.done.is_set():
            return _json({"status": "queued", "command": "summary"}, 202)
        if not order.applied:
            return _error(409, "the chat's actor is stopped after repeated crashes: nothing was done, try again later")
        return _json({"status": "applied", "command": "summary", "summary": text.strip()})

    @app.get("/supervisors")
    @admin
    async def supervisors() -> Response:
        return _json(await admin_api.supervisors(svc))

    @app.get("/instances")
    @admin
    async def instances() -> Response:
        return _json(await admin_api.instances(svc))

    @app.post("/instances/reload")
    @admin
    async def instances_reload() -> Response:
        """Read the instances file again (docs/behaviour.md §9.3); a bad file keeps the settings in force."""
        try:
            return _json(admin_api.reloaded(await reload_instances(svc, settings)))
        except ReloadRefused as exc:
            return _error(400, str(exc))

    @app.get("/shards")
    @admin
    async def shards() -> Response:
        return _json(await admin_api.shards(svc))

    @app.get("/cluster")
    @admin
    async def cluster() -> Response:
        return _json(await admin_api.cluster(svc))

    @app.get("/metrics")
    @admin
    async def metrics() -> Response:
        return Response(svc.metrics.render(), status=200, content_type=CONTENT_TYPE_LATEST)

    @app.get("/outbox")
    @admin
    async def outbox() -> Response:
        if svc.outbound is None:
            return _error(503, "starting up")
        try:
            after = int(request.args.get("after", "0"))
            limit = min(int(request.args.get("limit", "100")), 1000)
        except ValueError:
            return _error(400, "after and limit must be integers")
        jid = request.args.get("jid") or None
        if jid is not None and (bad := chat_jid(jid)) is not None:
            return bad
        entries = svc.outbound.outbox_entries(after=after, jid=jid, limit=limit)
        return _json([attrs.asdict(e) for e in entries])

    register_console(app, settings, svc, admin, sessions, is_loopback)
    return app


app = lifecycle.configured_or_exit(create_app)
