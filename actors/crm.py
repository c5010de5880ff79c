"""The CRM supervisor: registers booking leads in Krayin CRM without ever delaying a conversation.

``KrayinClient`` is the thin HTTP adapter for the Krayin REST API (``/api/v1``); ``CrmSupervisor`` owns
the policy: one job at a time per JID (so a JID never gets two leads), retries with capped exponential
backoff until success or ``CRM_GIVE_UP_SECONDS``, person reuse, and the seed's ``[CRM]`` log lines.
"""

from __future__ import annotations

import collections
import logging
import random
import re
import time
from typing import Any, Awaitable, Callable, Deque

import attrs
import httpx
import trio

from actors.privacy import log_text
from actors.settings import Settings

log = logging.getLogger(__name__)

BASE_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
CONCURRENT_JOBS = 4              # Krayin allows 60 requests/min per user: keep the fan-out small
FAILURES_KEPT = 50
KNOWN_LEADS_KEPT = 50_000
LEAD_RECORD_TIMEOUT_SECONDS = 10.0  # how long a new lead id may wait for the chat's mailbox (then: logged, still known here)
DEFAULT_LEAD_NAME = "Lead desde WhatsApp"
MIN_LEAD_VALUE = 500
HTTP_LIMITS = httpx.Limits(max_connections=16, max_keepalive_connections=8, keepalive_expiry=30.0)

_AUTH_WORDS = ("unauthenticated", "unauthorized", "authentication", "token", "route [login]")


@attrs.frozen
class LeadRequest:
    """Ask the CRM to register a lead for a chat (or, with ``lead_id``, to add a note to it)."""

    jid: str
    name: str
    phone: str | None                # digits from an @s.whatsapp.net JID; None for @lid
    motivo: str = ""
    lead_id: int | None = None       # existing lead: add a note instead
    alt_jid: str = ""                # remoteJidAlt of an @lid chat, when known
    job_id: int | None = None        # durable outbox row id
    empresa: str = ""
    rubro: str = ""
    volumen_mensajes: int | None = None
    email: str = ""                  # a real address when known; otherwise a placeholder is generated


@attrs.frozen
class CrmFailure:
    """A job that was given up. Never holds the token."""

    jid: str
    error: str
    attempts: int
    at: float                        # unix time
    job_id: int | None = None


@attrs.frozen
class PendingJob:
    jid: str
    kind: str                        # "lead" | "note"
    attempts: int
    last_error: str
    waiting_seconds: float           # since submitted
    job_id: int | None = None


@attrs.frozen
class CrmStatistics:
    """A snapshot of the CRM supervisor for ``/supervisors`` and metrics."""

    enabled: bool
    queued: int                      # jobs not yet started, all JIDs
    running: int                     # jobs in progress (including those waiting to retry)
    retrying: int                    # jobs sleeping before a retry
    leads_created: int
    notes_added: int
    skipped: int                     # duplicate requests for a JID whose lead exists
    failed: int                      # given up (permanent error or CRM_GIVE_UP_SECONDS)
    auth_failing: bool               # the last Krayin answer said the token is bad
    pending: tuple[PendingJob, ...]  # running jobs, oldest first
    failures: tuple[CrmFailure, ...]


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

    async def create_person(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._request("POST", "/contacts/persons", json=payload)

    async def create_lead(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._request("POST", "/leads", json=payload)

    async def update_stage(self, lead_id: int, stage_id: int) -> dict[str, Any]:
        return await self._request("PUT", f"/leads/stage/edit/{int(lead_id)}",
                                   json={"lead_pipeline_stage_id": stage_id})

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
                              f"{method} {path}: status={response.status_code}, error={_short(body)}",
                              body=body, retry_after=_retry_after(response))
        if not isinstance(body, dict):
            raise KrayinError(502, f"{method} {path}: unexpected answer {_short(body)}", body=body)
        return body.get("data")


def _short(body: Any) -> str:
    return str(body)[:300]


def _retry_after(response: httpx.Response) -> float | None:
    try:
        value = response.headers.get("retry-after")
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _digits(value: str) -> str:
    return re.sub(r"\D", "", value)


def lead_value(volumen_mensajes: int | None) -> int:
    """The seed's estimate: ``max(volumen_mensajes * 10, 500)``, 500 when unknown."""
    if not volumen_mensajes or volumen_mensajes < 0:
        return MIN_LEAD_VALUE
    return max(int(volumen_mensajes) * 10, MIN_LEAD_VALUE)


@attrs.define
class _Job:
    request: LeadRequest
    submitted_at: float
    attempts: int = 0
    last_error: str = ""
    person_id: int | None = None
    lead_id: int | None = None       # the lead this job created
    retrying: bool = False
    announced: bool = False


class CrmSupervisor:
    """Registers leads in Krayin, one job at a time per JID, retried until success or give-up.

    ``submit()`` never blocks. A request without ``lead_id`` for a JID whose lead this supervisor already
    created (or saw) becomes a note on that lead, or is skipped when it has no ``motivo``; so one JID
    never gets two leads. ``on_lead(jid, lead_id)`` is awaited once a lead exists; ``on_done(request,
    outcome)`` once a job is finished for good (outcome ``"created"``, ``"noted"``, ``"skipped"``,
    ``"failed"``), e.g. to settle its durable row. Callback errors are logged and swallowed.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        http: httpx.AsyncClient | None = None,
        on_lead: Callable[[str, int], Awaitable[None]] | None = None,
        on_done: Callable[[LeadRequest, str], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._enabled = settings.crm.crm_enabled
        self._client: KrayinClient | None = self._make_client(http) if http is not None and self._enabled else None
        self._on_lead = on_lead
        self._on_done = on_done
        self._nursery: trio.Nursery | None = None
        self._queues: dict[str, Deque[_Job]] = {}
        self._running: dict[str, _Job] = {}
        self._limiter = trio.CapacityLimiter(CONCURRENT_JOBS)
        self._leads: dict[str, int] = {}
        self._rng = random.Random()
        self._failures: Deque[CrmFailure] = collections.deque(maxlen=FAILURES_KEPT)
        self._queued = 0
        self._created = 0
        self._noted = 0
        self._skipped = 0
        self._failed = 0
        self._auth_failing = False

    def _make_client(self, http: httpx.AsyncClient) -> KrayinClient:
        s = self._settings
        return KrayinClient(http, s.crm.krayin_api_url, s.crm.krayin_api_token, s.server.http_timeout)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the job tasks until cancelled. Creates (and closes) the HTTP client if none was given."""
        s = self._settings
        owned: httpx.AsyncClient | None = None
        if self._enabled and self._client is None:
            owned = httpx.AsyncClient(timeout=httpx.Timeout(s.server.http_timeout), limits=HTTP_LIMITS)
            self._client = self._make_client(owned)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._enabled:
                    for jid in list(self._queues):
                        nursery.start_soon(self._worker, jid)
                    log.info("[CRM] Registro automático de leads activo: Krayin en %s (stage=%s, user=%s, "
                             "source=%s, type=%s)", s.crm.krayin_api_url, s.crm.krayin_stage_id, s.crm.krayin_user_id,
                             s.crm.krayin_lead_source_id, s.crm.krayin_lead_type_id)
                else:
                    log.info("[CRM] Registro de leads desactivado (%s)", self._why_disabled())
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self._nursery = None
        finally:
            if owned is not None:
                self._client = None
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await owned.aclose()

    def _why_disabled(self) -> str:
        s = self._settings
        if not s.crm.crm_auto_register:
            return "CRM_AUTO_REGISTER=false"
        missing = [name for name, value in (("KRAYIN_API_URL", s.crm.krayin_api_url),
                                            ("KRAYIN_API_TOKEN", s.crm.krayin_api_token)) if not value]
        return f"falta {', '.join(missing)}"

    def submit(self, request: LeadRequest) -> None:
        """Queue a job behind the JID's earlier ones; never blocks. A no-op (DEBUG log) when CRM is off."""
        if not self._enabled:
            log.debug("[CRM] Registro desactivado: se ignora la solicitud para user_id=%s", request.jid)
            return
        job = _Job(request, trio.current_time())
        queue = self._queues.get(request.jid)
        self._queued += 1
        if queue is not None:
            queue.append(job)
            return
        self._queues[request.jid] = collections.deque([job])
        if self._nursery is not None:
            self._nursery.start_soon(self._worker, request.jid)

    def statistics(self) -> CrmStatistics:
        now = trio.current_time() if self._running else 0.0
        pending = tuple(
            PendingJob(job.request.jid, "note" if self._lead_of(job.request) else "lead", job.attempts,
                       job.last_error, now - job.submitted_at, job.request.job_id)
            for job in sorted(self._running.values(), key=lambda j: j.submitted_at)
        )
        return CrmStatistics(
            enabled=self._enabled,
            queued=self._queued,
            running=len(self._running),
            retrying=sum(1 for job in self._running.values() if job.retrying),
            leads_created=self._created,
            notes_added=self._noted,
            skipped=self._skipped,
            failed=self._failed,
            auth_failing=self._auth_failing,
            pending=pending,
            failures=tuple(self._failures),
        )

    async def update_lead(self, lead_id: int, stage_id: int | None, notes: str = "") -> bool:
        """Move a lead to ``stage_id`` (when given) and add ``notes`` as a note (when non-empty).

        One attempt each, no retries (the seed's ``actualizar_lead_krayin``); True when every call
        succeeded. Never raises for a Krayin failure; raises ``RuntimeError`` before ``run()`` starts
        when no HTTP client was passed.
        """
        if not self._enabled:
            log.warning("[CRM] Registro desactivado: no se actualiza el lead %s", lead_id)
            return False
        if self._client is None:
            raise RuntimeError("CrmSupervisor.update_lead called before run() started")
        ok = True
        try:
            if stage_id is not None:
                await self._client.update_stage(lead_id, stage_id)
                log.info("[CRM] Lead %s movido a la etapa %s", lead_id, stage_id)
            if notes:
                await self._client.add_note(lead_id, notes)
                log.info("[CRM] Nota agregada al lead %s", lead_id)
        except KrayinError as exc:
            self._note_auth(exc)
            log.error("[CRM] Error al actualizar lead %s: %s", lead_id, exc)
            ok = False
        return ok

    # ------------------------------------------------------------------ workers

    async def _worker(self, jid: str) -> None:
        queue = self._queues[jid]
        while queue:
            job = queue.popleft()
            self._queued -= 1
            self._running[jid] = job
            try:
                outcome = await self._process(job)
            except Exception as exc:  # a bug must not kill the supervisor or the JID's later jobs
                log.exception("[CRM] Error al registrar lead: error inesperado para user_id=%s", jid)
                outcome = self._give_up(job, f"internal error: {type(exc).__name__}")
            finally:
                del self._running[jid]
            if self._on_done is not None:
                try:
                    await self._on_done(job.request, outcome)
                except Exception:
                    log.exception("[CRM] on_done callback failed for user_id=%s", jid)
        del self._queues[jid]  # no checkpoint since the emptiness check: submit() cannot slip in between

    async def _process(self, job: _Job) -> str:
        """Run one job to completion: retry retryable failures with capped backoff, give up after
        ``CRM_GIVE_UP_SECONDS`` or on a permanent error."""
        give_up = self._settings.crm.crm_give_up_seconds
        while True:
            job.attempts += 1
            try:
                async with self._limiter:
                    outcome = await self._attempt(job)
            except KrayinError as exc:
                self._note_auth(exc)
                job.last_error = str(exc)
                if not exc.retryable:
                    log.error("[CRM] Error al crear lead: status=%s, error=%s", exc.status, _short(exc.body or exc))
                    return self._give_up(job, str(exc))
                delay = self._backoff(job.attempts, exc.retry_after)
                waited = trio.current_time() - job.submitted_at
                if waited + delay > give_up:
                    return self._give_up(job, f"sin éxito tras {job.attempts} intentos en {waited:.0f}s: {exc}")
                if exc.status == 0:
                    log.warning("[CRM] Error al registrar lead: %s (user_id=%s); reintento %d en %.1fs",
                                exc, job.request.jid, job.attempts, delay)
                elif not exc.auth:
                    log.warning("[CRM] Error al crear lead: status=%s, error=%s (user_id=%s); reintento %d en %.1fs",
                                exc.status, _short(exc.body), job.request.jid, job.attempts, delay)
                job.retrying = True
                try:
                    await trio.sleep(delay)
                finally:
                    job.retrying = False
                continue
            if self._auth_failing:
                log.info("[CRM] Krayin vuelve a aceptar el token")
            self._auth_failing = False
            if job.lead_id is not None:
                await self._record_lead(job.request.jid, job.lead_id)
            return outcome

    async def _record_lead(self, jid: str, lead_id: int) -> None:
        """Hand the new lead id to ``on_lead``, outside the concurrency slot and bounded in time: a chat
        whose mailbox does not take it must not hold up other chats' leads. This supervisor remembers
        the id either way, so the chat never gets a second lead."""
        if self._on_lead is None:
            return
        with trio.move_on_after(LEAD_RECORD_TIMEOUT_SECONDS) as waited:
            try:
                await self._on_lead(jid, lead_id)
            except Exception:
                log.exception("[CRM] on_lead callback failed for user_id=%s", jid)
        if waited.cancelled_caught:
            log.warning("[CRM] Lead id not recorded in the chat within %gs (user_id=%s, lead_id=%s); "
                        "carrying on", LEAD_RECORD_TIMEOUT_SECONDS, jid, lead_id)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(MAX_BACKOFF_SECONDS, BASE_BACKOFF_SECONDS * 2 ** (attempt - 1))
        delay = ceiling * self._rng.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, MAX_BACKOFF_SECONDS)

    def _note_auth(self, exc: KrayinError) -> None:
        if exc.auth:
            if not self._auth_failing:
                log.error("[CRM] Krayin rechazó el token (status=%s): KRAYIN_API_TOKEN inválido o expirado; "
                          "los leads pendientes se reintentan", exc.status)
            self._auth_failing = True

    def _give_up(self, job: _Job, error: str) -> str:
        self._failed += 1
        self._failures.append(CrmFailure(job.request.jid, error, job.attempts, time.time(), job.request.job_id))
        log.error("[CRM] Fallo al registrar lead para user_id=%s: %s", job.request.jid, error)
        return "failed"

    def _lead_of(self, request: LeadRequest) -> int | None:
        return request.lead_id if request.lead_id is not None else self._leads.get(request.jid)

    def _remember_lead(self, jid: str, lead_id: int) -> None:
        self._leads.pop(jid, None)
        self._leads[jid] = lead_id
        if len(self._leads) > KNOWN_LEADS_KEPT:
            self._leads.pop(next(iter(self._leads)))

    async def _attempt(self, job: _Job) -> str:
        """One try at the job; raises KrayinError. Progress (the person id) survives between tries."""
        assert self._client is not None
        request = job.request
        existing = self._lead_of(request)
        if existing is not None:
            self._remember_lead(request.jid, existing)
            if not request.motivo and request.lead_id is None:
                log.info("[CRM] Lead ya registrado para user_id=%s (lead_id=%s): no se crea otro",
                         request.jid, existing)
                self._skipped += 1
                return "skipped"
            await self._client.add_note(existing, self._note_text(request))
            log.info("[CRM] Nota agregada al lead existente - lead_id=%s, user_id=%s", existing, request.jid)
            self._noted += 1
            return "noted"

        phone = self._phone(request)
        if not job.announced:
            job.announced = True
            log.info("[CRM] Iniciando registro de lead para user_id=%s, telefono=%s", request.jid, phone or "-")
            log.debug("[CRM] Información del lead: %s", self._shown({
                "nombre": request.name, "telefono": phone or "", "empresa": request.empresa,
                "rubro": request.rubro, "volumen_mensajes": request.volumen_mensajes, "motivo": request.motivo,
            }))
            log.info("[CRM] Creando lead en Krayin - Nombre: %s, Telefono: %s", self._shown(self._name(request)),
                     phone or "-")
        if job.person_id is None:
            log.debug("[CRM] Paso 1: Creando persona en Krayin")
            job.person_id = await self._find_or_create_person(request)
        value = lead_value(request.volumen_mensajes)
        log.debug("[CRM] Valor del lead calculado: $%s (basado en %s mensajes)", value,
                  request.volumen_mensajes if request.volumen_mensajes else "sin info de")
        payload = self._lead_payload(request, job.person_id, value)
        log.debug("[CRM] Paso 2: Creando lead con datos: %s", self._shown(payload))
        data = await self._client.create_lead(payload)
        lead_id = job.lead_id = _id_of(data, "lead")
        log.info("[CRM] Lead creado exitosamente - lead_id=%s, valor=$%s", lead_id, value)
        self._remember_lead(request.jid, lead_id)
        self._created += 1
        log.info("[CRM] Lead registrado exitosamente - lead_id=%s", lead_id)
        log.info("[CRM] ✅ Lead creado en Krayin CRM (ID: %s, Valor: $%s)", lead_id, value)
        return "created"   # _process hands the id to on_lead, outside the concurrency slot

    def _shown(self, value: object) -> str:
        """Lead data (the customer's name, the model's motivo) as LOG_CUSTOMER_TEXT lets a log line show it."""
        return log_text(str(value), self._settings.security.log_customer_text)

    # ------------------------------------------------------------------ Krayin payloads

    @staticmethod
    def _name(request: LeadRequest) -> str:
        return request.name.strip() or DEFAULT_LEAD_NAME

    @staticmethod
    def _phone(request: LeadRequest) -> str | None:
        """Phone digits: the request's, else the phone-number JID in ``alt_jid``; never from an @lid."""
        if request.phone and _digits(request.phone):
            return _digits(request.phone)
        if request.alt_jid.endswith("@s.whatsapp.net"):
            return _digits(request.alt_jid.split("@", 1)[0].split(":", 1)[0]) or None
        if request.jid.endswith("@s.whatsapp.net"):
            return _digits(request.jid.split("@", 1)[0].split(":", 1)[0]) or None
        return None

    def _email(self, request: LeadRequest, phone: str | None) -> str:
        if request.email:
            return request.email
        domain = self._settings.crm.crm_email_domain
        if phone:
            return f"wa-{phone}@{domain}"
        local = re.sub(r"[^0-9A-Za-z]", "", request.jid.split("@", 1)[0]) or "unknown"
        return f"wa-lid-{local}@{domain}"

    def _person_payload(self, request: LeadRequest, phone: str | None) -> dict[str, Any]:
        # contact_numbers is optional in Krayin and validated as numeric: an @lid chat without a known
        # phone gets none (its @lid is no phone number); its unique placeholder email identifies it.
        payload: dict[str, Any] = {
            "name": self._name(request),
            "emails": [{"value": self._email(request, phone), "label": "work"}],
        }
        if phone:
            payload["contact_numbers"] = [{"value": f"+{phone}", "label": "work"}]
        return payload

    async def _find_or_create_person(self, request: LeadRequest) -> int:
        assert self._client is not None
        phone = self._phone(request)
        # By phone when known (a 422 duplicate then searches by email too); else by the placeholder email.
        person_id = await self._find_person(request, phone, by_email=not phone)
        if person_id is not None:
            log.info("[CRM] Persona existente encontrada - person_id=%s", person_id)
            return person_id
        payload = self._person_payload(request, phone)
        log.info("[CRM] Creando persona - Nombre: %s, Telefono: %s", self._shown(payload["name"]), phone or "-")
        log.debug("[CRM] Datos de persona: %s", self._shown(payload))
        try:
            data = await self._client.create_person(payload)
        except KrayinError as exc:
            if not exc.duplicate:
                raise
            log.info("[CRM] La persona ya existe en Krayin (422): se busca para reutilizarla")
            person_id = await self._find_person(request, phone)
            if person_id is None:
                raise KrayinError(422, f"duplicate person for {request.jid} not found by search "
                                       f"(is it owned by another Krayin user?)", body=exc.body) from None
            log.info("[CRM] Persona existente reutilizada - person_id=%s", person_id)
            return person_id
        person_id = _id_of(data, "person")
        log.info("[CRM] Persona creada exitosamente - person_id=%s", person_id)
        return person_id

    async def _find_person(self, request: LeadRequest, phone: str | None, *, by_email: bool = True) -> int | None:
        """An existing person whose phone has exactly these digits, else (``by_email``) whose email is ours."""
        assert self._client is not None
        if phone:
            for person in await self._client.search_persons(phone, "contact_numbers"):
                numbers = person.get("contact_numbers") or []
                if any(isinstance(n, dict) and _digits(str(n.get("value", ""))) == phone for n in numbers):
                    return _id_of(person, "person")
        if not by_email:
            return None
        email = self._email(request, phone)
        for person in await self._client.search_persons(email, "emails"):
            emails = person.get("emails") or []
            if any(isinstance(e, dict) and str(e.get("value", "")).lower() == email.lower() for e in emails):
                return _id_of(person, "person")
        return None

    def _lead_payload(self, request: LeadRequest, person_id: int, value: int) -> dict[str, Any]:
        s = self._settings
        name = self._name(request)
        title = f"{name} - {request.empresa.strip()}" if request.empresa.strip() else name
        return {
            "title": title,
            "description": self._description(request),
            "lead_value": value,
            "lead_source_id": s.crm.krayin_lead_source_id,
            "lead_type_id": s.crm.krayin_lead_type_id,
            "lead_pipeline_stage_id": s.crm.krayin_stage_id,
            "user_id": s.crm.krayin_user_id,
            "person": {"id": person_id},
        }

    def _description(self, request: LeadRequest) -> str:
        phone = self._phone(request)
        lines = ["Lead generado automáticamente desde WhatsApp (solicitud de reserva)."]
        if request.motivo:
            lines.append(f"Motivo: {request.motivo}")
        if request.rubro:
            lines.append(f"Rubro: {request.rubro}")
        if request.volumen_mensajes:
            lines.append(f"Volumen de mensajes: {request.volumen_mensajes}")
        lines.append(f"Teléfono: +{phone}" if phone else "Teléfono: desconocido")
        if request.jid.endswith("@lid"):
            lines.append(f"WhatsApp @lid: {request.jid} (identificador de privacidad, no es un teléfono)")
        else:
            lines.append(f"WhatsApp: {request.jid}")
        return "\n".join(lines)

    @staticmethod
    def _note_text(request: LeadRequest) -> str:
        text = "Nueva solicitud de reserva desde WhatsApp."
        if request.motivo:
            text += f" Motivo: {request.motivo}"
        return text


def _id_of(data: Any, what: str) -> int:
    """The integer ``id`` of a Krayin resource; an answer without one is a (retryable) server fault."""
    try:
        return int(data["id"])
    except (TypeError, KeyError, ValueError):
        raise KrayinError(502, f"Krayin answered without a {what} id: {_short(data)}", body=data) from None
