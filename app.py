"""The HTTP surface (QuartTrio): translates HTTP into service calls and snapshots into JSON.

Run with ``hypercorn --worker-class trio --bind 127.0.0.1:5000 app:app``.
"""

from __future__ import annotations

import hmac
import logging
import os
import json
import sys
from functools import wraps
from typing import Any, Awaitable, Callable

import attrs
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from admin_web import Sessions, register_console
from actors.conversation import ConversationActor
from actors.evolution import WebhookError
from actors.jid import is_chat_jid
from actors.service import Service
from actors.settings import ConfigError, Settings, load_settings
from actors.state import seed_messages
from runtime.logs import configure_logging
from runtime.registry import MailboxFull, ShuttingDown
from runtime.store import StoreError

LOOPBACK = {"127.0.0.1", "::1", "localhost", "<local>"}
MAX_JSON_DEPTH = 32


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False, default=str), status=status,
                    headers=headers or {}, content_type="application/json")


def _error(status: int, message: str, **headers: str) -> Response:
    return _json({"error": message}, status, headers)


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping at ``limit + 1``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    return deepest


def create_app(settings: Settings | None = None, service: Service | None = None) -> QuartTrio:
    """Build the app for ``settings`` (default: loaded from the environment)."""
    settings = settings if settings is not None else load_settings()
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = settings.shutdown_grace_seconds + 5
    svc = service if service is not None else Service(settings)
    app.extensions["service"] = svc

    @app.before_serving
    async def start() -> None:
        configure_logging(
            log_dir=settings.log_dir, log_file=settings.log_file, level=settings.log_level,
            max_bytes=settings.log_max_bytes, backup_count=settings.log_backup_count,
            json_lines=settings.log_json, secrets=settings.secret_values(), stderr=settings.log_stderr,
        )
        try:
            await svc.store.open()
        except StoreError as exc:
            # One clear line, then stop the worker at once: raising here would make hypercorn print a
            # traceback, and SystemExit would make it carry on serving without lifespan support.
            print(f"Store error: {exc}", file=sys.stderr, flush=True)
            logging.shutdown()
            os._exit(3)
        await app.nursery.start(svc.run)

    @app.after_serving
    async def stop() -> None:
        await svc.shutdown(settings.shutdown_grace_seconds)

    sessions = Sessions(settings.admin_session_minutes * 60)

    def is_loopback() -> bool:
        return request.remote_addr in LOOPBACK

    def admin(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        """Bearer ADMIN_TOKEN (or the admin console's session) when set; otherwise loopback clients
        only (SPEC §7). A state-changing request on the console's session needs its CSRF token."""

        @wraps(handler)
        async def guarded(*args: Any, **kwargs: Any) -> Response:
            session = sessions.current()
            if settings.admin_token:
                supplied = request.headers.get("Authorization", "")
                expected = f"Bearer {settings.admin_token}"
                if hmac.compare_digest(supplied.encode(), expected.encode()):
                    session = None   # the Bearer token is no ambient credential: no CSRF token needed
                elif session is None:
                    return _error(401, "admin token required (Authorization: Bearer <ADMIN_TOKEN>)")
            elif not is_loopback():
                return _error(403, "admin endpoints are served to loopback clients only when ADMIN_TOKEN is unset")
            if (refused := sessions.csrf_refusal(session)) is not None:
                return refused
            return await handler(*args, **kwargs)

        return guarded

    def chat_jid(jid: str) -> Response | None:
        if not is_chat_jid(jid):
            return _error(400, "not a chat JID (expected <digits>@s.whatsapp.net, <digits>@lid or a group JID)")
        return None

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        # The request body may be unread (e.g. 413): close the connection rather than reuse it.
        return _error(error.code or 500, error.description or error.name, Connection="close")

    # -- webhook -----------------------------------------------------------------------------

    @app.post("/webhook")
    @app.post("/webhook/<path:event>")
    async def webhook(event: str = "") -> Response:
        # Read the (size-limited) body first, even for a request about to be refused: answering
        # with the body unread leaves the keep-alive connection stuck for the client's next request.
        raw = await request.get_data(as_text=False)
        if settings.webhook_secret:
            supplied = request.headers.get("x-webhook-token") or request.args.get("token") or ""
            if not hmac.compare_digest(supplied.encode(), settings.webhook_secret.encode()):
                return _error(401, "webhook token missing or wrong")
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError):
            return _error(400, "body is not valid JSON")
        if _depth(payload, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
            return _error(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            result = await svc.intake(payload)
        except WebhookError as exc:
            return _error(400, str(exc))
        headers = {"Retry-After": str(result.retry_after)} if result.retry_after else None
        return _json(result.body, result.status, headers)

    # -- health ------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if svc.ready:
            return _json({"status": "ready"})
        return _json({"status": "not ready"}, 503)

    # -- admin -------------------------------------------------------------------------------

    @app.get("/memory")
    @admin
    async def memory() -> Response:
        return _json(await svc.window_sizes())

    @app.get("/memory/<path:jid>")
    @admin
    async def memory_of(jid: str) -> Response:
        if (bad := chat_jid(jid)) is not None:
            return bad
        found = await svc.conversation_state(jid)
        if found is None:
            return _error(404, "no conversation for this JID")
        window = found[0].get("window", [])
        return _json({"user_id": jid, "count": len(window), "messages": seed_messages(window)})

    @app.get("/actors")
    @admin
    async def actors() -> Response:
        rows = []
        registry = svc.registry
        if registry is not None:
            for jid in registry.keys():
                stats = registry.actor_statistics(jid)
                if stats is None:
                    continue
                rows.append({
                    "jid": stats.key, "status": stats.status, "window_size": stats.state.window_size,
                    "booking_sent": stats.state.booking_sent, "mailbox_depth": stats.mailbox_depth,
                    "last_activity": stats.last_activity, "expires_at": stats.expires_at,
                    "crashes": stats.crashes,
                })
        return _json(rows)

    @app.get("/actors/<path:jid>")
    @admin
    async def actor(jid: str) -> Response:
        if (bad := chat_jid(jid)) is not None:
            return bad
        registry = svc.registry
        stats = registry.actor_statistics(jid) if registry is not None else None
        if stats is not None:
            body = {"live": True, **attrs.asdict(stats)}
            live_actor = registry.actor(jid) if registry is not None else None
            if isinstance(live_actor, ConversationActor):
                body["state"]["messages"] = live_actor.messages()
            return _json(body)
        found = await svc.conversation_state(jid)
        if found is None:
            return _error(404, "no conversation for this JID")
        state = found[0]
        return _json({"live": False, "key": jid, "status": "stored", "state": {
            **{k: v for k, v in state.items() if k != "window"},
            "window_size": len(state.get("window", [])),
            "messages": seed_messages(state.get("window", [])),
        }})

    @app.post("/actors/<path:jid>/<command>")
    @admin
    async def actor_command(jid: str, command: str) -> Response:
        if command not in ("pause", "resume", "reset"):
            return _error(404, "unknown command (pause, resume or reset)")
        if (bad := chat_jid(jid)) is not None:
            return bad
        if await svc.conversation_state(jid) is None:
            return _error(404, "no conversation for this JID")
        try:
            applied = await svc.control(jid, command)
        except (MailboxFull, ShuttingDown):
            return _error(503, "the chat's mailbox is full or the service is stopping", **{"Retry-After": "5"})
        if not applied:
            return _json({"status": "queued", "command": command}, 202)
        found = await svc.conversation_state(jid)
        state = found[0] if found is not None else {}
        return _json({"status": "applied", "command": command, "paused_until": state.get("paused_until"),
                      "window_size": len(state.get("window", [])), "booking_sent": state.get("booking_sent")})

    @app.get("/supervisors")
    @admin
    async def supervisors() -> Response:
        body: dict[str, Any] = {"ready": svc.ready}
        if svc.registry is not None:
            body["registry"] = attrs.asdict(svc.registry.statistics())
        if svc.chain is not None:
            body["llm"] = attrs.asdict(svc.chain.statistics())
        if svc.outbound is not None:
            body["outbound"] = attrs.asdict(svc.outbound.statistics())
        if svc.crm is not None:
            body["crm"] = attrs.asdict(svc.crm.statistics())
        body["intake"] = {"received": svc.received, "ignored": dict(svc.ignored)}
        body["dead_letters"] = [attrs.asdict(row) for row in await svc.store.dead_letters(20)]
        return _json(body)

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


def _load_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


app = create_app(_load_or_exit())
