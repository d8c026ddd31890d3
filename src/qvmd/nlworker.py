"""A netlink socket bound to one network namespace, served by one thread.

pyroute2's synchronous IPRoute hangs when used from a thread other than the
one that created it, and its netns= option forks a helper per operation
(~6 ms a TAP). So each namespace gets one long-lived thread that enters the
namespace once, creates the socket there and runs every request for it:
operations cost ~0.2-0.5 ms, and the event loop never blocks on the kernel
(deleting a TAP alone takes the kernel ~16 ms).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pyroute2 import IPRoute

from qvmd import nsutil

T = TypeVar("T")


class NetlinkWorker:
    def __init__(self, netns: str | None = None, name: str = "netlink") -> None:
        self.netns = netns
        self._ipr: Any = None
        self._closed = False
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=self._init
        )

    def _init(self) -> None:
        if self.netns is not None:
            nsutil.enter(self.netns)
        self._ipr = IPRoute()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(ipr, *args) on the worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, fn, args)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Same as run(), for code outside the event loop (teardown, CLI)."""
        return self._pool.submit(self._call, fn, args).result()

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        return fn(self._ipr, *args)

    def close(self) -> None:
        """Idempotent: close the socket on its own thread, then the thread."""
        if self._closed:
            return
        self._closed = True

        def _close() -> None:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

        try:
            self._pool.submit(_close).result(timeout=5)
        finally:
            self._pool.shutdown(wait=True)
