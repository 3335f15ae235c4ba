"""uvicorn's server, draining on SIGTERM/SIGINT and returning instead of re-raising the signal.

uvicorn's own handlers stop accepting connections, wait for the requests in flight and then
re-raise the captured signal, so the process dies of it (status 143 for SIGTERM) — wrong for a
supervisor that reads a clean exit as a clean stop. This one drains the same way and returns:
``zimage-trt serve`` exits 0 after SIGTERM and 130 after Ctrl-C. A second signal stops waiting.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn


class DrainingServer(uvicorn.Server):
    def __init__(self, app: Any, host: str, port: int, announce: Callable[[str], None]) -> None:
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.announce = announce
        self.interrupted = False
        self.port: int | None = None  # where it listens, once it does

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # tests run it on a thread
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:  # a second signal: stop waiting for the requests in flight
            self.force_exit = True
            return
        self.interrupted = sig == signal.SIGINT
        what = "interrupted" if self.interrupted else "SIGTERM"
        print(
            f"zimage-trt serve: {what}: draining (no new connections; the requests in flight "
            "finish)",
            file=sys.stderr,
            flush=True,
        )
        self.should_exit = True

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                self.port = port
                self.announce(f"zimage-trt serve: listening on http://{host}:{port}")
