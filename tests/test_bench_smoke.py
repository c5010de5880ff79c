"""Smoke test of the end-to-end benchmark harness (bench/run.py) on tiny sizes.

It starts the real processes (echo LLM fake, Evolution fake, the service under hypercorn, the load
generator) and checks that every message was answered exactly once, to the right chat, in order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("shape", ["pooled", "evolution", "evolution-fresh"])
def test_bench_harness_tiny_crowd_and_burst(tmp_path: Path, shape: str) -> None:
    out = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "--scenarios", "crowd,burst", "--quick", "--users", "20",
         "--messages", "2", "--llm-latency", "fixed:0.05", "--shape", shape, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.exists(), completed.stdout + completed.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["scenario"] for r in rows] == ["crowd", "burst"]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["messages"] == 40, row
        assert row["answered"] == row["messages"], row
        assert (row["lost"], row["duplicates"], row["out_of_order"], row["misrouted"]) == (0, 0, 0, 0), row
        assert row["unexpected"] == 0 and row["polite"] == 0, row
        assert row["service"]["cpu_s"] > 0 and row["service"]["peak_rss_mb"] > 0, row
        assert row["shape"] == shape and row["acks_over_30s"] == 0, row
        if shape == "evolution":   # its own connections, kept alive between a user's messages
            assert row["connections"]["opened"] + row["connections"]["reused"] >= row["messages"], row
        if shape == "evolution-fresh":   # a new connection for every webhook, never one reused
            assert row["connections"]["reused"] == 0 and row["connections"]["opened"] >= row["messages"], row
        # the runner's last /metrics scrape saw every webhook in the service's own ack histogram
        assert row["service_metrics"]["service_ack"]["n"] >= row["messages"], row
        assert set(row["listen"]) == {"ListenOverflows", "ListenDrops"}, row
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_long_conversations_bench_tiny(tmp_path: Path) -> None:
    """bench/long_conversations.py on 4 chats x 40 turns (MAX_MESSAGES 20, SUMMARY_CHUNK 10): the
    summarised mode reuses more of each prompt, bills fewer uncached tokens and keeps the name."""
    out = tmp_path / "long.json"
    completed = subprocess.run(
        [sys.executable, "bench/long_conversations.py", "--chats", "4", "--turns", "40", "--max-messages", "20",
         "--chunk", "10", "--llm-latency", "0.01", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    sliding, summarised = json.loads(out.read_text())
    assert sliding["turns"] == summarised["turns"] == 160
    assert summarised["cacheable_share"] > sliding["cacheable_share"]
    assert summarised["uncached_tokens_per_turn_with_summaries"] < sliding["uncached_tokens_per_turn"]
    assert sliding["summary_calls"] == 0 < summarised["summary_calls"]
    assert summarised["summaries_with_the_name_from_turn_1"] == 4


@pytest.mark.slow
def test_bench_takeover_quick(tmp_path: Path) -> None:
    """bench/run.py's takeover scenario (two node processes on a throwaway PostgreSQL, SIGKILL of
    one, SHARD_LEASE_SECONDS=3 in --quick): nothing lost or out of order, the survivor owns every
    shard within the issue's lease + 2 s, repeats bounded by what was unanswered at the kill."""
    from tests.postgres import unavailable_reason

    if (reason := unavailable_reason()) is not None:
        pytest.skip(reason)
    out = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "bench/run.py", "--scenarios", "takeover", "--store", "postgresql", "--quick",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert out.exists(), completed.stdout + completed.stderr
    [row] = json.loads(out.read_text())["rows"]
    assert "error" not in row, row.get("error")
    assert (row["lost"], row["out_of_order"], row["misrouted"], row["unexpected"]) == (0, 0, 0, 0), row
    takeover = row["takeover"]
    assert takeover["victim_chats"] > 0 and row["duplicates"] <= takeover["unanswered_at_kill"], takeover
    assert takeover["owned_all_s"] is not None and takeover["owned_all_s"] <= 3 + 2, takeover
    assert takeover["first_reply_s"] is not None, takeover
    assert completed.returncode == 0, completed.stdout + completed.stderr
