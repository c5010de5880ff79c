"""Monkey-patches for bench experiments (see README.md). Never imported by the service itself."""

from __future__ import annotations

from typing import Any


def switch_interval() -> None:
    """The GIL is handed to a waiting thread (the store's worker) after 0.5 ms instead of 5 ms."""
    import sys

    sys.setswitchinterval(0.0005)


def timing() -> None:
    """Record Service.intake, SqliteStore.accept, event-loop stalls and GC pauses; print percentiles at shutdown."""
    import gc
    import sys
    import time

    import trio

    from actors import service
    from runtime import sqlite_store

    samples: dict[str, list[float]] = {"intake": [], "accept": [], "sleep_overshoot": []}

    def wrap(cls: Any, name: str, key: str) -> None:
        original = getattr(cls, name)

        async def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(self, *args, **kwargs)
            finally:
                samples[key].append(time.perf_counter() - started)

        setattr(cls, name, timed)

    gc_started: list[float] = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            samples.setdefault(f"gc_gen{info['generation']}", []).append(time.perf_counter() - gc_started[0])

    gc.callbacks.append(on_gc)
    wrap(service.Service, "intake", "intake")
    wrap(sqlite_store.SqliteStore, "accept", "accept")
    original_run = service.Service.run

    async def run(self: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async def probe() -> None:
            while True:
                started = time.perf_counter()
                await trio.sleep(0.01)
                samples["sleep_overshoot"].append(time.perf_counter() - started - 0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe)
            await original_run(self, task_status=task_status)
            nursery.cancel_scope.cancel()

    service.Service.run = run  # type: ignore[method-assign]

    def report() -> None:
        for key, values in samples.items():
            if not values:
                continue
            values.sort()
            n = len(values)
            print(f"timing {key}: n={n} p50={1000 * values[n // 2]:.1f}ms p90={1000 * values[int(n * 0.9)]:.1f}ms "
                  f"p99={1000 * values[int(n * 0.99)]:.1f}ms max={1000 * values[-1]:.1f}ms", file=sys.stderr, flush=True)

    original_shutdown = service.Service.shutdown

    async def shutdown(self: Any, grace: float) -> None:
        report()
        await original_shutdown(self, grace)

    service.Service.shutdown = shutdown  # type: ignore[method-assign]


def passes() -> None:
    """Time every pass of trio's scheduler (from the end of one I/O wait to the start of the next: the
    batch of tasks run in between) and count its task steps; percentiles at shutdown. trio's
    ``serve_listeners`` accepts one connection per pass, so 1 / pass time bounds the new connections
    a second the server can take."""
    import sys
    import time

    import trio

    from actors import service

    durations: list[float] = []
    steps: list[int] = []

    class Passes(trio.abc.Instrument):
        def __init__(self) -> None:
            self.started = 0.0
            self.steps = 0

        def after_io_wait(self, timeout: float) -> None:
            self.started, self.steps = time.perf_counter(), 0

        def before_task_step(self, task: Any) -> None:
            self.steps += 1

        def before_io_wait(self, timeout: float) -> None:
            if self.started:
                durations.append(time.perf_counter() - self.started)
                steps.append(self.steps)

    original_run = service.Service.run

    async def run(self: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        trio.lowlevel.add_instrument(Passes())
        await original_run(self, task_status=task_status)

    service.Service.run = run  # type: ignore[method-assign]
    original_shutdown = service.Service.shutdown

    async def shutdown(self: Any, grace: float) -> None:
        busy = sorted(d for d, s in zip(durations, steps) if s > 1)
        counts = sorted(steps)
        for name, values, scale, unit in (("pass", busy, 1000, "ms"), ("pass_steps", counts, 1, "")):
            if values:
                n = len(values)
                print(f"passes {name}: n={n} p50={scale * values[n // 2]:.1f}{unit} p90={scale * values[int(n * 0.9)]:.1f}{unit} "
                      f"p99={scale * values[int(n * 0.99)]:.1f}{unit} max={scale * values[-1]:.1f}{unit}",
                      file=sys.stderr, flush=True)
        await original_shutdown(self, grace)

    service.Service.shutdown = shutdown  # type: ignore[method-assign]
