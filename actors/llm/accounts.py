"""One LLM supervisor per provider account, however many instances use it.

An *account* is a provider, its base URL and its API key. Every instance whose settings name the same
account shares one ``ProviderSlot`` for it: one concurrency bound, one circuit breaker, one stall
detector, one set of latency statistics, one SDK client. (The provider's rate limits and outages are
the account's, not an instance's: a circuit opened by one instance's calls is open for all.) An
instance with a key of its own gets a slot of its own. The model is not part of the account: each
chain asks the shared provider for its own instance's model (``Link.model``).

``ChainPool.chain_for(settings, polite_error)`` hands out a ``ProviderChain`` per distinct provider
order (same accounts, models and polite text: the same chain), whose links point at the pool's
slots. The pool owns the hedged half-open probes of all of them in one nursery (``run``), sizes the
shared bounds across every chain (chain.py ``size_bounds``) and closes every account's SDK client
(``aclose``). Accounts and chains are kept for the life of the pool: a reload that changes an
instance's provider or key adds a slot, and the old one idles.

The process-wide LLM knobs (timeout, concurrency, circuit threshold and cool-down, stall floor, hedge
factor, turn deadline) cannot differ between instances (actors/settings/sections.py), so a slot is
built from the settings of the first chain that needs it.
"""

from __future__ import annotations

import collections
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from ..settings import Settings
from .chain import Link, Precedence, ProviderChain, chain_options, close_providers, precedence, size_bounds
from .providers import (ANTHROPIC_DEFAULT_BASE_URL, GEMINI_DEFAULT_BASE_URL, OLLAMA_DEFAULT_BASE_URL,
                        OPENAI_DEFAULT_BASE_URL, build_provider)
from .slot import ProviderSlot, ProviderStatistics

# provider -> (its model, base URL and key settings, the base URL it uses when none is set)
_SETTINGS: dict[str, tuple[str, str, str, str]] = {
    "openai": ("openai_model", "openai_base_url", "openai_api_key", OPENAI_DEFAULT_BASE_URL),
    "ollama": ("ollama_model", "ollama_base_url", "ollama_api_key", OLLAMA_DEFAULT_BASE_URL),
    "anthropic": ("anthropic_model", "anthropic_base_url", "anthropic_api_key", ANTHROPIC_DEFAULT_BASE_URL),
    "gemini": ("gemini_model", "gemini_base_url", "gemini_api_key", GEMINI_DEFAULT_BASE_URL),
    "huggingface": ("hf_model", "hf_base_url", "huggingface_api_key", ""),   # empty: the HF router
}


@attrs.frozen
class Account:
    """What makes two instances' calls to a provider the same calls: provider, base URL and key."""

    provider: str
    base_url: str
    api_key: str = attrs.field(repr=False)


def account_of(provider: str, settings: Settings) -> Account:
    """The account ``settings`` call ``provider`` on (``offline`` has one, local, account)."""
    if provider not in _SETTINGS:
        return Account(provider, "", "")
    _, url_field, key_field, default_url = _SETTINGS[provider]
    return Account(provider, getattr(settings.llm, url_field) or default_url, getattr(settings.llm, key_field))


def model_of(provider: str, settings: Settings) -> str | None:
    """The model ``settings`` ask ``provider`` for (None: it has no model to choose)."""
    return getattr(settings.llm, _SETTINGS[provider][0]) if provider in _SETTINGS else None


@attrs.frozen
class AccountStatistics:
    """One account's shared slot: which provider and server (never its key), and its health."""

    account: str        # the slot's name in logs: the provider, with #2, #3... for its further accounts
    provider: str
    host: str
    chains: int         # provider orders (instances with the same order count once) that use it
    health: ProviderStatistics


class ChainPool:
    """The provider chains of every instance, over one ProviderSlot per provider account."""

    def __init__(self) -> None:
        self._slots: dict[Account, ProviderSlot] = {}
        self._chains: dict[tuple[Any, ...], ProviderChain] = {}
        self._precedence: Precedence = {}   # across every chain: see chain.py precedence()
        self._nursery: trio.Nursery | None = None

    def chain_for(self, settings: Settings, polite_error: str) -> ProviderChain:
        """The chain for ``settings.llm.provider_order`` on the pool's shared slots, each link asking
        for ``settings``' own model, answering ``polite_error`` when every provider fails; the same
        chain for the same accounts, models and polite text."""
        order = settings.llm.provider_order
        links = [Link(self._slot(name, settings), model_of(name, settings)) for name in order]
        key = (tuple((account_of(name, settings), link.model) for name, link in zip(order, links)), polite_error)
        chain = self._chains.get(key)
        if chain is None:
            chain = ProviderChain(links, polite_text=polite_error, sized_by=self._size_bounds,
                                  **chain_options(settings))
            chain.use_nursery(self._nursery)
            self._chains[key] = chain
            self._precedence = precedence(chain.slots for chain in self._chains.values())
        return chain

    def _slot(self, provider: str, settings: Settings) -> ProviderSlot:
        account = account_of(provider, settings)
        slot = self._slots.get(account)
        if slot is None:
            same = sum(1 for known in self._slots if known.provider == provider)
            llm = settings.llm
            slot = ProviderSlot(build_provider(provider, settings), concurrency=llm.llm_concurrency,
                                threshold=max(1, llm.circuit_failure_threshold),
                                cooldown=llm.circuit_cooldown_seconds, stall_seconds=llm.circuit_stall_seconds,
                                timeout=llm.llm_timeout, name=provider if not same else f"{provider}#{same + 1}")
            self._slots[account] = slot
        return slot

    def _size_bounds(self) -> None:
        size_bounds(self._precedence)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the hedged half-open probes of every chain, in one nursery, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._use_nursery(nursery)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._use_nursery(None)

    def _use_nursery(self, nursery: trio.Nursery | None) -> None:
        self._nursery = nursery
        for chain in self._chains.values():
            chain.use_nursery(nursery)

    def statistics(self) -> tuple[AccountStatistics, ...]:
        """Every account's shared health, in the order the accounts were first used."""
        now = trio.current_time()
        users = collections.Counter(slot for chain in self._chains.values() for slot in chain.slots)
        return tuple(
            AccountStatistics(account=slot.name, provider=account.provider,
                              host=urlsplit(account.base_url).hostname or "", chains=users[slot],
                              health=slot.statistics(now))
            for account, slot in self._slots.items()
        )

    async def aclose(self) -> None:
        """Close every account's SDK client (the chains' links are only borrowed)."""
        await close_providers(self._slots.values())
