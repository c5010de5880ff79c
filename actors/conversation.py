"""The conversation actor: one per (instance, chat), owning its window, booking flag, lead info and pause state.

Its key is the conversation key "<instance>/<jid>" (conversation_key.py); each unit (a turn or a
control) reads its instance's ``Tenant`` (tenants.py) once, at its start, and uses its settings,
texts and LLM chain throughout, so a reload changes nothing in flight.

One turn (docs/behaviour.md §3.2): window += user message → finished-conversation rule → prompt →
ProviderChain.ask → booking JSON or text → outbound (per-JID FIFO) → window += reply →
truncate → one store commit that saves the state, acks the inbox rows and writes the outbox rows.
Replies are handed to the outbound supervisor only after that commit, in turn order.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Protocol, Sequence

import attrs
import trio

from runtime.clock import Clock
from runtime.store import StateMeta, Store

from .booking import BookingAction, booking_reply, lead_request, parse_answer
from .bounds import bounded_entry, truncate
from .bounds import trim as _trim
from .controls import apply_command, phone_message, remember_sent
from .conversation_key import ConversationKey
from .crm import LeadRequest
from .echoes import RecentSends
from .flood import Flood, flood_check
from .generic import MAX_SCANNED_CHARS, is_generic_message, normalise
from .inbound import InboundMessage
from .instances import sender_instances
from .jid import phone_of
from .llm.chain import Answer
from .llm.prompt_cache import chat_cache_key
from .media import MediaSource, turn_images, wants_model, window_text
from .memory_summary import MAX_SUMMARY_CHARS, FoldJob, FoldResult, apply_fold, fold_job
from .outbound import OutboundMessage
from .privacy import log_text
from .prompts import Texts
from .settings import Settings
from .state import ASSISTANT, OPERATOR, USER, ConversationState, LeadInfo, seed_messages
from .tenants import Tenant, Tenants
from .turn_prompt import build_prompt

log = logging.getLogger(__name__)
PREVIEW_CHARS = 120


@attrs.frozen
class Accepted:
    """A message the store accepted (``seq`` is its inbox row); ``arrived`` is trio time at intake."""

    seq: int
    message: InboundMessage
    arrived: float = 0.0


@attrs.define
class Control:
    """A command ordered with the chat's messages in its mailbox: pause (``value``: minutes, None for
    HUMAN_TAKEOVER_MINUTES, 0 until resumed) | resume | reset | reply (``value``: an operator's text,
    sent in order with the bot's replies) from the admin, lead (the CRM supervisor recording
    ``value``, the lead id) or sent (the outbound supervisor recording ``value``, the ids Evolution
    gave our sends, so their fromMe echoes are not a person) or resend (``value``: a revived dead
    letter's outbox row, from the admin on another node). Every command but ``sent`` is
    committed at once; ``sent`` is saved with the next commit. An admin command queued through the
    chat's inbox (several nodes: actors/inbox_mail.py) has its row's ``seq``, acked by that commit."""

    command: str
    value: Any = None
    done: trio.Event = attrs.Factory(trio.Event)
    applied: bool = False      # set with ``done`` once the actor carried it out (not when it was stopped)
    seq: int | None = None     # its inbox row, when it came through the chat's inbox


Mail = Accepted | Control


class Sender(Protocol):
    def submit(self, message: OutboundMessage) -> None: ...

    async def typing(self, jid: str, instances: tuple[str, ...], key: str = "") -> None: ...


class LeadRegistrar(Protocol):
    def submit(self, request: LeadRequest) -> None: ...


class Summariser(Protocol):
    def submit(self, key: str, job: FoldJob, chain: Any, texts: Texts) -> bool: ...


@attrs.frozen
class ConversationContext:
    """The shared objects every conversation actor talks to (built once by the service).
    ``settings`` are the global ones (process-wide fields); per-instance ones come from ``tenants``."""

    settings: Settings
    tenants: Tenants
    outbound: Sender
    store: Store
    clock: Clock
    crm: LeadRegistrar | None = None
    observe_turn: Callable[[str, float], None] | None = None   # (instance, seconds from arrival to committed reply)
    media: MediaSource | None = None   # customers' images and voice notes (actors/media.py)
    summariser: Summariser | None = None   # MEMORY_SUMMARY's folds (actors/memory_summary.py)
    resend: Callable[[str, int], Awaitable[None]] | None = None   # several nodes: a revived dead letter's row


@attrs.frozen
class ConversationSnapshot:
    """A frozen view of one conversation for the admin endpoints."""

    jid: str
    instance: str
    window_size: int
    booking_sent: bool
    paused_until: float
    lead: dict[str, Any]
    messages_in: int
    replies_out: int
    ignored: int
    crashes: int
    summary: str = ""


class ConversationActor:
    """Handles one chat's mail strictly in order (the runtime guarantees one batch at a time)."""

    __slots__ = ("key", "_ctx", "_tenant", "state", "_outbox", "_acked", "_crm", "_unit",
                 "_unreached", "_before", "_loaded", "_apologised", "_folding", "_recent")

    def __init__(self, key: str, context: ConversationContext) -> None:
        self.key = key                                  # "<instance>/<jid>"; its parts are read from it
        self._ctx = context
        self._tenant: Tenant | None = None              # the unit's, read once at its start
        self.state = ConversationState()
        # Scratch of the unit being handled (empty tuples between units: an idle actor stays small).
        self._outbox: list[tuple[str, dict[str, Any]]] | tuple[()] = ()
        self._acked: list[int] | tuple[()] = ()
        self._crm: LeadRequest | None = None
        self._unit: list[Mail] | None = None         # the unit (turn or control) being handled
        self._unreached: list[Mail] | tuple[()] = ()  # the rest of the batch, for a crash
        self._before: ConversationState | None = None  # the state before the unit, for a crash
        self._loaded = False                            # activate() read the stored state
        self._apologised: set[int] | None = None        # seqs answered politely while it could not
        self._folding = False                           # a summary fold was handed over and has not come back
        self._recent: RecentSends | None = None         # our replies whose fromMe echoes may come before their ids

    @property
    def jid(self) -> str:
        """The customer's chat (what replies go to and logs show); derived, so an idle actor keeps one string."""
        return ConversationKey.parse(self.key).jid

    @property
    def instance(self) -> str:
        return ConversationKey.parse(self.key).instance

    # -- runtime hooks -------------------------------------------------------------------------

    async def activate(self) -> None:
        """Load the stored state. If that fails (store error, a state this code cannot read), the
        actor stays unloaded: ``on_crash`` then commits nothing, so the stored state is never
        overwritten, and the messages wait for a later activation."""
        saved = await self._ctx.store.load(self.key)
        if saved is not None:
            self.state = ConversationState.from_bytes(saved)
            log.debug("get_memory called for user_id=%s (restored %d messages)", self.jid, len(self.state.window))
        else:
            log.debug("get_memory called for user_id=%s (new conversation)", self.jid)
        self._loaded, self._apologised = True, None

    def batch_delay(self, first: Mail) -> float:
        """Hold a customer message until DEBOUNCE_SECONDS (or the reorder delay) after it arrived."""
        if not isinstance(first, Accepted) or first.message.from_me:
            return 0.0
        settings = self._ctx.tenants.for_instance(self.instance).settings
        hold = settings.conversation.debounce_seconds or self._ctx.settings.conversation.reorder_delay_seconds
        return max(0.0, first.arrived + hold - trio.current_time()) if hold else 0.0

    async def handle(self, batch: Sequence[Mail]) -> None:
        """Work through the batch unit by unit (a turn or a control), each committed on its own.

        Customer messages are ordered by messageTimestamp (then arrival); with DEBOUNCE_SECONDS a
        run of them is one merged turn; controls keep their place.
        """
        units: list[list[Mail]] = []
        run: list[Accepted] = []
        merge = self._ctx.tenants.for_instance(self.instance).settings.conversation.debounce_seconds > 0
        for item in [*batch, None]:
            if isinstance(item, Accepted):
                run.append(item)
                continue
            if run:
                run.sort(key=lambda a: (a.message.timestamp, a.seq))
                units.extend([list(run)] if merge else [[m] for m in run])
                run = []
            if isinstance(item, Control):
                units.append([item])
        for index, unit in enumerate(units):
            self._unit = unit
            self._unreached = [m for later in units[index + 1:] for m in later]
            self._before = self.state.copy()
            await self._handle_unit(unit)
        self._unit, self._unreached, self._before, self._tenant = None, (), None, None

    @property
    def tenant(self) -> Tenant:
        """The Tenant of the unit being handled (read once at its start), else the current one."""
        return self._tenant if self._tenant is not None else self._ctx.tenants.for_instance(self.instance)

    async def _handle_unit(self, unit: list[Mail]) -> None:
        self._outbox, self._acked, self._crm = [], [], None
        self._tenant = self._ctx.tenants.for_instance(self.instance)
        first = unit[0]
        if isinstance(first, Control):
            await self._control(first)
            return
        items = [m for m in unit if isinstance(m, Accepted)]
        customer = []
        for item in items:
            if item.message.from_me:
                self._acked.append(item.seq)
                if self._own_echo(item.message):
                    continue
                phone_message(self.tenant.settings, self.state, self.jid, item.message, self._ctx.clock.now())
            else:
                customer.append(item)
        if customer:
            await self._turn(customer)
        await self._commit()
        if customer and self._ctx.observe_turn is not None:
            self._ctx.observe_turn(self.instance, trio.current_time() - customer[0].arrived)
        if customer:
            self._fold_later()

    def _own_echo(self, message: InboundMessage) -> bool:
        """A fromMe message that is the echo of a reply we just sent, whose id we do not know yet
        (actors/echoes.py)."""
        recent = self._recent
        if recent is None or message.message_id in self.state.sent_ids:
            return False
        if not recent.claim(message.text, self._ctx.clock.now()):
            return False
        log.debug("fromMe echo of our reply to %s came before its send id: not a person", self.jid)
        return True

    def _fold_later(self) -> None:
        """After the committed turn: hand the oldest messages to the summariser when the window is
        full (MEMORY_SUMMARY), one fold at a time, with the instance's chain and texts; it reports
        back through the mailbox."""
        summariser = self._ctx.summariser
        if summariser is None or self._folding:
            return
        tenant = self.tenant
        job = fold_job(tenant.settings, self.state)
        if job is not None and summariser.submit(self.key, job, tenant.chain, tenant.texts):
            self._folding = True

    async def on_crash(self, batch: Sequence[Mail], error: BaseException) -> Sequence[Mail]:
        """Roll the state back to before the failing turn, answer its messages with the polite text,
        and hand back the messages of the batch it never reached (the runtime re-queues them).

        Before the state was loaded nothing is committed: each customer message gets the polite
        text once, and the whole batch is handed back (retried after the runtime's backoff)."""
        if not self._loaded:
            self._apologise(batch)
            return list(batch)
        tenant = self.tenant
        failing = self._unit if self._unit is not None else list(batch)
        unreached = list(self._unreached) if self._unit is not None else []
        if self._before is not None:
            self.state = self._before
        self._unit, self._unreached, self._before = None, (), None
        self._outbox, self._acked, self._crm = [], [], None
        state = self.state
        state.crashes += 1
        state.last_activity = self._ctx.clock.now()
        for item in failing:
            if isinstance(item, Control):
                if item.seq is not None:   # not carried out, and not retried: its inbox row is settled
                    self._acked.append(item.seq)
                item.done.set()
                continue
            message = item.message
            self._acked.append(item.seq)
            if message.from_me:
                continue
            state.messages_in += 1
            state.window.append(bounded_entry(tenant.settings, USER, window_text(tenant.texts, message),
                                              state.last_activity))
            self._reply(message, tenant.texts.polite_error)
            log.info("[RESPUESTA]: %s", tenant.texts.polite_error)
        await self._commit()
        self._tenant = None
        return unreached

    def _apologise(self, batch: Sequence[Mail]) -> None:
        """The polite text, once per message, sent without touching the stored conversation."""
        done = self._apologised if self._apologised is not None else set()
        polite = self.tenant.texts.polite_error
        for item in batch:
            if isinstance(item, Accepted) and not item.message.from_me and item.seq not in done:
                done.add(item.seq)
                self._ctx.outbound.submit(OutboundMessage(
                    jid=item.message.jid, text=polite, key=self.key,
                    instances=sender_instances(self._ctx.tenants, item.message)))
                log.info("[RESPUESTA]: %s", polite)
        self._apologised = done

    def _remember_send(self, text: str) -> None:
        if self._recent is None:
            self._recent = RecentSends()
        self._recent.add(text, self.tenant.settings.outbound.split_max_chars, self._ctx.clock.now())

    def hibernate(self) -> None:
        """Idle until the next message: pack the window (most of an idle chat's memory)."""
        self.state.window.hibernate()
        if self._recent is not None and self._recent.is_empty(self._ctx.clock.now()):
            self._recent = None

    def snapshot(self) -> ConversationSnapshot:
        s = self.state
        return ConversationSnapshot(
            jid=self.jid,
            instance=self.instance,
            window_size=len(s.window),
            booking_sent=s.booking_sent,
            paused_until=s.paused_until,
            lead=attrs.asdict(s.lead),
            messages_in=s.messages_in,
            replies_out=s.replies_out,
            ignored=s.ignored,
            crashes=s.crashes,
            summary=s.summary,
        )

    def messages(self) -> list[dict[str, Any]]:
        """The window for ``/actors/{jid}``: seed roles plus time and whether a person wrote it."""
        rows = self.state.window.rows()   # read without thawing a hibernating window
        return [dict(m, at=row[2], human=row[0] == OPERATOR) for m, row in zip(seed_messages(rows), rows)]

    # -- one batch -------------------------------------------------------------------------------

    async def _turn(self, items: list[Accepted]) -> None:
        ctx, state, tenant = self._ctx, self.state, self.tenant
        settings, texts = tenant.settings, tenant.texts
        if ctx.media is not None:   # voice notes become "[audio] <transcript>" (TRANSCRIBE_PROVIDER)
            items = [attrs.evolve(i, message=await ctx.media.transcribed(i.message, texts, settings)) for i in items]
        now = ctx.clock.now()
        for item in items:
            message = item.message
            log.info("Processing message from %s: %s", self.jid, self._shown(message.text))
            self._remember_customer(message)
            self._acked.append(item.seq)
            state.messages_in += 1
            state.last_activity = now
            state.window.append(bounded_entry(settings, USER, window_text(texts, message), now))
        last = items[-1].message
        text = "\n".join(i.message.text for i in items)

        if state.paused_until > now:
            log.info("[TAKEOVER] %s is handled by a person: no reply", self.jid)
            return self._silent(len(items))
        if self._is_reset(text):
            state.window.clear()
            state.summary = ""
            state.booking_sent = False
            log.info("Conversation reset by the customer: %s", self.jid)
            return self._reply(last, texts.reset_done)
        if all(i.message.kind == "media" and not wants_model(settings, i.message) for i in items):
            reply = self._unknown_message_text()
            return self._reply(last, reply) if reply else self._silent(len(items))
        if state.booking_sent:
            if is_generic_message(text):
                log.info("[BOOKING] Conversación finalizada. Mensaje genérico ignorado: %s", self._shown(text))
                log.info("[BOOKING] No se envía respuesta - conversación finalizada")
                return self._silent(len(items))
            log.info("[BOOKING] Nueva pregunta después del link, continuando conversación: %s", self._shown(text))
            state.booking_sent = False
        flood = flood_check(state, now, settings.conversation.flood_max_per_minute, self.jid)
        if flood is Flood.NOTICE:
            self._reply_text(texts.flood_notice, self.jid, sender_instances(ctx.tenants, last))
        if flood is not Flood.ASK:
            return self._silent(len(items))

        answer = await self._ask(items)
        if answer is None:   # only images, none of which could be had, and no caption to answer
            return self._reply(last, texts.media_failed)
        log.info("[RESPUESTA DEL LLM]: %s", self._shown(answer.text))
        action = parse_answer(answer.text) if not answer.failed else texts.polite_error
        if isinstance(action, BookingAction):
            self._reply(last, booking_reply(settings, texts, action))
            if settings.conversation.google_booking_url:
                state.booking_sent = True
                log.info("[BOOKING] Conversación marcada como completada para user_id=%s", self.jid)
                if ctx.crm is not None and settings.crm.crm_enabled:
                    self._crm = lead_request(self.jid, state.lead, action, self.key)
        else:
            self._reply(last, action)

    async def _ask(self, items: list[Accepted]) -> Answer | None:
        """Show "typing…" and ask the chain with the turn's prompt (turn_prompt.py); None when the
        turn is only images that could not be had, with no caption to answer instead."""
        ctx, tenant = self._ctx, self.tenant
        messages = [item.message for item in items]
        images = await turn_images(ctx.media, tenant.settings, tenant.texts, messages)
        if images is None:
            return None
        summary = f"{tenant.texts.summary_heading}\n{self.state.summary}" if self.state.summary else ""
        prompt = build_prompt(tenant.settings, tenant.texts.agent_instruction, self.state.window, messages,
                              images=images, summary=summary, cache_key=chat_cache_key(self.key))
        last = messages[-1]
        await ctx.outbound.typing(last.jid, sender_instances(ctx.tenants, last), self.key)   # returns at once; best effort
        return await tenant.chain.ask(prompt)

    def _shown(self, text: str) -> str:
        """A customer's or the model's text as LOG_CUSTOMER_TEXT lets a log line show it."""
        return log_text(text, self._ctx.settings.security.log_customer_text)

    def _is_reset(self, text: str) -> bool:
        if len(text) > MAX_SCANNED_CHARS:
            return False
        normal = normalise(text)
        return bool(normal) and normal in {normalise(k) for k in self.tenant.settings.conversation.reset_keywords}

    def _unknown_message_text(self) -> str:
        configured = self.tenant.settings.conversation.unknown_message_text
        return self.tenant.texts.unknown_message if configured == "default" else configured

    def _silent(self, count: int) -> None:
        self.state.ignored += count
        truncate(self.tenant.settings, self.state.window)

    def _remember_customer(self, message: InboundMessage) -> None:
        lead: LeadInfo = self.state.lead
        if message.push_name and not lead.nombre and not message.jid.endswith("@g.us"):
            lead.nombre = message.push_name
        if not lead.telefono:
            lead.telefono = phone_of(message.jid) or phone_of(message.alt_jid) or ""
        if message.alt_jid and not lead.alt_jid:
            lead.alt_jid = message.alt_jid
        if message.instances:   # where an operator's reply from the console goes: the same senders as ours
            self.state.instance = message.instance
            self.state.instances = list(sender_instances(self._ctx.tenants, message))

    # -- control -----------------------------------------------------------------------------------

    async def _control(self, control: Control) -> None:
        state = self.state
        if control.seq is not None:
            self._acked.append(control.seq)
        if control.command == "sent":   # bookkeeping only: saved with the next commit
            remember_sent(state, control.value)
            control.done.set()
            return
        if control.command in ("fold", "summary"):   # the summariser's result | an admin's summary
            if control.command == "fold":
                self._folding = False
                changed = isinstance(control.value, FoldResult) and apply_fold(state, control.value, self.jid)
            else:
                state.summary, changed = str(control.value)[:MAX_SUMMARY_CHARS], True
                log.info("Admin summary for %s (%d chars)", self.jid, len(state.summary))
            if changed or self._acked:
                await self._commit()
            control.applied = True
            control.done.set()
            return
        if control.command == "resend":   # a dead letter revived on another node: its row is back in the outbox
            await self._commit()          # (acks the command's inbox row), then the row goes out in order
            if self._ctx.resend is not None:
                await self._ctx.resend(self.key, int(control.value))
            control.applied = True
            control.done.set()
            return
        text = apply_command(self.tenant.settings, state, self.jid, control.command, control.value, self._ctx.clock.now())
        if text is not None:   # an operator's reply: sent behind the bot's earlier replies
            self._reply_text(text, self.jid, tuple(state.instances))
        await self._commit()
        control.applied = True
        control.done.set()

    def meta(self) -> StateMeta:
        """What the store keeps beside this chat's state: its last activity, its window length and
        its listing record (name, last message, pause or booking status)."""
        state = self.state
        finished = "finished" if state.booking_sent else ""
        paused = state.paused_until > self._ctx.clock.now()
        return StateMeta(
            last_activity=state.last_activity,
            size=len(state.window),
            title=state.lead.nombre,
            preview=_trim(state.window.last_content(), PREVIEW_CHARS),
            status=("paused" if state.pause_reason == "operator" else "takeover") if paused else finished,
            status_until=state.paused_until if paused else 0.0,
            status_after=finished,
            scope=self.instance,
        )

    # -- effects -----------------------------------------------------------------------------------

    def _reply(self, message: InboundMessage, text: str) -> None:
        self.state.replies_out += 1
        self.state.window.append(bounded_entry(self.tenant.settings, ASSISTANT, text, self.state.last_activity))
        truncate(self.tenant.settings, self.state.window)
        self._reply_text(text, message.jid, sender_instances(self._ctx.tenants, message))

    def _reply_text(self, text: str, jid: str, instances: tuple[str, ...]) -> None:
        self._outbox.append(("reply", {"jid": jid, "text": text, "instances": list(instances)}))

    async def _commit(self) -> None:
        """One store transaction for the batch; then the replies (in order) and the CRM job go out."""
        ctx = self._ctx
        outbox = list(self._outbox)
        crm = self._crm
        if crm is not None:
            outbox.append(("crm", attrs.asdict(crm)))
        ids = await ctx.store.commit(self.key, self.state.to_bytes(), self.meta(), acked=list(self._acked),
                                     outbox=outbox)
        self._outbox, self._acked, self._crm = (), (), None
        for (kind, payload), row_id in zip(outbox, ids):
            if kind == "reply":
                self._remember_send(payload["text"])
                ctx.outbound.submit(OutboundMessage(
                    jid=payload["jid"], text=payload["text"], instances=tuple(payload["instances"]), outbox_id=row_id,
                    key=self.key,
                ))
            elif kind == "crm" and crm is not None and ctx.crm is not None:
                ctx.crm.submit(attrs.evolve(crm, job_id=row_id))
