"""The benchmarks' code paths: the compile benchmark on tiny sizes (``bench/compile.py --smoke``: every case lowers
and compiles against the current signatures of engine.sample, engine.train_step and the reward's scoring function;
a renamed or added argument there broke the full-size benchmark once without any test noticing), the attention
benchmark's matmul chain, and one pass of the encoder benchmark (``bench/encoders.py``: our VAE, CLIP and T5
against the diffusers / transformers modules it builds)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_compile_bench_smoke():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "bench/compile.py", "--smoke", "--no-unrolled"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # progress lines go to stderr: stdout is the JSON alone
    assert out["smoke"] is True and set(out["cases"]) == {"rollout", "train", "reward"}, out
    for case, modes in out["cases"].items():
        r = modes["scan"]
        assert r["compile_s"] > 0 and r["stablehlo_lines"] > 100, (case, r)


def test_attention_bench_matmul_chain_does_the_kernels_matmuls():
    """bench/attention.py's matmul chain (the kernel's matmuls without its softmax, XLA and torch sides) computes
    what it claims, over several block pairs: o = (q k^T) v, dq = (do v^T) k, dk = (do v^T)^T q,
    dv = (q k^T)^T do; the forward-only chain leaves the gradients zero. float32 against a float64 numpy
    reference; 1e-4 of the largest value covers float32 sums over 64 keys at either matmul precision."""
    import importlib.util

    import jax
    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("attention_bench", ROOT / "bench" / "attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((3, n, 8)).astype(np.float32) for n in (48, 64, 64, 48))
    s, dp = np.einsum("hqd,hkd->hqk", q, k, dtype=np.float64), np.einsum("hqd,hkd->hqk", do, v, dtype=np.float64)
    want = (s @ v, dp @ k, np.swapaxes(dp, 1, 2) @ q, np.swapaxes(s, 1, 2) @ do)
    with jax.default_matmul_precision("highest"):
        xla = jax.jit(lambda *a: bench.xla_matmul_chain(*a, 16, 32, True))(q, k, v, do)
        xla_fwd = jax.jit(lambda *a: bench.xla_matmul_chain(*a, 16, 32, False))(q, k, v, do)
    ours = bench.torch_matmul_chain(*(torch.from_numpy(x) for x in (q, k, v, do)), 16, 32, True)
    for name, got_x, got_t, w in zip(("o", "dq", "dk", "dv"), xla, ours, want):
        tol = 1e-4 * np.abs(w).max()
        assert np.abs(np.asarray(got_x) - w).max() <= tol, name
        assert np.abs(got_t.numpy() - w).max() <= tol, name
    np.testing.assert_allclose(np.asarray(xla_fwd[0]), want[0], rtol=0, atol=1e-4 * np.abs(want[0]).max())
    assert all(not np.asarray(x).any() for x in xla_fwd[1:])
    # Seven matmuls per block pair survive compilation: the backward's recomputed logits are not merged with the
    # forward's (an earlier version had both in one loop body and XLA computed them once).
    hlo = jax.jit(lambda *a: bench.xla_matmul_chain(*a, 16, 32, True)).lower(q, k, v, do).compile().as_text()
    assert len(re.findall(r"\bdot\(", hlo)) == 7, re.findall(r".*\bdot\(.*", hlo)


@pytest.mark.slow
def test_encoder_bench_runs_every_row():
    """One iteration at batch 1 (~30 s): every row is timed on both sides and the JSON holds what the README quotes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "bench/encoders.py", "--iters", "1", "--batch", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert [r["name"] for r in out["rows"]] == ["vae_encode", "vae_decode", "clip_l_text", "t5_encoder_12x768"]
    for r in out["rows"]:
        assert r["input"][0] == 1 and r["ours_ms"] > 0 and r["ref_ms"] > 0, r
        assert abs(r["speedup_vs_ref"] - r["ref_ms"] / r["ours_ms"]) < 0.01, r
    assert out["machine"]["cores"] == os.cpu_count()


def test_paired_times_alternates_the_sides_in_random_rounds():
    """bench/machine.paired_times (how every comparison benchmark times its two sides): warm-up calls first and
    untimed, then every round calls each side exactly once in a seeded order that is not always the same; each
    side's times are its own (a side that sleeps 30 ms more measures at least that much more)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_machine", ROOT / "bench" / "machine.py")
    machine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(machine)
    import time

    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: (calls.append("b"), time.sleep(0.03)),
           "c": lambda: calls.append("c")}
    times = machine.paired_times(fns, repeats=6, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up, in the given order
    rounds = [calls[3 + 3 * r: 6 + 3 * r] for r in range(6)]
    assert len(calls) == 3 + 18 and all(sorted(r) == ["a", "b", "c"] for r in rounds), calls
    assert len({tuple(r) for r in rounds}) > 1, rounds  # the order changes between rounds
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6, "c": 6}
    assert min(times["b"]) >= 0.03 > max(max(times["a"]), max(times["c"]))


def test_dit_bench_comparison_pairs_each_round_with_its_own_peak():
    """bench/dit.py cpu_comparison (the DiT benches' figures): each round's ratio is torch time / JAX time of that
    round, each round's fraction of the peak divides by the matmuls timed in the same round, and the medians come
    from the same times. Stand-in sides that sleep 50 and 150 ms (the comparison's arithmetic is under test, not a
    model) give ratios near 3 (the bounds leave ~30 ms of oversleep on a loaded machine; the other way round, the
    ratio would be near 1/3); a JAX side of 1 GFLOP in >= 50 ms runs at <= 20 GFLOP/s."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dit_bench", ROOT / "bench" / "dit.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import time

    sides = {"forward": (lambda: time.sleep(0.05), lambda: time.sleep(0.15))}
    out = bench.cpu_comparison(sides, {"forward": 1e9}, repeats=3)
    ratios = out["ratio_per_round"]["forward"]
    assert len(ratios) == 3 and all(1.8 < r < 3.7 for r in ratios), ratios
    assert 1.8 < out["ratio_torch_over_jax"]["forward"] < 3.7
    peak = out["peak_measured"]
    assert 0 < peak["gflops_min"] <= out["peak_gflops"] <= peak["gflops_max"], peak
    gflops = out["jax"]["forward_gflops_per_s"]
    assert gflops <= 20 and abs(out["jax"]["forward_frac_of_peak"] - gflops / out["peak_gflops"]) < 1e-9
    # each round's fraction is the JAX side's rate in that round (1 GFLOP in 50-83 ms: 12-20 GFLOP/s) over the
    # peak of the same round
    fracs, peaks = out["jax_frac_of_peak_per_round"]["forward"], out["peak_gflops_per_round"]["forward"]
    assert len(peaks) == 3 and min(peaks) == round(peak["gflops_min"], 1), (peaks, peak)
    assert all(12 < f * p < 20.2 for f, p in zip(fracs, peaks)), (fracs, peaks)
    fixed = bench.cpu_comparison(sides, {"forward": 1e9}, repeats=2, peak_gflops=100.0)
    assert fixed["peak_measured"] is None and fixed["peak_gflops"] == 100.0
    # 1 GFLOP in 50-83 ms against 100 GFLOP/s: 0.12-0.2 of the peak in each round
    assert all(0.12 < f <= 0.2 for f in fixed["jax_frac_of_peak_per_round"]["forward"]), fixed


def test_thunk_profile_names_the_compiled_programs_instructions():
    """bench/machine.py thunk_profile (``bench/dit.py --profile``): the times it reports belong to thunks of the
    compiled program (their names are instruction names of its HLO), per call, grouped by kind."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT / "bench"))
    import machine

    x = jnp.ones((512, 512), jnp.float32)
    f = jax.jit(lambda a: jnp.exp(a @ a.T) * 2.0 + a)
    hlo = f.lower(x).compile().as_text()
    prof = machine.thunk_profile(lambda: f(x).block_until_ready(), calls=3, top=5)
    assert prof["calls"] == 3 and prof["thread_ms"] > 0, prof
    names = list(prof["top_thunks_ms"])
    assert names and all(re.search(rf"\b{re.escape(n)} = ", hlo) for n in names), (names, hlo[-2000:])
    # kinds are the names without their ".N" suffix and add up to the total
    assert abs(sum(prof["by_kind_ms"].values()) - prof["thread_ms"]) < 0.05 + 1e-3 * prof["thread_ms"], prof
    assert all(not re.search(r"\.\d+$", k) for k in prof["by_kind_ms"]), prof
