"""LoRA on the Qwen-Image transformer: zero-B = base, random LoRA = diffusers + peft (forward and LoRA gradients),
export to the PEFT/diffusers layout read back by diffusers.

Tolerances: forward as tests/test_qwen_image_transformer.py (STRICT_RTOL = 2e-6 of max|output| with torch's float32
timestep frequencies, RTOL = 3e-5 as shipped). LoRA gradients (without and with per-block remat): GRAD_RTOL = 5e-5 of max|grad| per
tensor (the backward sums over every token and goes through two LoRA factors: float32 roundoff is larger).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from edit_r1_jax import weights
from edit_r1_jax.models import lora as L
from edit_r1_jax.models.qwen_image import modeling, params
from edit_r1_jax.models.qwen_image.modeling import QwenImageTransformer, qwen_image_velocity
from test_qwen_image_transformer import (RTOL, STRICT_RTOL, TINY_CONFIGS, convert_diffusers, load_model, make_inputs,
                                         make_torch_model, torch_forward, torch_timestep_features)
from tools.convert_weights.__main__ import main as convert_main

GRAD_RTOL = 5e-5
RANK, ALPHA = 4, 12.0  # scale 3 (not a power of two, so a wrong scale cannot hide)
LORA_CONFIG = TINY_CONFIGS["base"]  # 2 blocks: the first block's text-stream LoRA gets gradients too


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    dcfg = LORA_CONFIG
    dst = convert_diffusers(make_torch_model(dcfg, seed=11), tmp)
    cfg_lora = L.LoRAConfig(rank=RANK, alpha=ALPHA)
    # Base weights from the checkpoint, LoRA freshly initialised (A gaussian std 1/r, B = 0): the trainer's path.
    cfg, graphdef, base, lora = params.load_transformer(dst, lora=cfg_lora, seed=7)
    assert cfg.lora == cfg_lora
    return dict(dst=dst, graphdef=graphdef, base=base, lora=lora, inp=make_inputs(dcfg, seed=12), dcfg=dcfg, tmp=tmp)


def _args(inp):
    return (inp["x_t"], inp["ref"], inp["prompt"], inp["mask"], inp["sigma"], inp["img_ids"], inp["txt_ids"])


def velocity(graphdef, base, lora, inp, jit=True):
    fn = lambda b, l, *a: L.apply(graphdef, b, l, *a, fn=qwen_image_velocity)  # noqa: E731
    return np.asarray((jax.jit(fn) if jit else fn)(base, lora, *_args(inp)))


def random_lora(lora, seed):
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def test_lora_targets(setup):
    flat = L.lora_to_flat(setup["lora"])
    mods = sorted({k.rsplit(".", 1)[0] for k in flat})
    # the 8 attention projections of each block and nothing else (MLPs, modulation, img_in/txt_in, proj_out)
    assert mods == sorted(f"transformer_blocks.{i}.attn.{t}" for t in L.DEFAULT_TARGETS
                          for i in range(setup["dcfg"]["num_layers"]))
    for k, v in flat.items():
        assert v.dtype == jnp.float32
        if k.endswith("lora_b"):
            assert not np.any(np.asarray(v)), "B must start at zero"


def test_zero_b_lora_equals_base(setup):
    g, base, lora, inp = setup["graphdef"], setup["base"], setup["lora"], setup["inp"]
    # Op by op the LoRA branch adds an exact 0.0 to every projection: bitwise equal.
    np.testing.assert_array_equal(velocity(g, base, lora, inp, jit=False), velocity(g, base, None, inp, jit=False))
    # Under jit XLA may fuse the LoRA-A dot with the projection sharing its input (other summation order).
    jl, jb = velocity(g, base, lora, inp), velocity(g, base, None, inp)
    np.testing.assert_allclose(jl, jb, rtol=0, atol=1e-6 * np.abs(jb).max())
    # ... and equals a model built without any LoRA on the same weights.
    plain = np.asarray(nnx.jit(qwen_image_velocity)(load_model(setup["dst"]), *_args(inp)))
    np.testing.assert_allclose(plain, jb, rtol=0, atol=1e-6 * np.abs(jb).max())


def _peft_model(setup, lora_flat):
    """diffusers model + peft adapter carrying our LoRA values."""
    from peft import LoraConfig

    tm = make_torch_model(setup["dcfg"], seed=11)  # same base weights as the converted checkpoint
    tm.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(L.DEFAULT_TARGETS),
                              init_lora_weights="gaussian"))
    named = dict(tm.named_parameters())
    with torch.no_grad():
        for k, v in lora_flat.items():
            mod, ab = k.rsplit(".", 1)
            named[f"{mod}.lora_{ab[-1].upper()}.default.weight"].copy_(torch.from_numpy(np.asarray(v).T.copy()))
    assert len(lora_flat) == len([k for k in named if ".lora_" in k]), "every peft LoRA weight set from ours"
    return tm


def test_random_lora_matches_peft_forward_and_grads(setup, monkeypatch):
    monkeypatch.setattr(modeling, "timestep_features", torch_timestep_features)  # isolate LoRA (see tolerances)
    g, base, inp = setup["graphdef"], setup["base"], setup["inp"]
    lora = random_lora(setup["lora"], seed=3)
    n = inp["x_t"].shape[1]
    out = velocity(g, base, lora, inp)
    tm = _peft_model(setup, L.lora_to_flat(lora))
    ref = torch_forward(tm, inp)[:, :n]
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() / scale < STRICT_RTOL
    assert np.abs(out - velocity(g, base, None, inp)).max() / scale > 1e-2, "the random LoRA must change the output"

    w = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)

    def loss(graphdef, lora_state):
        return jnp.sum(L.apply(graphdef, base, lora_state, *_args(inp), fn=qwen_image_velocity) * w)

    # Gradients without remat and with per-block remat (what training uses), each against torch.
    model = nnx.merge(g, base, setup["lora"])
    remat_cfg = dataclasses.replace(model.config, remat_policy="full")
    g_remat = L.split_policy(nnx.eval_shape(lambda: QwenImageTransformer(remat_cfg, rngs=nnx.Rngs(0))))[0]
    grads = {name: L.lora_to_flat(jax.jit(jax.grad(lambda l, gd=gd: loss(gd, l)))(lora))
             for name, gd in (("plain", g), ("remat", g_remat))}
    hidden = np.concatenate([inp["x_t"], inp["ref"]], 1)
    tout = tm(hidden_states=torch.from_numpy(hidden), encoder_hidden_states=torch.from_numpy(inp["prompt"]),
              encoder_hidden_states_mask=torch.from_numpy(inp["mask"]), timestep=torch.from_numpy(inp["sigma"]),
              img_shapes=[list(inp["img_shapes"])] * 2).sample[:, :n]
    (tout * torch.from_numpy(w)).sum().backward()
    named = dict(tm.named_parameters())
    last = f"transformer_blocks.{setup['dcfg']['num_layers'] - 1}"
    errs = []
    for name in grads:
        for k, gr in grads[name].items():
            mod, ab = k.rsplit(".", 1)
            tg = named[f"{mod}.lora_{ab[-1].upper()}.default.weight"].grad
            if mod in (f"{last}.attn.to_add_out", f"{last}.attn.add_q_proj"):
                # The last block's text output feeds nothing (the model returns image tokens), so neither its text
                # output projection nor its text queries get a gradient: exactly zero here, zero or None in torch.
                assert not np.any(np.asarray(gr)) and (tg is None or not torch.any(tg)), (name, k)
                continue
            tg = tg.numpy().T
            errs.append(np.abs(np.asarray(gr) - tg).max() / np.abs(tg).max())
    assert len(errs) == 2 * (len(grads["plain"]) - 4)
    assert np.max(errs) < GRAD_RTOL, f"max relative LoRA grad error {np.max(errs):.2e}"  # NaN fails too


def test_export_lora_loads_into_diffusers(setup):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    g, base, inp = setup["graphdef"], setup["base"], setup["inp"]
    lora = random_lora(setup["lora"], seed=5)
    n = inp["x_t"].shape[1]
    out = velocity(g, base, lora, inp)
    ckpt = setup["tmp"] / "ckpt"
    ckpt.mkdir()
    weights.save_tensors(ckpt / "lora.safetensors", L.lora_to_flat(lora))
    (ckpt / "config.json").write_text(json.dumps({"lora": {"rank": RANK, "alpha": ALPHA}}))
    exported = setup["tmp"] / "export" / "pytorch_lora_weights.safetensors"
    convert_main(["export-lora", "--src", str(ckpt), "--dst", str(exported)])

    # 1) QwenImageTransformer2DModel.load_lora_adapter
    tm = make_torch_model(setup["dcfg"], seed=11)
    tm.load_lora_adapter(str(exported.parent), weight_name=exported.name, prefix="transformer", adapter_name="nft")
    assert tm.peft_config["nft"].lora_alpha == ALPHA and tm.peft_config["nft"].r == RANK
    ref = torch_forward(tm, inp)[:, :n]
    assert np.abs(out - ref).max() / np.abs(ref).max() < RTOL

    # 2) QwenImageEditPlusPipeline.load_lora_weights (the path users take)
    pipe = QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                     tokenizer=None, processor=None,
                                     transformer=make_torch_model(setup["dcfg"], seed=11))
    pipe.load_lora_weights(str(exported.parent), weight_name=exported.name)
    ref2 = torch_forward(pipe.transformer, inp)[:, :n]
    assert np.abs(out - ref2).max() / np.abs(ref2).max() < RTOL

