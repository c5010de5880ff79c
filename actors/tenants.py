"""Per-instance settings for a turn: which assistant answers a conversation of one WhatsApp number.

``Tenants`` holds the global settings and the effective settings of each configured instance (the
instances file's loader gives them: the global ones with that instance's overrides). A turn reads
its ``Tenant`` once, at its start, so ``replace`` (a reload) takes effect from the next turn and
changes nothing in flight. Process-wide fields always come from the global settings.

LLM chains: one per distinct LLM section, made by the ``chain_factory`` the service gives
(``ChainPool.chain_for``: instances on one provider account share its supervisor) and shared by every
instance with the same section; chains made by a reload are started in the nursery of ``run`` and all
are closed when it ends.
"""

from __future__ import annotations

from typing import Callable, Mapping

import attrs
import trio

from .llm.chain import ProviderChain
from .prompts import Texts, texts_for
from .settings import Settings
from .settings.sections import LLMSettings

DEFAULT_INSTANCE = "default"


def default_instance(settings: Settings) -> str:
    """The instance of a webhook that names none (local curl) and of chats stored before instances
    were part of their key: EVOLUTION_INSTANCE, else ``default``."""
    return settings.outbound.evolution_instance or DEFAULT_INSTANCE


@attrs.frozen
class Tenant:
    """What one instance's turns read: its effective settings, texts and LLM chain."""

    name: str
    settings: Settings
    texts: Texts
    chain: ProviderChain
    configured: bool          # named in the instances file (else: the global settings)


class Tenants:
    """The global settings and every configured instance's, swappable as a whole (``replace``)."""

    def __init__(self, base: Settings, instances: Mapping[str, Settings] | None = None, *,
                 chain_factory: Callable[[Settings], ProviderChain]) -> None:
        self.base = base
        self._chain_factory = chain_factory
        self._chains: dict[LLMSettings, ProviderChain] = {}
        self._nursery: trio.Nursery | None = None
        self.default = self._tenant(default_instance(base), base, configured=False)
        self._map: dict[str, Tenant] = {}
        self.replace(instances or {})

    # -- reading -------------------------------------------------------------------------------

    def for_instance(self, name: str) -> Tenant:
        """The instance's Tenant; the global settings (``configured=False``) for one not configured."""
        tenant = self._map.get(name)
        if tenant is not None:
            return tenant
        if name == self.default.name:
            return self.default
        return attrs.evolve(self.default, name=name)

    @property
    def names(self) -> tuple[str, ...]:
        """The configured instance names, sorted."""
        return tuple(sorted(self._map))

    @property
    def names_instances(self) -> bool:
        """Whether the deployment names the instances it serves (an instances file or EVOLUTION_INSTANCE*)."""
        return bool(self._map) or self.base.outbound.names_instances

    @property
    def default_instance(self) -> str:
        return self.default.name

    def configured(self) -> dict[str, Settings]:
        """Each configured instance's effective settings, in file order (what a reload compares with)."""
        return {name: tenant.settings for name, tenant in self._map.items()}

    def all(self) -> list[Tenant]:
        """The default Tenant and every configured one."""
        return [self.default, *self._map.values()]

    def chains(self) -> list[ProviderChain]:
        """Every chain built so far (each once)."""
        seen: dict[int, ProviderChain] = {}
        for chain in self._chains.values():
            seen.setdefault(id(chain), chain)
        return list(seen.values())

    # -- changing ------------------------------------------------------------------------------

    def replace(self, instances: Mapping[str, Settings]) -> None:
        """Swap the instance map at once (a reload): turns that already read their Tenant keep it."""
        self._map = {name: self._tenant(name, settings, configured=True) for name, settings in instances.items()}

    def _tenant(self, name: str, settings: Settings, *, configured: bool) -> Tenant:
        texts = texts_for(settings.conversation.language, settings.conversation.agent_instruction)
        return Tenant(name, settings, texts, self._chain(settings), configured)

    def _chain(self, settings: Settings) -> ProviderChain:
        """The chain of ``settings``' LLM section, built on first use; one built while ``run`` runs
        (a reload naming a new section) is started at once, unless it is one already running (a
        factory may hand the same chain to several sections)."""
        chain = self._chains.get(settings.llm)
        if chain is None:
            running = self.chains()
            chain = self._chains[settings.llm] = self._chain_factory(settings)
            if self._nursery is not None and all(chain is not other for other in running):
                self._nursery.start_soon(chain.run)
        return chain

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every chain (hedged probes) until cancelled, then close them all."""
        try:
            async with trio.open_nursery() as nursery:
                for chain in self.chains():
                    await nursery.start(chain.run)
                self._nursery = nursery
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self._nursery = None
        finally:
            with trio.CancelScope(shield=True):
                for chain in self.chains():
                    await chain.aclose()
