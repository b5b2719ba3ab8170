"""The background input pipeline: results in order, computed ahead of the consumer, errors raised where they
occur."""

import threading
import time

import pytest

from edit_r1_jax.data.prefetch import Prefetcher


def test_runs_ahead_in_order_and_raises():
    started = []

    def load(i):
        started.append(i)
        time.sleep(0.05)
        return i * i, threading.current_thread().name

    with Prefetcher(load, range(4)) as it:
        first, name = next(it)
        assert first == 0 and name.startswith("prefetch")  # not the consumer's thread
        time.sleep(0.2)
        assert started[:3] == [0, 1, 2]  # items 1 and 2 were prepared while the consumer held item 0
        assert [x for x, _ in it] == [1, 4, 9]

    def bad(i):
        if i == 1:
            raise ValueError("cannot decode row 1")
        return i

    with Prefetcher(bad, range(3)) as it:
        assert next(it) == 0
        with pytest.raises(ValueError, match="row 1"):
            next(it)
