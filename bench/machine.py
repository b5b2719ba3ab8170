"""What every benchmark prints about the machine it ran on (CPU model, core count, load average at start and at
the end: a busy machine makes the figures meaningless, package versions), and how the comparisons are timed:
``paired_times`` (both sides in the same rounds) and ``matmul_fns`` (the CPU matmul peak, timed beside them)."""

from __future__ import annotations

import os
import platform

from edit_r1_jax import host_memory


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def add_host_malloc_flag(parser) -> None:
    """``--host-malloc``: glibc's allocator for the whole process, both sides of a comparison alike
    (edit_r1_jax/host_memory.py); applied by ``use_host_malloc`` before jax's backend starts."""
    parser.add_argument("--host-malloc", default="system", choices=host_memory.SETTINGS,
                        help="system = glibc as it is (the tools' default), keep = glibc reuses freed memory; the "
                             "same for the JAX and the PyTorch side")


def use_host_malloc(args) -> str:
    """Apply ``--host-malloc`` and say which on stderr (also recorded by ``machine_info``)."""
    import sys

    choice = host_memory.configure(args.host_malloc, "--host-malloc")
    print(f"host malloc: {choice} (--host-malloc={args.host_malloc}; edit_r1_jax/host_memory.py)", file=sys.stderr,
          flush=True)
    return choice


def machine_info(start_loadavg=None) -> dict:
    """``start_loadavg``: ``os.getloadavg()`` taken when the benchmark started (printed beside the end's)."""
    import jax

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "backend": jax.default_backend(), "jax": jax.__version__,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            # the allocator changes CPU figures (page faults on fresh buffers): --host-malloc, GLIBC_TUNABLES
            "host_malloc": host_memory.applied(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    if start_loadavg is not None:
        info["loadavg_start"] = [round(x, 2) for x in start_loadavg]
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def matmul_fns(n: int = 2048) -> dict:
    """The CPU matmul peak's callables, timed in the same rounds as the models (bench/dit.py cpu_comparison,
    bench/attention.py): name -> zero-argument fn, a jitted n x n float32 matmul (highest precision) ("jax") and
    torch's ``mm`` of the same ("torch", when torch is installed). Each does 2 n^3 FLOPs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    ja = jnp.asarray(a)
    mm = jax.jit(lambda x: jnp.dot(x, x, precision="highest"))
    fns = {"jax": lambda: jax.block_until_ready(mm(ja))}
    try:
        import torch

        ta = torch.from_numpy(a)
        fns["torch"] = lambda: torch.mm(ta, ta)
    except ImportError:
        pass
    return fns


def paired_times(fns: dict, repeats: int, warmup: int = 1, seed: int = 0) -> dict:
    """Seconds per call of each zero-argument callable in ``fns`` (name -> fn), ``repeats`` of each, timed in
    rounds: every round calls each fn once, in a new (seeded) random order, so a host whose speed drifts (other
    tenants, frequency) slows every side of a comparison alike and none always runs after the same neighbour (in a
    fixed order, three copies of one program timed 0.146 / 0.157 / 0.168 s on a 2-core CPU, and of two attention
    block sizes the one timed first looked faster). ``warmup`` untimed calls of each first (compilation).
    Returns name -> list of seconds, in round order."""
    import random
    import time

    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    order = random.Random(seed)
    times = {name: [] for name in names}
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times
