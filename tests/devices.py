"""The XLA settings of the test process and of every subprocess a test starts.

Tests compile many small programs whose run time is negligible next to their compile time, so they compile with
LLVM at -O0 (``--xla_backend_optimization_level=0``): that halves the XLA compile time of the tiny train step
(measured: 19.6 s -> 9.1 s) and so most of the suite's. What it changes is machine code, not the computation:
values move at float32 rounding level (e.g. no fused multiply-adds), far inside every tolerance, and each
bitwise comparison compares two runs built the same way. Users' runs keep XLA's default level.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def with_test_flags(flags: str) -> str:
    """``flags`` plus the test flags (once)."""
    return flags if TEST_XLA_FLAGS in flags else f"{flags} {TEST_XLA_FLAGS}".strip()


def env(devices: int | None = None) -> dict[str, str]:
    """The environment for a subprocess: this one's, on the CPU, with ``devices`` host devices (None: XLA's
    default), the test flags and the repository root first on PYTHONPATH."""
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = " ".join(f for f in e.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform"))
    if devices is not None:
        flags += f" --xla_force_host_platform_device_count={devices}"
    e["XLA_FLAGS"] = with_test_flags(flags)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, e.get("PYTHONPATH", "")) if p)
    return e
