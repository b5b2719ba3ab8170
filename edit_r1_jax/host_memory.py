"""glibc's allocator, set so XLA:CPU reuses its large per-call buffers (train, edit, evaluate, the benchmarks).

XLA:CPU allocates each call's temporaries and outputs afresh (one buffer of 494 MB for the forward+backward of
bench/dit.py) and frees them at the end. glibc serves an allocation that large with its own ``mmap`` and returns it
with ``munmap`` (the main arena above its mmap threshold, at most 32 MB; another thread's arena above its 64 MB
heap size, whatever ``M_MMAP_MAX`` says); so every call starts on fresh pages, which the kernel zero-fills on first
touch: 120,612 page faults per forward+backward of bench/dit.py on a 2-core AMD EPYC.

"keep" makes the next call reuse the same pages (0 page faults per call), at the price of a resident size that
stays at its peak. Two parts, both needed:
- glibc (``mallopt``): never ``mmap`` (``M_MMAP_MAX`` 0) and keep up to 2 GiB of freed memory at the heap's top
  (``M_TRIM_THRESHOLD``). That reaches the main thread's heap only: another thread's arena still maps anything
  above 64 MB.
- jax (``jax_cpu_enable_async_dispatch`` False): XLA:CPU runs a single-device call inline on the calling thread
  instead of on its dispatch thread, so the buffers are allocated by the thread that calls (the main thread in
  train, edit, evaluate and the benchmarks). It is read when jax creates its CPU client: set before the first jax
  computation. jax applies it to single-device calls only: multi-device CPU calls (a mesh over
  ``--xla_force_host_platform_device_count`` devices) stay asynchronous, so their buffers above 64 MB are not kept
  (not measured).
An earlier "keep" limited glibc to one arena (``M_ARENA_MAX`` 1) instead of the dispatch change; it made the toy
quick start 14-16% slower (every thread's small allocations in one arena). This one made it faster: on the AMD
machine, four runs 1:44-1:55 min:s against 2:07 (two runs) as glibc is; the dispatch change alone 1:58-1:59; the
``mallopt`` part alone 2:07-2:29 (docs/PERFORMANCE.md).

Settings: "system" = glibc and jax as they are; "keep"; "auto" (the default) = keep where jax will run on the CPU
only and has not started yet (``JAX_PLATFORMS=cpu``, or unset with no accelerator plugin installed: no
``jax_plugins`` module or entry point, no ``libtpu``), else system: on an accelerator host the big buffers live on
the device and the host heap is better left free to shrink. "keep" needs glibc (refused elsewhere); the choice is
logged with its reason.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import pkgutil
import platform

log = logging.getLogger(__name__)

SETTINGS = ("auto", "system", "keep")
# glibc's mallopt parameter numbers (malloc.h) and the values "keep" sets
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEEP_VALUES = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}
ASYNC_DISPATCH = "jax_cpu_enable_async_dispatch"

_applied: str | None = None  # "keep" once mallopt has run in this process


def resolve(setting: str, libc: str, flag: str = "--config.host_malloc") -> str:
    """The setting, normalised ("auto", "system" or "keep"), for the C library's name (``platform.libc_ver()[0]``);
    raises ValueError naming ``flag`` for a setting that is unknown or cannot be applied."""
    s = str(setting).strip().lower()
    if s not in SETTINGS:
        raise ValueError(f"{flag}={setting!r}: expected one of {', '.join(SETTINGS)}")
    if s == "keep" and libc != "glibc":
        raise ValueError(f"{flag}=keep needs glibc's mallopt; this C library is {libc or 'unknown'}")
    return s


def check(setting: str, flag: str = "--config.host_malloc") -> str:
    """``resolve`` for this process's C library."""
    return resolve(setting, platform.libc_ver()[0], flag)


def accelerator_plugins() -> list[str]:
    """Installed jax accelerator plugins, found the way jax finds them, without importing any: modules of the
    ``jax_plugins`` namespace package, ``jax_plugins`` entry points, and ``libtpu``."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names |= {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}
    if importlib.util.find_spec("libtpu") is not None:
        names.add("libtpu")
    return sorted(names)


def auto_choice() -> tuple[str, str]:
    """What "auto" means in this process now: ("keep" or "system", why)."""
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return "system", "jax's backend had started already"
    if platform.libc_ver()[0] != "glibc":
        return "system", f"not glibc ({platform.libc_ver()[0] or 'unknown C library'})"
    platforms = [p.strip() for p in (jax.config.jax_platforms or "").split(",") if p.strip()]
    if platforms:
        return ("keep" if platforms == ["cpu"] else "system"), f"JAX_PLATFORMS={','.join(platforms)}"
    plugins = accelerator_plugins()
    if plugins:
        return "system", f"accelerator plugin installed: {', '.join(plugins)}"
    return "keep", "jax on the CPU only: no accelerator plugin installed"


def configure(setting: str = "auto", flag: str = "--config.host_malloc") -> str:
    """Resolve ``setting`` (see the module docstring), apply it and log the choice with its reason; returns "keep"
    or "system". Calling it again with "keep" is a no-op, and "system" after "keep" cannot undo it (said so)."""
    global _applied
    import jax
    from jax._src import xla_bridge

    choice = check(setting, flag)
    auto, why = choice == "auto", f"{flag}={choice}"
    if auto:
        choice, reason = auto_choice()
        why = f"{flag}=auto: {reason}"
    if choice == "system":
        if _applied == "keep":
            log.warning("host malloc: %s, but keep was set earlier in this process and stays", why)
            return "keep"
        log.log(logging.INFO if auto else logging.DEBUG, "host malloc: glibc and jax as they are (%s)", why)
        return "system"
    if _applied != "keep":
        late = xla_bridge.backends_are_initialized()
        libc = ctypes.CDLL(None)
        for param, value in KEEP_VALUES.items():
            if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
                raise OSError(f"glibc mallopt({param}, {value}) failed ({why}); --host-malloc / "
                              f"config.host_malloc=system leaves the allocator alone")
        jax.config.update(ASYNC_DISPATCH, False)
        _applied = "keep"
        log.info("host malloc: keep (%s): glibc keeps freed memory for reuse (no mmap) and XLA:CPU runs each call "
                 "on the calling thread, so its per-call buffers do not fault in fresh pages", why)
        if late:
            log.warning("host malloc: keep set after jax's backend started: its CPU calls stay on XLA's dispatch "
                        "thread, whose large buffers are still mapped afresh (set it before the first jax "
                        "computation)")
    return "keep"


def applied() -> str:
    """What this process runs with: "keep" once ``configure`` set it, else "system"."""
    return _applied or "system"
