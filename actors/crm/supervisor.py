"""The CRM supervisor: registers booking leads in Krayin without ever delaying a conversation.

The policy, apart from the wire (``krayin.py``) and the payload shapes (``payloads.py``): one job
at a time per JID (a ``KeyedSerialExecutor``), so a JID never gets two leads; retries with capped
exponential backoff (a ``RetryPolicy``) until success or ``CRM_GIVE_UP_SECONDS`` after submission;
at most ``CONCURRENT_JOBS`` Krayin attempts at once across chats; lead bookkeeping; the seed's
``[CRM]`` log lines.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Awaitable, Callable, Deque

import attrs
import httpx
import trio

from actors.privacy import log_text
from actors.settings import Settings
from runtime.keyed import KeyedSerialExecutor, MailboxFull
from runtime.retry import RetryPolicy

from .krayin import HTTP_LIMITS, KrayinClient, KrayinError, id_of, short
from .payloads import lead_name, lead_payload, lead_value, note_text, phone_of
from .persons import find_or_create_person
from .records import CrmFailure, CrmStatistics, LeadRequest, PendingJob

log = logging.getLogger(__name__)

CONCURRENT_JOBS = 4              # Krayin allows 60 requests/min per user: keep the fan-out small
QUEUE_CAPACITY = 1_000           # jobs waiting per JID; one more is given up (a chat books far fewer)
KEYS_IN_FLIGHT = 4_096           # JIDs with a job in progress: a memory bound, CONCURRENT_JOBS paces Krayin
FAILURES_KEPT = 50
KNOWN_LEADS_KEPT = 50_000
LEAD_RECORD_TIMEOUT_SECONDS = 10.0  # how long a new lead id may wait for the chat's mailbox (then: logged, still known here)
DROPPED = "dropped"               # a job left to the chat's new owner (several nodes): neither done nor failed


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
    create_sent: bool = False        # a create_lead went out: it may have succeeded without our seeing the answer


class CrmSupervisor:
    """Registers leads in Krayin, one job at a time per JID, retried until success or give-up.

    ``submit()`` never blocks. A request without ``lead_id`` for a JID whose lead this supervisor already
    created (or saw) becomes a note on that lead, or is skipped when it has no ``motivo``; so one JID
    never gets two leads (per conversation: ``LeadRequest.key``, one per instance and chat). ``on_lead(key, lead_id)`` is awaited once a lead exists; ``on_done(request,
    outcome)`` once a job is finished for good (outcome ``"created"``, ``"noted"``, ``"skipped"``,
    ``"failed"``; a job refused by its JID's full queue is ``"failed"`` too), e.g. to settle its
    durable row. Callback errors are logged and swallowed.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        http: httpx.AsyncClient | None = None,
        on_lead: Callable[[str, int], Awaitable[None]] | None = None,
        on_done: Callable[[LeadRequest, str], Awaitable[None]] | None = None,
        settings_for: Callable[[str], Settings] | None = None,
        enabled: Callable[[], bool] | None = None,
        may_run: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        """``settings_for(instance)``: that instance's effective settings, whose Krayin ids a lead
        gets (default: ``settings``; the Krayin server and token are always ``settings``').
        ``enabled()``: whether any instance registers leads now (default: ``settings``' CRM switch); an
        instances reload may turn it on or off. Jobs run whenever Krayin is configured
        (KRAYIN_API_URL and KRAYIN_API_TOKEN): whether a chat asks for one is its instance's switch."""
        self._settings = settings
        self._settings_for = settings_for if settings_for is not None else (lambda _: settings)
        self._enabled = enabled if enabled is not None else (lambda: settings.crm.crm_enabled)
        self._able = bool(settings.crm.krayin_api_url and settings.crm.krayin_api_token)
        self._client: KrayinClient | None = self._make_client(http) if http is not None and self._able else None
        self._on_lead = on_lead
        self._on_done = on_done
        self._may_run = may_run   # (key) awaited before each attempt: only the chat's owner runs its jobs
        self._jobs: KeyedSerialExecutor[str, _Job] = KeyedSerialExecutor(
            self._handle, queue_capacity=QUEUE_CAPACITY, max_keys_in_flight=KEYS_IN_FLIGHT, name="crm")
        # The budget counts from submission (the job's ``submitted_at``), not from its first attempt.
        self._retry = RetryPolicy(attempts=None, base=1.0, cap=30.0, jitter=0.5,
                                  budget=settings.crm.crm_give_up_seconds)
        self._nursery: trio.Nursery | None = None
        self._refused: list[_Job] = []   # refused before run() started: their on_done waits for it
        self._running: dict[str, _Job] = {}
        self._limiter = trio.CapacityLimiter(CONCURRENT_JOBS)
        self._leads: dict[str, int] = {}
        self._failures: Deque[CrmFailure] = collections.deque(maxlen=FAILURES_KEPT)
        self._created = 0
        self._noted = 0
        self._skipped = 0
        self._failed = 0
        self._auth_failing = False

    @property
    def enabled(self) -> bool:
        """Whether any instance registers leads now."""
        return self._able and self._enabled()

    def _make_client(self, http: httpx.AsyncClient) -> KrayinClient:
        s = self._settings
        return KrayinClient(http, s.crm.krayin_api_url, s.crm.krayin_api_token, s.server.http_timeout)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the job tasks until cancelled. Creates (and closes) the HTTP client if none was given."""
        s = self._settings
        owned: httpx.AsyncClient | None = None
        if self._able and self._client is None:
            owned = httpx.AsyncClient(timeout=httpx.Timeout(s.server.http_timeout), limits=HTTP_LIMITS)
            self._client = self._make_client(owned)
        try:
            async with trio.open_nursery() as nursery:
                if self._able:
                    await nursery.start(self._jobs.run)
                if self.enabled:
                    log.info("[CRM] Registro automático de leads activo: Krayin en %s (stage=%s, user=%s, "
                             "source=%s, type=%s)", s.crm.krayin_api_url, s.crm.krayin_stage_id, s.crm.krayin_user_id,
                             s.crm.krayin_lead_source_id, s.crm.krayin_lead_type_id)
                else:
                    log.info("[CRM] Registro de leads desactivado (%s)", self._why_disabled())
                self._nursery = nursery
                for job in self._refused:
                    nursery.start_soon(self._finish, job, "failed")
                self._refused.clear()
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
        """Queue a job behind the JID's earlier ones; never blocks. A no-op (DEBUG log) when CRM is off.

        A JID that already has ``QUEUE_CAPACITY`` jobs waiting gets this one given up at once (logged,
        counted, ``on_done(request, "failed")``), never silently dropped."""
        if not self._able:
            log.debug("[CRM] Registro desactivado: se ignora la solicitud para user_id=%s", request.jid)
            return
        job = _Job(request, trio.current_time())
        try:
            self._jobs.submit_nowait(request.chat, job)
        except MailboxFull:
            self._give_up(job, f"cola llena: ya hay {QUEUE_CAPACITY} trabajos pendientes para este chat")
            if self._nursery is None:
                self._refused.append(job)
            else:
                self._nursery.start_soon(self._finish, job, "failed")

    def statistics(self) -> CrmStatistics:
        now = trio.current_time() if self._running else 0.0
        pending = tuple(
            PendingJob(job.request.jid, "note" if self._lead_of(job.request) else "lead", job.attempts,
                       job.last_error, now - job.submitted_at, job.request.job_id)
            for job in sorted(self._running.values(), key=lambda j: j.submitted_at)
        )
        return CrmStatistics(
            enabled=self.enabled,
            queued=self._jobs.statistics().queued,
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

    # ------------------------------------------------------------------ jobs

    async def _handle(self, jid: str, job: _Job) -> None:
        """The executor's handler: one job of ``jid`` to completion, then its ``on_done``."""
        self._running[jid] = job
        try:
            outcome = await self._process(job)
        except Exception as exc:  # a bug must not kill the supervisor or the JID's later jobs
            log.exception("[CRM] Error al registrar lead: error inesperado para user_id=%s", jid)
            outcome = self._give_up(job, f"internal error: {type(exc).__name__}")
        finally:
            del self._running[jid]
        await self._finish(job, outcome)

    async def _finish(self, job: _Job, outcome: str) -> None:
        if self._on_done is None or outcome == DROPPED:
            return
        try:
            await self._on_done(job.request, outcome)
        except Exception:
            log.exception("[CRM] on_done callback failed for user_id=%s", job.request.jid)

    async def _process(self, job: _Job) -> str:
        """Run one job to completion: retry retryable failures with capped backoff, give up after
        ``CRM_GIVE_UP_SECONDS`` or on a permanent error."""
        while True:
            if self._may_run is not None and job.request.key and not await self._may_run(job.request.key):
                log.info("[CRM] job for user_id=%s dropped: its chat moved to another node (the job stays stored)",
                         job.request.jid)
                return DROPPED
            job.attempts += 1
            try:
                async with self._limiter:
                    outcome = await self._attempt(job)
            except KrayinError as exc:
                self._note_auth(exc)
                job.last_error = str(exc)
                if not exc.retryable:
                    log.error("[CRM] Error al crear lead: status=%s, error=%s", exc.status, short(exc.body or exc))
                    return self._give_up(job, str(exc))
                waited = trio.current_time() - job.submitted_at
                delay = self._retry.delay(job.attempts, elapsed=waited, retry_after=exc.retry_after)
                if delay is None:
                    return self._give_up(job, f"sin éxito tras {job.attempts} intentos en {waited:.0f}s: {exc}")
                if exc.status == 0:
                    log.warning("[CRM] Error al registrar lead: %s (user_id=%s); reintento %d en %.1fs",
                                exc, job.request.jid, job.attempts, delay)
                elif not exc.auth:
                    log.warning("[CRM] Error al crear lead: status=%s, error=%s (user_id=%s); reintento %d en %.1fs",
                                exc.status, short(exc.body), job.request.jid, job.attempts, delay)
                job.retrying = True   # sleeping outside the limiter: a waiting job holds no Krayin slot
                try:
                    await trio.sleep(delay)
                finally:
                    job.retrying = False
                continue
            if self._auth_failing:
                log.info("[CRM] Krayin vuelve a aceptar el token")
            self._auth_failing = False
            if job.lead_id is not None:
                await self._record_lead(job.request.chat, job.lead_id)
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

    # ------------------------------------------------------------------ lead bookkeeping

    def _lead_of(self, request: LeadRequest) -> int | None:
        return request.lead_id if request.lead_id is not None else self._leads.get(request.chat)

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
            self._remember_lead(request.chat, existing)
            if not request.motivo and request.lead_id is None:
                log.info("[CRM] Lead ya registrado para user_id=%s (lead_id=%s): no se crea otro",
                         request.jid, existing)
                self._skipped += 1
                return "skipped"
            await self._client.add_note(existing, note_text(request))
            log.info("[CRM] Nota agregada al lead existente - lead_id=%s, user_id=%s", existing, request.jid)
            self._noted += 1
            return "noted"

        phone = phone_of(request)
        if not job.announced:
            job.announced = True
            log.info("[CRM] Iniciando registro de lead para user_id=%s, telefono=%s", request.jid, phone or "-")
            log.debug("[CRM] Información del lead: %s", self._shown({
                "nombre": request.name, "telefono": phone or "", "empresa": request.empresa,
                "rubro": request.rubro, "volumen_mensajes": request.volumen_mensajes, "motivo": request.motivo,
            }))
            log.info("[CRM] Creando lead en Krayin - Nombre: %s, Telefono: %s", self._shown(lead_name(request)),
                     phone or "-")
        if job.person_id is None:
            log.debug("[CRM] Paso 1: Creando persona en Krayin")
            job.person_id = await find_or_create_person(self._client, request, self._settings_for(request.instance))
        value = lead_value(request.volumen_mensajes)
        log.debug("[CRM] Valor del lead calculado: $%s (basado en %s mensajes)", value,
                  request.volumen_mensajes if request.volumen_mensajes else "sin info de")
        payload = lead_payload(request, job.person_id, value, self._settings_for(request.instance))
        if job.create_sent or request.recovered:
            found = await self._created_before(job.person_id, payload)
            if found is not None:
                job.lead_id = found
                self._remember_lead(request.chat, found)
                log.info("[CRM] Lead ya creado en un intento anterior - lead_id=%s, user_id=%s: no se crea otro",
                         found, request.jid)
                self._created += 1
                return "created"
        log.debug("[CRM] Paso 2: Creando lead con datos: %s", self._shown(payload))
        job.create_sent = True
        data = await self._client.create_lead(payload)
        lead_id = job.lead_id = id_of(data, "lead")
        log.info("[CRM] Lead creado exitosamente - lead_id=%s, valor=$%s", lead_id, value)
        self._remember_lead(request.chat, lead_id)
        self._created += 1
        log.info("[CRM] Lead registrado exitosamente - lead_id=%s", lead_id)
        log.info("[CRM] ✅ Lead creado en Krayin CRM (ID: %s, Valor: $%s)", lead_id, value)
        return "created"   # _process hands the id to on_lead, outside the concurrency slot

    async def _created_before(self, person_id: int, payload: dict[str, Any]) -> int | None:
        """The lead an earlier try of this job created, if any: a create whose answer was lost (a
        timeout, a 5xx after the insert) or a job recovered after a crash before its lead id was
        recorded. It is the person's lead with this job's very title and description."""
        assert self._client is not None
        for lead in await self._client.search_leads(person_id):
            if lead.get("title") == payload["title"] and lead.get("description", payload["description"]) == \
                    payload["description"] and isinstance(lead.get("id"), int):
                return int(lead["id"])
        return None

    def _shown(self, value: object) -> str:
        """Lead data (the customer's name, the model's motivo) as LOG_CUSTOMER_TEXT lets a log line show it."""
        return log_text(str(value), self._settings.security.log_customer_text)
