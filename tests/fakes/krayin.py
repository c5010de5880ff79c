"""A fake Krayin CRM REST API (plain ASGI): persons search/create, leads, activities.

Speaks the JSON of krayin/rest-api v2 under ``prefix`` (``/api/v1``): ``{"data": ..., "message": ...}``,
422 with ``errors`` for validation and duplicates, 401 ``Unauthenticated.``, and a 302 to the login page
when ``Accept: application/json`` is missing (what Laravel does). Scriptable per test: ``fail_every``,
``down_until`` (trio time), ``auth_as_500`` (an expired token under APP_DEBUG off), ``fail_next``,
``lose_lead_answers`` (that many lead creations succeed, then answer 500: the insert happened, the
client never learns its id).
"""

from __future__ import annotations

import itertools
import re
import time
from typing import Any
from urllib.parse import parse_qs

import attrs
import trio

from tests.fakes.evolution import Receive, Scope, Send, _json_or_none, _lifespan, _read_body, _respond

_LEAD_VALUE = re.compile(r"^\d*(\.\d{1,4})?$")
# PHP's is_numeric, which Laravel's ``numeric`` rule applies (so "+5491131376731" passes, "123@lid" does not)
_NUMERIC = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")


@attrs.frozen
class KrayinCall:
    method: str
    path: str                       # without the prefix
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    status: int
    at: float


@attrs.define
class FakeKrayin:
    """Scriptable Krayin. ``stages``: the pipeline stage ids that exist. ``fail_next``: statuses to answer
    (in order) before behaving normally, e.g. ``[500, 500]``."""

    token: str = "t"
    prefix: str = "/api/v1"
    stages: set[int] = attrs.field(factory=lambda: {1, 2, 3})
    fail_every: int = 0
    down_until: float = float("-inf")
    auth_as_500: bool = False
    fail_next: list[int] = attrs.field(factory=list)
    lose_lead_answers: int = 0
    persons: dict[int, dict[str, Any]] = attrs.field(factory=dict)
    leads: dict[int, dict[str, Any]] = attrs.field(factory=dict)
    activities: list[dict[str, Any]] = attrs.field(factory=list)
    calls: list[KrayinCall] = attrs.field(factory=list)
    _count: int = 0
    _person_ids: Any = attrs.field(factory=lambda: itertools.count(45))
    _lead_ids: Any = attrs.field(factory=lambda: itertools.count(123))
    _activity_ids: Any = attrs.field(factory=lambda: itertools.count(900))

    def add_person(self, name: str, phone: str | None, email: str) -> int:
        """Seed an existing person (``phone`` None: without contact numbers); returns its id."""
        person_id = next(self._person_ids)
        self.persons[person_id] = {
            "id": person_id, "name": name,
            "emails": [{"value": email, "label": "work"}],
            "contact_numbers": [{"value": phone, "label": "work"}] if phone is not None else [],
        }
        return person_id

    def down_for(self, seconds: float) -> None:
        self.down_until = trio.current_time() + seconds

    def calls_to(self, method: str, path: str) -> list[KrayinCall]:
        return [c for c in self.calls if c.method == method and c.path == path]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        path = scope["path"]
        path = path[len(self.prefix):] if path.startswith(self.prefix) else path
        payload = _json_or_none(body)
        status, answer, extra = self._handle(scope["method"], path, query, headers, payload)
        self.calls.append(KrayinCall(scope["method"], path, query, headers, payload, status, trio.current_time()))
        await _respond(send, status, answer, extra)

    def _handle(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
                payload: Any) -> tuple[int, Any, list[tuple[bytes, bytes]]]:
        if "application/json" not in headers.get("accept", ""):
            return 302, {"message": "Redirecting to /admin/login"}, [(b"location", b"/admin/login")]
        if trio.current_time() < self.down_until:
            return 503, {"message": "Service Unavailable"}, []
        if headers.get("authorization") != f"Bearer {self.token}":
            if self.auth_as_500:
                return 500, {"message": "Unauthenticated."}, []
            return 401, {"message": "Unauthenticated."}, []
        if self.fail_next:
            status = self.fail_next.pop(0)
            return status, {"message": "Server Error"}, []
        self._count += 1
        if self.fail_every and self._count % self.fail_every == 0:
            return 500, {"message": "Server Error"}, []
        if method == "GET" and path == "/contacts/persons/search":
            return 200, {"data": self._search(query)}, []
        if method == "POST" and path == "/contacts/persons":
            return self._create_person(payload) + ([],)
        if method == "GET" and path == "/leads/search":
            return 200, {"data": self._search_leads(query)}, []
        if method == "POST" and path == "/leads":
            status, answer = self._create_lead(payload)
            if status == 200 and self.lose_lead_answers > 0:
                self.lose_lead_answers -= 1
                return 500, {"message": "Server Error"}, []
            return status, answer, []
        if method == "POST" and path == "/activities":
            return self._create_activity(payload) + ([],)
        return 404, {"message": "resource-not-found"}, []

    def _search(self, query: dict[str, str]) -> list[dict[str, Any]]:
        """Prettus RequestCriteria, enough of it: ``search=<v>&searchFields=<field>:like``."""
        needle = query.get("search", "")
        field, _, operator = query.get("searchFields", "name:like").partition(":")
        found = []
        for person in self.persons.values():
            value = person.get(field)
            values = [str(v.get("value", "")) for v in value] if isinstance(value, list) else [str(value or "")]
            if any((needle.lower() in v.lower()) if operator == "like" else v == needle for v in values):
                found.append(person)
        return found

    def _search_leads(self, query: dict[str, str]) -> list[dict[str, Any]]:
        """Prettus RequestCriteria on LeadRepository's searchable fields, enough of it:
        ``search=person_id:<id>&searchFields=person_id:=``; anything else finds nothing."""
        field, _, value = query.get("search", "").partition(":")
        if field != "person_id" or query.get("searchFields") != "person_id:=":
            return []
        return [{k: v for k, v in lead.items() if k != "person"} | {"person_id": lead["person"]["id"]}
                for lead in self.leads.values() if str(lead["person"]["id"]) == value]

    def _create_person(self, payload: Any) -> tuple[int, Any]:
        errors: dict[str, list[str]] = {}
        if not isinstance(payload, dict):
            return 422, {"message": "The given data was invalid.", "errors": {"name": ["The name field is required."]}}
        if not payload.get("name"):
            errors["name"] = ["The name field is required."]
        emails = payload.get("emails") or []
        numbers = payload.get("contact_numbers") or []
        if not emails or not all(isinstance(e, dict) and "@" in str(e.get("value", "")) for e in emails):
            errors["emails"] = ["The emails field is required."]
        # contact_numbers is optional (Krayin's attribute seeder: not required, unique, ``numeric``)
        if not isinstance(numbers, list) or not all(isinstance(n, dict) for n in numbers):
            errors["contact_numbers"] = ["The contact numbers field must be an array."]
        else:
            for i, n in enumerate(numbers):
                if not _NUMERIC.match(str(n.get("value", ""))):
                    errors[f"contact_numbers.{i}.value"] = [f"The contact numbers.{i}.value field must be a number."]
        if not errors:
            taken_emails = {e["value"].lower() for p in self.persons.values() for e in p["emails"]}
            taken_numbers = {n["value"] for p in self.persons.values() for n in p.get("contact_numbers") or []}
            for i, e in enumerate(emails):
                if e["value"].lower() in taken_emails:
                    errors[f"emails.{i}.value"] = ["The value has already been taken."]
            for i, n in enumerate(numbers):
                if n["value"] in taken_numbers:
                    errors[f"contact_numbers.{i}.value"] = ["The value has already been taken."]
        if errors:
            first = next(iter(errors.values()))[0]
            return 422, {"message": first, "errors": errors}
        person_id = next(self._person_ids)
        person = {"id": person_id, "name": payload["name"], "emails": emails, "contact_numbers": numbers or [],
                  "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())}
        self.persons[person_id] = person
        return 200, {"data": person, "message": "Person created successfully."}

    def _create_lead(self, payload: Any) -> tuple[int, Any]:
        if not isinstance(payload, dict):
            payload = {}
        errors: dict[str, list[str]] = {}
        if not payload.get("title"):
            errors["title"] = ["The title field is required."]
        if not _LEAD_VALUE.match(str(payload.get("lead_value", ""))):
            errors["lead_value"] = ["The lead value format is invalid."]
        person = payload.get("person") or {}
        if not isinstance(person, dict) or person.get("id") not in self.persons:
            errors["person.id"] = ["The selected person.id is invalid."]
        if errors:
            return 422, {"message": next(iter(errors.values()))[0], "errors": errors}
        stage = payload.get("lead_pipeline_stage_id")
        if stage not in self.stages:
            return 404, {"message": "resource-not-found"}
        lead_id = next(self._lead_ids)
        lead = {**payload, "id": lead_id, "status": 1, "lead_pipeline_id": 1,
                "person": self.persons[person["id"]]}
        self.leads[lead_id] = lead
        return 200, {"data": lead, "message": "Lead created successfully."}

    def _create_activity(self, payload: Any) -> tuple[int, Any]:
        if not isinstance(payload, dict) or not payload.get("type"):
            return 422, {"message": "The type field is required.", "errors": {"type": ["The type field is required."]}}
        if payload["type"] == "note" and not payload.get("comment"):
            return 422, {"message": "The comment field is required when type is note.",
                         "errors": {"comment": ["The comment field is required when type is note."]}}
        activity = {**payload, "id": next(self._activity_ids), "is_done": 1}
        self.activities.append(activity)
        return 200, {"data": activity, "message": "Activity created successfully."}
