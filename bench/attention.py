"""Attention benchmark on the CPU. Not a test.

Times one attention call, forward and forward+backward (gradients of q, k, v), float32, for our implementations
("xla" = jax.nn.dot_product_attention, "flash_loop" = models/attention.py's blocked kernel head by head, the CPU
default, "flash_vmap" = the same kernel batched over heads, the accelerator default) and torch's CPU
scaled_dot_product_attention, all in the same process, interleaved round by round (median of the repeats), and
as the CPU peak the faster of a jitted 2048^2 float32 matmul and torch.mm of the same, timed in the same rounds
(``matmul_peak`` per case; ``fraction_of_matmul_peak`` divides by it):
    python bench/attention.py [--repeats 5] [--cases small,large] [--blocks 256x512,128x256]

``matmul_chain`` (per case): the kernel's matmuls without its softmax, at its default (head-by-head) block sizes:
per (batch, head) and block pair, forward s = q_i k_j^T, o_i += s v_j; forward+backward adds the backward's five
(s recomputed, dv_j^T += do_i^T s, dp = do_i v_j^T, dq_i += dp k_j, dk_j^T += q_i^T dp, from q^T and do^T
transposed once per head as in the kernel; dp stands in for ds). Run
once as one jitted program of the same loop structure (XLA:CPU's dot kernels) and once as torch.mm calls in a
python loop (torch's BLAS), in the same rounds. ``kernel_fraction_of_chain`` = chain time / kernel time: how close
the kernel runs to its own matmuls; ``torch_mm_over_xla`` = XLA chain time / torch chain time: how much faster the
same matmuls are with torch's BLAS on this CPU (the part of the gap to torch's SDPA no XLA-side kernel can close).

Cases: "small" = 8 heads x 64 over 2176 tokens (the issue's first measurement), "dit" = 4 heads x 128 over the
same 2176 tokens (one block of bench/dit.py and bench/qwen_image_dit.py), "large" = 24 heads x 128 over
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import add_host_malloc_flag, machine_info, matmul_fns, paired_times, use_host_malloc  # noqa: E402

START_LOAD = os.getloadavg()

CASES = {"small": (1, 2176, 8, 64), "dit": (1, 2176, 4, 128), "large": (1, 4608, 24, 128)}


def _rounds(fns: dict, repeats: int) -> dict:
    """Median wall time of each callable, timed in rounds of a random order (machine.paired_times)."""
    return {n: statistics.median(t) for n, t in paired_times(fns, repeats).items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default="small", help="comma list of: " + ",".join(CASES))
    ap.add_argument("--blocks", default="", help="extra flash block sizes, e.g. 128x256,512x512")
    add_host_malloc_flag(ap)
    args = ap.parse_args(argv)
    use_host_malloc(args)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from edit_r1_jax.models.attention import BATCHED_BLOCKS, LOOP_BLOCKS, flash_attention

    matmuls = {f"matmul_{k}/peak": f for k, f in matmul_fns().items()}  # timed in every case's rounds
    impls = {"xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
             "flash_loop_{}x{}".format(*LOOP_BLOCKS): lambda q, k, v: flash_attention(q, k, v, head_loop=True),
             "flash_vmap_{}x{}".format(*BATCHED_BLOCKS): lambda q, k, v: flash_attention(q, k, v, head_loop=False)}
    for spec in filter(None, args.blocks.split(",")):
        bq, bk = (int(x) for x in spec.split("x"))
        impls[f"flash_loop_{bq}x{bk}"] = lambda q, k, v, bq=bq, bk=bk: flash_attention(
            q, k, v, block_q=bq, block_k=bk, head_loop=True)

    results, chains, peaks = [], [], []
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
        times = _rounds({**fns, **matmuls}, args.repeats)
        rates = {k.split("/")[0]: 2 * 2048 ** 3 / times.pop(k) / 1e9 for k in matmuls}
        peak_gflops = max(rates.values())
        peaks.append({"case": case, "gflops": round(peak_gflops, 1), **{k: round(r, 1) for k, r in rates.items()}})
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
        loop_name = "flash_loop_{}x{}".format(*LOOP_BLOCKS)
        chains.append({"case": case, **_matmul_chain(B, L, H, D, args.repeats, times[f"{loop_name}/fwd"],
                                                        times[f"{loop_name}/fwd+bwd"])})
        print(f"case {case} matmul chain: {json.dumps(chains[-1])}", file=sys.stderr, flush=True)

    print(json.dumps({
        "machine": machine_info(START_LOAD),
        "matmul_peak": peaks,
        "repeats": args.repeats, "results": results, "matmul_chain": chains}, indent=1))


def xla_matmul_chain(q, k, v, do, bq: int, bk: int, backward: bool):
    """The kernel's matmuls without the softmax (module docstring), per head of q/k/v/do ``[heads, L, D]`` (lengths
    multiples of the blocks), in the kernel's loop structure: lax.map over heads, a fori_loop over block pairs for
    the forward and another for the backward (as separate loops, XLA cannot merge the recomputed logits with the
    forward's). Returns (o, dq, dk, dv) = (q k^T) v, (do v^T) k, (do v^T)^T q, (q k^T)^T do (the last three zero
    without ``backward``)."""
    import jax.numpy as jnp
    from jax import lax

    nq, nk = q.shape[1] // bq, k.shape[1] // bk

    def add(x, y, start, size):
        return lax.dynamic_update_slice_in_dim(x, lax.dynamic_slice_in_dim(x, start, size) + y, start, 0)

    def add_t(x, y, start, size):  # the same along axis 1 (transposed accumulators [D, L])
        return lax.dynamic_update_slice_in_dim(x, lax.dynamic_slice_in_dim(x, start, size, 1) + y, start, 1)

    def head(args):
        q, k, v, do = args

        def blocks(t):
            i, j = t // nk, t % nk
            return (i, j, lax.dynamic_slice_in_dim(q, i * bq, bq), lax.dynamic_slice_in_dim(do, i * bq, bq),
                    lax.dynamic_slice_in_dim(k, j * bk, bk), lax.dynamic_slice_in_dim(v, j * bk, bk))

        def forward(t, o):
            i, _, qi, _, kj, vj = blocks(t)
            return add(o, jnp.einsum("qd,kd->qk", qi, kj) @ vj, i * bq, bq)

        qt, dot_ = q.T, do.T  # as the kernel: dK^T = Q^T dP, dV^T = dO^T S from Q^T, dO^T transposed once per head

        def backward_pair(t, c):
            dq, dkt, dvt = c
            i, j, qi, doi, kj, vj = blocks(t)
            s = jnp.einsum("qd,kd->qk", qi, kj)  # the recomputation
            dp = jnp.einsum("qd,kd->qk", doi, vj)
            qti, doti = lax.dynamic_slice_in_dim(qt, i * bq, bq, 1), lax.dynamic_slice_in_dim(dot_, i * bq, bq, 1)
            return (add(dq, dp @ kj, i * bq, bq), add_t(dkt, qti @ dp, j * bk, bk), add_t(dvt, doti @ s, j * bk, bk))

        zq, zt = jnp.zeros_like(q), jnp.zeros_like(k.T)
        o = lax.fori_loop(0, nq * nk, forward, zq)
        if not backward:
            return o, zq, zt.T, zt.T
        dq, dkt, dvt = lax.fori_loop(0, nq * nk, backward_pair, (zq, zt, zt))
        return o, dq, dkt.T, dvt.T

    return lax.map(head, (q, k, v, do))


def torch_matmul_chain(q, k, v, do, bq: int, bk: int, backward: bool):
    """The same matmuls as xla_matmul_chain, as torch.mm calls in a python loop (torch tensors in, same outputs)."""
    import torch

    heads, nq, nk = q.shape[0], q.shape[1] // bq, k.shape[1] // bk
    with torch.no_grad():
        o, dq, dk, dv = (torch.zeros_like(x) for x in (q, q, k, k))
        for h in range(heads):
            for i in range(nq):
                qs = slice(i * bq, (i + 1) * bq)
                qi, doi = q[h, qs], do[h, qs]
                for j in range(nk):
                    ks = slice(j * bk, (j + 1) * bk)
                    kj, vj = k[h, ks], v[h, ks]
                    o[h, qs] += (qi @ kj.T) @ vj
                    if backward:
                        s = qi @ kj.T
                        dp = doi @ vj.T
                        dq[h, qs] += dp @ kj
                        dv[h, ks] += s.T @ doi
                        dk[h, ks] += dp.T @ qi
    return o, dq, dk, dv


def _matmul_chain(B, L, H, D, repeats, kernel_fwd_s, kernel_fwd_bwd_s):
    """Times the kernel's matmuls alone (module docstring) at its default head-loop block sizes; self-attention
    with one query head per kv head (the CASES), so a block holds block_q query rows."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from edit_r1_jax.models.attention import LOOP_BLOCKS, _block_size

    bq, lqp = _block_size(L, LOOP_BLOCKS[0])
    bk, lkp = _block_size(L, LOOP_BLOCKS[1])
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((B * H, n, D)).astype(np.float32) / 8 for n in (lqp, lkp, lkp, lqp)]
    ja = [jnp.asarray(x) for x in arrays]
    ta = [torch.from_numpy(x) for x in arrays]
    jf = jax.jit(lambda *a: xla_matmul_chain(*a, bq, bk, False))
    jb = jax.jit(lambda *a: xla_matmul_chain(*a, bq, bk, True))
    times = _rounds({"xla/fwd": lambda: jax.block_until_ready(jf(*ja)),
                     "xla/fwd+bwd": lambda: jax.block_until_ready(jb(*ja)),
                     "torch/fwd": lambda: torch_matmul_chain(*ta, bq, bk, False),
                     "torch/fwd+bwd": lambda: torch_matmul_chain(*ta, bq, bk, True)}, repeats)
    flops = 2 * bq * bk * D * B * H * (lqp // bq) * (lkp // bk)  # one matmul over every block pair
    out = {"block_q": bq, "block_k": bk, "seconds": {k_: round(t, 4) for k_, t in times.items()},
           "gflops": {k_: round(flops * (2 if k_.endswith("/fwd") else 7) / t / 1e9, 1) for k_, t in times.items()}}
    out["kernel_fraction_of_chain"] = {"fwd": round(times["xla/fwd"] / kernel_fwd_s, 3),
                                       "fwd+bwd": round(times["xla/fwd+bwd"] / kernel_fwd_bwd_s, 3)}
    out["torch_mm_over_xla"] = {m: round(times[f"xla/{m}"] / times[f"torch/{m}"], 2) for m in ("fwd", "fwd+bwd")}
    return out


if __name__ == "__main__":
    main()
