"""The conversation actor: one per chat JID, owning its window, booking flag and lead info.

One turn (SPEC §1.4): window += user message → finished-conversation rule → prompt →
ProviderChain.ask → booking JSON or text → outbound (per-JID FIFO) → window += reply →
truncate → one store commit that saves the state, acks the inbox row and writes the outbox rows.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, Sequence

import attrs

from runtime.clock import Clock
from runtime.store import Store

from .booking import BookingAction, parse_answer
from .crm import LeadRequest
from .generic import is_generic_message
from .inbound import InboundMessage
from .jid import phone_of
from .llm.base import ChatMessage, Prompt
from .llm.chain import Answer
from .outbound import OutboundMessage
from .prompts import Texts
from .settings import Settings
from .state import ASSISTANT, USER, ConversationState, LeadInfo, WindowEntry, seed_messages

log = logging.getLogger("python-agent")


@attrs.frozen
class Accepted:
    """A message the store accepted (``seq`` is its inbox row) on its way to the actor."""

    seq: int
    message: InboundMessage


class Asker(Protocol):
    async def ask(self, prompt: Prompt) -> Answer: ...


class Sender(Protocol):
    def submit(self, message: OutboundMessage) -> None: ...

    async def typing(self, jid: str, instances: tuple[str, ...]) -> None: ...


class LeadRegistrar(Protocol):
    def submit(self, request: LeadRequest) -> None: ...


@attrs.frozen
class ConversationContext:
    """The shared objects every conversation actor talks to (built once by the service)."""

    settings: Settings
    texts: Texts
    chain: Asker
    outbound: Sender
    store: Store
    clock: Clock
    crm: LeadRegistrar | None = None


@attrs.frozen
class ConversationSnapshot:
    """A frozen view of one conversation for the admin endpoints."""

    jid: str
    window_size: int
    booking_sent: bool
    lead: dict[str, Any]
    messages_in: int
    replies_out: int
    ignored: int
    crashes: int
    paused_until: float
    messages: list[dict[str, Any]]


def _trim(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


class ConversationActor:
    """Handles one chat's messages strictly in order (the runtime guarantees one turn at a time)."""

    def __init__(self, jid: str, context: ConversationContext) -> None:
        self.jid = jid
        self._ctx = context
        self.state = ConversationState()

    # -- runtime hooks -------------------------------------------------------------------------

    async def activate(self) -> None:
        saved = await self._ctx.store.load(self.jid)
        if saved is not None:
            self.state = ConversationState.from_dict(saved)
            log.debug("get_memory called for user_id=%s (restored %d messages)", self.jid, len(self.state.window))
        else:
            log.debug("get_memory called for user_id=%s (new conversation)", self.jid)

    def batch_delay(self, first: Accepted) -> float:
        return 0.0

    async def handle(self, batch: Sequence[Accepted]) -> None:
        for item in sorted(batch, key=lambda a: (a.message.timestamp, a.seq)):
            await self._turn(item)

    async def on_crash(self, batch: Sequence[Accepted], error: BaseException) -> None:
        """Answer each message of a failed turn with the polite text; the window keeps the exchange."""
        state = self.state
        state.crashes += 1
        state.last_activity = self._ctx.clock.now()
        outbox = []
        for item in batch:
            now = self._ctx.clock.now()
            state.window.append(WindowEntry(USER, item.message.text, now))
            state.window.append(WindowEntry(ASSISTANT, self._ctx.texts.polite_error, now))
            outbox.append(self._reply_row(item.message, self._ctx.texts.polite_error))
            log.info("[RESPUESTA]: %s", self._ctx.texts.polite_error)
        self._truncate()
        await self._commit([item.seq for item in batch], outbox, [item.message for item in batch])

    async def on_expire(self) -> None:
        await self._ctx.store.delete(self.jid)

    def snapshot(self) -> ConversationSnapshot:
        s = self.state
        return ConversationSnapshot(
            jid=self.jid,
            window_size=len(s.window),
            booking_sent=s.booking_sent,
            lead=attrs.asdict(s.lead),
            messages_in=s.messages_in,
            replies_out=s.replies_out,
            ignored=s.ignored,
            crashes=s.crashes,
            paused_until=s.paused_until,
            messages=[dict(m, at=e.at) for m, e in zip(seed_messages(s.window), s.window)],
        )

    # -- the turn ------------------------------------------------------------------------------

    async def _turn(self, item: Accepted) -> None:
        message = item.message
        ctx = self._ctx
        state = self.state
        text = message.text
        log.info("Processing message from %s: %s", self.jid, _trim(text))
        self._remember_customer(message)

        if state.booking_sent:
            if is_generic_message(text):
                log.info("[BOOKING] Conversación finalizada. Mensaje genérico ignorado: %s", _trim(text))
                log.info("[BOOKING] No se envía respuesta - conversación finalizada")
                state.messages_in += 1
                state.ignored += 1
                state.last_activity = ctx.clock.now()
                state.window.append(WindowEntry(USER, text, state.last_activity))
                self._truncate()
                await self._commit([item.seq], [], [])
                return
            log.info("[BOOKING] Nueva pregunta después del link, continuando conversación: %s", _trim(text))

        history = [ChatMessage(e.role, e.content) for e in state.window[-(ctx.settings.max_messages - 1):]]
        history.append(ChatMessage(USER, self._model_text(message)))
        prompt = Prompt(system=ctx.texts.agent_instruction, messages=tuple(history))
        answer = await ctx.chain.ask(prompt)
        log.info("[RESPUESTA DEL LLM]: %s", _trim(answer.text))

        action = parse_answer(answer.text) if not answer.failed else answer.text
        booking = isinstance(action, BookingAction)
        reply = self._booking_reply(action) if isinstance(action, BookingAction) else action

        # Everything below mutates the state with no await in between, then commits it whole.
        now = ctx.clock.now()
        state.messages_in += 1
        state.replies_out += 1
        state.last_activity = now
        state.booking_sent = booking and bool(ctx.settings.google_booking_url)
        state.window.append(WindowEntry(USER, text, now))
        state.window.append(WindowEntry(ASSISTANT, reply, now))
        self._truncate()
        outbox = [self._reply_row(message, reply)]
        crm_request = self._lead_request(action) if booking else None
        if crm_request is not None:
            outbox.append(("crm", _lead_payload(crm_request)))
        if state.booking_sent:
            log.info("[BOOKING] Conversación marcada como completada para user_id=%s", self.jid)
        ids = await self._commit([item.seq], outbox, [message])
        if crm_request is not None and ctx.crm is not None:
            ctx.crm.submit(attrs.evolve(crm_request, job_id=ids[-1]))

    def _model_text(self, message: InboundMessage) -> str:
        """The customer's text verbatim; a quoted message is given as context before it."""
        if message.quoted_text:
            return f"[En respuesta a: \"{_trim(message.quoted_text, 500)}\"]\n{message.text}"
        return message.text

    def _booking_reply(self, action: BookingAction) -> str:
        ctx = self._ctx
        log.info("[BOOKING] Generando link de reserva - Motivo: %s", action.motivo or "(sin motivo)")
        url = ctx.settings.google_booking_url
        if not url:
            log.warning("[BOOKING] GOOGLE_BOOKING_URL no configurada: no se puede enviar el link de reserva")
            return ctx.texts.booking_unavailable
        log.info("[BOOKING] Link de reserva generado exitosamente")
        return ctx.texts.booking_message.format(url=url)

    def _lead_request(self, action: BookingAction) -> LeadRequest | None:
        ctx = self._ctx
        if ctx.crm is None or not ctx.settings.crm_enabled:
            return None
        lead = self.state.lead
        return LeadRequest(
            jid=self.jid,
            name=lead.nombre or "Lead desde WhatsApp",
            phone=lead.telefono or None,
            motivo=action.motivo,
            lead_id=lead.lead_id,
            alt_jid=lead.alt_jid,
        )

    def _remember_customer(self, message: InboundMessage) -> None:
        lead: LeadInfo = self.state.lead
        if message.push_name and not lead.nombre:
            lead.nombre = message.push_name
        if not lead.telefono:
            lead.telefono = phone_of(self.jid) or phone_of(message.alt_jid) or ""
        if message.alt_jid and not lead.alt_jid:
            lead.alt_jid = message.alt_jid

    def set_lead_id(self, lead_id: int) -> None:
        """Record the CRM lead created for this chat (called by the CRM supervisor's callback)."""
        self.state.lead.lead_id = lead_id

    # -- helpers -------------------------------------------------------------------------------

    def _truncate(self) -> None:
        window = self.state.window
        limit = self._ctx.settings.max_messages
        if len(window) > limit:
            before = len(window)
            del window[: before - limit]
            log.info("Truncated memory: %d → %d messages", before, limit)

    def _reply_row(self, message: InboundMessage, text: str) -> tuple[str, dict[str, Any]]:
        return "reply", {"jid": self.jid, "text": text, "instances": list(message.instances)}

    async def _commit(
        self,
        acked: list[int],
        outbox: list[tuple[str, dict[str, Any]]],
        messages: list[InboundMessage],
    ) -> list[int]:
        ids = await self._ctx.store.commit(self.jid, self.state.to_dict(), acked=acked, outbox=outbox)
        for (kind, payload), row_id in zip(outbox, ids):
            if kind == "reply":
                self._ctx.outbound.submit(OutboundMessage(
                    jid=payload["jid"], text=payload["text"], instances=tuple(payload["instances"]), outbox_id=row_id,
                ))
        return ids


def _lead_payload(request: LeadRequest) -> dict[str, Any]:
    return attrs.asdict(request)
