"""Qwen-Image DiT (QwenImageTransformer) benchmark. Not a test.

CPU mode (default): our JAX QwenImageTransformer vs diffusers QwenImageTransformer2DModel (+ peft LoRA on the 8
attention projections) on one mid-size config (4 dual-stream blocks, width 512 = 4 heads of 128, text width 3584),
forward and forward+backward (gradients of the LoRA parameters only), float32, batch 1, the edit layout
(1024 noisy + 1024 reference image tokens, 128 text tokens of which 100 are real, text mask on):
    python bench/qwen_image_dit.py [--repeats 5] [--noisy 1024] [--text 128] [--peak-gflops X] [--profile]
        [--host-malloc {auto,system,keep}]
The two sides are timed in alternating rounds (random order per round, median of ``--repeats``). Prints one JSON
object with both timings, ``ratio_torch_over_jax`` (ratio of the medians, > 1: ours faster) and
``ratio_per_round`` (each round's ratio: its spread shows how steady the host was).

Full mode (accelerator): the 20B Qwen-Image-Edit-2509 config (60 blocks, width 3072) in bf16 on the spec's 512x512
edit (1024 noisy + 1024 reference tokens + 256 text tokens), LoRA r32, remat per block. Always lowers and compiles
the forward and the LoRA train step ahead of time on abstract shapes (``jax.ShapeDtypeStruct``, nothing
allocated) and prints compile times, XLA's memory analysis and cost-analysis FLOPs; with ``--run`` it then
initialises random parameters on the devices (jitted, sharded init) and times both:
    python bench/qwen_image_dit.py --full [--run] [--batch 1] [--mesh data=-1,fsdp=1,tensor=1] [--remat full]
``--smoke`` runs the --full code path on a 2-block, 2-head model (checks it runs, e.g. on CPU).

Model FLOPs (matmuls only, 2 FLOPs per multiply-add; norms, RoPE, softmax, elementwise not counted; remat
recomputation not counted, i.e. MFU is "model FLOPs utilisation"):
    per token, per block : 2 * 12 * D^2 (q,k,v,o = 4 D^2, MLP D->4D->D = 8 D^2), image and text streams alike
    attention, per block : 4 * S^2 * D (QK^T and PV over the joint sequence S = image + text tokens)
    embedders / output   : 2 * (C_in*D*L_img + J*D*T + D*C_out*L_img) + per sample: modulation 2*D*12D per block
                           (img_mod + txt_mod), timestep MLP 2*(256 D + D^2), norm_out 2*D*2D
    LoRA                 : 2 * r * 2D per token per adapted projection (8 per block, D -> D)
    forward F; forward+backward with frozen base = 2 F + F_lora extra (weight grads only for LoRA) and attention
    fwd+bwd = 3 F_attn, as in bench/dit.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

from dit import _median_time, _peak_for, cpu_comparison  # noqa: E402  (shared timing helpers of the FLUX DiT bench)
from machine import add_host_malloc_flag, machine_info, use_host_malloc  # noqa: E402

START_LOAD = os.getloadavg()

MID_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=4, attention_head_dim=128,
                  num_attention_heads=4, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))


def model_flops(cfg, batch: int, l_img: int, t: int, lora_rank: int | None):
    """(forward FLOPs, forward+backward FLOPs) per the formula in the module docstring."""
    d = cfg.inner_dim
    s = l_img + t
    nl = cfg.num_layers
    lin = 2 * 12 * d * d * s * nl
    attn = 4 * s * s * d * nl
    emb = 2 * (cfg.in_channels * d * l_img + cfg.joint_attention_dim * d * t + d * cfg.out_dim * l_img)
    mod = 2 * d * 12 * d * nl * (1.5 if cfg.zero_cond_t else 1) + 2 * (256 * d + d * d) + 2 * d * 2 * d
    lora = 2 * lora_rank * 2 * d * 4 * s * nl if lora_rank else 0  # 4 image-side + 4 text-side projections
    fwd = batch * (lin + attn + emb + lora + mod)
    fwd_bwd = 2 * batch * (lin + emb + mod) + 3 * batch * attn + 3 * batch * lora
    return fwd, fwd_bwd


def _inputs_np(b, n, nr, t, real_t, joint, c_in, seed=0):
    import numpy as np

    from edit_r1_jax.diffusion import qwen_image as Q

    side_n, side_r = int(round(n ** 0.5)), int(round(nr ** 0.5))
    if side_n * side_n != n or side_r * side_r != nr:
        raise ValueError(f"--noisy {n} must be a square number of tokens (reference = noisy)")
    shapes = [(1, side_n, side_n), (1, side_r, side_r)]
    img_ids, txt_ids = Q.position_ids(shapes, t)
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, t), np.int64)
    mask[:, :real_t] = 1
    return dict(x=rng.standard_normal((b, n, c_in)).astype(np.float32),
                ref=rng.standard_normal((b, nr, c_in)).astype(np.float32),
                prompt=rng.standard_normal((b, t, joint)).astype(np.float32), mask=mask,
                sigma=np.full((b,), 0.7, np.float32), img_ids=img_ids, txt_ids=txt_ids, img_shapes=shapes)


def bench_cpu(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from edit_r1_jax.models import lora as L
    from edit_r1_jax.models.qwen_image.modeling import QwenImageConfig, QwenImageTransformer, qwen_image_velocity

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(os.cpu_count() or 1)
    dcfg = MID_CONFIG
    n, t, b, rank = args.noisy, args.text, 1, 32
    real_t = max(1, int(round(t * 100 / 128)))
    lcfg = L.LoRAConfig(rank=rank, alpha=64.0)
    cfg = QwenImageConfig.from_diffusers(dcfg, lora=lcfg)
    print(f"building the JAX model ({cfg.num_layers} blocks, width {cfg.inner_dim})", file=sys.stderr, flush=True)
    graphdef, base, lora = L.split_policy(QwenImageTransformer(cfg, rngs=nnx.Rngs(0)))
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # nonzero B so the backward is not trivially zero
    inp = _inputs_np(b, n, n, t, real_t, dcfg["joint_attention_dim"], dcfg["in_channels"])
    arrays = {k: v for k, v in inp.items() if k != "img_shapes"}
    w = np.random.default_rng(1).standard_normal((b, n, cfg.out_dim)).astype(np.float32)

    def fwd(base, lora, a):
        return L.apply(graphdef, base, lora, a["x"], a["ref"], a["prompt"], a["mask"], a["sigma"], a["img_ids"],
                       a["txt_ids"], fn=qwen_image_velocity)

    jfwd = jax.jit(fwd)
    jgrad = jax.jit(jax.grad(lambda lora, base, a: jnp.sum(fwd(base, lora, a) * w)))

    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig

    tm = QwenImageTransformer2DModel(**dcfg).eval()
    tm.add_adapter(LoraConfig(r=rank, lora_alpha=64, target_modules=list(L.DEFAULT_TARGETS),
                              init_lora_weights="gaussian"))
    assert all(p.requires_grad == (".lora_" in k) for k, p in tm.named_parameters()), "peft must freeze the base"
    th = {k: torch.from_numpy(v) for k, v in arrays.items()}
    hidden = torch.cat([th["x"], th["ref"]], 1)
    tw = torch.from_numpy(w)

    def torch_fwd():
        return tm(hidden_states=hidden, encoder_hidden_states=th["prompt"], encoder_hidden_states_mask=th["mask"],
                  timestep=th["sigma"], img_shapes=[inp["img_shapes"]] * b).sample[:, :n]

    def torch_fwd_nograd():
        with torch.inference_mode():  # as bench/dit.py: faster than no_grad in this torch build
            torch_fwd()

    def torch_bwd():
        tm.zero_grad(set_to_none=True)
        (torch_fwd() * tw).sum().backward()

    f_fwd, f_fb = model_flops(cfg, b, 2 * n, t, rank)
    result = {
        "mode": "cpu", "model": "qwen-image",
        "config": {**dcfg, "axes_dims_rope": list(dcfg["axes_dims_rope"]), "width": cfg.inner_dim, "batch": b,
                   "noisy_tokens": n, "reference_tokens": n, "text_tokens": t, "real_text_tokens": real_t,
                   "lora_rank": rank, "dtype": "float32", "matmul_precision": "highest",
                   "cpu_threads": os.cpu_count(), "repeats": args.repeats},
        "model_gflops": {"forward": f_fwd / 1e9, "forward_backward_lora": f_fb / 1e9},
        **cpu_comparison({"forward": (lambda: jfwd(base, lora, arrays).block_until_ready(), torch_fwd_nograd),
                          "forward_backward": (lambda: jax.block_until_ready(jgrad(lora, base, arrays)), torch_bwd)},
                         {"forward": f_fwd, "forward_backward": f_fb}, args.repeats, args.peak_gflops,
                         args.profile),
    }
    result["machine"] = machine_info(START_LOAD)
    print(json.dumps(result, indent=2))


def _memory(compiled):
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - reported, not hidden: some backends have no memory analysis
        return {"unavailable": f"{type(e).__name__}: {e}"}
    if m is None:
        return {"unavailable": "memory_analysis() returned None on this backend"}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    return {f.replace("_in_bytes", "_gib"): getattr(m, f) / 2 ** 30 for f in fields if hasattr(m, f)}


def _xla_flops(compiled):
    try:
        c = compiled.cost_analysis()
    except Exception as e:  # noqa: BLE001 - reported
        return f"unavailable: {type(e).__name__}: {e}"
    c = c[0] if isinstance(c, (list, tuple)) else c
    return None if not c or "flops" not in c else c["flops"]


def bench_full(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from edit_r1_jax.diffusion import qwen_image as Q
    from edit_r1_jax.models import lora as L
    from edit_r1_jax.models.qwen_image.modeling import QwenImageConfig, QwenImageTransformer, qwen_image_velocity
    from edit_r1_jax.parallel import mesh as mesh_lib
    from edit_r1_jax.parallel import rules

    shape = {}
    for part in args.mesh.split(","):
        k, v = part.split("=")
        shape[k] = int(v)
    mesh = mesh_lib.make_mesh(shape)
    lcfg = L.LoRAConfig()
    small = dict(num_layers=2, num_attention_heads=2) if args.smoke else {}
    cfg = QwenImageConfig(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat_policy=args.remat, lora=lcfg, **small)
    b, n, t = args.batch, (64 if args.smoke else 1024), (32 if args.smoke else 256)

    abstract = nnx.eval_shape(lambda: QwenImageTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_base, abstract_lora = L.split_policy(abstract)
    base_sh = rules.state_shardings(abstract_base, mesh)
    lora_sh = rules.state_shardings(abstract_lora, mesh)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_base))
    n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_lora))
    print(f"Qwen-Image DiT: {cfg.num_layers} blocks, width {cfg.inner_dim}, {n_params / 1e9:.2f}B base + "
          f"{n_lora / 1e6:.1f}M LoRA parameters; mesh {dict(mesh.shape)}", file=sys.stderr, flush=True)

    side = int(round(n ** 0.5))
    img_ids, txt_ids = (jnp.asarray(a) for a in Q.position_ids([(1, side, side)] * 2, t))

    def spec(shape, dtype, axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(
            mesh, rules.partition_spec(axes, shape, mesh)))

    row = ("batch", None, None)
    abs_inp = dict(x=spec((b, n, cfg.in_channels), jnp.bfloat16, row),
                   ref=spec((b, n, cfg.in_channels), jnp.bfloat16, row),
                   prompt=spec((b, t, cfg.joint_attention_dim), jnp.bfloat16, row),
                   mask=spec((b, t), jnp.int32, ("batch", None)), sigma=spec((b,), jnp.float32, ("batch",)))
    abs_base = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_base, base_sh)
    abs_lora = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_lora, lora_sh)

    def fwd(base, lora, a):
        return L.apply(graphdef, base, lora, a["x"], a["ref"], a["prompt"], a["mask"], a["sigma"], img_ids, txt_ids,
                       fn=qwen_image_velocity)

    def loss(lora, base, a):
        v = fwd(base, lora, a).astype(jnp.float32)
        return jnp.mean(jnp.square(v - a["x"].astype(jnp.float32)))

    out = {}
    with jax.set_mesh(mesh):
        jfwd, jstep = jax.jit(fwd), jax.jit(jax.value_and_grad(loss))
        for name, fn, a in (("forward", jfwd, (abs_base, abs_lora, abs_inp)),
                            ("train_step", jstep, (abs_lora, abs_base, abs_inp))):
            print(f"AOT lower + compile: {name}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            compiled = fn.lower(*a).compile()
            out[name] = {"compile_s": time.perf_counter() - t0, "memory": _memory(compiled),
                         "xla_flops": _xla_flops(compiled)}

        if args.run:
            @jax.jit
            def init():
                _, ba, lo = L.split_policy(QwenImageTransformer(cfg, rngs=nnx.Rngs(0)))
                return jax.lax.with_sharding_constraint(ba, base_sh), jax.lax.with_sharding_constraint(lo, lora_sh)

            print("random init on the devices", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            base, lora = jax.block_until_ready(init())
            out["init_s"] = time.perf_counter() - t0
            ks = jax.random.split(jax.random.key(1), 3)
            put = lambda x, s: jax.device_put(x, s.sharding)  # noqa: E731
            inp = dict(x=put(jax.random.normal(ks[0], abs_inp["x"].shape, jnp.bfloat16), abs_inp["x"]),
                       ref=put(jax.random.normal(ks[1], abs_inp["ref"].shape, jnp.bfloat16), abs_inp["ref"]),
                       prompt=put(jax.random.normal(ks[2], abs_inp["prompt"].shape, jnp.bfloat16), abs_inp["prompt"]),
                       mask=put(jnp.ones((b, t), jnp.int32).at[:, int(0.8 * t):].set(0), abs_inp["mask"]),
                       sigma=put(jnp.full((b,), 0.7, jnp.float32), abs_inp["sigma"]))
            print("timing forward / train step", file=sys.stderr, flush=True)
            out["forward_s"], _ = _median_time(lambda: jax.block_until_ready(jfwd(base, lora, inp)), args.repeats)
            out["train_step_s"], _ = _median_time(lambda: jax.block_until_ready(jstep(lora, base, inp)),
                                                  args.repeats)

    f_fwd, f_fb = model_flops(cfg, b, 2 * n, t, lcfg.rank)
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or _peak_for(kind)
    n_dev = len(jax.devices())
    tokens = b * (2 * n + t)
    result = {
        "mode": "full", "model": "qwen-image", "device_kind": kind, "devices": n_dev, "mesh": dict(mesh.shape),
        "smoke": args.smoke, "ran": args.run,
        "config": {"width": cfg.inner_dim, "blocks": cfg.num_layers, "batch": b, "image_tokens": 2 * n,
                   "text_tokens": t, "dtype": "bfloat16", "remat": args.remat, "lora_rank": lcfg.rank},
        "params": n_params, "lora_params": n_lora,
        "model_tflops": {"forward": f_fwd / 1e12, "forward_backward_lora": f_fb / 1e12},
        "peak_tflops_per_chip": peak, **out,
    }
    if args.run:
        result.update({
            "tokens_per_s_forward": tokens / out["forward_s"], "tokens_per_s_train": tokens / out["train_step_s"],
            "mfu_forward": None if not peak else f_fwd / out["forward_s"] / (peak * 1e12 * n_dev),
            "mfu_train": None if not peak else f_fb / out["train_step_s"] / (peak * 1e12 * n_dev)})
    result["machine"] = machine_info(START_LOAD)
    print(json.dumps(result, indent=2, default=str))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--run", action="store_true", help="--full: also allocate and time on the devices")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--noisy", type=int, default=1024, help="CPU mode: noisy tokens (= reference tokens), a square")
    p.add_argument("--text", type=int, default=128, help="CPU mode: text tokens")
    p.add_argument("--peak-gflops", type=float, default=None,
                   help="CPU matmul peak for the fraction (default: measured in the run, bench/machine.py)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1")
    p.add_argument("--remat", default="full")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--profile", action="store_true", help="CPU mode: where the JAX side's time goes per thunk "
                                                             "(jax.profiler) instead of the comparison")
    p.add_argument("--smoke", action="store_true", help="--full code path on a 2-block, 2-head model")
    add_host_malloc_flag(p)
    args = p.parse_args(argv)
    use_host_malloc(args)
    bench_full(args) if args.full else bench_cpu(args)


if __name__ == "__main__":
    main()
