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
    parser.add_argument("--host-malloc", default="auto", choices=host_memory.SETTINGS,
                        help="auto (the tools' default: keep on a CPU-only jax), keep = glibc reuses freed memory and "
                             "XLA:CPU runs calls on the calling thread, system = glibc and jax as they are; the "
                             "allocator part holds for the JAX and the PyTorch side alike")


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


def thunk_profile(fn, calls: int = 3, top: int = 20) -> dict:
    """Where a jitted call's time goes on XLA:CPU, from ``jax.profiler``: ``fn`` (zero arguments, blocks until its
    result is ready) is called twice untraced, then ``calls`` times traced. Each thunk event on XLA:CPU's threads
    (its worker pool, and the client thread that runs a small program inline) counts its exclusive time (events
    nested in it, e.g. a while loop's body, are subtracted). Returns per call: ``thread_ms`` (the threads' summed
    thunk time; up to cores x wall), ``by_kind_ms`` (thunk names without their ".N" suffix: "ynn_fusion" are
    YNNPACK dots in jax 0.10, "subtract_exponential_fusion" an elementwise fusion, ...) and the ``top`` thunks by
    name (instruction names of the compiled HLO). A thunk's helper work on other threads (a dot split across
    cores) is not traced: ``thread_ms`` is a lower bound of the threads' busy time, and a gap is not idle time."""
    import collections
    import glob
    import re
    import tempfile

    import jax

    for _ in range(2):
        fn()
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(calls):
            fn()
        jax.profiler.stop_trace()
        traces = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {d}")
        data = jax.profiler.ProfileData.from_file(traces[-1])
    wrappers = re.compile(r"^(ThunkExecutor|ThreadpoolListener|end:|SlinkyThreadPool::Await)")
    excl = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name and "XLAPjRtCpuClient" not in line.name:  # XLA:CPU's threads
                continue
            events = sorted(((e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events
                             if not wrappers.match(e.name)), key=lambda x: (x[0], -x[1]))
            stack: list = []
            for start, end, name in events:
                while stack and stack[-1][0] <= start:
                    stack.pop()
                if stack:  # nested in the innermost open event: not that event's own time
                    excl[stack[-1][1]] -= min(end, stack[-1][0]) - start
                excl[name] += end - start
                stack.append((end, name))
    if not excl:
        raise RuntimeError("the trace holds no XLA:CPU thunk events (not a CPU backend?)")
    per_call = {name: ns / calls / 1e6 for name, ns in excl.items()}
    kinds = collections.Counter()
    for name, ms in per_call.items():
        kinds[re.sub(r"\.\d+$", "", name)] += ms
    return {"calls": calls, "thread_ms": round(sum(per_call.values()), 2),
            "by_kind_ms": {k: round(v, 2) for k, v in kinds.most_common()},
            "top_thunks_ms": {k: round(v, 2) for k, v in collections.Counter(per_call).most_common(top)}}
