"""A chat's state and prompt stay bounded in bytes, whatever customers (or the model) send."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.memory_store import MemoryStore
from tests.conftest import chain_of, key_of, make_settings, wait_for
from tests.doubles import ScriptedProvider
from tests.payloads import upsert

JID = "5491131376731@s.whatsapp.net"


async def test_huge_messages_keep_the_state_and_the_prompt_bounded(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    import trio

    from actors.service import Service

    caplog.set_level("INFO", logger="actors")
    settings = make_settings(tmp_path)
    provider = ScriptedProvider(answer=lambda prompt: "z" * 70_000)   # a model going wild too
    store = MemoryStore()
    service = Service(settings, store=store, chain=chain_of(settings, provider))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        for i in range(12):
            assert (await service.intake(upsert(f"{i:02d}" + "y" * 65_534))).status == 200
        assert service.outbound is not None
        await wait_for(lambda: service.chain is not None and service.chain.statistics().asks == 12, timeout=20)
        await wait_for(lambda: len(service.outbound.outbox_entries(limit=10_000)) == 12 * 18, timeout=20)
        nursery.cancel_scope.cancel()

    state = json.loads(store._states[key_of(JID)])
    assert len(json.dumps(state)) <= settings.conversation.max_window_chars + 5_000
    assert all(len(row[1]) <= settings.conversation.max_message_chars for row in state["window"])
    assert state["window"][-2][1].startswith("11y")          # the newest turn is kept
    for turn, prompt in enumerate(provider.prompts):
        assert len(prompt.system) + sum(len(m.content) for m in prompt.messages) <= settings.conversation.prompt_max_chars
        assert prompt.messages[-1].content[:2] == f"{turn:02d}"   # the customer's own newest text, last
    # The reply itself reaches the customer whole (split into 4,000-character parts).
    parts = service.outbound.outbox_entries(limit=10_000)
    assert sum(len(p.text) for p in parts) == 12 * 70_000
    assert "Truncated a user message kept in memory: 65536 → 8000 characters" in caplog.text
