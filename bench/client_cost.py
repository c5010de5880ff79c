"""CPU cost per HTTP call of the clients the service uses, against the echo LLM fake in its own process.

    .venv/bin/python bench/client_cost.py [--calls 2000] [--concurrency 1,32] [--history 3,50]

Measures, in this process (time.process_time), one chat-completion call made five ways:

* ``openai-sdk``: ``AsyncOpenAI(...).chat.completions.create``, the SDK's usual call;
* ``openai-post``: ``AsyncOpenAI.post("/chat/completions", body=..., cast_to=ChatCompletion)``, what
  ``OpenAIProvider.complete`` sends: the SDK's transport, auth, error classes and response model,
  without ``create``'s per-message parameter transform;
* ``httpx``: ``httpx.AsyncClient.post(json=body)`` + ``response.json()`` (what ``EvolutionTransport`` uses);
* ``httpx2``: the same with ``httpx2`` (the fork the openai SDK ships with; its pool is O(n), not O(n*m));
* ``h11-raw``: a minimal keep-alive HTTP/1.1 client on trio sockets + h11 + json (the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from evolution_shape import Connections  # noqa: E402
from run import Proc, read_listening_url  # noqa: E402

SYSTEM = "Eres el asistente virtual de WhatsApp de un negocio. " * 10


def messages(history: int) -> list[dict[str, str]]:
    out = [{"role": "system", "content": SYSTEM}]
    for i in range(history):
        role = "user" if i % 2 == 0 else "assistant"
        out.append({"role": role, "content": f"m:{i}:0 " + "Hola, quisiera saber los horarios y precios. " * 3})
    if out[-1]["role"] != "user":
        out.append({"role": "user", "content": "m:1:1 Hola"})
    return out


class RawClient:
    """A tiny HTTP/1.1 keep-alive client: the h11 connections of evolution_shape.py, at most ``size``
    requests at once."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.connections = Connections(host, port)
        self.slots = trio.Semaphore(size)

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        status, answer = await self.request_json(path, body)
        assert status == 200, status
        return answer

    async def request_json(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """POST ``body`` as JSON; the status and the decoded JSON answer."""
        async with self.slots:
            status, _, data = await self.connections.post(path, json.dumps(body).encode())
        return status, json.loads(data)


async def measure(kind: str, url: str, calls: int, concurrency: int, history: int) -> float:
    body = {"model": "gpt-4o", "messages": messages(history), "max_completion_tokens": 512}
    call: Callable[[], Awaitable[None]]
    closer: Callable[[], Awaitable[None]]
    if kind == "openai-sdk":
        import openai
        client = openai.AsyncOpenAI(api_key="sk-bench", base_url=url + "/v1", timeout=20, max_retries=0)

        async def call() -> None:
            r = await client.chat.completions.create(model="gpt-4o", messages=body["messages"],  # type: ignore
                                                     max_completion_tokens=512)
            assert r.choices[0].message.content
        closer = client.close
    elif kind == "openai-post":
        import openai
        from openai.types.chat import ChatCompletion
        client = openai.AsyncOpenAI(api_key="sk-bench", base_url=url + "/v1", timeout=20, max_retries=0)

        async def call() -> None:  # the SDK's transport, errors and parsing, without its param transform
            r = await client.post("/chat/completions", body=body, cast_to=ChatCompletion)
            assert r.choices[0].message.content
        closer = client.close
    elif kind in ("httpx", "httpx2"):
        lib = __import__(kind)
        client = lib.AsyncClient(limits=lib.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
                                 timeout=20)

        async def call() -> None:
            r = await client.post(url + "/v1/chat/completions", json=body,
                                  headers={"Authorization": "Bearer sk-bench"})
            assert r.json()["choices"][0]["message"]["content"]
        closer = client.aclose
    else:
        host, port = url.rsplit("/", 1)[-1].split(":")
        raw = RawClient(host, int(port), concurrency)

        async def call() -> None:
            r = await raw.post_json("/v1/chat/completions", body)
            assert r["choices"][0]["message"]["content"]

        closer = raw.connections.aclose

    async def worker(n: int) -> None:
        for _ in range(n):
            await call()

    for _ in range(min(200, calls)):  # warm up: imports, connections, caches
        await call()
    started = time.process_time()
    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(worker, calls // concurrency)
    spent = time.process_time() - started
    await closer()
    return 1000 * spent / (calls // concurrency * concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--history", default="3,50", help="messages in the prompt's history")
    args = parser.parse_args()
    work = Path(os.environ.get("TMPDIR", "/tmp"))
    fake = Proc("llm", [sys.executable, "-m", "tests.fakes.llm", "--port", "0", "--latency", "fixed:0"],
                stdout=subprocess.PIPE, log=work / "client_cost_fake.log")
    try:
        url = read_listening_url(fake)
        print(f"client CPU ms per call ({args.calls} calls, after 200 warm-up calls), fake LLM at 0 latency:")
        print(f"{'client':12}{'conc':>6}{'history':>9}{'ms/call':>10}")
        for history in (int(h) for h in args.history.split(",")):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                for kind in ("openai-sdk", "openai-post", "httpx", "httpx2", "h11-raw"):
                    ms = trio.run(measure, kind, url, args.calls, concurrency, history)
                    print(f"{kind:12}{concurrency:>6}{history:>9}{ms:>10.3f}", flush=True)
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
