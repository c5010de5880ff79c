"""Fake LLM APIs as plain ASGI apps, speaking each provider's real JSON.

One class per API (OpenAI, Anthropic, Gemini, Hugging Face); each records what it received and
answers from a script of behaviours::

    fake = OpenAIFake()
    fake.script(Fail(429, retry_after="1"), Reply("hola"))
    async with running_server(fake) as base_url:
        ...
    fake.requests[0].json["model"]

When the script is empty the fake answers with its ``default`` (a behaviour, or a callable taking
the recorded request).

Like the real APIs, each fake checks the image parts it is sent (OpenAI ``image_url`` with a data URI,
Anthropic an ``image`` block with a base64 source, Gemini ``inline_data``): a part whose bytes are not
an image of its declared type gets that API's 400. And each reports prompt caching in its usage: a
request whose leading messages repeat an earlier request's (OpenAI: with the same
``prompt_cache_key``; Anthropic: up to a ``cache_control`` breakpoint) is billed as cached, once the
repeated prefix reaches ``cache_min_tokens`` (tokens estimated as characters / 4). ``python -m tests.fakes.llm --port P --latency fixed:0.5 [--echo-chars N]``
serves the OpenAI fake on its own (the benchmarks run it as a separate process; with
``--echo-chars`` it echoes each message back, see ``echo_behaviour``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import json
import math
import random
import re
import socket
import sys
from typing import Any, Awaitable, Callable, Union

import attrs
import trio

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@attrs.frozen
class Reply:
    """Answer 200 with ``text`` after ``delay`` seconds (None: the fake's latency function)."""

    text: str = "Hola, ¿en qué puedo ayudarte?"
    delay: float | None = None


@attrs.frozen
class Fail:
    """Answer ``status`` with the API's error body; ``retry_after`` becomes the Retry-After header."""

    status: int
    retry_after: str | None = None
    delay: float = 0.0
    body: dict[str, Any] | None = None  # overrides the API's standard error body


@attrs.frozen
class Hang:
    """Never answer: wait until the client gives up (disconnects) or the fake is released."""


@attrs.frozen
class Blocked:
    """Answer 200 with the API's safety-blocked answer: no text (content filter, refusal, blocked prompt)."""


Behaviour = Union[Reply, Fail, Hang, Blocked]


@attrs.frozen
class RecordedRequest:
    """One request as the fake received it. Header names are lower case."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    body: bytes = b""      # the raw body (multipart uploads have no JSON)


CHARS_PER_TOKEN = 4
MAX_CACHE_KEYS = 20_000
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
_MAGIC = {"image/jpeg": (b"\xff\xd8\xff",), "image/png": (b"\x89PNG\r\n\x1a\n",),
          "image/gif": (b"GIF87a", b"GIF89a"), "image/webp": (b"RIFF",)}
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
"""A real 1x1 PNG, for tests that send an image."""


def tokens(value: Any) -> int:
    """The fakes' token estimate: the JSON text of ``value`` / CHARS_PER_TOKEN."""
    return len(json.dumps(value, ensure_ascii=False)) // CHARS_PER_TOKEN


def image_error(mime: str, data: str) -> str | None:
    """Why base64 ``data`` is not an image of type ``mime`` (None: it is one)."""
    if mime not in IMAGE_TYPES:
        return f"unsupported image type {mime!r}"
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return "invalid base64 data"
    if not raw.startswith(_MAGIC[mime]) or (mime == "image/webp" and raw[8:12] != b"WEBP"):
        return f"the image data does not match the media type {mime}"
    return None


def common_prefix(one: list[Any], other: list[Any]) -> int:
    """How many leading items the two lists share."""
    count = 0
    for a, b in zip(one, other):
        if a != b:
            break
        count += 1
    return count


class FakeAPI:
    """Scripted, recording ASGI app; subclasses know one API's paths and JSON."""

    api = "base"

    def __init__(
        self,
        *,
        default: Behaviour | Callable[[RecordedRequest], Behaviour] = Reply(),
        latency: Callable[[], float] | None = None,
        record: bool = True,
    ) -> None:
        self.default = default
        self.latency = latency
        self.record = record
        self.requests: list[RecordedRequest] = []
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._script: collections.deque[Behaviour] = collections.deque()
        self._released = trio.Event()
        self.cache_min_tokens = 1024          # the shortest prefix a provider caches (OpenAI: 1,024 tokens)
        self._prefixes: dict[str, list[Any]] = {}   # cache key → the items of the last request with it
        self.transcript = "Hola, quiero saber el precio del servicio"   # what transcription answers

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, in order."""
        self._script.extend(behaviours)

    def release(self) -> None:
        """Let every hanging request finish (with a 503), e.g. before shutting the server down."""
        self._released.set()

    # -- API specifics -------------------------------------------------------------------
    def route(self, method: str, path: str) -> bool:
        raise NotImplementedError

    def reply_body(self, request: RecordedRequest, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def error_body(self, status: int) -> dict[str, Any]:
        raise NotImplementedError

    def blocked_body(self, request: RecordedRequest) -> dict[str, Any]:
        raise NotImplementedError

    def invalid(self, request: RecordedRequest) -> dict[str, Any] | None:
        """The API's 400 body when the request is malformed (e.g. a broken image part), else None."""
        return None

    def cached(self, key: str, items: list[Any]) -> int:
        """Tokens of ``items``' leading part that an earlier request with cache ``key`` sent too (0
        below ``cache_min_tokens``); remembers ``items`` for the next request."""
        previous = self._prefixes.pop(key, [])
        self._prefixes[key] = items
        if len(self._prefixes) > MAX_CACHE_KEYS:   # like a real cache: the least recently used go
            del self._prefixes[next(iter(self._prefixes))]
        shared = tokens(items[:common_prefix(items, previous)]) if previous else 0
        return shared if shared >= self.cache_min_tokens else 0

    # -- ASGI ----------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        body = await _read_body(receive)
        if not self.route(method, path):
            await _send_json(send, 404, self.error_body(404))
            return
        try:
            payload: Any = json.loads(body) if body else None
        except ValueError:
            payload = None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request = RecordedRequest(method, path, headers, payload, body)
        if self.record:
            self.requests.append(request)
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._behave(request, receive, send)
        finally:
            self.in_flight -= 1

    async def _behave(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        if self._script:
            behaviour = self._script.popleft()
        elif callable(self.default):
            behaviour = self.default(request)
        else:
            behaviour = self.default
        if isinstance(behaviour, Hang):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_wait_disconnect, receive, nursery.cancel_scope)
                await self._released.wait()
                nursery.cancel_scope.cancel()
                await _send_json(send, 503, self.error_body(503))
            return
        if isinstance(behaviour, Fail):
            if behaviour.delay:
                await trio.sleep(behaviour.delay)
            extra = [(b"retry-after", behaviour.retry_after.encode())] if behaviour.retry_after is not None else []
            body = behaviour.body if behaviour.body is not None else self.error_body(behaviour.status)
            await _send_json(send, behaviour.status, body, extra)
            return
        if isinstance(behaviour, Blocked):
            await _send_json(send, 200, self.blocked_body(request))
            return
        if (invalid := self.invalid(request)) is not None:
            await _send_json(send, 400, invalid)
            return
        delay = behaviour.delay if behaviour.delay is not None else (self.latency() if self.latency else 0.0)
        if delay > 0:
            await trio.sleep(delay)
        await _send_json(send, 200, self.reply_body(request, behaviour.text))


class OpenAIFake(FakeAPI):
    """``POST /chat/completions`` (also ``/v1/chat/completions``): OpenAI and Ollama."""

    api = "openai"
    _TRANSCRIBE = ("/audio/transcriptions", "/v1/audio/transcriptions")
    AUDIO_FORMATS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")

    def route(self, method: str, path: str) -> bool:
        return method == "POST" and path in ("/chat/completions", "/v1/chat/completions", *self._TRANSCRIBE)

    def invalid(self, request: RecordedRequest) -> dict[str, Any] | None:
        if request.path in self._TRANSCRIBE:
            name = upload_name(request)
            if name is None or name.rpartition(".")[2].lower() not in self.AUDIO_FORMATS:
                return {"error": {"message": f"Invalid file format. Supported formats: {list(self.AUDIO_FORMATS)}",
                                  "type": "invalid_request_error", "param": None, "code": None}}
            return None
        for message in (request.json or {}).get("messages") or []:
            content = message.get("content")
            for part in content if isinstance(content, list) else ():
                if part.get("type") != "image_url":
                    continue
                url = str((part.get("image_url") or {}).get("url", ""))
                match = re.match(r"^data:([^;,]+);base64,(.*)$", url, re.S)
                if match is None:
                    return _openai_error("Invalid image URL.", "invalid_image_url")
                if image_error(match.group(1), match.group(2)) is not None:
                    return _openai_error("You uploaded an unsupported image. Please make sure your image has of one "
                                         "the following formats: ['png', 'jpeg', 'gif', 'webp'].", "invalid_image_format")
        return None

    def reply_body(self, request: RecordedRequest, text: str) -> dict[str, Any]:
        if request.path in self._TRANSCRIBE:
            return {"text": self.transcript}
        payload = request.json or {}
        model = payload.get("model", "gpt-test")
        messages = payload.get("messages") or []
        prompt_tokens = max(1, tokens(messages))
        cached = self.cached(str(payload.get("prompt_cache_key", "")), messages)
        cached -= cached % 128   # OpenAI caches in 128-token steps
        return {
            "id": f"chatcmpl-{self.calls}",
            "object": "chat.completion",
            "created": 1769000000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": prompt_tokens + 5,
                      "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0}},
        }

    def blocked_body(self, request: RecordedRequest) -> dict[str, Any]:
        """What a content filter answers (Azure OpenAI, and providers behind the HF router): no content."""
        body = self.reply_body(request, "")
        body["choices"][0]["message"]["content"] = None
        body["choices"][0]["finish_reason"] = "content_filter"
        return body

    def error_body(self, status: int) -> dict[str, Any]:
        kind, code = _OPENAI_ERRORS.get(status, ("server_error", None))
        return {"error": {"message": f"fake {status} error", "type": kind, "param": None, "code": code}}


def _openai_error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


def upload_name(request: RecordedRequest) -> str | None:
    """The file name of a multipart upload's ``file`` part (None: no such part)."""
    match = re.search(rb'Content-Disposition: form-data; name="file"; filename="([^"]*)"', request.body, re.I)
    return match.group(1).decode() if match else None


_OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


class HuggingFaceFake(OpenAIFake):
    """``POST /v1/chat/completions`` as the HF router / TGI serve it (OpenAI-compatible JSON)."""

    api = "huggingface"

    def route(self, method: str, path: str) -> bool:
        return method == "POST" and path == "/v1/chat/completions"

    def error_body(self, status: int) -> dict[str, Any]:
        return {"error": f"fake {status} error", "error_type": "validation" if status < 500 else "generation"}


class AnthropicFake(FakeAPI):
    """``POST /v1/messages``."""

    api = "anthropic"

    def route(self, method: str, path: str) -> bool:
        return method == "POST" and path == "/v1/messages"

    def invalid(self, request: RecordedRequest) -> dict[str, Any] | None:
        for m, message in enumerate((request.json or {}).get("messages") or []):
            content = message.get("content")
            for c, block in enumerate(content if isinstance(content, list) else ()):
                if block.get("type") != "image":
                    continue
                source = block.get("source") or {}
                where = f"messages.{m}.content.{c}.image.source.base64"
                if source.get("type") != "base64":
                    why: str | None = "source.type: Input should be 'base64'"
                else:
                    why = image_error(str(source.get("media_type", "")), str(source.get("data", "")))
                if why is not None:
                    return {"type": "error", "error": {"type": "invalid_request_error", "message": f"{where}: {why}"},
                            "request_id": "req_fake"}
        return None

    def reply_body(self, request: RecordedRequest, text: str) -> dict[str, Any]:
        usage = self._usage(request.json or {})
        return {
            "id": f"msg_fake{self.calls}",
            "type": "message",
            "role": "assistant",
            "model": (request.json or {}).get("model", "claude-test"),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 5},
        }

    def _usage(self, payload: dict[str, Any]) -> dict[str, int]:
        """Anthropic's prompt caching: the prompt up to its last ``cache_control`` breakpoint is read
        from the cache when an earlier request had that same prefix, else written to it."""
        system = payload.get("system") or []
        items = ([{"system": b} for b in system] if isinstance(system, list) else [{"system": system}]) + [
            {"message": m} for m in payload.get("messages") or []]
        total = max(1, tokens(items))
        marks = [i for i, item in enumerate(items) if _has_cache_control(item)]
        if not marks:
            return {"input_tokens": total, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
        prefix = items[:marks[-1] + 1]
        read = self.cached("", prefix)
        written = 0 if read else (tokens(prefix) if tokens(prefix) >= self.cache_min_tokens else 0)
        return {"input_tokens": max(0, total - read - written), "cache_read_input_tokens": read,
                "cache_creation_input_tokens": written}

    def blocked_body(self, request: RecordedRequest) -> dict[str, Any]:
        """A refusal by the streaming classifiers: ``stop_reason`` "refusal", no content."""
        return {**self.reply_body(request, ""), "content": [], "stop_reason": "refusal"}

    def error_body(self, status: int) -> dict[str, Any]:
        kind = _ANTHROPIC_ERRORS.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": f"fake {status} error"}, "request_id": "req_fake"}


def _has_cache_control(value: Any) -> bool:
    if isinstance(value, dict):
        return "cache_control" in value or any(_has_cache_control(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_cache_control(v) for v in value)
    return False


_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class GeminiFake(FakeAPI):
    """``POST /v1/models/{model}:generateContent`` and the ``/v1beta/`` form."""

    api = "gemini"
    _PATH = re.compile(r"^/(v1|v1beta)/models/([^/:]+):generateContent$")

    def route(self, method: str, path: str) -> bool:
        return method == "POST" and bool(self._PATH.match(path))

    def invalid(self, request: RecordedRequest) -> dict[str, Any] | None:
        for content in (request.json or {}).get("contents") or []:
            for part in content.get("parts") or []:
                inline = part.get("inlineData", part.get("inline_data"))
                if inline is None:
                    continue
                mime = str(inline.get("mimeType", inline.get("mime_type", "")))
                if image_error(mime, str(inline.get("data", ""))) is not None and not mime.startswith("audio/"):
                    return {"error": {"code": 400, "message": "Unable to process input image. Please retry or report "
                                      "in https://developers.generativeai.google/guide/troubleshooting",
                                      "status": "INVALID_ARGUMENT"}}
        return None

    def reply_body(self, request: RecordedRequest, text: str) -> dict[str, Any]:
        match = self._PATH.match(request.path)
        payload = request.json or {}
        items = [payload.get("systemInstruction"), *(payload.get("contents") or [])]
        prompt = max(1, tokens(items))
        cached = self.cached("", items)   # Gemini's implicit caching of a repeated prefix
        return {
            "candidates": [
                {"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": 5, "totalTokenCount": prompt + 5,
                              **({"cachedContentTokenCount": cached} if cached else {})},
            "modelVersion": match.group(2) if match else "gemini-test",
            "responseId": f"fake{self.calls}",
        }

    def blocked_body(self, request: RecordedRequest) -> dict[str, Any]:
        """A blocked prompt: no candidates, ``promptFeedback.blockReason``."""
        return {
            "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [
                {"category": "HARM_CATEGORY_HARASSMENT", "probability": "HIGH", "blocked": True}]},
            "usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10},
            "modelVersion": "gemini-test",
            "responseId": f"fake{self.calls}",
        }

    def error_body(self, status: int) -> dict[str, Any]:
        state = _GEMINI_STATUS.get(status, "INTERNAL")
        error: dict[str, Any] = {"code": status, "message": f"fake {status} error", "status": state}
        if status == 429:
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}]
        return {"error": error}


_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

GEMINI_BAD_KEY_BODY: dict[str, Any] = {
    "error": {
        "code": 400,
        "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ],
    }
}
"""What Gemini really answers to a wrong API key (400, not 401)."""


def refused_url() -> str:
    """The URL of a 127.0.0.1 port nobody listens on (bound, then closed): connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- ASGI helpers ------------------------------------------------------------------------
async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _wait_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _send_json(send: Send, status: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


# -- command line: the OpenAI fake as a separate process -----------------------------------
def parse_latency(spec: str, rng: random.Random | None = None) -> Callable[[], float]:
    """``fixed:S``, ``uniform:LO,HI`` or ``lognormal:MEDIAN,SIGMA`` (seconds) → a sampler."""
    rng = rng or random.Random()
    kind, _, args = spec.partition(":")
    try:
        values = [float(v) for v in args.split(",")] if args else []
        if kind == "fixed" and len(values) == 1:
            return lambda: values[0]
        if kind == "uniform" and len(values) == 2:
            return lambda: rng.uniform(values[0], values[1])
        if kind == "lognormal" and len(values) == 2:
            mu = math.log(values[0])
            return lambda: rng.lognormvariate(mu, values[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"bad latency {spec!r}: fixed:S | uniform:LO,HI | lognormal:MEDIAN,SIGMA")


_LATENCY_TAG = re.compile(r"\[lat=([0-9.]+)\]")


def echo_behaviour(echo_chars: int) -> Callable[[RecordedRequest], Reply]:
    """Answer ``"re: " + <last user message>`` (at most ``echo_chars`` characters), so a marker at the
    start of each message comes back in its reply; a ``[lat=SECONDS]`` tag in that message sets the
    call's latency (the benchmarks' hot-user scenario)."""

    def behave(request: RecordedRequest) -> Reply:
        messages = (request.json or {}).get("messages") or []
        last = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
        tag = _LATENCY_TAG.search(last)
        return Reply(text=("re: " + last)[:echo_chars] or "re:", delay=float(tag.group(1)) if tag else None)

    return behave


def describe_images(request: RecordedRequest) -> Reply:
    """Answer like a vision model: what images the last message carries (type and size) and its text;
    a message without images gets the default reply."""
    payload = request.json or {}
    seen = []
    if "messages" in payload:   # OpenAI / Anthropic
        content = (payload["messages"] or [{}])[-1].get("content")
        for part in content if isinstance(content, list) else ():
            if part.get("type") == "image_url":
                header, _, data = str(part["image_url"]["url"]).partition(",")
                seen.append((header[5:].partition(";")[0], len(base64.b64decode(data))))
            elif part.get("type") == "image":
                seen.append((part["source"]["media_type"], len(base64.b64decode(part["source"]["data"]))))
    for part in ((payload.get("contents") or [{}])[-1].get("parts") or []):   # Gemini
        inline = part.get("inlineData")
        if inline:
            seen.append((inline.get("mimeType", inline.get("mime_type")), len(base64.b64decode(inline["data"]))))
    if not seen:
        return Reply()
    return Reply(text="Veo " + ", ".join(f"una imagen {mime} de {size} bytes" for mime, size in seen) + ".")


async def _serve(host: str, port: int, latency: Callable[[], float], echo_chars: int,
                 describe: bool = False) -> None:
    from hypercorn.trio import serve

    from .server import hypercorn_config

    default: Behaviour | Callable[[RecordedRequest], Behaviour] = echo_behaviour(echo_chars) if echo_chars else Reply()
    if describe:
        default = describe_images
    app = OpenAIFake(latency=latency, record=False, default=default)
    config = hypercorn_config(f"{host}:{port}")
    config.backlog = 4096   # load tests open hundreds of connections at once
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))
        print(f"listening on {binds[0]}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the fake OpenAI chat completions API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: an ephemeral port (printed)")
    parser.add_argument("--latency", default="fixed:0", help="fixed:S | uniform:LO,HI | lognormal:MEDIAN,SIGMA")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--echo-chars", type=int, default=0,
                        help="answer 're: <last user message>' cut to this many characters (0: a fixed text)")
    parser.add_argument("--describe-images", action="store_true",
                        help="answer a message with images like a vision model ('Veo una imagen image/png de N bytes.')")
    args = parser.parse_args(argv)
    latency = parse_latency(args.latency, random.Random(args.seed))
    try:
        trio.run(_serve, args.host, args.port, latency, args.echo_chars, args.describe_images)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
