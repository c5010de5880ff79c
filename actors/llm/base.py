"""The provider interface every LLM adapter implements, and the error classes it raises."""

from __future__ import annotations

import enum
from typing import Protocol, Sequence

import attrs


@attrs.frozen
class ChatMessage:
    """One turn of the history sent to a model. ``role`` is ``"user"`` or ``"assistant"``."""

    role: str
    content: str


@attrs.frozen
class Prompt:
    """What a conversation asks a model: the system prompt and the history, oldest first.

    The last message is the customer's newest text, verbatim.
    """

    system: str
    messages: tuple[ChatMessage, ...]


class ErrorKind(enum.Enum):
    """Why a provider call failed; the fallback chain decides what to do from this.

    BAD_REQUEST, EMPTY and BLOCKED are about one request (its chat's content), not the provider:
    they send that request to the fallback and never count towards opening the circuit.
    """

    RATE_LIMIT = "rate_limit"
    AUTH = "auth"
    BAD_REQUEST = "bad_request"     # 400/413/422: e.g. this chat's context is too long
    EMPTY = "empty"                 # answered, but with no text (e.g. max tokens used up)
    BLOCKED = "blocked"             # a safety filter or refusal blocked this prompt or answer
    SERVER = "server"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    UNAVAILABLE = "unavailable"     # no key, or the model/endpoint cannot be used (404, failed precondition)
    OTHER = "other"

    @property
    def per_request(self) -> bool:
        return self in _PER_REQUEST


_PER_REQUEST = frozenset({ErrorKind.BAD_REQUEST, ErrorKind.EMPTY, ErrorKind.BLOCKED})


class ProviderError(Exception):
    """A provider call failed. ``str()`` is safe to log: it never holds a key or the prompt.

    ``retry_after`` is the server's Retry-After in seconds, when it sent one.
    """

    def __init__(self, kind: ErrorKind, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after

    @property
    def per_request(self) -> bool:
        """A failure of this request only (see ErrorKind), which says nothing about the provider's health."""
        return self.kind.per_request


class Provider(Protocol):
    """An LLM adapter: one SDK client, created once, closed at shutdown."""

    name: str

    @property
    def available(self) -> bool:
        """False when the provider cannot be used (e.g. its API key is missing)."""

    async def complete(self, prompt: Prompt, model: str | None = None) -> str:
        """Answer the prompt with the model's text. Raises ProviderError on any failure.

        ``model``: this call's model (instances sharing one account may each use their own); None:
        the provider's configured one. The caller applies the timeout; the adapter must not retry on its own.
        """

    async def aclose(self) -> None:
        """Release the SDK client's connections."""


def history_roles_alternate(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """Merge consecutive messages of the same role (Anthropic and Gemini need alternation).

    The result starts with a user message: a leading assistant message is dropped.
    """
    merged: list[ChatMessage] = []
    for message in messages:
        if merged and merged[-1].role == message.role:
            merged[-1] = ChatMessage(message.role, merged[-1].content + "\n" + message.content)
        else:
            merged.append(message)
    while merged and merged[0].role != "user":
        merged.pop(0)
    return merged
