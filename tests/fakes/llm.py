"""Fake LLM APIs as plain ASGI apps, speaking each provider's real JSON.

One class per API (OpenAI, Anthropic, Gemini, Hugging Face); each records what it received and
answers from a script of behaviours::

    fake = OpenAIFake()
    fake.script(Fail(429, retry_after="1"), Reply("hola"))
    async with running_server(fake) as base_url:
        ...
    fake.requests[0].json["model"]

When the script is empty the fake answers with its ``default`` (a behaviour, or a callable taking
the recorded request). ``python -m tests.fakes.llm --port P --latency fixed:0.5 [--echo-chars N]``
serves the OpenAI fake on its own (the benchmarks run it as a separate process; with
``--echo-chars`` it echoes each message back, see ``echo_behaviour``).
"""

from __future__ import annotations

import argparse
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
        request = RecordedRequest(method, path, headers, payload)
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
        delay = behaviour.delay if behaviour.delay is not None else (self.latency() if self.latency else 0.0)
        if delay > 0:
            await trio.sleep(delay)
        await _send_json(send, 200, self.reply_body(request, behaviour.text))


class OpenAIFake(FakeAPI):
    """``POST /chat/completions`` (also ``/v1/chat/completions``): OpenAI and Ollama."""

    api = "openai"

    def route(self, method: str, path: str) -> bool:
        return method == "POST" and path in ("/chat/completions", "/v1/chat/completions")

    def reply_body(self, request: RecordedRequest, text: str) -> dict[str, Any]:
        model = (request.json or {}).get("model", "gpt-test")
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
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
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

    def reply_body(self, request: RecordedRequest, text: str) -> dict[str, Any]:
        return {
            "id": f"msg_fake{self.calls}",
            "type": "message",
            "role": "assistant",
            "model": (request.json or {}).get("model", "claude-test"),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5},
        }

    def blocked_body(self, request: RecordedRequest) -> dict[str, Any]:
        """A refusal by the streaming classifiers: ``stop_reason`` "refusal", no content."""
        return {**self.reply_body(request, ""), "content": [], "stop_reason": "refusal"}

    def error_body(self, status: int) -> dict[str, Any]:
        kind = _ANTHROPIC_ERRORS.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": f"fake {status} error"}, "request_id": "req_fake"}


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

    def reply_body(self, request: RecordedRequest, text: str) -> dict[str, Any]:
        match = self._PATH.match(request.path)
        return {
            "candidates": [
                {"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15},
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


async def _serve(host: str, port: int, latency: Callable[[], float], echo_chars: int) -> None:
    from hypercorn.trio import serve

    from .server import hypercorn_config

    default: Behaviour | Callable[[RecordedRequest], Behaviour] = echo_behaviour(echo_chars) if echo_chars else Reply()
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
    args = parser.parse_args(argv)
    latency = parse_latency(args.latency, random.Random(args.seed))
    try:
        trio.run(_serve, args.host, args.port, latency, args.echo_chars)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
