"""Full-size accelerator benchmark: the trainer's own jitted pieces at the paper's per-device batch. Not a test.

    python bench/accelerator.py [--out bench_accelerator.json] [--batch 3] [--mesh data=-1] [--remat full]
    python bench/accelerator.py --smoke      # the same code path on tiny sizes (CPU check that it runs)

On whatever accelerator is present it runs, with random weights initialised on device (jitted, sharded):
  1. the NFT train step of engine.train_step: T_train = 5 timesteps x (theta_old forward, reference forward,
     theta forward + backward), LoRA rank 32 on the 8 attention projections, 12B FLUX.1-Kontext in bf16,
     512x512 Kontext input (1024 noisy + 1024 reference + 128 text tokens), one micro-batch of ``--batch``
     per device (the paper's 3);
  2. a 6-step dpm2 rollout (engine.sample) of the same batch;
  3. a Qwen2.5-VL-7B reward forward (rewards.mllm.MLLMReward) on ``--batch`` pairs of 512x512 images.
Writes JSON with times, images/s and MFU (FLOP formula: bench/dit.py's model_flops; a train step counts
T_train x (2 forwards + forward/backward), a rollout 6 forwards). Budget: well under 10 minutes on one H200.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _timed(fn, repeats: int):
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, sorted(times)[len(times) // 2]


def build_dit(args, mesh, abstract: bool = False, scan_layers: bool = True) -> SimpleNamespace:
    """Everything the rollout and the train step take, at full size (or ``--smoke`` size): config, policy,
    optimizer, NFT hyper-parameters, base weights, LoRA train state and conditioning, laid out on ``mesh``.

    ``abstract=True``: ``jax.ShapeDtypeStruct``s with their shardings instead of arrays (nothing allocated), for
    ahead-of-time compilation (bench/compile.py); ``batch_for(x0)`` then also takes an abstract ``x0``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from edit_r1_jax import editors, engine
    from edit_r1_jax.diffusion import latents, schedule
    from edit_r1_jax.models import lora as L
    from edit_r1_jax.models.flux.modeling import FluxConfig, FluxTransformer
    from edit_r1_jax.nft.loss import NFTConfig
    from edit_r1_jax.parallel import distributed, rules

    small = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32,
                 axes_dims_rope=(8, 12, 12), joint_attention_dim=64, pooled_projection_dim=32) if args.smoke else {}
    lcfg = L.LoRAConfig(rank=4 if args.smoke else 32, alpha=8.0 if args.smoke else 64.0)
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    cfg = FluxConfig(dtype=dtype, param_dtype=dtype, remat_policy=args.remat, lora=lcfg, scan_layers=scan_layers,
                     **small)
    grid = 4 if args.smoke else 32  # 512x512 -> 64x64 latents -> 32x32 tokens
    n, t = grid * grid, (8 if args.smoke else 128)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    b = args.batch * dp

    abstract_model = nnx.eval_shape(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_base, abstract_lora = L.split_policy(abstract_model)
    base_sh, lora_sh = rules.state_shardings(abstract_base, mesh), rules.state_shardings(abstract_lora, mesh)

    def init():
        _, base, lora = L.split_policy(FluxTransformer(cfg, rngs=nnx.Rngs(0)))
        return base, lora

    init_fn = jax.jit(init, out_shardings=(base_sh, lora_sh))
    t0 = time.perf_counter()
    base, lora = jax.eval_shape(init_fn) if abstract else jax.block_until_ready(init_fn())
    init_s = time.perf_counter() - t0
    policy = engine.Policy(graphdef, editors.get("kontext").velocity, latents.kontext_ids(grid, grid),
                           latents.text_ids(t), 2.5, (n, 64))
    c = SimpleNamespace(train=SimpleNamespace(max_grad_norm=1.0, learning_rate=3e-4, adam_b1=0.9, adam_b2=0.999,
                                              adam_eps=1e-8, weight_decay=1e-4))
    tx = engine.make_optimizer(c)
    hp = NFTConfig(num_micro_batches=1)
    host = {"ref": ((b, n, 64), np.float32), "text": ((b, t, cfg.joint_attention_dim), np.float32),
            "pooled": ((b, cfg.pooled_projection_dim), np.float32), "index": ((b,), np.int64)}
    if abstract:
        def batch_spec(shape, dt):
            spec = rules.partition_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh)
            return jax.ShapeDtypeStruct(shape, dt, sharding=jax.sharding.NamedSharding(mesh, spec))

        arrays = {k: batch_spec(*v) for k, v in host.items()}
        state = jax.eval_shape(lambda lo: engine.init_state(lo, tx, jax.random.key(0)), lora)
    else:
        rng = np.random.default_rng(0)
        arrays = distributed.to_global(mesh, {k: (rng.standard_normal(s).astype(d) if k != "index"
                                                  else np.arange(b)) for k, (s, d) in host.items()})
        state = engine.init_state(lora, tx, jax.random.key(0))
    index = arrays.pop("index")
    sigmas = schedule.sigmas(6, n)

    def batch_for(x0):
        per = {"r": np.full((b,), 0.6, np.float32), "mask": np.ones((b,), np.float32)}
        if abstract:
            per = {k: batch_spec(v.shape, v.dtype) for k, v in per.items()}
        else:
            per = distributed.to_global(mesh, per)
        return dict(x0=x0, cond=arrays, index=index, sigmas=jnp.asarray(sigmas, jnp.float32), **per)

    return SimpleNamespace(cfg=cfg, lcfg=lcfg, policy=policy, tx=tx, hp=hp, base=base, lora=lora, state=state,
                           cond=arrays, index=index, sigmas=sigmas, batch_for=batch_for, b=b, n=n, t=t,
                           init_s=init_s)


def dit_section(args, mesh):
    import jax
    import numpy as np

    from dit import _peak_for, model_flops
    from edit_r1_jax import engine

    d = build_dit(args, mesh)
    cfg, lcfg, policy, tx, hp, base, lora, state = d.cfg, d.lcfg, d.policy, d.tx, d.hp, d.base, d.lora, d.state
    cond, index, sigmas, b, n, t, init_s = d.cond, d.index, d.sigmas, d.b, d.n, d.t, d.init_s

    with jax.set_mesh(mesh):
        roll_first, roll_s = _timed(lambda: engine.sample(policy, base, state["theta_old"], cond, jax.random.key(1),
                                                          index, sigmas, "dpm2", 0.0), args.repeats)
        x0 = engine.sample(policy, base, state["theta_old"], cond, jax.random.key(1), index, sigmas, "dpm2", 0.0)
        batch = d.batch_for(x0)
        holder = {"state": state}

        def step():
            holder["state"], m = engine.train_step(policy, tx, hp, base, holder["state"], batch)
            return m["loss"]

        train_first, train_s = _timed(step, args.repeats)

    f_fwd, f_fb = model_flops(cfg, b, 2 * n, t, lcfg.rank)
    t_train = int(6 * 0.99)
    train_flops, roll_flops = t_train * (2 * f_fwd + f_fb), 6 * f_fwd
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or _peak_for(kind)
    total_peak = None if not peak else peak * 1e12 * len(jax.devices())
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base))
    return {"params": n_params, "lora_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora)),
            "global_batch": b, "tokens_per_sample": 2 * n + t, "init_s": round(init_s, 2),
            "train_step": {"what": f"{t_train} timesteps x (theta_old fwd + reference fwd + theta fwd/bwd)",
                           "first_call_s": round(train_first, 2), "seconds": round(train_s, 4),
                           "samples_per_s": round(b / train_s, 3), "model_tflop": round(train_flops / 1e12, 3),
                           "mfu": None if not total_peak else round(train_flops / train_s / total_peak, 4)},
            "rollout": {"what": "6-step dpm2", "first_call_s": round(roll_first, 2), "seconds": round(roll_s, 4),
                        "images_per_s": round(b / roll_s, 3), "model_tflop": round(roll_flops / 1e12, 3),
                        "mfu": None if not total_peak else round(roll_flops / roll_s / total_peak, 4)},
            "peak_tflops_per_chip": peak}


def reward_section(args, mesh):
    import jax
    import reward as reward_bench

    ns = argparse.Namespace(batch=args.batch * mesh.shape["data"] * mesh.shape["fsdp"], size=512, iters=args.repeats,
                            mesh=",".join(f"{k}={v}" for k, v in mesh.shape.items()),
                            text_layers=1 if args.smoke else 0, vision_depth=2 if args.smoke else 0)
    if args.smoke:
        ns.size = 56
    out = reward_bench.full_mode(ns)
    out["images_per_s"] = out.pop("pairs_per_s")
    del jax
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_accelerator.json")
    p.add_argument("--batch", type=int, default=3, help="samples per data-parallel device (paper: 3)")
    p.add_argument("--mesh", default="data=-1")
    p.add_argument("--remat", default="full")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak per chip (default: by device kind)")
    p.add_argument("--skip-reward", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code path on CPU")
    args = p.parse_args(argv)

    import jax

    from edit_r1_jax.parallel import mesh as mesh_lib

    shape = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
    mesh = mesh_lib.make_mesh(shape)
    t0 = time.perf_counter()
    result = {"device_kind": jax.devices()[0].device_kind, "devices": len(jax.devices()),
              "mesh": dict(mesh.shape), "smoke": args.smoke, "batch_per_device": args.batch}
    result["dit"] = dit_section(args, mesh)
    print(json.dumps(result, indent=2), flush=True)
    if not args.skip_reward:
        result["reward_7b"] = reward_section(args, mesh)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
