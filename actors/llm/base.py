"""The provider interface every LLM adapter implements, and the error classes it raises."""

from __future__ import annotations

import base64
import enum
from typing import Protocol, Sequence

import attrs


@attrs.frozen
class ImagePart:
    """An image sent with a message: its bytes and mimetype. ``alt`` is the text a model without
    vision gets instead when the message has no text of its own (e.g. ``[imagen]``)."""

    mime: str
    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")
    alt: str = "[image]"

    def base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")

    def data_uri(self) -> str:
        return f"data:{self.mime};base64,{self.base64()}"


@attrs.frozen
class ChatMessage:
    """One turn of the history sent to a model. ``role`` is ``"user"`` or ``"assistant"``; a user
    message may carry images (its ``content`` is then their caption, possibly empty)."""

    role: str
    content: str
    images: tuple[ImagePart, ...] = ()

    def text_only(self) -> "ChatMessage":
        """This message without its images (their ``alt`` text when it has no text of its own)."""
        if not self.images:
            return self
        return ChatMessage(self.role, self.content or " ".join(dict.fromkeys(i.alt for i in self.images)))


@attrs.frozen
class Prompt:
    """What a conversation asks a model, ordered for prefix caching: the system prompt, the chat's
    running ``summary`` (a second system message; empty: none), the history oldest first.

    The last message is the customer's newest text, verbatim (with its images, if any).
    ``cache_key`` names the chat for providers that route a repeated prefix to the same cache
    (OpenAI's ``prompt_cache_key``); ``vision`` names the providers that may get the images (None:
    every one); the others get ``text_only()`` messages.
    """

    system: str
    messages: tuple[ChatMessage, ...]
    summary: str = ""
    cache_key: str = ""
    vision: frozenset[str] | None = None

    @property
    def has_images(self) -> bool:
        return any(m.images for m in self.messages)

    def seen_by(self, provider: str) -> "Prompt":
        """The prompt as ``provider`` gets it: without images unless it is one of ``vision``."""
        if self.vision is None or provider in self.vision or not self.has_images:
            return self
        return attrs.evolve(self, messages=tuple(m.text_only() for m in self.messages))


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
            previous = merged[-1]
            text = "\n".join(t for t in (previous.content, message.content) if t)
            merged[-1] = ChatMessage(message.role, text, previous.images + message.images)
        else:
            merged.append(message)
    while merged and merged[0].role != "user":
        merged.pop(0)
    return merged
