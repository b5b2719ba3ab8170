"""DiT (FLUX transformer) benchmark. Not a test.

CPU mode (default): our JAX FluxTransformer vs diffusers FluxTransformer2DModel (+ peft LoRA) on one mid-size
config, forward and forward+backward (gradients of the LoRA parameters only), float32, batch 1, the two sides
timed in alternating rounds (random order per round, median of ``--repeats``; ``ratio_per_round`` holds each
round's torch/JAX ratio, ``ratio_torch_over_jax`` the ratio of the medians):
    python bench/dit.py [--repeats 5] [--peak-gflops X] [--host-malloc {auto,system,keep}] [--profile]
Full mode (accelerator): the 12B FLUX.1-Kontext config in bf16, 512x512 Kontext (1024 noisy + 1024 reference image
tokens + 128 text tokens), parameters initialised randomly on device by a jitted, sharded init, remat on:
    python bench/dit.py --full [--batch 1] [--mesh data=-1,fsdp=1,tensor=1] [--remat full] [--peak-tflops X]

Model FLOPs (stated formula, matmuls only, 2 FLOPs per multiply-add; elementwise ops, norms, RoPE and softmax are
not counted; remat recomputation is not counted, i.e. MFU is "model FLOPs utilisation"):
    per token, per double block : 2 * 12 * D^2  (q,k,v,o = 4 D^2, MLP D->4D->D = 8 D^2), image and text streams alike
    per token, per single block : 2 * 12 * D^2  (q,k,v = 3 D^2, proj_mlp 4 D^2, proj_out 5 D^2)
    attention, per block        : 4 * S^2 * D   (QK^T and PV over the joint sequence S = image + text tokens)
    embedders / output          : 2 * (C_in*D*L_img + J*D*T + D*C_out*L_img) + modulation 2*B*D*(12 D per double,
                                  3 D per single, 2 D final) + time/guidance/pooled MLPs
    LoRA                        : 2 * r * (in + out) per token per adapted projection
    forward F; forward+backward with frozen base = 2 F + 2 * F_lora (activation gradients mirror every forward
    matmul; weight gradients only for LoRA: 2 * r * (in + out) per token again). Attention backward is counted as
    2x its forward like every other matmul (it has 4 matmuls vs 2: dP = dO V^T, dV = P^T dO, dQ, dK -> we count
    2*F_attn extra, i.e. attention fwd+bwd = 3 F_attn).
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

from machine import (add_host_malloc_flag, machine_info, matmul_fns, paired_times, thunk_profile,  # noqa: E402
                     use_host_malloc)

START_LOAD = os.getloadavg()


def model_flops(cfg, batch: int, l_img: int, t: int, lora_rank: int | None):
    """(forward FLOPs, forward+backward FLOPs) per the formula in the module docstring."""
    d = cfg.num_attention_heads * cfg.attention_head_dim
    s = l_img + t
    nd, ns = cfg.num_layers, cfg.num_single_layers
    lin = 2 * 12 * d * d * s * (nd + ns)
    attn = 4 * s * s * d * (nd + ns)
    c_out = cfg.patch_size ** 2 * (cfg.out_channels or cfg.in_channels)
    emb = 2 * (cfg.in_channels * d * l_img + cfg.joint_attention_dim * d * t + d * c_out * l_img)
    mod = 2 * d * d * (12 * nd + 3 * ns + 2) + 2 * (256 * d + d * d) * (2 if cfg.guidance_embeds else 1) \
        + 2 * (cfg.pooled_projection_dim * d + d * d)
    lora = 0
    if lora_rank:
        per_tok_double = 2 * lora_rank * 2 * d * 4  # 4 image-side + 4 text-side projections (d -> d)
        lora = per_tok_double * (l_img + t) * nd
        lora += 2 * lora_rank * 2 * d * 3 * s * ns  # q, k, v in single blocks
    fwd = batch * (lin + attn + emb + lora) + batch * mod
    fwd_bwd = 2 * batch * (lin + emb) + 3 * batch * attn + 3 * batch * lora + 2 * batch * mod
    return fwd, fwd_bwd


def _median_time(fn, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def cpu_comparison(sides: dict, flops: dict, repeats: int, peak_gflops: float | None = None,
                   profile: bool = False) -> dict:
    """Our model against the reference, both on this CPU. ``sides``: mode ("forward", "forward_backward") ->
    (JAX fn, torch fn), zero-argument callables; ``flops``: mode -> model FLOPs of one call. ``profile``: no
    timing; where the JAX side's time goes instead (machine.thunk_profile per mode, under "thunk_profile").

    Per mode, the two sides and the two 2048^2 matmuls of the peak (machine.matmul_fns) are timed in the same
    rounds (machine.paired_times, a random order each round), so each round's ratio and fraction of the peak
    compare figures taken seconds apart: on a host whose speed drifts, a model timed now against a peak taken
    minutes later can read above 100%. "peak" = the faster matmul, its median over every round (``peak_gflops``
    given: that number, no matmuls timed). Returns the JSON fields shared by bench/dit.py and
    bench/qwen_image_dit.py."""
    if profile:
        print("profiling the JAX side (jax.profiler, per thunk)", file=sys.stderr, flush=True)
        return {"thunk_profile": {mode: thunk_profile(jax_fn) for mode, (jax_fn, _) in sides.items()}}
    mm = {} if peak_gflops else {f"matmul_{k}": f for k, f in matmul_fns().items()}
    mm_flops = 2 * 2048 ** 3
    times, round_peaks = {}, {}
    for mode, (jax_fn, torch_fn) in sides.items():
        print(f"timing JAX and the PyTorch reference, {mode}: {repeats} rounds in alternation (JAX's first call "
              "compiles)", file=sys.stderr, flush=True)
        times[mode] = paired_times({"jax": jax_fn, "torch": torch_fn, **mm}, repeats)
        round_peaks[mode] = ([peak_gflops * 1e9] * repeats if peak_gflops else
                             [max(mm_flops / times[mode][k][r] for k in mm) for r in range(repeats)])
    every_round = [p for ps in round_peaks.values() for p in ps]
    peak = statistics.median(every_round)
    med = {mode: {side: statistics.median(t[side]) for side in ("jax", "torch")} for mode, t in times.items()}
    out = {"jax": {}, "torch_diffusers_peft": {}, "ratio_torch_over_jax": {}, "ratio_per_round": {},
           "jax_frac_of_peak_per_round": {},
           "peak_gflops_per_round": {m: [round(p / 1e9, 1) for p in ps] for m, ps in round_peaks.items()}}
    for mode, t in times.items():
        f = flops[mode]
        out["jax"].update({f"{mode}_s": med[mode]["jax"], f"{mode}_gflops_per_s": f / med[mode]["jax"] / 1e9,
                           f"{mode}_frac_of_peak": f / med[mode]["jax"] / peak})
        out["torch_diffusers_peft"].update({f"{mode}_s": med[mode]["torch"],
                                            f"{mode}_gflops_per_s": f / med[mode]["torch"] / 1e9,
                                            f"{mode}_frac_of_peak": f / med[mode]["torch"] / peak})
        out["ratio_torch_over_jax"][mode] = med[mode]["torch"] / med[mode]["jax"]
        out["ratio_per_round"][mode] = [round(b / a, 3) for a, b in zip(t["jax"], t["torch"])]
        out["jax_frac_of_peak_per_round"][mode] = [round(f / a / p, 3) for a, p in zip(t["jax"], round_peaks[mode])]
    out["peak_gflops"] = peak / 1e9
    out["peak_measured"] = None if peak_gflops else {
        "gflops_min": min(every_round) / 1e9, "gflops_max": max(every_round) / 1e9, "size": 2048,
        **{f"{k}_gflops_median": mm_flops / statistics.median([x for t in times.values() for x in t[k]]) / 1e9
           for k in mm}}
    return out


def bench_cpu(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from edit_r1_jax.models import lora as L
    from edit_r1_jax.models.flux.modeling import FluxConfig, FluxTransformer, kontext_velocity

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(os.cpu_count() or 1)
    dcfg = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                num_attention_heads=4, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
    n, nr, t, b, rank = args.noisy, args.noisy, args.text, 1, 32
    lcfg = L.LoRAConfig(rank=rank, alpha=64.0)
    cfg = FluxConfig.from_diffusers(dcfg, lora=lcfg)
    print(f"building the JAX model ({cfg.num_layers}+{cfg.num_single_layers} blocks, width {cfg.inner_dim})",
          file=sys.stderr, flush=True)
    model = FluxTransformer(cfg, rngs=nnx.Rngs(0))
    graphdef, base, lora = L.split_policy(model)
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # nonzero B so the backward is not trivially zero

    rng = np.random.default_rng(0)
    side = int(round(n ** 0.5))
    rows, cols = np.divmod(np.arange(n), side)
    inp = dict(
        x=rng.standard_normal((b, n, 64)).astype(np.float32),
        ref=rng.standard_normal((b, nr, 64)).astype(np.float32),
        prompt=rng.standard_normal((b, t, 4096)).astype(np.float32),
        pooled=rng.standard_normal((b, 768)).astype(np.float32),
        sigma=np.full((b,), 0.7, np.float32),
        img_ids=np.concatenate([np.stack([np.zeros(n), rows, cols], 1),
                                np.stack([np.ones(nr), rows, cols], 1)]).astype(np.float32),
        txt_ids=np.zeros((t, 3), np.float32),
        guidance=np.full((b,), 2.5, np.float32),
    )
    w = rng.standard_normal((b, n, 64)).astype(np.float32)

    def fwd(base, lora, inp):
        return L.apply(graphdef, base, lora, inp["x"], inp["ref"], inp["prompt"], inp["pooled"], inp["sigma"],
                       inp["img_ids"], inp["txt_ids"], inp["guidance"], fn=kontext_velocity)

    jfwd = jax.jit(fwd)
    jgrad = jax.jit(jax.grad(lambda lora, base, inp: jnp.sum(fwd(base, lora, inp) * w)))

    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    tm = FluxTransformer2DModel(**dcfg).eval()
    tm.add_adapter(LoraConfig(r=rank, lora_alpha=64, target_modules=list(L.DEFAULT_TARGETS),
                              init_lora_weights="gaussian"))
    th = {k: torch.from_numpy(v) for k, v in inp.items()}
    hidden = torch.cat([th["x"], th["ref"]], 1)
    tw = torch.from_numpy(w)

    def torch_fwd():
        return tm(hidden_states=hidden, encoder_hidden_states=th["prompt"], pooled_projections=th["pooled"],
                  timestep=th["sigma"], img_ids=th["img_ids"], txt_ids=th["txt_ids"], guidance=th["guidance"]
                  ).sample[:, :n]

    def torch_fwd_nograd():
        # inference_mode: in this torch build plain no_grad measured slower than a grad-enabled forward.
        with torch.inference_mode():
            torch_fwd()

    def torch_bwd():
        tm.zero_grad(set_to_none=True)
        (torch_fwd() * tw).sum().backward()

    assert all(p.requires_grad == (".lora_" in k) for k, p in tm.named_parameters()), "peft must freeze the base"
    f_fwd, f_fb = model_flops(cfg, b, n + nr, t, rank)
    result = {
        "mode": "cpu",
        "config": {**dcfg, "width": cfg.inner_dim, "batch": b, "noisy_tokens": n, "reference_tokens": nr,
                   "text_tokens": t, "lora_rank": rank, "dtype": "float32", "matmul_precision": "highest",
                   "cpu_threads": os.cpu_count(), "repeats": args.repeats},
        "model_gflops": {"forward": f_fwd / 1e9, "forward_backward_lora": f_fb / 1e9},
        **cpu_comparison({"forward": (lambda: jfwd(base, lora, inp).block_until_ready(), torch_fwd_nograd),
                          "forward_backward": (lambda: jax.block_until_ready(jgrad(lora, base, inp)), torch_bwd)},
                         {"forward": f_fwd, "forward_backward": f_fb}, args.repeats, args.peak_gflops,
                         args.profile),
    }
    result["machine"] = machine_info(START_LOAD)
    print(json.dumps(result, indent=2))


_PEAK_TFLOPS_BF16 = {  # dense bf16 peak per chip
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "TPU v4": 275.0,
}


def _peak_for(kind: str) -> float | None:
    for k, v in _PEAK_TFLOPS_BF16.items():
        if k.lower() in kind.lower():
            return v
    return None


def bench_full(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from edit_r1_jax.models import lora as L
    from edit_r1_jax.models.flux.modeling import FluxConfig, FluxTransformer, kontext_velocity
    from edit_r1_jax.parallel import mesh as mesh_lib
    from edit_r1_jax.parallel import rules

    shape = {}
    for part in args.mesh.split(","):
        k, v = part.split("=")
        shape[k] = int(v)
    mesh = mesh_lib.make_mesh(shape)
    lcfg = L.LoRAConfig()
    small = dict(num_layers=1, num_single_layers=1, num_attention_heads=2) if args.smoke else {}
    cfg = FluxConfig(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat_policy=args.remat, lora=lcfg,
                     guidance_embeds=True, **small)
    b, n, t = args.batch, (64 if args.smoke else 1024), 128

    # Jitted, sharded random init: parameters are created directly on the devices that hold them.
    abstract = nnx.eval_shape(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_lora, abstract_base = nnx.split(abstract, L.LoRAParam, ...)
    base_sh = rules.state_shardings(abstract_base, mesh)
    lora_sh = rules.state_shardings(abstract_lora, mesh)

    @jax.jit
    def init():
        m = FluxTransformer(cfg, rngs=nnx.Rngs(0))
        _, lo, ba = nnx.split(m, L.LoRAParam, ...)
        return jax.lax.with_sharding_constraint(ba, base_sh), jax.lax.with_sharding_constraint(lo, lora_sh)

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        base, lora = jax.block_until_ready(init())
    init_s = time.perf_counter() - t0
    graphdef, _, _ = L.split_policy(abstract)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base))
    n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora))

    key = jax.random.key(1)
    ks = jax.random.split(key, 5)
    rows, cols = np.divmod(np.arange(n), int(round(n ** 0.5)))
    batch_sh = jax.sharding.NamedSharding(mesh, rules.partition_spec(("batch",), (b,), mesh))
    put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(  # noqa: E731
        mesh, rules.partition_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)))
    inp = dict(
        x=put(jax.random.normal(ks[0], (b, n, 64), jnp.bfloat16)),
        ref=put(jax.random.normal(ks[1], (b, n, 64), jnp.bfloat16)),
        prompt=put(jax.random.normal(ks[2], (b, t, 4096), jnp.bfloat16)),
        pooled=put(jax.random.normal(ks[3], (b, 768), jnp.bfloat16)),
        sigma=jax.device_put(jnp.full((b,), 0.7, jnp.float32), batch_sh),
        guidance=jax.device_put(jnp.full((b,), 2.5, jnp.float32), batch_sh),
        img_ids=jnp.asarray(np.concatenate([np.stack([np.zeros(n), rows, cols], 1),
                                            np.stack([np.ones(n), rows, cols], 1)]), jnp.float32),
        txt_ids=jnp.zeros((t, 3), jnp.float32),
    )

    def fwd(base, lora, inp):
        return L.apply(graphdef, base, lora, inp["x"], inp["ref"], inp["prompt"], inp["pooled"], inp["sigma"],
                       inp["img_ids"], inp["txt_ids"], inp["guidance"], fn=kontext_velocity)

    def loss(lora, base, inp):
        v = fwd(base, lora, inp).astype(jnp.float32)
        return jnp.mean(jnp.square(v - inp["x"].astype(jnp.float32)))

    with jax.set_mesh(mesh):
        jfwd = jax.jit(fwd)
        jstep = jax.jit(jax.value_and_grad(loss))
        t0 = time.perf_counter()
        jax.block_until_ready(jstep(lora, base, inp))
        compile_s = time.perf_counter() - t0
        fwd_t, _ = _median_time(lambda: jax.block_until_ready(jfwd(base, lora, inp)), args.repeats)
        step_t, _ = _median_time(lambda: jax.block_until_ready(jstep(lora, base, inp)), args.repeats, warmup=0)

    f_fwd, f_fb = model_flops(cfg, b, 2 * n, t, lcfg.rank)
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or _peak_for(kind)
    n_dev = len(jax.devices())
    tokens = b * (2 * n + t)
    result = {
        "mode": "full", "device_kind": kind, "devices": n_dev, "mesh": dict(mesh.shape),
        "smoke": args.smoke,
        "config": {"width": cfg.inner_dim, "double": cfg.num_layers, "single": cfg.num_single_layers,
                   "batch": b, "image_tokens": 2 * n, "text_tokens": t, "dtype": "bfloat16",
                   "remat": args.remat, "lora_rank": lcfg.rank},
        "params": n_params, "lora_params": n_lora, "init_s": init_s, "first_step_incl_compile_s": compile_s,
        "forward_s": fwd_t, "train_step_s": step_t,
        "tokens_per_s_forward": tokens / fwd_t, "tokens_per_s_train": tokens / step_t,
        "model_tflops": {"forward": f_fwd / 1e12, "forward_backward_lora": f_fb / 1e12},
        "peak_tflops_per_chip": peak,
        "mfu_forward": None if not peak else f_fwd / fwd_t / (peak * 1e12 * n_dev),
        "mfu_train": None if not peak else f_fb / step_t / (peak * 1e12 * n_dev),
    }
    result["machine"] = machine_info(START_LOAD)
    print(json.dumps(result, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--noisy", type=int, default=1024, help="CPU mode: noisy tokens (= reference tokens)")
    p.add_argument("--text", type=int, default=128, help="CPU mode: text tokens")
    p.add_argument("--peak-gflops", type=float, default=None,
                   help="CPU matmul peak for the fraction (default: measured in the run, bench/machine.py)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1")
    p.add_argument("--remat", default="full")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--smoke", action="store_true", help="--full code path on a 1+1 block model (checks it runs)")
    p.add_argument("--profile", action="store_true", help="CPU mode: where the JAX side's time goes per thunk "
                                                             "(jax.profiler) instead of the comparison")
    add_host_malloc_flag(p)
    args = p.parse_args(argv)
    use_host_malloc(args)
    bench_full(args) if args.full else bench_cpu(args)


if __name__ == "__main__":
    main()
