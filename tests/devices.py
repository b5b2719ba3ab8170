"""The XLA settings of the test process and of every subprocess a test starts.

Tests compile many small programs whose run time is negligible next to their compile time, so they compile for
compile speed:
* LLVM at -O0 (``--xla_backend_optimization_level=0``): halves the XLA compile time of the tiny train step
  (measured: 19.6 s -> 9.1 s) and so most of the suite's.
* XLA:CPU's older elemental emitters instead of its MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=false``):
  the 8-device FLUX sharding check (tests/flux_sharding_check.py) spends 16.1-16.8 s compiling instead of
  26.6-27.9 s, the toy two-process test takes 73 s instead of 106 s (cold compile cache, this 2-core machine).
What they change is machine code, not the computation: values move at float32 rounding level (e.g. no fused
multiply-adds, another exp/tanh polynomial), far inside every tolerance, and each bitwise comparison compares two
runs built the same way. Users' runs keep XLA's defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def with_test_flags(flags: str) -> str:
    """``flags`` plus each test flag it does not already set."""
    have = {f.split("=", 1)[0] for f in flags.split()}
    return " ".join([*flags.split(), *(f for f in TEST_XLA_FLAGS if f.split("=", 1)[0] not in have)])


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
