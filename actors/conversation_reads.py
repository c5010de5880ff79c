"""The service's reads of conversations for admins: window sizes, the seed's ``/memory``, which
instances know a JID, and one conversation's state or view, live or stored (docs/behaviour.md §8.2).

A mixin of ``actors.service.Service``: it reads the service's registry, store and tenants and
changes nothing.
"""

from __future__ import annotations

from typing import Any

import attrs

from runtime.actor import ActorStatistics
from runtime.registry import Registry
from runtime.store import Store

from .conversation import Accepted, ConversationActor
from .conversation_key import ConversationKey
from .conversation_view import ConversationView
from .state import ConversationState, state_dict
from .tenants import Tenants


class AmbiguousChat(Exception):
    """A JID with a conversation in several instances, asked for without ``instance``."""

    def __init__(self, jid: str, instances: list[str]) -> None:
        super().__init__(f"{jid} has conversations in several instances: pass ?instance=")
        self.instances = instances


class ConversationReads:
    """Admin reads over the service's conversations (see the module docstring)."""

    store: Store
    registry: Registry[Accepted] | None
    tenants: Tenants

    async def window_sizes(self) -> dict[str, int]:
        """Messages in the window of every conversation, stored or live, by conversation key.

        Cheap with many chats: stored lengths are the size each commit gave the store, live ones
        come from ``len`` (which never thaws a hibernating window)."""
        sizes = await self.store.sizes()
        registry = self.registry
        if registry is not None:
            for key in registry.keys():
                actor = registry.actor(key)
                if isinstance(actor, ConversationActor):
                    sizes[key] = len(actor.state.window)
        return sizes

    async def memory(self, instance: str | None = None) -> dict[str, Any]:
        """The seed's ``/memory``: ``{jid: count}`` for one instance (``instance``, or a deployment
        whose conversations are all in one instance and that configures none), else
        ``{instance: {jid: count}}`` (docs/behaviour.md §8.2)."""
        nested: dict[str, dict[str, int]] = {}
        for key, size in sorted((await self.window_sizes()).items()):
            parts = ConversationKey.parse(key)
            nested.setdefault(parts.instance, {})[parts.jid] = size
        if instance is not None:
            return nested.get(instance, {})
        if self.tenants.names or len(nested) > 1:
            return nested
        return next(iter(nested.values()), {})

    async def instances_of(self, jid: str) -> list[str]:
        """The instances in which ``jid`` has a conversation (live or stored), sorted."""
        found = {ConversationKey.parse(key).instance for key in self.registry.keys()
                 if ConversationKey.parse(key).jid == jid} if self.registry is not None else set()
        # the configured and default instances first; the page's scopes (every instance with a
        # stored conversation) name the rest: at most two lookups by key, never a scan
        checked: set[str] = set()
        candidates = {self.tenants.default_instance, *self.tenants.names}
        while candidates:
            keys = [ConversationKey(i, jid).key for i in sorted(candidates)]
            page = await self.store.listing(now=0.0, keys=keys, limit=len(keys))
            found |= {ConversationKey.parse(row.key).instance for row in page.rows}
            checked |= candidates
            candidates = set(page.scopes) - checked
        return sorted(found)

    async def resolve(self, jid: str, instance: str | None = None) -> str | None:
        """The conversation key of ``jid`` in ``instance``, or in the one instance it is known in
        when ``instance`` is None; None when there is no such conversation. Raises AmbiguousChat
        when ``instance`` is None and the JID is known in several."""
        if instance is not None:
            key = ConversationKey(instance, jid).key
            return key if await self.conversation_state(key) is not None else None
        instances = await self.instances_of(jid)
        if len(instances) > 1:
            raise AmbiguousChat(jid, instances)
        return ConversationKey(instances[0], jid).key if instances else None

    async def conversation_state(self, key: str) -> tuple[dict[str, Any], bool] | None:
        """(state dict, live) for a conversation key (or a JID known in one instance only, see
        ``resolve``): from its live actor, else from the store."""
        if ConversationKey.parse(key).instance == "":
            found = await self.resolve(key)
            if found is None:
                return None
            key = found
        registry = self.registry
        if registry is not None and key in registry:
            actor = registry.actor(key)
            if isinstance(actor, ConversationActor):
                return actor.state.to_dict(), True
        saved = await self.store.load(key)
        return (state_dict(saved), False) if saved is not None else None

    async def conversation(self, key: str) -> ConversationView | None:
        """A conversation (None when there is none), with the registry's facts about its actor
        when it is live. ``key``: a conversation key (or a JID known in one instance only)."""
        if ConversationKey.parse(key).instance == "" and (resolved := await self.resolve(key)) is not None:
            key = resolved
        found = await self.conversation_state(key)
        if found is None:
            return None
        state, live = found
        actor = self.registry.actor_statistics(key) if live and self.registry is not None else None
        parts = ConversationKey.parse(key)
        view = ConversationView.of(parts.jid, ConversationState.from_dict(state), live=live, actor=actor)
        return attrs.evolve(view, instance=parts.instance)

    def live_actors(self, after: str | None, limit: int,
                    instance: str | None = None) -> tuple[list[ActorStatistics], str | None]:
        """Up to ``limit`` live actors after the key ``after`` in key order (each one's ``state`` is
        its ConversationSnapshot), only ``instance``'s when given, and the cursor of the next page
        (None on the last)."""
        registry = self.registry
        if registry is None:
            return [], None
        if instance is None:
            keys = registry.page(after, limit + 1)
        else:   # an instance's keys are contiguous in key order, from "<instance>/"
            prefix = ConversationKey(instance, "").key
            keys, cursor = [], max(after or "", prefix) if after is not None else prefix
            while len(keys) <= limit:
                chunk = registry.page(cursor, limit + 1)
                keys += [k for k in chunk if k.startswith(prefix) and ConversationKey.parse(k).instance == instance]
                if len(chunk) <= limit or not chunk[-1].startswith(prefix):
                    break
                cursor = chunk[-1]
            keys = keys[:limit + 1]
        page = [stats for key in keys[:limit] if (stats := registry.actor_statistics(key)) is not None]
        return page, keys[limit - 1] if len(keys) > limit else None
