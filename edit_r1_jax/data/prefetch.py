"""Run a host-side producer ahead of its consumer in one background thread (image decoding, resizing and text
lookups for the next rollout call, while the devices work on the current one)."""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Sequence


class Prefetcher:
    """``with Prefetcher(fn, args_list, ahead=1) as it: for out in it: ...`` yields ``fn(a)`` for each ``a`` in
    order, computing up to ``ahead`` results in advance. An exception in ``fn`` is raised at the item that
    failed (never swallowed); leaving the block cancels what was not started."""

    def __init__(self, fn: Callable[[Any], Any], args: Sequence[Any], ahead: int = 1):
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1, got {ahead}")
        self.fn, self.args, self.ahead = fn, list(args), ahead
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._futures: list[concurrent.futures.Future] = []
        self._next = 0

    def _fill(self):
        while self._next < len(self.args) and len(self._futures) < self.ahead + 1:
            self._futures.append(self._pool.submit(self.fn, self.args[self._next]))
            self._next += 1

    def __enter__(self):
        self._fill()
        return self

    def __iter__(self):
        return self

    def __next__(self):
        if not self._futures:
            raise StopIteration
        fut = self._futures.pop(0)
        self._fill()  # the next item starts before this one is handed over
        return fut.result()

    def __exit__(self, *exc):
        for f in self._futures:
            f.cancel()
        self._pool.shutdown(wait=True)
        return False
