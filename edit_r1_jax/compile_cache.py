"""jax's persistent compilation cache for the command-line tools (train, edit, evaluate).

A restart, a preemption or the next run of the same configuration loads the compiled train step, rollout, reward
or editor instead of compiling it again. jax keys each program by its HLO, the compile options, the backend and
the jax version, so a stale entry is never reused; it keeps programs that compile in at least
``jax_persistent_cache_min_compile_time_secs`` (1 s by default) and writes entries from process 0 only (on a pod,
give every host the same folder or bucket).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

OFF = "none"


def resolve(setting: str) -> str | None:
    """The cache location for a setting: "none" -> None (off); "" -> jax's own setting if there is one
    (JAX_COMPILATION_CACHE_DIR, or an earlier ``jax.config.update``), else $XDG_CACHE_HOME/edit_r1_jax/xla
    (~/.cache/...); anything else as given (a bucket URL, or a folder, made absolute)."""
    s = str(setting).strip()
    if s.lower() == OFF:
        return None
    if s:
        return s if "://" in s else os.path.abspath(os.path.expanduser(s))
    if jax.config.jax_compilation_cache_dir:
        return str(jax.config.jax_compilation_cache_dir)
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "edit_r1_jax", "xla")


def use(setting: str, flag: str = "--config.compile_cache_dir") -> str | None:
    """Turn the cache on at ``resolve(setting)`` (or off), before the first compile; logs where. ``flag`` names
    the option in the log line."""
    path = resolve(setting)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        log.info("compile cache: off (%s=%s): every start compiles again", flag, OFF)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    log.info("compile cache: %s (programs that compile in %.1f s or more are kept for the next start; %s=%s "
             "turns it off)", path, jax.config.jax_persistent_cache_min_compile_time_secs, flag, OFF)
    return path
