"""glibc's allocator, set for XLA:CPU's large per-call buffers (the command-line tools and the benchmarks).

XLA:CPU allocates each call's temporaries and outputs afresh (one buffer of 494 MB for the forward+backward of
bench/dit.py) and frees them at the end. glibc serves an allocation that large with its own ``mmap`` and returns it
with ``munmap``, and does so for every allocation of a thread other than the main one whatever its size; so every
call starts on fresh pages, which the kernel zero-fills on first touch: 120,612 page faults per forward+backward of
bench/dit.py on a 2-core AMD EPYC. "keep" tells glibc (``mallopt``) to serve every thread from its main heap
(``M_ARENA_MAX`` 1), never to ``mmap`` (``M_MMAP_MAX`` 0) and to keep up to 2 GiB of freed memory at the heap's top
(``M_TRIM_THRESHOLD``): the next call reuses the same pages (0 page faults per call), at the price of a resident
size that stays at its peak. Measured on that machine (docs/PERFORMANCE.md): the DiT forward+backward 2.72-2.85 s
-> 2.36-2.42 s, torch's a little faster too.

Settings: "auto" (default) = "keep" when jax will run on the CPU (``JAX_PLATFORMS`` / ``jax_platforms`` starts
with cpu, or no accelerator plugin is installed), else "system"; "keep"; "system" = glibc as it is. Apply it before
jax's backend starts: ``M_ARENA_MAX`` only reaches threads that have not allocated yet. Where the C library is not
glibc, "keep" is refused and "auto" leaves the allocator alone; the chosen setting and its reason are logged.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import platform

log = logging.getLogger(__name__)

SETTINGS = ("auto", "keep", "system")
# glibc's mallopt parameter numbers (malloc.h) and the values "keep" sets
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP_VALUES = {M_ARENA_MAX: 1, M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}

_applied: str | None = None  # "keep" once mallopt has run in this process


def accelerator_plugins() -> list[str]:
    """The PJRT plugins jax would find (entry points and ``jax_plugins.*`` modules) and libtpu, by name."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins  # a namespace package: jax_cuda12_plugin and others install modules into it

        import pkgutil

        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return sorted(set(names))


def resolve(setting: str, platforms: str | None, plugins: list[str], libc: str,
            flag: str = "--config.host_malloc") -> tuple[str, str]:
    """(``"keep"`` or ``"system"``, the reason) for a setting, the ``jax_platforms`` value, the installed
    accelerator plugins and the C library's name (``platform.libc_ver()[0]``)."""
    s = str(setting).strip().lower()
    if s not in SETTINGS:
        raise ValueError(f"{flag}={setting!r}: expected one of {', '.join(SETTINGS)}")
    if s == "system":
        return "system", f"{flag}=system"
    if libc != "glibc":
        if s == "keep":
            raise ValueError(f"{flag}=keep needs glibc's mallopt; this C library is {libc or 'unknown'}")
        return "system", f"the C library is {libc or 'unknown'}, not glibc"
    if s == "keep":
        return "keep", f"{flag}=keep"
    first = (platforms or "").split(",")[0].strip().lower()
    if first:
        return ("keep" if first == "cpu" else "system"), f"jax_platforms={platforms!r}"
    if plugins:
        return "system", f"accelerator plugins installed ({', '.join(plugins)}): jax will not run on the CPU"
    return "keep", "no accelerator plugin installed: jax runs on the CPU"


def configure(setting: str = "auto", flag: str = "--config.host_malloc") -> str:
    """Resolve ``setting`` (see the module docstring), apply it and log the choice; returns "keep" or
    "system". Calling it again with "keep" is a no-op, and "system" after "keep" cannot undo it (said so)."""
    global _applied
    import jax
    from jax._src import xla_bridge

    choice, why = resolve(setting, jax.config.jax_platforms, accelerator_plugins(), platform.libc_ver()[0], flag)
    if choice == "system":
        if _applied == "keep":
            log.warning("host malloc: %s asked for, but keep was set earlier in this process and stays", why)
            return "keep"
        log.info("host malloc: glibc as it is (%s)", why)
        return "system"
    if _applied != "keep":
        libc = ctypes.CDLL(None)
        for param, value in KEEP_VALUES.items():
            if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
                raise OSError(f"glibc mallopt({param}, {value}) failed: {flag}=system leaves the allocator alone")
        _applied = "keep"
        late = (" (jax's backend had already started: its threads that allocated before keep their own arenas)"
                if xla_bridge.backends_are_initialized() else "")
        log.info("host malloc: keep (%s): one arena, no mmap, freed memory kept for reuse, so XLA:CPU's per-call "
                 "buffers do not fault in fresh pages; %s=system leaves glibc as it is%s", why, flag, late)
    return "keep"


def applied() -> str:
    """What this process runs with: "keep" once ``configure`` set it, else "system"."""
    return _applied or "system"
