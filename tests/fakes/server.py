"""Serve an ASGI app on 127.0.0.1 (an ephemeral port) inside a trio nursery, for tests and benches."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve


def hypercorn_config(bind: str = "127.0.0.1:0") -> Config:
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5
    config.keep_alive_timeout = 30
    return config


@asynccontextmanager
async def running_server(app: Callable[..., Any], bind: str = "127.0.0.1:0") -> AsyncIterator[str]:
    """Start ``app`` under hypercorn's trio worker; yields its base URL (``http://127.0.0.1:PORT``).

    The server is shut down when the block exits.
    """
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: serve(app, hypercorn_config(bind), shutdown_trigger=shutdown.wait, task_status=task_status)
        )
        try:
            yield binds[0]
        finally:
            shutdown.set()
