"""The service graph: store, tenants (per-instance settings and LLM chains), outbound and CRM
supervisors, and the actor registry.

``Service.run`` owns one nursery holding every supervisor and the registry (structured
concurrency: nothing outlives it). ``Service.intake`` is what ``/webhook`` calls. A conversation
is (instance, chat): its actor and store key is ``ConversationKey(instance, jid).key``.
"""

from __future__ import annotations

import gc
import itertools
import logging
import secrets
from typing import Any, Awaitable, Callable, Mapping

import attrs
import httpx
import trio

from runtime.bounded import OTHER, bounded_key
from runtime.clock import Clock
from runtime.fenced_store import FencedStore
from runtime.inbox_feed import InboxFeed
from runtime.logs import LogCompressor
from runtime.memory_store import MemoryStore
from runtime.registry import MailboxFull, Registry, ShuttingDown
from runtime.retry import RetryPolicy
from runtime.shards import NodeInfo, ShardOwner, shard_of
from runtime.store import InboxRow, OutboxRow, Store, StoreError

from .admin_view import STARTED, Activity
from .conversation import Accepted, Control, ConversationActor, ConversationContext
from .conversation_key import ConversationKey
from .conversation_reads import ConversationReads
from .crm import CrmSupervisor, LeadRequest
from .evolution import Ignored, parse_webhook
from .exposure import advertised_address
from .inbound import InboundMessage
from .inbox_mail import control_payload, mail_of
from .instances import unknown_instance
from .jid import is_group
from .llm.accounts import ChainPool
from .llm.chain import ProviderChain
from .llm.transcribe import Transcriber, build_transcriber
from .media import MediaSource, wants_model
from .memory_summary import FoldResult, MemorySummariser
from .metrics import Metrics
from .new_chats import NewChatLimiter
from .outbound import Delivery, OutboundMessage, OutboundSender
from .prompts import Texts, texts_for
from .settings import Settings
from .state import state_dict
from .tenants import Tenant, Tenants, default_instance

log = logging.getLogger(__name__)
GC_THRESHOLDS = (10_000, 20, 20)   # gc.set_threshold once the service is up (the default is 700, 10, 10)
# "event <name>" is the one ignore reason that carries request content: at most this many names are
# counted (and exported as a metric label) on their own, the rest as "other".
MAX_EVENT_REASONS = 16
BUSY_RETRY_AFTER = 1       # seconds: webhooks past INTAKE_MAX_IN_FLIGHT wait for a group commit or two
FOLD_REPORT_WAIT = 30      # seconds a summary fold's report waits to be applied before the next fold may run
LEAD_RECORD_WAIT = 5.0    # seconds a lead stored in the chat's inbox waits to be recorded here (it stays stored either way)
SETTLE_RETRY = RetryPolicy(attempts=None, base=0.5, cap=2.0, jitter=0.5, budget=60.0)   # see Service._settling
BACKLOG_RETRY_AFTER = 10   # seconds: the outbound backlog drains at OUTBOUND_RATE_PER_INSTANCE (20/s by default)


@attrs.frozen
class IntakeResult:
    """What ``/webhook`` answers: HTTP status and JSON body."""

    status: int
    body: dict[str, Any]
    retry_after: int | None = None


def make_store(settings: Settings) -> Store:
    """The configured store: PostgreSQL (STORE_URL), SQLite in DATA_DIR, or memory."""
    storage = settings.storage
    if storage.kind == "postgresql":
        from runtime.postgres_store import PostgresStore

        return PostgresStore(storage.postgres_url, pool_size=storage.store_pool_size,
                             connect_timeout=settings.server.http_timeout, shards=storage.shards, node=storage.node)
    if storage.kind == "sqlite":
        from runtime.sqlite_store import SqliteStore

        default = default_instance(settings)
        return SqliteStore(storage.data_dir / "agent.sqlite3", legacy_key_prefix=ConversationKey(default, "").key,
                           legacy_scope=default)
    return MemoryStore()


class Service(ConversationReads):
    """Builds and runs the whole actor system for one process."""

    def __init__(self, settings: Settings, *, store: Store | None = None, chain: ProviderChain | None = None,
                 instances: Mapping[str, Settings] | None = None) -> None:
        """``store`` and ``chain`` default to the configured ones (tests inject their own: an
        injected chain serves every instance); ``instances``: each configured instance's effective
        settings (the instances file, actors/settings/instances.py), none for a single-tenant
        deployment. Instances on one provider account share its supervisor (``ChainPool``)."""
        self.settings = settings
        self.pool: ChainPool | None = None
        if chain is None:
            pool = self.pool = ChainPool()
            factory: Callable[[Settings], ProviderChain] = lambda s: pool.chain_for(
                s, texts_for(s.conversation.language).polite_error)
        else:
            factory = lambda _: chain
        self.tenants = Tenants(settings, instances, chain_factory=factory)
        self.store: Store = store if store is not None else make_store(settings)
        self.ready = False
        self.clock: Clock | None = None
        self.outbound: OutboundSender | None = None
        self.crm: CrmSupervisor | None = None
        self.summariser: MemorySummariser | None = None
        self.transcriber: Transcriber | None = None
        self.registry: Registry[Accepted] | None = None
        self._cancel: trio.CancelScope | None = None
        self.received = 0
        self.ignored: dict[str, int] = {}
        self._event_reasons: set[str] = set()
        self._new_chats = NewChatLimiter(settings.security.new_chats_per_minute)
        self.new_chats_refused = 0
        self.intake_refused = {"busy": 0, "backlog": 0}   # 503s before any state changed (§2.9)
        self.storing = 0                     # webhooks past screening and not yet answered (INTAKE_MAX_IN_FLIGHT)
        self._refusals_warned = float("-inf")   # trio time of the last such warning (one a minute at most)
        self._new_chats_warned = float("-inf")   # trio time of the last warning (one a minute at most)
        self._aliases: dict[str, str] = {}   # (instance, @lid ↔ phone JID) of one chat, as a key → its actor key
        self._alias_lock = trio.Lock()       # one resolution at a time: both forms never spawn two actors
        self.failure: str | None = None      # set when run() died of an error: /health reports it
        self.metrics = Metrics(self)
        self.activity = Activity()           # messages in / replies out per minute (admin console)
        self.per_instance: dict[str, list[int]] = {}   # metric label → [messages in, replies out, turns]
        # Several nodes on one PostgreSQL database: shard ownership, fenced commits, the inbox feed
        # (runtime/shards.py, fenced_store.py, inbox_feed.py). None with SQLite or memory.
        self.owner: ShardOwner | None = None
        self.fenced: FencedStore | None = None
        self.feed: InboxFeed | None = None
        self._releasing: set[int] = set()   # shards being handed back: no new deliveries
        self.forwarded = 0                  # messages accepted here for a chat another node owns
        self.commands_forwarded = 0         # admin commands stored here for a chat another node runs
        self._orders: dict[tuple[str, int], Control] = {}   # (key, seq) → a command a request here waits for
        self.address = ""                   # where admins reach this node (GET /cluster), with several nodes
        from runtime.postgres_store import PostgresStore   # imports no driver: psycopg loads at open

        if isinstance(self.store, PostgresStore):
            storage = settings.storage
            self.address = advertised_address(settings)
            self.owner = ShardOwner(self.store, storage.node, shards=self.store.shards,
                                    lease_seconds=storage.shard_lease_seconds, on_gained=self._shards_gained,
                                    on_lost=self._shards_lost, on_release=self._shards_released,
                                    describe=self.describe_node)
            self.fenced = FencedStore(self.store, self.owner)
            self.feed = InboxFeed(self.store, self.owner, deliver=self._deliver_row, may_deliver=self.runs,
                                  poll_seconds=storage.inbox_poll_seconds)

    @property
    def chain(self) -> ProviderChain:
        """The default instance's LLM chain (the global settings')."""
        return self.tenants.default.chain

    @property
    def texts(self) -> Texts:
        """The global settings' texts."""
        return self.tenants.default.texts

    def instance_label(self, instance: str) -> str:
        """A metric's ``instance`` label: configured instances and the default one by name, the rest
        ``other`` (webhooks name instances: the label's values stay bounded)."""
        if instance == self.tenants.default_instance or self.tenants.for_instance(instance).configured:
            return instance
        return OTHER

    def count(self, instance: str, *, inbound: int = 0, outbound: int = 0, turns: int = 0) -> None:
        """The per-instance conversation counters (messages in, replies out, turns)."""
        row = self.per_instance.setdefault(self.instance_label(instance), [0, 0, 0])
        row[0] += inbound
        row[1] += outbound
        row[2] += turns

    def _observe_turn(self, instance: str, seconds: float) -> None:
        self.metrics.turn_seconds.observe(seconds)
        self.count(instance, turns=1)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the store, start every supervisor and the registry, recover pending work, serve."""
        settings = self.settings
        self.clock = Clock()
        await self.store.open()   # idempotent: Lifecycle.start opens it first to report a bad database in one line
        # Shared by the outbound (≤ 48 sendText, ≤ 12 sendPresence and ≤ 4 media fetches at once) and CRM
        # (≤ 4) supervisors: as large as all of them together, so requests never queue inside httpcore's
        # pool (see actors/outbound/evolution.py), and every connection may be kept alive (httpcore's pool costs O(connections²) per event when
        # it holds more connections than it may keep alive).
        limits = httpx.Limits(max_connections=68, max_keepalive_connections=68)
        timeout = httpx.Timeout(settings.server.http_timeout)
        try:
            async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
                settings_for = self._settings_for
                owns = self.owner.holds if self.owner is not None else None   # waits for a late renewal
                self.outbound = OutboundSender(settings, http=http, on_settled=self._reply_settled,
                                               settings_for=settings_for, may_send=owns)
                self.crm = CrmSupervisor(settings, http=http, on_lead=self._lead_created, on_done=self._crm_done,
                                         settings_for=settings_for, may_run=owns,
                                         enabled=lambda: any(t.settings.crm.crm_enabled for t in self.tenants.all()))
                self.summariser = MemorySummariser(self._folded, keys_in_flight=settings.llm.llm_concurrency)
                self.transcriber = build_transcriber(settings, self.texts.transcribe_instruction)
                context = ConversationContext(
                    settings=settings, tenants=self.tenants, outbound=self.outbound,
                    store=self.fenced if self.fenced is not None else self.store, clock=self.clock,
                    crm=self.crm,
                    observe_turn=self._observe_turn,
                    media=MediaSource(self.outbound.transport, self.transcriber),
                    summariser=self.summariser,
                    resend=self.resend if self.owner is not None else None,
                )
                self.registry = Registry(
                    lambda key: ConversationActor(key, context),
                    clock=self.clock,
                    mailbox_size=settings.conversation.mailbox_size,
                    idle_ttl=settings.conversation.actor_idle_ttl,
                    intensity=settings.conversation.restart_intensity,
                    period=settings.conversation.restart_period,
                    on_idle_sweep=self._expire_stored,
                )
                async with trio.open_nursery() as nursery:
                    self._cancel = nursery.cancel_scope
                    await nursery.start(LogCompressor().run)
                    await nursery.start(self.tenants.run)   # owns the LLM chains (hedged half-open probes), closes them
                    await nursery.start(self.outbound.run)
                    await nursery.start(self.crm.run)
                    await nursery.start(self.summariser.run)
                    await nursery.start(self.registry.run)
                    if self.owner is not None and self.feed is not None:
                        # the first balance step owns this node's share and recovers it (on_gained)
                        await nursery.start(self.store.listen, self.owner.node, self.feed.wake)  # type: ignore[attr-defined]
                        await nursery.start(self.owner.run)
                        await nursery.start(self.feed.run)
                    else:
                        await self._recover()
                    # Everything allocated so far (the SDKs' modules and models, settings, clients)
                    # lives as long as the process: keep it out of the cyclic collector. And collect
                    # the young generation every 10,000 allocations instead of 700, so that a turn's
                    # objects (alive for about one LLM call) mostly die before they are promoted:
                    # with thousands of turns in flight the defaults ran a full collection every
                    # 2.5 s, each stalling the event loop for ~0.1 s (docs/performance.md).
                    gc.freeze()
                    gc.set_threshold(*GC_THRESHOLDS)
                    self.ready = True
                    log.info("Service ready: provider chain %s, store %s, outbound %s, instances %s",
                             " → ".join(settings.llm.provider_order), settings.storage.kind,
                             "evolution" if settings.outbound.evolution_api_url else "local outbox",
                             ", ".join(self.tenants.names) or f"{self.tenants.default_instance} (single)")
                    task_status.started()
        finally:
            self.ready = False
            with trio.CancelScope(shield=True):
                if self.pool is not None:
                    await self.pool.aclose()   # the shared SDK clients (Tenants closed the chains)
                if self.transcriber is not None:
                    await self.transcriber.aclose()
                await self.store.close()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let turns in flight finish and their replies go out for up to ``grace``
        seconds, then stop everything. What is unfinished stays in the store for the next start."""
        log.info("Shutdown: no longer accepting messages; finishing turns in flight (up to %.0fs)", grace)
        if self.owner is not None:   # nothing new is handed to this node's actors; webhooks are stored for the next owner
            self._releasing.update(range(self.owner.shards))
        with trio.move_on_after(grace) as scope:
            if self.registry is not None:
                await self.registry.drain()
            if self.outbound is not None:
                await self.outbound.drain()
        if scope.cancelled_caught:
            log.warning("Shutdown: work still in flight after %.0fs; it stays in the store for the next start", grace)
        else:
            log.info("Shutdown: every turn finished and every reply was handed over")
        if self.owner is not None:   # hand every shard back at once: the other nodes take them now
            with trio.move_on_after(max(1.0, self.settings.storage.shard_lease_seconds / 3)):
                try:
                    await self.owner.leave()
                except StoreError as exc:
                    log.warning("Shutdown: shards not released (%s); they are taken over when their leases run out",
                                exc)
        if self._cancel is not None:
            self._cancel.cancel()

    async def _recover(self) -> None:
        """Re-send unsettled outbox rows and re-deliver unacknowledged inbox rows, in order."""
        assert self.outbound is not None and self.registry is not None and self.crm is not None
        outbox = await self.store.pending_outbox()
        inbox = await self.store.pending_inbox()
        for row in outbox:
            await self._resubmit(row)
        for irow in inbox:
            self._deliver_row(irow)
        if outbox or inbox:
            log.info("Recovery: %d pending replies/jobs re-sent, %d accepted messages re-delivered", len(outbox), len(inbox))

    # -- shards (several nodes on one PostgreSQL database) -------------------------------------

    def runs(self, key: str) -> bool:
        """Whether this process runs ``key``'s actor now: always with one process per store; with
        several, when it owns the key's shard and is not handing it back."""
        if self.owner is None:
            return True
        return self.owner.owns(key) and shard_of(key, self.owner.shards) not in self._releasing

    def describe_node(self) -> NodeInfo:
        """What this node's heartbeat tells the others (GET /cluster, on any node)."""
        owner = self.owner
        assert owner is not None
        return NodeInfo(self.address, STARTED, {
            "acquired": owner.acquired, "taken_over": owner.taken_over, "lost": owner.lost,
            "handed_back": owner.handed_back, "fenced_refused": self.fenced.refused if self.fenced is not None else 0,
            "forwarded": self.forwarded, "commands_forwarded": self.commands_forwarded,
            "live_actors": len(self.registry) if self.registry is not None else 0,
        })

    def _keys_in(self, shards: list[int]) -> list[str]:
        assert self.owner is not None and self.registry is not None
        wanted = set(shards)
        return [key for key in self.registry.keys() if shard_of(key, self.owner.shards) in wanted]

    def _deliver_row(self, row: InboxRow) -> None:
        """Hand a stored message or admin command (any node accepted it) to its actor, in sequence order."""
        assert self.registry is not None
        self.registry.deliver(row.key, mail_of(row, trio.current_time(), self._orders), force=True)

    async def _shards_gained(self, shards: list[int]) -> None:
        """Recover newly owned shards: their unsent replies and jobs, then their accepted messages."""
        assert self.owner is not None and self.feed is not None
        try:
            outbox = await self.store.pending_outbox_in(shards)  # type: ignore[attr-defined]
            # every row: the sender confirms the lease before each send (a check here, while a
            # renewal runs late, would skip a row for good: nobody else re-sends it)
            for row in outbox:
                await self._resubmit(row)
            before = self.feed.caught_up
            await self.feed.gained(shards)
        except StoreError as exc:   # leave them; they are retaken (and recovered) once their leases run out
            log.error("Shards: recovering %d acquired shards failed (%s); dropping them", len(shards), exc)
            await self.owner.lose(shards)
            return
        if outbox or self.feed.caught_up != before:
            log.info("Shards: recovered %d shards: %d pending replies/jobs re-sent, %d accepted messages re-delivered",
                     len(shards), len(outbox), self.feed.caught_up - before)

    async def _shards_lost(self, shards: list[int]) -> None:
        """Another node owns ``shards`` now: their actors stop at once (nothing more is committed),
        their sends stop before the next attempt (OutboundSender's ``may_send``)."""
        assert self.registry is not None and self.feed is not None
        stopped = self.registry.stop(self._keys_in(shards))
        self.feed.forget_shards(shards)
        if stopped:
            log.warning("Shards: %d conversations stopped (their shards were lost)", len(stopped))

    async def _shards_released(self, shards: list[int]) -> None:
        """Hand ``shards`` back gracefully: no new deliveries, turns in flight finish and commit, and
        their replies are sent and settled (for at most a third of the lease, so renewals are not
        held up: the new owner sends what is left), then their actors stop."""
        assert self.registry is not None and self.feed is not None and self.owner is not None
        assert self.outbound is not None
        self._releasing.update(shards)
        wanted, count = set(shards), self.owner.shards
        try:
            with trio.move_on_after(self.owner.lease_seconds / 3) as scope:
                await self.registry.drain_keys(self._keys_in(shards))
                await self.outbound.drain_chats(lambda key: shard_of(key, count) in wanted)
            if scope.cancelled_caught:
                log.warning("Shards: handing back %d shards with turns or replies still in flight (the new owner retries them)",
                            len(shards))
            self.registry.stop(self._keys_in(shards))
            self.feed.forget_shards(shards)
        finally:
            self._releasing.difference_update(shards)

    async def _resubmit(self, row: OutboxRow) -> None:
        """Hand a stored job (unsettled at start-up, or a revived dead letter) to its supervisor."""
        assert self.outbound is not None and self.crm is not None
        if row.kind == "reply":
            p = row.payload
            self.outbound.submit(OutboundMessage(jid=p["jid"], text=p["text"], instances=tuple(p["instances"]),
                                                 outbox_id=row.id, key=row.key))
        elif row.kind == "crm":
            request = attrs.evolve(LeadRequest(**row.payload), job_id=row.id, key=row.key, recovered=True)
            saved = await self.store.load(row.key)
            lead_id = (state_dict(saved) if saved is not None else {}).get("lead", {}).get("lead_id")
            if lead_id is not None and request.lead_id is None:
                request = attrs.evolve(request, lead_id=lead_id)   # created before the restart: a note, not a 2nd lead
            self.crm.submit(request)

    async def retry_dead_letter(self, dead_letter_id: int) -> bool:
        """Move a dead letter back to the outbox and submit it again; False when there is none.
        With several nodes only a chat's owner sends: the owner (this node or another) is told through
        the chat's inbox, like any command (a ``resend``, handled in order with the chat's mail)."""
        row = await self.store.revive(dead_letter_id)
        if row is None:
            return False
        if self.feed is None:
            await self._resubmit(row)
        else:
            await self._command_through_inbox(row.key, Control("resend", row.id), wait=0)
        log.info("Admin retry of dead letter %d (%s for %s)", row.id, row.kind, row.key)
        return True

    async def resend(self, key: str, outbox_id: int) -> None:
        """Submit ``key``'s pending outbox row ``outbox_id`` (a dead letter revived on another node);
        nothing when it is no longer pending (sent meanwhile, e.g. by a shard recovery)."""
        assert self.owner is not None
        for row in await self.store.pending_outbox_in([shard_of(key, self.owner.shards)]):  # type: ignore[attr-defined]
            if row.id == outbox_id and row.key == key:
                await self._resubmit(row)

    # -- intake ------------------------------------------------------------------------------

    async def intake(self, payload: Any) -> IntakeResult:
        """Validate, dedupe, store and deliver one webhook. Raises WebhookError for a bad body."""
        message = parse_webhook(payload, groups_enabled=self._groups_anywhere())
        if isinstance(message, Ignored):
            return self._ignore(message.reason)
        self.received += 1
        if (reason := self._screen(message)) is not None:
            return self._ignore(reason)
        registry = self.registry
        if registry is None or not self.ready:
            return IntakeResult(503, {"error": "starting up"}, retry_after=5)
        if (refusal := self._admission()) is not None:
            return refusal
        self.storing += 1
        try:
            return await self._accept(message, registry)
        except StoreError as exc:   # nothing was accepted: Evolution retries later
            log.error("Store error: webhook answered 503: %s", exc)
            return IntakeResult(503, {"error": "store unavailable"}, retry_after=5)
        finally:
            self.storing -= 1

    def _admission(self) -> IntakeResult | None:
        """A 503 for a message the service cannot take now, before anything is reserved or stored:
        too many webhooks already waiting for the store (an ack that would be slow), or too many
        replies waiting to go out (a new turn would only add to them). None: go on."""
        if self.storing >= self.settings.server.intake_max_in_flight:
            reason, error, retry_after = "busy", "busy", BUSY_RETRY_AFTER
        elif self.outbound is not None and self.outbound.backlog >= self.settings.outbound.outbound_max_backlog:
            reason, error, retry_after = "backlog", "outbound backlog full", BACKLOG_RETRY_AFTER
        else:
            return None
        self.intake_refused[reason] += 1
        if trio.current_time() - self._refusals_warned >= 60:
            self._refusals_warned = trio.current_time()
            log.warning("Intake: answering 503 %r (INTAKE_MAX_IN_FLIGHT %d, OUTBOUND_MAX_BACKLOG %d)", error,
                        self.settings.server.intake_max_in_flight, self.settings.outbound.outbound_max_backlog)
        return IntakeResult(503, {"error": error}, retry_after=retry_after)

    async def _accept(self, message: InboundMessage, registry: Registry[Accepted]) -> IntakeResult:
        key = await self._actor_key(message)
        if (wait := await self._new_chat_wait(key, message)) is not None:
            self.new_chats_refused += 1
            if trio.current_time() - self._new_chats_warned >= 60:
                self._new_chats_warned = trio.current_time()
                log.warning("New chats: instance %r opened %d chats within a minute (NEW_CHATS_PER_MINUTE): "
                            "answering 429 to new ones", message.instance[:40], self._new_chats.limit)
            return IntakeResult(429, {"error": "too many new chats for this instance (NEW_CHATS_PER_MINUTE)"},
                                retry_after=wait)
        if not self.runs(key):   # another node runs this chat: store it, the store wakes its owner
            seq = await self.store.accept(key, f"{message.instance}:{message.message_id}", attrs.asdict(message))
            if seq is None:
                return self._ignore("duplicate")
            self.forwarded += 1
            return self._accepted(key)
        try:
            registry.reserve(key)
        except MailboxFull:
            log.warning("Mailbox full for %s: answering 503", key)
            return IntakeResult(503, {"error": "mailbox full"}, retry_after=5)
        except ShuttingDown:
            return IntakeResult(503, {"error": "shutting down"}, retry_after=10)
        try:
            seq = await self.store.accept(key, f"{message.instance}:{message.message_id}", message.stored_fields())
        except BaseException:
            registry.release(key)
            raise
        if seq is None:
            registry.release(key)
            return self._ignore("duplicate")
        feed = self.feed
        if feed is None:
            registry.deliver(key, Accepted(seq, message, trio.current_time()), reserved=True)
        elif key in registry and self.runs(key) and feed.is_next(key, seq):
            registry.deliver(key, Accepted(seq, message, trio.current_time()), reserved=True)
            feed.handed(key, seq)
        else:   # earlier messages of the chat (accepted elsewhere) go first: read them all, in order
            registry.release(key)
            try:
                await feed.catch_up(key)
            except StoreError as exc:   # accepted all the same: the next poll hands it over
                log.warning("Intake: %s's pending messages not read yet (%s); the inbox poll will", key, exc)
        return self._accepted(key)

    def _accepted(self, key: str) -> IntakeResult:
        self.activity.count(inbound=1)
        parts = ConversationKey.parse(key)
        self.count(parts.instance, inbound=1)
        return IntakeResult(200, {"status": "accepted", "jid": parts.jid, "instance": parts.instance})

    def _settings_for(self, instance: str) -> Settings:
        return self.tenants.for_instance(instance).settings

    def _groups_anywhere(self) -> bool:
        """Whether any instance answers groups (each webhook is then screened by its own instance's)."""
        return any(t.settings.conversation.groups_enabled for t in self.tenants.all())

    def instance_of(self, message: InboundMessage) -> str:
        """The instance a message's conversation belongs to: the webhook's, else the default one."""
        return message.instance or self.tenants.default_instance

    def tenant_of(self, message: InboundMessage) -> Tenant:
        return self.tenants.for_instance(self.instance_of(message))

    def _screen(self, message: InboundMessage) -> str | None:
        """Why a well-formed message is not for the bot (unknown instance, groups, ignore/allow
        lists, unreadable media: each instance's own), or None."""
        if unknown_instance(self.tenants, message):
            return "unknown_instance"
        settings = self.tenant_of(message).settings
        if is_group(message.jid) and not settings.conversation.groups_enabled:
            return "group"
        names = {message.jid, message.alt_jid} - {""}
        kinds = {"@" + message.jid.split("@", 1)[1]}
        if names & set(settings.conversation.ignore_jids) or kinds & set(settings.conversation.ignore_jids):
            return "ignore list"
        if settings.conversation.allow_jids and not names & set(settings.conversation.allow_jids):
            return "not in allow list"
        if (message.kind == "media" and not settings.conversation.unknown_message_text and not message.from_me
                and not wants_model(settings, message)):
            return "no text"
        return None

    async def _new_chat_wait(self, key: str, message: InboundMessage) -> int | None:
        """Seconds to wait when ``message`` would open one chat too many for its instance, else None.

        A chat that is not live counts as new; only past the limit is the store asked whether it
        is a stored chat coming back (not new, never refused), so within the limit the webhook does
        no store work beyond its commit."""
        if not self._new_chats.limit or (self.registry is not None and key in self.registry):
            return None
        wait = self._new_chats.refused(message.instance, trio.current_time())
        if wait is not None and await self.store.load(key) is not None:
            return None
        return wait

    async def _actor_key(self, message: InboundMessage) -> str:
        """One actor per (instance, chat), whichever of the chat's two forms (@lid or phone JID) a
        message uses: once a message names both, the form that already has a conversation (live or
        stored) in that instance keeps it.

        Resolutions that need the store run one at a time, so two first messages arriving together
        in the two forms agree on one key."""
        instance = self.instance_of(message)
        mine = ConversationKey(instance, message.jid).key
        key = self._aliases.get(mine)
        if key is not None or not message.alt_jid:
            return key or mine
        async with self._alias_lock:
            return await self._resolve_alias(mine, ConversationKey(instance, message.alt_jid).key)

    async def _resolve_alias(self, mine: str, alt_form: str) -> str:
        key = self._aliases.get(mine)
        if key is not None:
            return key
        alt = self._aliases.get(alt_form, alt_form)
        mine_exists = self.registry is not None and mine in self.registry
        alt_exists = self.registry is not None and alt in self.registry
        if not mine_exists and not alt_exists:
            mine_exists = await self.store.load(mine) is not None
            alt_exists = not mine_exists and await self.store.load(alt) is not None
        key = alt if alt_exists and not mine_exists else mine
        self._aliases[mine] = key
        self._aliases[alt_form] = key
        return key

    async def control(self, key: str, command: str, value: Any = None, *, wait: float = 5.0) -> bool:
        """Queue an admin command (pause | resume | reset) in the conversation's mailbox, in order
        with its messages; True once the actor handled it within ``wait`` seconds. ``key``: a
        conversation key, or a JID known in one instance only (``resolve``). Raises MailboxFull/ShuttingDown."""
        return (await self.command(key, command, value, wait=wait)).done.is_set()

    async def command(self, key: str, command: str, value: Any = None, *, wait: float = 5.0) -> Control:
        """Like ``control``, returning the order: ``done`` once handled within ``wait`` seconds,
        ``applied`` unless the chat's actor was stopped (then it was answered, not carried out).
        With several nodes the command goes through the chat's inbox (``_command_through_inbox``)."""
        assert self.registry is not None
        if ConversationKey.parse(key).instance == "":
            key = await self.resolve(key) or ConversationKey(self.tenants.default_instance, key).key
        key = self._aliases.get(key, key)
        order = Control(command, value)
        if self.feed is not None:
            await self._command_through_inbox(key, order, wait)
            return order
        self.registry.deliver(key, order)
        with trio.move_on_after(wait):
            await order.done.wait()
        return order

    async def _command_through_inbox(self, key: str, order: Control, wait: float) -> None:
        """Several nodes: store the command as the chat's next inbox row (actors/inbox_mail.py), so
        it takes its place after every message any node accepted before it, and whichever node runs
        the chat carries it out. On that node, hand it over and wait for it like a local command;
        elsewhere the owner's feed picks it up (a wake-up, else its next poll): ``done`` stays unset."""
        assert self.feed is not None
        seq = await self.store.accept(key, f"admin:{secrets.token_hex(12)}", control_payload(order.command, order.value))
        if seq is None:   # a fresh random id is never a duplicate
            raise StoreError("an admin command's inbox row was taken for a duplicate")
        order.seq = seq
        if not self.runs(key):
            self.commands_forwarded += 1
            log.info("Command %s for %s stored for the node that runs the chat", order.command, key)
            return
        self._orders[(key, seq)] = order
        try:
            try:
                await self.feed.catch_up(key)
            except StoreError as exc:   # stored all the same (never a 503: a retry would repeat it); the poll hands it over
                log.warning("Command %s for %s stored; not read back yet (%s): the inbox poll will", order.command, key, exc)
                return
            with trio.move_on_after(wait):
                await order.done.wait()
        finally:
            self._orders.pop((key, seq), None)

    def _ignore(self, reason: str) -> IntakeResult:
        counted = reason
        if reason.startswith("event "):
            counted = bounded_key(self._event_reasons, reason, MAX_EVENT_REASONS)
            if counted != OTHER:
                self._event_reasons.add(counted)
        self.ignored[counted] = self.ignored.get(counted, 0) + 1
        return IntakeResult(200, {"status": "ignored", "reason": reason})

    # -- supervisor callbacks ----------------------------------------------------------------

    async def _reply_settled(self, message: OutboundMessage, delivery: Delivery) -> None:
        """Settle the reply's outbox row; the ids Evolution gave it go to the chat's actor through
        its mailbox (only the actor touches its state), when it is live."""
        key = self._aliases.get(message.chat, message.chat)
        if delivery.message_ids and self.registry is not None and key in self.registry:
            try:
                self.registry.deliver(key, Control("sent", list(delivery.message_ids)), force=True, touch=False)
            except RuntimeError:   # the registry stopped: the ids only matter to a live actor
                log.debug("Outbound: %s's send ids not recorded (the registry stopped)", key)
        if delivery.status == "sent" and not delivery.repeat:
            self.activity.count(outbound=1)
            self.count(message.tenant, outbound=1)
        if message.outbox_id is None:
            return
        outbox_id = message.outbox_id
        if delivery.status == "sent":
            await self._settling(lambda: self.store.settle(outbox_id))
        else:
            await self._settling(lambda: self.store.bury(outbox_id, delivery.error or "not delivered"))

    async def _settling(self, write: Callable[[], Awaitable[None]]) -> None:
        """Settle a performed job. With several nodes, retried while the store is unreachable (for
        SETTLE_RETRY's budget, even if the chat's shard was lost meanwhile: a settle is idempotent,
        and a row left unsettled is performed again by the shard's next owner, a reply sent twice).
        The chat's later jobs wait meanwhile."""
        started = trio.current_time()
        for attempt in itertools.count(1):
            try:
                await write()
                return
            except StoreError:
                delay = SETTLE_RETRY.delay(attempt, elapsed=trio.current_time() - started)
                if delay is None or self.owner is None:
                    raise
                await trio.sleep(delay)

    async def _crm_done(self, request: LeadRequest, outcome: str) -> None:
        if request.job_id is None:
            return
        job_id = request.job_id
        if outcome == "failed":
            await self._settling(lambda: self.store.bury(
                job_id, "CRM registration given up (see the [CRM] log lines)"))
        else:
            await self._settling(lambda: self.store.settle(job_id))

    async def _lead_created(self, key: str, lead_id: int) -> None:
        """Record the lead id through the chat's mailbox, so it is saved in order with its turns
        (during a drain too: the drain waits for it), never by writing the stored state directly.
        With several nodes it goes through the chat's inbox like an admin command: whichever node
        runs the chat records it (this one too, when its lease renewal is merely late)."""
        order = Control("lead", lead_id)
        if self.registry is None:
            return
        if self.feed is not None:
            await self._command_through_inbox(key, order, LEAD_RECORD_WAIT)
            return
        self.registry.deliver(key, order, force=True, touch=False)
        await order.done.wait()

    async def _folded(self, key: str, result: FoldResult) -> None:
        """A summary fold's outcome goes to the chat's actor through its mailbox (applied in order with
        its turns); the summariser's next fold for the chat waits until it was applied."""
        if self.registry is None:
            return
        order = Control("fold", result)
        try:
            self.registry.deliver(key, order, force=True, touch=False)
        except RuntimeError:   # the registry stopped: the messages stay, folded again after a later turn
            return
        with trio.move_on_after(FOLD_REPORT_WAIT):
            await order.done.wait()

    async def _expire_stored(self, idle_before: float) -> None:
        live = set(self.registry.keys()) if self.registry is not None else set()
        if self.feed is not None:
            self.feed.forget_except(live)   # an expired chat's sequence may restart at 1
        gone = await (self.fenced or self.store).expire(idle_before, keep=live)
        self._aliases = {alias: key for alias, key in self._aliases.items() if key in live}  # re-learnt on demand
        if gone:
            log.info("Expired %d stored conversations idle for over %.0fs", len(gone), self.settings.conversation.actor_idle_ttl)
