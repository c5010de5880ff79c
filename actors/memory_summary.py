"""Summarised memory (MEMORY_SUMMARY): the oldest messages of a long chat folded into a running
summary by the LLM, so the customer's name, requests and bookings outlive the window
(docs/behaviour.md §3.7).

When a committed turn leaves the window at MAX_MESSAGES or more, the actor hands its oldest
SUMMARY_CHUNK messages and its summary to the ``MemorySummariser`` (``fold_job``). The summariser
makes one LLM call through the same provider chain, in its own task: the reply that triggered it is
already committed and on its way, and later turns of the chat do not wait for it. Its result comes
back through the chat's mailbox (like every supervisor's report, so only the actor changes its state),
and ``apply_fold`` drops the folded messages and keeps the new summary, provided the window still
starts with them. A failed call changes nothing: the messages stay (the window may then grow by
another SUMMARY_CHUNK before the oldest are cut) and the next turn tries again.

The window thus shrinks in SUMMARY_CHUNK steps instead of one message per turn, so the prompt's
prefix (system prompt, summary, oldest messages) stays the same for SUMMARY_CHUNK / 2 turns: what
the providers' prompt caches reuse (actors/llm/prompt_cache.py).
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Protocol

import attrs
import trio

from runtime.keyed import ExecutorClosed, KeyedSerialExecutor, MailboxFull

from .llm.base import ChatMessage, Prompt
from .llm.chain import Answer
from .prompts import Texts
from .settings import Settings
from .state import ConversationState

log = logging.getLogger(__name__)
MAX_SUMMARY_CHARS = 4000         # a summary kept (or set by an admin) is cut to this
REQUEST_HEADER = "PREVIOUS SUMMARY:"   # the summary request's first line (the offline provider knows it)


class Asker(Protocol):
    async def ask(self, prompt: Prompt, *, turn: bool = True) -> Answer: ...


@attrs.frozen
class FoldJob:
    """The oldest ``rows`` (``(role, content, at)``) of a chat's window and its summary, to fold."""

    summary: str
    rows: tuple[tuple[str, str, float], ...]


@attrs.frozen
class FoldResult:
    """A fold's outcome, for the chat's actor: the new summary (None: the call failed)."""

    job: FoldJob
    summary: str | None


def fold_job(settings: Settings, state: ConversationState) -> FoldJob | None:
    """The fold a committed turn calls for: with MEMORY_SUMMARY on and the window at MAX_MESSAGES or
    more, its oldest SUMMARY_CHUNK messages (always leaving the newest one); else None."""
    conversation = settings.conversation
    size = len(state.window)
    if not conversation.memory_summary or size < conversation.max_messages:
        return None
    count = min(conversation.summary_chunk, size - 1)
    rows = tuple((e.role, e.content, e.at) for e in state.window[:count])
    return FoldJob(state.summary, rows) if rows else None


def apply_fold(state: ConversationState, result: FoldResult, jid: str) -> bool:
    """Drop the folded messages still in the window and keep the new summary, when the window starts
    with (the rest of) them: the oldest may have been cut meanwhile (the window's hard bound, while
    the fold waited), and the summary holds them anyway. A reset or an admin's summary since makes the
    fold stale. True when the state changed."""
    job = result.job
    if result.summary is None:
        return False
    rows = job.rows
    head = (state.window[0].role, state.window[0].content, state.window[0].at) if len(state.window) else None
    cut = rows.index(head) if head in rows else -1
    kept = rows[cut:] if cut >= 0 else ()
    if not kept or tuple((e.role, e.content, e.at) for e in state.window[:len(kept)]) != kept \
            or state.summary != job.summary:
        log.info("Summarised memory for %s discarded: the window changed meanwhile", jid)
        return False
    before = len(state.window)
    del state.window[:len(kept)]
    state.summary = result.summary[:MAX_SUMMARY_CHARS]
    log.info("Summarised memory: %d → %d messages (summary %d chars)", before, len(state.window), len(state.summary))
    return True


def summary_prompt(texts: Texts, job: FoldJob) -> Prompt:
    """The summary call: the instruction as its system prompt; the previous summary and the messages
    to fold (tagged by who wrote them) as its one user message."""
    lines = "\n".join(f"[{'customer' if role == 'user' else 'business'}] {content}" for role, content, _ in job.rows)
    request = f"{REQUEST_HEADER}\n{job.summary or '(none)'}\n\nMESSAGES:\n{lines}"
    return Prompt(system=texts.summary_instruction, messages=(ChatMessage("user", request),))


class MemorySummariser:
    """Runs the folds, one at a time per chat, ``keys_in_flight`` chats at once (the service gives it
    LLM_CONCURRENCY: the chain bounds the calls anyway, and fewer let folds lag behind the turns of
    many chats that fill their windows together), and reports each back."""

    def __init__(self, report: Callable[[str, FoldResult], Awaitable[None]], *, keys_in_flight: int) -> None:
        self._report = report
        self._jobs: KeyedSerialExecutor[str, tuple[FoldJob, Asker, Texts]] = KeyedSerialExecutor(
            self._fold, queue_capacity=1, max_keys_in_flight=keys_in_flight, name="summary")
        self.calls = 0
        self.failures = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._jobs.run(task_status=task_status)

    def submit(self, key: str, job: FoldJob, chain: Asker, texts: Texts) -> bool:
        """Queue a fold for the conversation ``key``, asked through its instance's ``chain`` in its
        ``texts``' language (never blocks); False when one is already queued or we are stopping."""
        try:
            self._jobs.submit_nowait(key, (job, chain, texts))
        except (MailboxFull, ExecutorClosed):
            return False
        return True

    def statistics(self) -> dict[str, Any]:
        stats = self._jobs.statistics()
        return {"calls": self.calls, "failures": self.failures, "in_progress": stats.keys}

    async def _fold(self, key: str, item: tuple[FoldJob, Asker, Texts]) -> None:
        job, chain, texts = item
        self.calls += 1
        answer = await chain.ask(summary_prompt(texts, job), turn=False)
        summary = answer.text.strip() if not answer.failed else ""
        if not summary:
            self.failures += 1
            log.warning("Summarised memory for %s failed (%s): its %d oldest messages stay; retried after a "
                        "later turn", key, "no provider answered" if answer.failed else "empty summary", len(job.rows))
        await self._report(key, FoldResult(job, summary or None))
