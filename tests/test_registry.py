"""The actor runtime on its own: spawn on first use, order, isolation, supervision, expiry."""

from __future__ import annotations

from typing import Any, Sequence

import pytest
import trio
import trio.testing

from runtime.clock import Clock
from runtime.mailbox import Mailbox, MailboxClosed, MailboxFull
from runtime.registry import Registry, ShuttingDown


class Recorder:
    """A test actor: records what it handles; a message "crash" raises, "hang" waits for ``release``."""

    def __init__(self, key: str, log: list[tuple[str, Any]], release: trio.Event) -> None:
        self.key = key
        self.log = log
        self.release = release
        self.handled: list[Any] = []
        self.crashed: list[Any] = []
        self.hibernations = 0
        self._failing: list[Any] | None = None   # the message being handled, then the rest of its batch

    async def activate(self) -> None:
        self.log.append((self.key, "activate"))

    def batch_delay(self, first: Any) -> float:
        return 0.0

    async def handle(self, batch: Sequence[Any]) -> None:
        for index, message in enumerate(batch):
            self._failing = list(batch[index:])
            if message == "crash":
                raise ValueError("boom")
            if message == "hang":
                await self.release.wait()
            await trio.sleep(0)
            self.handled.append(message)
            self.log.append((self.key, message))
        self._failing = None

    async def on_crash(self, batch: Sequence[Any], error: BaseException) -> Sequence[Any]:
        """The crashing message is answered; the rest of its batch is handed back (as the contract says)."""
        failing, self._failing = self._failing, None
        if failing is None:   # never reached handle(): the whole batch failed
            self.crashed.extend(batch)
            return ()
        self.crashed.append(failing[0])
        return failing[1:]

    def hibernate(self) -> None:
        self.hibernations += 1
        self.log.append((self.key, "hibernate"))

    def snapshot(self) -> Any:
        return {"handled": len(self.handled)}


def make_registry(**kw: Any) -> tuple[Registry[Any], dict[str, Recorder], list[tuple[str, Any]], trio.Event]:
    actors: dict[str, Recorder] = {}
    log: list[tuple[str, Any]] = []
    release = trio.Event()

    def factory(key: str) -> Recorder:
        actors[key] = Recorder(key, log, release)
        return actors[key]

    options = dict(mailbox_size=100, idle_ttl=86400.0, intensity=3, period=60.0)
    options.update(kw)
    return Registry(factory, clock=Clock(), **options), actors, log, release


async def wait_until(condition: Any) -> None:
    while not condition():
        await trio.sleep(0.001)


def test_mailbox_bounded_and_closable() -> None:
    box: Mailbox[int] = Mailbox(2)
    box.put_nowait(1)
    box.reserve()
    with pytest.raises(MailboxFull):
        box.put_nowait(2)
    box.put_nowait(3, reserved=True)
    assert box.take_all() == [1, 3]
    assert box.close() == []
    with pytest.raises(MailboxClosed):
        box.put_nowait(4)


async def test_spawn_on_first_message_and_strict_order(nursery: trio.Nursery) -> None:
    registry, actors, log, _ = make_registry(mailbox_size=200)
    await nursery.start(registry.run)
    for i in range(200):
        registry.deliver("a", i)
    await wait_until(lambda: len(actors["a"].handled) == 200)
    assert actors["a"].handled == list(range(200))
    assert log[0] == ("a", "activate")
    assert registry.statistics().spawned == 1


async def test_hibernate_once_the_mailbox_is_empty(nursery: trio.Nursery) -> None:
    registry, actors, log, release = make_registry()
    await nursery.start(registry.run)
    registry.deliver("a", "hang")
    registry.deliver("a", 1)
    registry.deliver("a", 2)
    await wait_until(lambda: registry.actor_statistics("a").status == "running")
    assert actors["a"].hibernations == 0          # busy: never while messages wait
    release.set()
    await wait_until(lambda: actors["a"].hibernations == 1)
    assert [m for k, m in log if k == "a"] == ["activate", "hang", 1, 2, "hibernate"]
    registry.deliver("a", 3)
    await wait_until(lambda: actors["a"].hibernations == 2)
    assert [m for k, m in log if k == "a"][-2:] == [3, "hibernate"]


async def test_one_hanging_actor_does_not_delay_others(nursery: trio.Nursery) -> None:
    registry, actors, _, release = make_registry()
    await nursery.start(registry.run)
    registry.deliver("slow", "hang")
    for i in range(100):
        registry.deliver(f"k{i}", "hello")
    await wait_until(lambda: all(f"k{i}" in actors and actors[f"k{i}"].handled == ["hello"] for i in range(100)))
    assert actors["slow"].handled == []
    assert registry.actor_statistics("slow").status == "running"
    release.set()
    await wait_until(lambda: actors["slow"].handled == ["hang"])


async def test_full_mailbox_refuses(nursery: trio.Nursery) -> None:
    registry, actors, _, release = make_registry(mailbox_size=3)
    await nursery.start(registry.run)
    registry.deliver("a", "hang")           # taken by the running task
    await wait_until(lambda: registry.actor_statistics("a").mailbox_depth == 0)
    for i in range(3):
        registry.deliver("a", i)
    assert registry.actor_statistics("a").mailbox_depth == 3
    with pytest.raises(MailboxFull):
        registry.deliver("a", 99)
    release.set()
    await wait_until(lambda: actors["a"].handled == ["hang", 0, 1, 2])


async def test_crash_is_answered_and_actor_keeps_going(nursery: trio.Nursery) -> None:
    registry, actors, _, _ = make_registry(intensity=3, period=60.0)
    await nursery.start(registry.run)
    for message in (1, "crash", 2):
        registry.deliver("a", message)
    registry.deliver("b", "x")
    await wait_until(lambda: actors["a"].handled == [1, 2] and actors["b"].handled == ["x"])
    assert actors["a"].crashed == ["crash"]
    stats = registry.actor_statistics("a")
    assert stats.crashes == 1 and stats.status == "idle" and "boom" in stats.last_error


async def test_crash_loop_stops_at_intensity(nursery: trio.Nursery) -> None:
    registry, actors, _, _ = make_registry(intensity=2, period=60.0)
    await nursery.start(registry.run)
    for _ in range(5):
        registry.deliver("a", "crash")
    registry.deliver("a", "after")
    await wait_until(lambda: len(actors["a"].crashed) == 6)
    # 3 crashes stop the actor (more than 2 in 60 s); the rest is answered without running the turn.
    assert registry.actor_statistics("a").crashes == 3
    assert registry.actor_statistics("a").status == "failed"
    assert actors["a"].handled == []
    assert registry.statistics().failed_actors == 1


async def test_failed_actor_restarts_after_period(autojump_clock: trio.testing.MockClock) -> None:
    registry, actors, _, _ = make_registry(intensity=0, period=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        registry.deliver("a", "crash")
        await wait_until(lambda: actors["a"].crashed == ["crash"])
        assert registry.actor_statistics("a").status == "failed"
        await trio.sleep(11)
        registry.deliver("a", "ok")
        await wait_until(lambda: actors["a"].handled == ["ok"])
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("idle", "gone"), [(24 * 3600, True), (24 * 3600 - 60, False)])
async def test_idle_expiry_under_mock_clock(idle: float, gone: bool, autojump_clock: trio.testing.MockClock) -> None:
    registry, actors, _, _ = make_registry(idle_ttl=86400.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        registry.deliver("a", "hi")
        await wait_until(lambda: actors["a"].handled == ["hi"])
        await trio.sleep(idle)
        await registry.sweep()
        assert ("a" not in registry) is gone
        assert registry.statistics().expired == int(gone)
        nursery.cancel_scope.cancel()


async def test_message_in_between_resets_the_idle_clock(autojump_clock: trio.testing.MockClock) -> None:
    registry, actors, _, _ = make_registry(idle_ttl=86400.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        registry.deliver("a", 1)
        await trio.sleep(20 * 3600)
        registry.deliver("a", 2)
        await trio.sleep(20 * 3600)       # 40 h since the first message, 20 h since the last
        assert "a" in registry            # the sweeper ran many times meanwhile (every 60 s)
        await trio.sleep(4 * 3600 + 61)   # now over 24 h idle: the sweeper finds it within a minute
        assert "a" not in registry
        assert actors["a"].handled == [1, 2]
        nursery.cancel_scope.cancel()


async def test_drain_stops_intake_and_waits_for_turns(nursery: trio.Nursery) -> None:
    registry, actors, _, release = make_registry()
    await nursery.start(registry.run)
    registry.deliver("a", "hang")
    registry.deliver("a", "next")
    drained = trio.Event()

    async def drain() -> None:
        await registry.drain()
        drained.set()

    nursery.start_soon(drain)
    await wait_until(lambda: not registry.statistics().accepting)
    with pytest.raises(ShuttingDown):
        registry.deliver("b", "x")
    assert not drained.is_set()
    release.set()
    await drained.wait()
    assert actors["a"].handled == ["hang", "next"]


async def test_a_batch_is_not_dropped_when_on_crash_raises(autojump_clock: trio.testing.MockClock) -> None:
    """on_crash itself fails (e.g. the store is down): the batch is put back and retried after a
    backoff, so the messages behind the crash are still handled, in order."""
    registry, actors, _, _ = make_registry()

    class FlakyRecorder(Recorder):
        answer_failures = 1

        def batch_delay(self, first: Any) -> float:
            return 0.1   # a batch of everything that arrived meanwhile (debounce, reordering)

        async def on_crash(self, batch: Sequence[Any], error: BaseException) -> Sequence[Any]:
            if self.answer_failures:
                self.answer_failures -= 1
                raise RuntimeError("store is down")
            return await super().on_crash(batch, error)

    registry._factory = lambda key: actors.setdefault(key, FlakyRecorder(key, [], trio.Event()))
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        for message in ("crash", 1, 2):
            registry.deliver("a", message)
        await wait_until(lambda: actors["a"].handled == [1, 2])
        assert actors["a"].crashed == ["crash"]
        assert registry.actor_statistics("a").crashes == 2
        nursery.cancel_scope.cancel()


async def test_live_keys_are_listed_a_page_at_a_time(nursery: trio.Nursery) -> None:
    registry, actors, _, _ = make_registry()
    await nursery.start(registry.run)
    keys = [f"k{i:03d}" for i in range(250)]
    for key in reversed(keys):
        registry.deliver(key, "hi")
    seen: list[str] = []
    cursor = None
    while page := registry.page(cursor, 100):
        seen.extend(page)
        cursor = page[-1]
    assert seen == keys
    await wait_until(lambda: all(actors[k].handled == ["hi"] for k in keys))
    registry._idle_ttl = 0.0
    await registry.sweep()
    assert registry.page(None, 100) == []


async def test_stop_ends_only_those_actors_at_once(nursery: trio.Nursery) -> None:
    """Shard ownership lost (runtime/shards.py): the shard's actors stop mid-turn, nothing more of
    theirs runs, the others are untouched, and a later message spawns a fresh actor."""
    registry, actors, log, release = make_registry()
    await nursery.start(registry.run)
    registry.deliver("a", "hang")
    registry.deliver("a", 1)
    registry.deliver("b", "hang")
    await wait_until(lambda: registry.actor_statistics("a").status == "running"
                     and registry.actor_statistics("b").status == "running")
    first_a = actors["a"]
    assert registry.stop(["a", "zzz"]) == ["a"]
    assert "a" not in registry and "b" in registry
    await wait_until(lambda: registry.statistics().running_actors == 1)
    release.set()
    await wait_until(lambda: actors["b"].handled == ["hang"])
    await trio.sleep(0.01)
    assert first_a.handled == []           # cancelled in its turn: neither "hang" nor 1 ran
    registry.deliver("a", 2)
    await wait_until(lambda: actors["a"] is not first_a and actors["a"].handled == [2])


async def test_stop_before_the_actor_task_started(nursery: trio.Nursery) -> None:
    registry, actors, log, _ = make_registry()
    await nursery.start(registry.run)
    registry.deliver("a", 1)
    registry.stop(["a"])
    await trio.sleep(0.01)
    assert actors["a"].handled == [] and registry.statistics().running_actors == 0


async def test_drain_keys_waits_for_those_keys_only(nursery: trio.Nursery) -> None:
    """A graceful shard handoff: the keys' turns in flight finish; other keys do not hold it up."""
    registry, actors, log, release = make_registry()
    await nursery.start(registry.run)
    registry.deliver("a", "hang")
    registry.deliver("a", 1)
    registry.deliver("c", 5)
    await wait_until(lambda: registry.actor_statistics("a").status == "running")
    drained = trio.Event()

    async def drain() -> None:
        await registry.drain_keys(["a", "c"])
        drained.set()

    nursery.start_soon(drain)
    await trio.sleep(0.02)
    assert not drained.is_set()
    release.set()
    with trio.fail_after(2):
        await drained.wait()
    assert actors["a"].handled == ["hang", 1] and actors["c"].handled == [5]
