"""In-process test doubles of *our own* interfaces (never of an SDK): a scriptable LLM provider.

SDK providers are tested against fake HTTP servers in tests/fakes; these doubles let actor-level
tests control latency, hangs and crashes precisely.
"""

from __future__ import annotations

import random
from typing import Awaitable, Callable

import trio

from actors.llm.base import Prompt


class ScriptedProvider:
    """A Provider whose answer and latency come from callables; records every prompt it gets."""

    name = "scripted"
    available = True

    def __init__(
        self,
        answer: Callable[[Prompt], str] | None = None,
        *,
        latency: Callable[[Prompt], float] | None = None,
        hook: Callable[[Prompt], Awaitable[None]] | None = None,
    ) -> None:
        self.prompts: list[Prompt] = []
        self.models: list[str | None] = []   # the model each call asked for (None: the provider's own)
        self._answer = answer or (lambda p: f"re: {p.messages[-1].content}")
        self._latency = latency or (lambda p: 0.0)
        self._hook = hook

    async def complete(self, prompt: Prompt, model: str | None = None) -> str:
        self.prompts.append(prompt)
        self.models.append(model)
        if self._hook is not None:
            await self._hook(prompt)
        delay = self._latency(prompt)
        if delay:
            await trio.sleep(delay)
        return self._answer(prompt)

    async def aclose(self) -> None:
        return None


def random_latency(low: float, high: float, seed: int = 7) -> Callable[[Prompt], float]:
    rng = random.Random(seed)
    return lambda prompt: rng.uniform(low, high)


class CrashingChain:
    """Wraps a ProviderChain; ``ask`` raises (a bug in the turn, not a provider failure) on "crash…" texts."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self._inner = inner

    async def ask(self, prompt: Prompt, *, turn: bool = True):  # type: ignore[no-untyped-def]
        if prompt.messages[-1].content.startswith("crash"):
            raise RuntimeError("bug in a turn")
        return await self._inner.ask(prompt, turn=turn)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        await self._inner.run(task_status=task_status)

    def statistics(self):  # type: ignore[no-untyped-def]
        return self._inner.statistics()

    async def aclose(self) -> None:
        await self._inner.aclose()
