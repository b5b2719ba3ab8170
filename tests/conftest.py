"""Shared test set-up: float32 parity needs the highest matmul precision on every backend."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from devices import with_test_flags  # noqa: E402

# Before jax starts its backend: the test compile settings (tests/devices.py), inherited by every subprocess.
os.environ["XLA_FLAGS"] = with_test_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Compiled programs are reused across tests and xdist workers (the trainer tests compile the same tiny
# programs several times: straight run, stop, resume). Only speeds things up; results are unchanged.
# The environment variables carry the same cache into the subprocesses the CLI, multi-device and multi-process
# tests start (they inherit os.environ; jax reads these at start-up).
_cache = os.environ.get("EDIT_R1_TEST_COMPILE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_cache))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Started here, so that host_malloc="auto" (the trainer's default, edit_r1_jax/host_memory.py) finds it running and
# leaves the test process's allocator and dispatch as they are whichever test runs first; the subprocess tests
# start fresh and run the default as users do.
jax.devices()
