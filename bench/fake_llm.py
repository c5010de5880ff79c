"""The OpenAI fake of ``tests/fakes/llm.py`` in echo mode, as a process, for ``bench/run.py``.

``python -m tests.fakes.llm`` always answers the same fixed text, so the load generator could not
tell which message a reply belongs to. This wrapper serves the very same ``OpenAIFake`` class (same
JSON, same hypercorn server) with a ``default`` behaviour that answers ``"re: " + <last user
message>`` (at most ``--echo-chars`` characters), so the marker ``m:<user>:<seq>`` the load
generator puts at the start of every message comes back in the reply.

A ``[lat=SECONDS]`` tag in the last user message overrides ``--latency`` for that call (the hot-user
scenario uses it so that one chat's 1,000 sequential turns fit in a bounded run).

    .venv/bin/python bench/fake_llm.py --port 0 --latency fixed:1.0
    -> prints "listening on http://127.0.0.1:PORT" once it accepts connections

Remove this file once ``tests.fakes.llm`` grows an ``--echo`` option (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path
from typing import Callable

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fakes.llm import OpenAIFake, RecordedRequest, Reply, parse_latency  # noqa: E402
from tests.fakes.server import hypercorn_config  # noqa: E402

_LAT = re.compile(r"\[lat=([0-9.]+)\]")


def echo_behaviour(echo_chars: int) -> Callable[[RecordedRequest], Reply]:
    def behave(request: RecordedRequest) -> Reply:
        messages = (request.json or {}).get("messages") or []
        last = ""
        for message in reversed(messages):
            if message.get("role") == "user":
                last = str(message.get("content") or "")
                break
        match = _LAT.search(last)
        delay = float(match.group(1)) if match else None
        return Reply(text=("re: " + last)[:echo_chars] or "re:", delay=delay)

    return behave


async def _serve(host: str, port: int, latency: Callable[[], float], echo_chars: int) -> None:
    from hypercorn.trio import serve

    app = OpenAIFake(latency=latency, record=False, default=echo_behaviour(echo_chars))
    config = hypercorn_config(f"{host}:{port}")
    config.backlog = 4096
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))
        print(f"listening on {binds[0]}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI chat completions fake that echoes the last user message.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", default="fixed:0", help="fixed:S | uniform:LO,HI | lognormal:MEDIAN,SIGMA")
    parser.add_argument("--echo-chars", type=int, default=300)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    latency = parse_latency(args.latency, random.Random(args.seed))
    try:
        trio.run(_serve, args.host, args.port, latency, args.echo_chars)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
