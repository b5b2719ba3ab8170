"""glibc's allocator, optionally set for XLA:CPU's large per-call buffers (train, edit, evaluate, the benchmarks).

XLA:CPU allocates each call's temporaries and outputs afresh (one buffer of 494 MB for the forward+backward of
bench/dit.py) and frees them at the end. glibc serves an allocation that large with its own ``mmap`` and returns it
with ``munmap`` (the main arena above its mmap threshold, at most 32 MB; another thread's arena above its 64 MB
heap size, whatever ``M_MMAP_MAX`` says); so every call starts on fresh pages, which the kernel zero-fills on first touch: 120,612 page faults per forward+backward of
bench/dit.py on a 2-core AMD EPYC. "keep" tells glibc (``mallopt``) to serve every thread from its main heap
(``M_ARENA_MAX`` 1), never to ``mmap`` (``M_MMAP_MAX`` 0) and to keep up to 2 GiB of freed memory at the heap's top
(``M_TRIM_THRESHOLD``): the next call reuses the same pages (0 page faults per call), at the price of a resident
size that stays at its peak. Measured on that machine (docs/PERFORMANCE.md): the DiT forward+backward 2.72-2.85 s
-> 2.36-2.42 s, torch's a little faster too.

Settings: "system" (default) = glibc as it is; "keep". Keep is opt-in because it is not faster everywhere: it
made the toy quick start slower (2.4-2.6 min against 2.1-2.2 min, its train phase 56-60 s against 44-45 s, two
pairs; its calls are small, and every thread's allocations now share one arena). Apply it before jax's backend
starts: ``M_ARENA_MAX`` only reaches threads that have not allocated yet. "keep" needs glibc (refused elsewhere);
the setting is logged.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

SETTINGS = ("system", "keep")
# glibc's mallopt parameter numbers (malloc.h) and the values "keep" sets
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP_VALUES = {M_ARENA_MAX: 1, M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}

_applied: str | None = None  # "keep" once mallopt has run in this process


def resolve(setting: str, libc: str, flag: str = "--config.host_malloc") -> str:
    """"keep" or "system" for a setting and the C library's name (``platform.libc_ver()[0]``)."""
    s = str(setting).strip().lower()
    if s not in SETTINGS:
        raise ValueError(f"{flag}={setting!r}: expected one of {', '.join(SETTINGS)}")
    if s == "keep" and libc != "glibc":
        raise ValueError(f"{flag}=keep needs glibc's mallopt; this C library is {libc or 'unknown'}")
    return s


def check(setting: str, flag: str = "--config.host_malloc") -> str:
    """``resolve`` for this process's C library: raises ValueError naming ``flag`` for a setting it cannot apply."""
    return resolve(setting, platform.libc_ver()[0], flag)


def configure(setting: str = "system", flag: str = "--config.host_malloc") -> str:
    """Resolve ``setting`` (see the module docstring), apply it and log the choice; returns "keep" or
    "system". Calling it again with "keep" is a no-op, and "system" after "keep" cannot undo it (said so)."""
    global _applied
    from jax._src import xla_bridge

    if check(setting, flag) == "system":
        if _applied == "keep":
            log.warning("host malloc: %s=system asked for, but keep was set earlier in this process and stays", flag)
            return "keep"
        log.debug("host malloc: glibc as it is (%s=keep reuses freed memory on the CPU)", flag)
        return "system"
    if _applied != "keep":
        libc = ctypes.CDLL(None)
        for param, value in KEEP_VALUES.items():
            if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
                raise OSError(f"glibc mallopt({param}, {value}) failed: {flag}=system leaves the allocator alone")
        _applied = "keep"
        late = (" (jax's backend had already started: its threads that allocated before keep their own arenas)"
                if xla_bridge.backends_are_initialized() else "")
        log.info("host malloc: keep (%s=keep): one arena, no mmap, freed memory kept for reuse, so XLA:CPU's "
                 "per-call buffers do not fault in fresh pages%s", flag, late)
    return "keep"


def applied() -> str:
    """What this process runs with: "keep" once ``configure`` set it, else "system"."""
    return _applied or "system"
