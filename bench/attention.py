"""Attention benchmark on the CPU. Not a test.

Times one attention call, forward and forward+backward (gradients of q, k, v), float32, for our implementations
("xla" = jax.nn.dot_product_attention, "flash_loop" = models/attention.py's blocked kernel head by head, the CPU
default, "flash_vmap" = the same kernel batched over heads, the accelerator default) and torch's CPU
scaled_dot_product_attention, all in the same process, interleaved round by round (median of the repeats), and
a jitted 2048^2 float32 matmul as the CPU peak:
    python bench/attention.py [--repeats 5] [--cases small,large] [--blocks 256x512,128x256]

Cases: "small" = 8 heads x 64 over 2176 tokens (one block of bench/dit.py), "large" = 24 heads x 128 over
4096 + 512 tokens (FLUX.1-Kontext at 512^2). Model FLOPs (2 per multiply-add, matmuls only): forward
4 * B * H * Lq * Lk * D; forward+backward 3x that (dQ, dK, dV, dP double the forward; the flash backward's
recomputation of the logits is not counted). `--blocks` adds flash_loop with other (block_q x block_k) sizes.
Prints one progress line per case to stderr and the JSON to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import machine_info  # noqa: E402

START_LOAD = os.getloadavg()

CASES = {"small": (1, 2176, 8, 64), "large": (1, 4608, 24, 128)}


def _rounds(fns: dict, repeats: int) -> dict:
    """Median wall time of each callable, calling them in turn each round so load changes hit all alike."""
    for f in fns.values():
        f()  # warm-up / compile
    times = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            t = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default="small", help="comma list of: " + ",".join(CASES))
    ap.add_argument("--blocks", default="", help="extra flash block sizes, e.g. 128x256,512x512")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from edit_r1_jax.models.attention import BATCHED_BLOCKS, LOOP_BLOCKS, flash_attention

    mm = jax.jit(lambda a: a @ a)
    a = jnp.ones((2048, 2048), jnp.float32)
    peak = _rounds({"mm": lambda: jax.block_until_ready(mm(a))}, args.repeats)["mm"]
    peak_gflops = 2 * 2048 ** 3 / peak / 1e9
    print(f"matmul 2048^2 f32: {peak:.4f} s = {peak_gflops:.1f} GFLOP/s", file=sys.stderr, flush=True)

    impls = {"xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
             "flash_loop_{}x{}".format(*LOOP_BLOCKS): lambda q, k, v: flash_attention(q, k, v, head_loop=True),
             "flash_vmap_{}x{}".format(*BATCHED_BLOCKS): lambda q, k, v: flash_attention(q, k, v, head_loop=False)}
    for spec in filter(None, args.blocks.split(",")):
        bq, bk = (int(x) for x in spec.split("x"))
        impls[f"flash_loop_{bq}x{bk}"] = lambda q, k, v, bq=bq, bk=bk: flash_attention(
            q, k, v, block_q=bq, block_k=bk, head_loop=True)

    results = []
    for case in args.cases.split(","):
        B, L, H, D = CASES[case]
        ks = jax.random.split(jax.random.PRNGKey(0), 3)
        q, k, v = (jax.random.normal(kk, (B, L, H, D), jnp.float32) for kk in ks)
        fns = {}
        for name, fn in impls.items():
            fwd = jax.jit(fn)
            grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * v), argnums=(0, 1, 2)))
            fns[f"{name}/fwd"] = lambda f=fwd: jax.block_until_ready(f(q, k, v))
            fns[f"{name}/fwd+bwd"] = lambda f=grad: jax.block_until_ready(f(q, k, v))
        tq, tk, tv = (torch.from_numpy(np.array(x)).transpose(1, 2).contiguous() for x in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def torch_fwd():
            with torch.no_grad():
                sdpa(tq, tk, tv)

        def torch_fwd_bwd():
            qq, kk, vv = (x.detach().requires_grad_() for x in (tq, tk, tv))
            (sdpa(qq, kk, vv) * vv).sum().backward()

        fns["torch_sdpa/fwd"], fns["torch_sdpa/fwd+bwd"] = torch_fwd, torch_fwd_bwd
        times = _rounds(fns, args.repeats)
        flops = {"fwd": 4 * B * H * L * L * D}
        flops["fwd+bwd"] = 3 * flops["fwd"]
        for key, t in times.items():
            name, mode = key.split("/")
            gflops = flops[mode] / t / 1e9
            results.append({"case": case, "shape_BLHD": [B, L, H, D], "impl": name, "mode": mode,
                            "seconds": round(t, 4), "gflops": round(gflops, 1),
                            "fraction_of_matmul_peak": round(gflops / peak_gflops, 3)})
        summary = ", ".join(f"{k_} {t:.3f}s" for k_, t in times.items())
        print(f"case {case} [B,L,H,D]={[B, L, H, D]}: {summary}", file=sys.stderr, flush=True)

    print(json.dumps({
        "machine": machine_info(START_LOAD),
        "matmul_peak": {"seconds": round(peak, 4), "gflops": round(peak_gflops, 1)},
        "repeats": args.repeats, "results": results}, indent=1))


if __name__ == "__main__":
    main()
