"""Property-based fuzzing of ``POST /webhook`` with hypothesis, through the real app and SQLite store.

Bodies follow the payload's shape (tests/payloads.py, docs/behaviour.md §2.2): a real ``messages.upsert``
whose fields are swapped for wrong types, deleted, made huge or deep; strings carrying unpaired
surrogates (escaped ``\\ud800`` and raw bytes ED A0 80), NULs, RTL marks and 1 MB runs; and raw byte
damage (truncation, invalid UTF-8). Every answer must be a 2xx, or a 4xx with a JSON reason, never a
5xx; a 4xx creates no actor; ``/health`` stays ok.

CI runs ``CI_EXAMPLES`` examples; the full run (``FULL_EXAMPLES``) is ``bench/fuzz_webhook.py``. Both
are derandomized with no example database, so a run is the same every time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import create_app
from tests.conftest import LoopbackClient, make_settings
from tests.payloads import upsert

CI_EXAMPLES = 250
FULL_EXAMPLES = 2500
MB = 1024 * 1024

ODD_STRINGS = ["\ud800", "\udfff", "a\ud83d", "\ude00b", "\x00", "nul\x00in", "\u202eevil\u202c", "\u200f",
               "\ufeff", "😀", "ñandú", "", " ", "\n", "x" * 70_000, "9" * 5000]
# Paths into the payload (tests/payloads.py) that the mutations aim at.
PATHS = [(), ("event",), ("instance",), ("data",), ("data", "key"), ("data", "key", "remoteJid"),
         ("data", "key", "id"), ("data", "key", "fromMe"), ("data", "key", "remoteJidAlt"),
         ("data", "key", "participant"), ("data", "message"), ("data", "message", "conversation"),
         ("data", "message", "extendedTextMessage"), ("data", "pushName"), ("data", "messageTimestamp"),
         ("data", "instanceId")]


def odd_text() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=40),
                     st.lists(st.sampled_from(ODD_STRINGS[:10]), max_size=5).map("".join))


def json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                       st.floats(allow_nan=False, allow_infinity=False), odd_text())
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(odd_text(), inner, max_size=4)),
                        max_leaves=12)


def deep(depth: int) -> Any:
    value: Any = "fondo"
    for _ in range(depth):
        value = {"m": value}
    return value


MUTATIONS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(PATHS[1:]), json_values()),
    st.tuples(st.just("set"), st.sampled_from(PATHS[1:]), st.sampled_from([20, 40, 1]).map(deep)),  # fresh each draw
    st.tuples(st.just("delete"), st.sampled_from(PATHS[1:]), st.none()),
    st.tuples(st.just("text"), st.sampled_from(PATHS[1:]), odd_text()),
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """(body bytes, how it was made) from a valid upsert with a few mutations and an encoding."""
    payload: Any = upsert(draw(odd_text()) if draw(st.booleans()) else "Hola")
    for op, path, value in draw(st.lists(MUTATIONS, max_size=4)):
        holder = payload
        for name in path[:-1]:
            holder = holder.get(name) if isinstance(holder, dict) else None
        if not isinstance(holder, dict):
            continue
        if op == "delete":
            holder.pop(path[-1], None)
        else:
            holder[path[-1]] = value
    if draw(st.integers(0, 40)) == 0:
        payload["data"] = {**(payload.get("data") if isinstance(payload.get("data"), dict) else {}),
                           "padding": "ñ" * (MB // 2 + draw(st.integers(0, 10)))}   # > MAX_BODY_BYTES
    encoding = draw(st.sampled_from(["ascii-escapes", "raw-utf8", "raw-surrogates", "truncated", "garbage"]))
    if encoding == "ascii-escapes":
        data = json.dumps(payload).encode()
    elif encoding in ("raw-utf8", "raw-surrogates"):
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8", "surrogatepass")
        if encoding == "raw-surrogates":
            data = data.replace(b"Hola", b"Ho\xed\xa0\x80la")
    elif encoding == "truncated":
        data = json.dumps(payload).encode()
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    else:
        data = draw(st.sampled_from([b"\xff\xfe{}", b"[" * 100_000, b'{"event": "messages.upsert"' + b"]" * 9,
                                     b"\x00" * 64, b'{"a": 1e999999}', b'"\\ud800"']))
    return data, encoding


async def fuzz(tmp_path: Path, examples: int) -> dict[str, int]:
    """Post ``examples`` generated bodies; returns how many got each status class."""
    app = create_app(make_settings(tmp_path, STORE="sqlite", LOG_STDERR="false"))
    app.test_client_class = LoopbackClient
    seen: dict[str, int] = {}
    async with app.test_app() as test_app:
        client = test_app.test_client()
        registry = app.extensions["service"].registry

        async def post(body: bytes) -> tuple[int, Any, int, int]:
            before = len(list(registry.keys()))
            response = await client.post("/webhook", data=body, headers={"Content-Type": "application/json"})
            return response.status_code, await response.get_json(), before, len(list(registry.keys()))

        @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(bodies())
        def one(case: tuple[bytes, str]) -> None:
            body, how = case
            status, answer, before, after = trio.from_thread.run(post, body)
            assert status < 500, (status, how, body[:300])
            assert isinstance(answer, dict), (status, how, body[:300])
            if status >= 400:
                assert isinstance(answer.get("error"), str) and answer["error"], (status, answer)
                assert after == before, ("a 4xx created an actor", how, body[:300])
            else:
                assert answer.get("status") in ("accepted", "ignored"), answer
            key = f"{status // 100}xx"
            seen[key] = seen.get(key, 0) + 1

        await trio.to_thread.run_sync(one)
        assert await (await client.get("/health")).get_json() == {"status": "ok"}
        assert await (await client.get("/ready")).get_json() == {"status": "ready"}
    return seen


async def test_fuzzed_webhook_bodies_are_never_a_5xx(tmp_path: Path) -> None:
    seen = await fuzz(tmp_path, CI_EXAMPLES)
    assert sum(seen.values()) == CI_EXAMPLES and seen.get("2xx") and seen.get("4xx"), seen
