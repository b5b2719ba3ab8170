"""Ahead-of-time compile time of the full-size programs, layers scanned vs unrolled. Not a test.

    python bench/compile.py                      # all cases, scan on and off
    python bench/compile.py --only train --no-unrolled
    python bench/compile.py --smoke              # tiny sizes: checks the code path quickly

Cases (abstract shapes only: ``jax.jit(f).lower(*ShapeDtypeStructs).compile()``, nothing allocated, on the CPU):
  rollout  engine.sample: 6-step dpm2 rollout of 12B FLUX.1-Kontext in bf16, batch 3, 512x512 Kontext input
           (1024 noisy + 1024 reference image tokens + 128 text tokens);
  train    engine.train_step: the NFT step on that batch, LoRA r32 on the 8 attention projections, remat "full";
  reward   rewards.mllm._score_fn: the Qwen2.5-VL-7B reward forward (bf16) on batch 3 pairs of 504x504 images.
Each case is compiled with ``scan_layers=True`` (one compiled block per layer kind, models/scan.py) and False (the
same stacked parameters in a python loop = the unrolled program before scanning). The DiT shapes come from
bench/accelerator.py's ``build_dit``. Prints one progress line per case and the JSON at the end (times, and the
size of the lowered program, which unlike the times does not depend on machine load).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import machine_info  # noqa: E402

START_LOAD = os.getloadavg()

CASES = ("rollout", "train", "reward")


def _compile(lowered_fn):
    t0 = time.perf_counter()
    lowered = lowered_fn()
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - t0
    # Program size does not depend on machine load (the timings do): lines of the lowered StableHLO.
    return {"lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2), "total_s": round(lower_s + compile_s, 2),
            "stablehlo_lines": lowered.as_text().count("\n")}


def dit_case(case, args, mesh, scan_layers):
    import jax

    from accelerator import build_dit
    from edit_r1_jax import engine

    d = build_dit(SimpleNamespace(smoke=args.smoke, batch=args.batch, remat="full"), mesh, abstract=True,
                  scan_layers=scan_layers)
    key = jax.random.key(1)
    with jax.set_mesh(mesh):
        if case == "rollout":
            return _compile(lambda: engine.sample.lower(d.policy, d.base, d.state["theta_old"], d.cond, key,
                                                        d.index, d.sigmas, "dpm2", 0.0))
        x0 = jax.eval_shape(lambda: engine.sample(d.policy, d.base, d.state["theta_old"], d.cond, key, d.index,
                                                  d.sigmas, "dpm2", 0.0))
        x0 = jax.ShapeDtypeStruct(x0.shape, x0.dtype, sharding=d.cond["ref"].sharding)
        return _compile(lambda: engine.train_step.lower(d.policy, d.tx, d.hp, d.base, d.state, d.batch_for(x0)))


def reward_case(args, mesh, scan_layers):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from edit_r1_jax.models.qwen2_5_vl.model import Qwen2_5_VL, Qwen2_5_VLConfig
    from edit_r1_jax.models.qwen2_5_vl.processor import ImageProcessorConfig, grid_for, num_image_tokens
    from edit_r1_jax.parallel import rules
    from edit_r1_jax.rewards.mllm import _score_fn

    cfg = Qwen2_5_VLConfig(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=scan_layers)  # = 7B sizes
    if args.smoke:
        cfg = dataclasses.replace(
            cfg, text_config=dataclasses.replace(cfg.text_config, num_hidden_layers=2),
            vision_config=dataclasses.replace(cfg.vision_config, depth=2, fullatt_block_indexes=(1,)))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))))
    shardings = rules.state_shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    pcfg = ImageProcessorConfig()
    size = 56 if args.smoke else 504
    grid = grid_for(size, size, pcfg)
    b = args.batch
    # prompt: two images + ~100 text tokens, padded to a multiple of 64 (MLLMReward's default)
    length = -(-(2 * num_image_tokens(grid, pcfg.merge_size) + 100) // 64) * 64
    digit_ids = tuple(range(15, 21))  # "0".."5" in the Qwen2.5 vocabulary (shared/ENVIRONMENT.md)
    sds = jax.ShapeDtypeStruct
    # ids, mask, 3-D positions, last index, take (this micro-batch's rows of the image batch), source, edited
    args_ = (sds((b, length), np.int32), sds((b, length), np.int32), sds((3, b, length), np.int32),
             sds((b,), np.int32), sds((b,), np.int32), sds((b, size, size, 3), np.float32),
             sds((b, size, size, 3), np.float32))
    with jax.set_mesh(mesh):
        out = _compile(lambda: _score_fn.lower(graphdef, pcfg, digit_ids, True, grid, grid, state, *args_))
    out["prompt_length"] = length
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(CASES), help=f"comma list of {CASES}")
    p.add_argument("--no-unrolled", action="store_true", help="skip scan_layers=False (the slow unrolled compile)")
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code path")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"--only: unknown cases {unknown}; choose from {list(CASES)}")

    import jax

    from edit_r1_jax.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh({"data": 1})
    result = {"backend": jax.default_backend(), "cpu_count": os.cpu_count(), "smoke": args.smoke,
              "batch": args.batch, "cases": {}}
    modes = [True] if args.no_unrolled else [True, False]
    for case in cases:
        for scan_layers in modes:
            name = "scan" if scan_layers else "unrolled"
            print(f"[compile] {case} ({name}) ...", file=sys.stderr, flush=True)
            r = reward_case(args, mesh, scan_layers) if case == "reward" else dit_case(case, args, mesh, scan_layers)
            result["cases"].setdefault(case, {})[name] = r
            print(f"[compile] {case} ({name}): lower {r['lower_s']} s + compile {r['compile_s']} s", file=sys.stderr,
                  flush=True)
    result["machine"] = machine_info(START_LOAD)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
