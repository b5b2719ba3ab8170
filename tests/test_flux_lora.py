"""LoRA on the FLUX transformer: base/adapter split, PEFT parity (forward and LoRA gradients), export to diffusers.

Tolerances: forward as tests/test_flux_parity.py (RTOL = 3e-5 of max|output| for the shipped model; STRICT_RTOL =
2e-6 with torch's float32 timestep frequencies, which removes the one-ulp frequency noise explained there). LoRA
gradients: GRAD_RTOL = 5e-5 of max|grad| per tensor, with torch's frequencies (observed ~1e-5: the backward pass
sums over every token and goes through two LoRA factors, so float32 roundoff is larger than in the forward).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from edit_r1_jax import weights
from edit_r1_jax.models import lora as L
from edit_r1_jax.models.flux import modeling, params
from edit_r1_jax.models.flux.modeling import kontext_velocity
from test_flux_parity import STRICT_RTOL, torch_timestep_features
from test_flux_parity import RTOL, TINY_CONFIGS, convert_diffusers, make_inputs, make_torch_model, torch_forward
from test_flux_parity import load_model
from tools.convert_weights.__main__ import main as convert_main

GRAD_RTOL = 5e-5
RANK, ALPHA = 4, 12.0  # scale 3 (not a power of two, so a wrong scale cannot hide)
# One double + one single block keeps compile times small; both block types carry LoRA.
LORA_CONFIG = {**TINY_CONFIGS["guidance"], "num_layers": 1, "num_single_layers": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    dcfg = LORA_CONFIG
    tm = make_torch_model(dcfg, seed=11)
    dst = convert_diffusers(tm, tmp)
    cfg_lora = L.LoRAConfig(rank=RANK, alpha=ALPHA)
    # Base weights from the checkpoint, LoRA freshly initialised (A gaussian std 1/r, B = 0): the trainer's path.
    cfg, graphdef, base, lora = params.load_transformer(dst, lora=cfg_lora, seed=7)
    assert cfg.lora == cfg_lora
    inp = make_inputs(dcfg, batch=2, text_len=7, seed=12)
    return dict(tm=tm, dst=dst, graphdef=graphdef, base=base, lora=lora, inp=inp, dcfg=dcfg, tmp=tmp)


def velocity_fn(graphdef):
    def fn(base, lora, inp):
        return L.apply(graphdef, base, lora, inp["x_t"], inp["ref"], inp["prompt"], inp["pooled"], inp["sigma"],
                       inp["img_ids"], inp["txt_ids"], inp["guidance"], fn=kontext_velocity)
    jitted = jax.jit(fn)
    jitted.__wrapped__ = fn
    return jitted


def random_lora(lora, seed):
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def test_lora_targets_and_counts(setup):
    flat = L.lora_to_flat(setup["lora"])
    mods = sorted({k.rsplit(".", 1)[0] for k in flat})
    d = setup["dcfg"]
    # 8 projections per double block, q/k/v per single block; nothing else (MLPs, proj_out, embedders untouched).
    assert len(mods) == 8 * d["num_layers"] + 3 * d["num_single_layers"]
    assert "transformer_blocks.0.attn.to_out.0" in mods and "single_transformer_blocks.0.attn.to_v" in mods
    assert not any("proj_mlp" in m or "ff" in m or "proj_out" in m or "norm" in m for m in mods)
    for k, v in flat.items():
        assert v.dtype == jnp.float32
        if k.endswith("lora_b"):
            assert not np.any(np.asarray(v)), "B must start at zero"
        else:  # gaussian init with std 1/r
            assert 0.5 / RANK < float(np.std(np.asarray(v))) < 2.0 / RANK
    # Base weights exist once: the base state holds no LoRA arrays and the LoRA state no base arrays.
    base_paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(setup["base"])}
    assert not any("lora" in p for p in base_paths) and all("lora" in k for k in flat)


def test_zero_b_lora_equals_base_exactly(setup):
    # Op by op (no jit) the LoRA branch adds an exact 0.0 to every projection: bitwise equal.
    eager = velocity_fn(setup["graphdef"]).__wrapped__
    with_lora = np.asarray(eager(setup["base"], setup["lora"], setup["inp"]))
    base_only = np.asarray(eager(setup["base"], None, setup["inp"]))
    np.testing.assert_array_equal(with_lora, base_only)
    # Under jit the two programs differ (XLA merges the LoRA-A dot with the q/k/v dots sharing their input, which
    # changes float32 summation order), so only roundoff-level agreement: 1e-6 of the output scale.
    f = velocity_fn(setup["graphdef"])
    jit_lora = np.asarray(f(setup["base"], setup["lora"], setup["inp"]))
    jit_base = np.asarray(f(setup["base"], None, setup["inp"]))
    np.testing.assert_allclose(jit_lora, jit_base, rtol=0, atol=1e-6 * np.abs(jit_base).max())
    np.testing.assert_allclose(jit_base, base_only, rtol=0, atol=1e-6 * np.abs(jit_base).max())
    # ... and equals a model built without any LoRA on the same weights.
    plain = load_model(setup["dst"])
    inp = setup["inp"]
    out = np.asarray(nnx.jit(kontext_velocity)(plain, inp["x_t"], inp["ref"], inp["prompt"], inp["pooled"],
                                               inp["sigma"], inp["img_ids"], inp["txt_ids"], inp["guidance"]))
    np.testing.assert_allclose(out, base_only, rtol=0, atol=1e-6 * np.abs(out).max())


def _peft_model(setup, lora_flat):
    """diffusers model + peft adapter carrying our LoRA values."""
    from peft import LoraConfig

    tm = make_torch_model(setup["dcfg"], seed=11)  # same base weights as setup["tm"]
    tm.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(L.DEFAULT_TARGETS),
                              init_lora_weights="gaussian"))
    named = dict(tm.named_parameters())
    n = 0
    with torch.no_grad():
        for k, v in lora_flat.items():
            mod, ab = k.rsplit(".", 1)
            tkey = f"{mod}.lora_{ab[-1].upper()}.default.weight"
            named[tkey].copy_(torch.from_numpy(np.asarray(v).T.copy()))
            n += 1
    assert n == len([k for k in named if ".lora_" in k]), "every peft LoRA weight must be set from ours"
    return tm


def test_random_lora_matches_peft_forward_and_grads(setup, monkeypatch):
    # torch's float32 timestep frequencies (see test_flux_parity.py) so that the comparison isolates LoRA.
    monkeypatch.setattr(modeling, "timestep_features", torch_timestep_features)
    lora = random_lora(setup["lora"], seed=3)
    inp = setup["inp"]
    out = np.asarray(velocity_fn(setup["graphdef"])(setup["base"], lora, inp))
    tm = _peft_model(setup, L.lora_to_flat(lora))
    ref = torch_forward(tm, inp)[:, :inp["x_t"].shape[1]]
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() / scale < STRICT_RTOL
    base_only = np.asarray(velocity_fn(setup["graphdef"])(setup["base"], None, inp))
    assert np.abs(out - base_only).max() / scale > 1e-2, "the random LoRA must change the output"

    # Gradient of a fixed linear functional of the velocity w.r.t. the LoRA parameters only.
    w = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)

    def loss(lora_state):
        v = L.apply(setup["graphdef"], setup["base"], lora_state, inp["x_t"], inp["ref"], inp["prompt"],
                    inp["pooled"], inp["sigma"], inp["img_ids"], inp["txt_ids"], inp["guidance"],
                    fn=kontext_velocity)
        return jnp.sum(v * w)

    grads = L.lora_to_flat(jax.jit(jax.grad(loss))(lora))
    hidden = np.concatenate([inp["x_t"], inp["ref"]], 1)
    tout = tm(hidden_states=torch.from_numpy(hidden), encoder_hidden_states=torch.from_numpy(inp["prompt"]),
              pooled_projections=torch.from_numpy(inp["pooled"]), timestep=torch.from_numpy(inp["sigma"]),
              img_ids=torch.from_numpy(inp["img_ids"]), txt_ids=torch.from_numpy(inp["txt_ids"]),
              guidance=torch.from_numpy(inp["guidance"])).sample[:, :out.shape[1]]
    (tout * torch.from_numpy(w)).sum().backward()
    named = dict(tm.named_parameters())
    errs = []
    for k, g in grads.items():
        mod, ab = k.rsplit(".", 1)
        tg = named[f"{mod}.lora_{ab[-1].upper()}.default.weight"].grad.numpy().T
        errs.append(np.abs(np.asarray(g) - tg).max() / np.abs(tg).max())
    print("max relative LoRA grad error", max(errs))
    assert max(errs) < GRAD_RTOL


def test_export_lora_loads_into_diffusers(setup):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    lora = random_lora(setup["lora"], seed=5)
    inp = setup["inp"]
    out = np.asarray(velocity_fn(setup["graphdef"])(setup["base"], lora, inp))

    ckpt = setup["tmp"] / "ckpt"
    ckpt.mkdir()
    weights.save_tensors(ckpt / "lora.safetensors", L.lora_to_flat(lora))
    (ckpt / "config.json").write_text(json.dumps({"lora": {"rank": RANK, "alpha": ALPHA}}))
    exported = setup["tmp"] / "export" / "pytorch_lora_weights.safetensors"
    convert_main(["export-lora", "--src", str(ckpt), "--dst", str(exported)])

    from safetensors import safe_open
    with safe_open(str(exported), "np") as f:
        keys = list(f.keys())
        a = f.get_tensor("transformer.transformer_blocks.0.attn.to_q.lora_A.weight")
        b = f.get_tensor("transformer.transformer_blocks.0.attn.to_q.lora_B.weight")
    assert all(k.startswith("transformer.") for k in keys)
    inner = setup["dcfg"]["num_attention_heads"] * setup["dcfg"]["attention_head_dim"]
    assert a.shape == (RANK, inner) and b.shape == (inner, RANK)

    # 1) FluxTransformer2DModel.load_lora_adapter
    tm = make_torch_model(setup["dcfg"], seed=11)
    tm.load_lora_adapter(str(exported.parent), weight_name=exported.name, prefix="transformer", adapter_name="nft")
    assert tm.peft_config["nft"].lora_alpha == ALPHA and tm.peft_config["nft"].r == RANK
    ref = torch_forward(tm, inp)[:, :out.shape[1]]
    assert np.abs(out - ref).max() / np.abs(ref).max() < RTOL

    # 2) FluxKontextPipeline.load_lora_weights (the path users take)
    tm2 = make_torch_model(setup["dcfg"], seed=11)
    pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                               tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tm2)
    pipe.load_lora_weights(str(exported.parent), weight_name=exported.name)
    ref2 = torch_forward(pipe.transformer, inp)[:, :out.shape[1]]
    assert np.abs(out - ref2).max() / np.abs(ref2).max() < RTOL

    # 3) --fold-scale: B * alpha/r, alpha = r; read identically even from a bare file path (no metadata use).
    folded = setup["tmp"] / "export_folded.safetensors"
    convert_main(["export-lora", "--src", str(ckpt), "--dst", str(folded), "--fold-scale"])
    tm3 = make_torch_model(setup["dcfg"], seed=11)
    tm3.load_lora_adapter(str(folded), prefix="transformer")
    ref3 = torch_forward(tm3, inp)[:, :out.shape[1]]
    assert np.abs(out - ref3).max() / np.abs(ref3).max() < RTOL


def test_export_lora_rejects_inconsistent_rank(setup):
    ckpt = setup["tmp"] / "bad"
    ckpt.mkdir()
    weights.save_tensors(ckpt / "lora.safetensors", L.lora_to_flat(setup["lora"]))
    (ckpt / "config.json").write_text(json.dumps({"rank": RANK + 1, "alpha": ALPHA}))
    dst = setup["tmp"] / "bad_out.safetensors"
    with pytest.raises(weights.ConversionError, match="do not match rank"):
        convert_main(["export-lora", "--src", str(ckpt), "--dst", str(dst)])
    assert not dst.exists()


def test_peft_rules_roundtrip(setup, tmp_path):
    """PEFT file -> our LoRA paths with weights.convert (resume from a diffusers/PEFT LoRA)."""
    lora = random_lora(setup["lora"], seed=9)
    flat = L.lora_to_flat(lora)
    weights.save_tensors(tmp_path / "peft.safetensors", params.lora_to_peft(flat))
    weights.convert(weights.SafetensorsSource(tmp_path / "peft.safetensors"), params.peft_lora_rules(),
                    setup["lora"], tmp_path / "back", {"rank": RANK, "alpha": ALPHA})
    back = weights.read_tensors(tmp_path / "back" / weights.PARAMS_FILE)
    assert sorted(back) == sorted(flat)
    for k in flat:
        np.testing.assert_array_equal(back[k], np.asarray(flat[k]))


@pytest.mark.parametrize("policy", ["full"])  # dots_saveable runs in tests/flux_sharding_check.py
def test_remat_policies_match(setup, policy):
    """Rematerialised blocks (what training uses) give the same velocity and LoRA gradient as no remat."""
    import dataclasses

    model = nnx.merge(setup["graphdef"], setup["base"], setup["lora"])
    cfg = dataclasses.replace(model.config, remat_policy=policy)
    remat_graphdef, _, _ = L.split_policy(nnx.eval_shape(lambda: type(model)(cfg, rngs=nnx.Rngs(0))))
    lora = random_lora(setup["lora"], seed=21)
    inp = setup["inp"]

    def loss(graphdef, lora_state):
        v = L.apply(graphdef, setup["base"], lora_state, inp["x_t"], inp["ref"], inp["prompt"], inp["pooled"],
                    inp["sigma"], inp["img_ids"], inp["txt_ids"], inp["guidance"], fn=kontext_velocity)
        return jnp.sum(v ** 2), v

    outs = [jax.jit(jax.grad(lambda l, g=g: loss(g, l), has_aux=True))(lora)
            for g in (setup["graphdef"], remat_graphdef)]
    (g0, v0), (g1, v1) = outs
    # Same math, possibly different fusion: float32 roundoff only.
    np.testing.assert_allclose(np.asarray(v1), np.asarray(v0), rtol=0, atol=1e-6 * np.abs(np.asarray(v0)).max())
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * np.abs(np.asarray(a)).max())
