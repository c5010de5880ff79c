"""The Krayin REST adapter (krayin/rest-api, ``/api/v1``): requests in, ``data`` or ``KrayinError`` out.

It knows the wire (headers, paths, the ``{"data": ...}`` envelope, timeouts) and what an error
means (bad token, retryable, duplicate person); it knows nothing of chats, retries or leads
already registered: that is the supervisor's policy.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import trio

from runtime.retry import parse_retry_after

log = logging.getLogger(__name__)

# For a client the supervisor opens itself (no shared one given): a few jobs at a time need few connections.
HTTP_LIMITS = httpx.Limits(max_connections=16, max_keepalive_connections=8, keepalive_expiry=30.0)

_AUTH_WORDS = ("unauthenticated", "unauthorized", "authentication", "token", "route [login]")


class KrayinError(Exception):
    """A Krayin call failed. ``status`` 0 means no HTTP answer; ``str()`` is safe to log."""

    def __init__(self, status: int, message: str, *, body: Any = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.retry_after = retry_after

    @property
    def auth(self) -> bool:
        """The token is missing, wrong or expired (401, or a 500 that says so: APP_DEBUG off)."""
        if self.status == 401:
            return True
        return self.status == 500 and any(word in str(self.body).lower() for word in _AUTH_WORDS)

    @property
    def retryable(self) -> bool:
        return self.status in (0, 401, 408, 429) or self.status >= 500

    @property
    def duplicate(self) -> bool:
        """A 422 saying an email or phone is already taken."""
        if self.status != 422 or not isinstance(self.body, dict):
            return False
        errors = self.body.get("errors")
        if not isinstance(errors, dict):
            return False
        return any(("email" in key or "contact_number" in key) and "taken" in str(value).lower()
                   for key, value in errors.items())


class KrayinClient:
    """Thin adapter over the Krayin REST API; raises ``KrayinError`` for anything but a 2xx JSON answer."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, token: str, timeout: float) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        self._timeout = timeout

    async def search_persons(self, value: str, field: str) -> list[dict[str, Any]]:
        """``GET /contacts/persons/search?search=<value>&searchFields=<field>:like``."""
        data = await self._request("GET", "/contacts/persons/search",
                                   params={"search": value, "searchFields": f"{field}:like"})
        return [p for p in data if isinstance(p, dict)] if isinstance(data, list) else []

    async def search_leads(self, person_id: int) -> list[dict[str, Any]]:
        """``GET /leads/search?search=person_id:<id>&searchFields=person_id:=`` (Prettus RequestCriteria;
        ``person_id`` is one of LeadRepository's searchable fields): the person's leads."""
        data = await self._request("GET", "/leads/search",
                                   params={"search": f"person_id:{person_id}", "searchFields": "person_id:="})
        return [lead for lead in data if isinstance(lead, dict)] if isinstance(data, list) else []

    async def create_person(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._request("POST", "/contacts/persons", json=payload)

    async def create_lead(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._request("POST", "/leads", json=payload)

    async def add_note(self, lead_id: int, comment: str) -> dict[str, Any]:
        return await self._request("POST", "/activities", json={"type": "note", "comment": comment, "lead_id": lead_id})

    async def _request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                       json: dict[str, Any] | None = None) -> Any:
        """The ``data`` member of the answer."""
        try:
            with trio.fail_after(self._timeout + 1):
                response = await self._http.request(method, self._base + path, params=params, json=json,
                                                    headers=self._headers, timeout=httpx.Timeout(self._timeout))
        except trio.TooSlowError:
            raise KrayinError(0, f"{method} {path}: timeout") from None
        except httpx.HTTPError as exc:
            raise KrayinError(0, f"{method} {path}: {type(exc).__name__}: {exc}"[:200]) from None
        log.debug("[CRM] Respuesta de API: %s %s status=%s", method, path, response.status_code)
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text[:300]
        if not 200 <= response.status_code < 300:
            raise KrayinError(response.status_code,
                              f"{method} {path}: status={response.status_code}, error={short(body)}",
                              body=body, retry_after=parse_retry_after(response.headers))
        if not isinstance(body, dict):
            raise KrayinError(502, f"{method} {path}: unexpected answer {short(body)}", body=body)
        return body.get("data")


def short(body: Any) -> str:
    """A Krayin answer cut to a log line's worth."""
    return str(body)[:300]


def id_of(data: Any, what: str) -> int:
    """The integer ``id`` of a Krayin resource; an answer without one is a (retryable) server fault."""
    try:
        return int(data["id"])
    except (TypeError, KeyError, ValueError):
        raise KrayinError(502, f"Krayin answered without a {what} id: {short(data)}", body=data) from None
