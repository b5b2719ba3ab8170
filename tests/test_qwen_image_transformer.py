"""QwenImageTransformer vs diffusers QwenImageTransformer2DModel on tiny random models, through the real converter CLI.

Tolerances (float32, highest matmul precision, relative to max|reference output|):
* STRICT_RTOL = 2e-6 with the sinusoidal timestep frequencies forced to torch's float32 values: isolates the
  architecture (what remains is float32 summation-order noise, ~1e-7 per op through a few blocks).
* RTOL = 3e-5 as shipped: the features take sin/cos of t*f*1000 with arguments up to 1000 rad, where one ulp of a
  float32 frequency moves the angle by ~6e-5 rad; our frequencies are correctly rounded, torch's float32 exp
  differs by one ulp on a few entries. These random models (std 0.2) have high gain, so that shows up ~1e-5.

Inputs cover batch 2, the edit layout (target + reference image, two img_shapes entries of different sizes), and a
text mask with padding at different lengths per row (diffusers masks text keys only).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from edit_r1_jax import weights
from edit_r1_jax.diffusion import qwen_image as Q
from edit_r1_jax.models.qwen_image import modeling
from edit_r1_jax.models.qwen_image.modeling import QwenImageConfig, QwenImageTransformer, qwen_image_velocity
from tools.convert_weights.__main__ import main as convert_main

STRICT_RTOL = 2e-6
RTOL = 3e-5

TINY_CONFIGS = {
    # 2 blocks, 2 heads of 16, out_channels = in/4 (the Qwen-Image layout: 4*C packed in, C*p*p out)
    "base": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(4, 6, 6)),
    # 2511-style: zero_cond_t, 3 heads of 8, 1 block, out_channels None (= in_channels)
    "zero_cond_t": dict(patch_size=1, in_channels=8, out_channels=None, num_layers=1, attention_head_dim=8,
                        num_attention_heads=3, joint_attention_dim=5, axes_dims_rope=(2, 2, 4), zero_cond_t=True),
}
IMG_SHAPES = [(1, 2, 3), (1, 3, 2)]  # target 2x3 tokens, reference 3x2 tokens (odd sizes: centring matters)


def make_torch_model(dcfg: dict, seed: int = 0, std: float = 0.2):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    tm = QwenImageTransformer2DModel(**dcfg).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if "norm" in name:  # RMSNorm weights: around 1
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return tm


def convert_diffusers(tm, tmp_path, name="transformer"):
    src = tmp_path / name
    tm.save_pretrained(src, max_shard_size="20KB", safe_serialization=True)
    assert (src / "diffusion_pytorch_model.safetensors.index.json").exists(), "expected a sharded checkpoint"
    dst = tmp_path / (name + "_jax")
    convert_main(["qwen-image-transformer", "--src", str(src), "--dst", str(dst), "--dtype", "float32"])
    return dst


def load_model(dst, **overrides):
    cfg = QwenImageConfig.from_diffusers(weights.read_config(dst), **overrides)
    abstract = nnx.eval_shape(lambda: QwenImageTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, weights.load_state(dst, abstract_state))


def make_inputs(dcfg, batch=2, img_shapes=IMG_SHAPES, text_len=7, lengths=(7, 4), seed=1):
    rng = np.random.default_rng(seed)
    sizes = [f * h * w for f, h, w in img_shapes]
    c = dcfg["in_channels"]
    mask = np.zeros((batch, text_len), np.int64)
    for i in range(batch):
        mask[i, :lengths[i % len(lengths)]] = 1
    img_ids, txt_ids = Q.position_ids(img_shapes, text_len)
    return dict(
        x_t=rng.standard_normal((batch, sizes[0], c)).astype(np.float32),
        ref=rng.standard_normal((batch, sum(sizes[1:]), c)).astype(np.float32) if len(sizes) > 1 else None,
        prompt=rng.standard_normal((batch, text_len, dcfg["joint_attention_dim"])).astype(np.float32),
        mask=mask, sigma=np.linspace(0.3, 0.9, batch).astype(np.float32),
        img_shapes=img_shapes, img_ids=img_ids, txt_ids=txt_ids)


def torch_forward(tm, inp):
    hidden = inp["x_t"] if inp["ref"] is None else np.concatenate([inp["x_t"], inp["ref"]], axis=1)
    with torch.no_grad():
        out = tm(hidden_states=torch.from_numpy(hidden), encoder_hidden_states=torch.from_numpy(inp["prompt"]),
                 encoder_hidden_states_mask=torch.from_numpy(inp["mask"]), timestep=torch.from_numpy(inp["sigma"]),
                 img_shapes=[list(inp["img_shapes"])] * hidden.shape[0]).sample
    return out.numpy()


def jax_velocity(model, inp):
    fn = nnx.jit(qwen_image_velocity)
    return np.asarray(fn(model, inp["x_t"], inp["ref"], inp["prompt"], inp["mask"], inp["sigma"], inp["img_ids"],
                         inp["txt_ids"]))


def torch_timestep_features(t, dim=256, max_period=10000.0, scale=1000.0):
    """modeling.timestep_features with torch's float32 frequencies (for the strict comparison)."""
    half = dim // 2
    f = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).numpy()
    args = (t.astype(jnp.float32)[:, None] * jnp.asarray(f)[None, :]) * jnp.float32(scale)
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_parity_with_diffusers(name, tmp_path, monkeypatch):
    dcfg = TINY_CONFIGS[name]
    tm = make_torch_model(dcfg)
    model = load_model(convert_diffusers(tm, tmp_path))
    assert model.config.zero_cond_t == dcfg.get("zero_cond_t", False)
    inp = make_inputs(dcfg)
    ref = torch_forward(tm, inp)
    n = inp["x_t"].shape[1]
    scale = np.abs(ref).max()

    out = jax_velocity(model, inp)
    assert out.shape == (2, n, ref.shape[-1])
    err = np.abs(out - ref[:, :n]).max() / scale
    assert err < RTOL, f"{name}: relative error {err:.2e}"

    # Full sequence (target and reference outputs) through __call__.
    hidden = np.concatenate([inp["x_t"], inp["ref"]], 1)
    full = np.asarray(nnx.jit(lambda m, *a: m(*a, num_target_tokens=n))(
        model, hidden, inp["prompt"], inp["mask"], inp["sigma"], inp["img_ids"], inp["txt_ids"]))
    assert np.abs(full - ref).max() / scale < RTOL

    monkeypatch.setattr(modeling, "timestep_features", torch_timestep_features)
    strict = jax_velocity(model, inp)
    err = np.abs(strict - ref[:, :n]).max() / scale
    assert err < STRICT_RTOL, f"{name}: relative error with torch timestep frequencies {err:.2e}"

    # The mask matters: dropping it changes the output (padding keys are attended to), so the test can fail.
    unmasked = np.asarray(nnx.jit(qwen_image_velocity)(model, inp["x_t"], inp["ref"], inp["prompt"], None,
                                                       inp["sigma"], inp["img_ids"], inp["txt_ids"]))
    assert np.abs(unmasked - ref[:, :n]).max() / scale > 1e-3


def test_no_mask_no_reference_batch3(tmp_path):
    dcfg = TINY_CONFIGS["base"]
    tm = make_torch_model(dcfg, seed=3)
    model = load_model(convert_diffusers(tm, tmp_path))
    inp = make_inputs(dcfg, batch=3, img_shapes=[(1, 3, 3)], text_len=5, lengths=(5,), seed=4)
    with torch.no_grad():
        ref = tm(hidden_states=torch.from_numpy(inp["x_t"]), encoder_hidden_states=torch.from_numpy(inp["prompt"]),
                 encoder_hidden_states_mask=None, timestep=torch.from_numpy(inp["sigma"]),
                 img_shapes=[[(1, 3, 3)]] * 3).sample.numpy()
    out = np.asarray(nnx.jit(qwen_image_velocity)(model, inp["x_t"], None, inp["prompt"], None, inp["sigma"],
                                                  inp["img_ids"], inp["txt_ids"]))
    assert np.abs(out - ref).max() / np.abs(ref).max() < RTOL


def test_rope_positions_match_diffusers():
    """Our integer positions -> tables equal diffusers' complex freqs (edit layout and the layer3d variant)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope, QwenEmbedRope

    axes = (16, 56, 56)
    shapes = [(1, 5, 4), (1, 3, 6)]
    for cls, layer3d in ((QwenEmbedRope, False), (QwenEmbedLayer3DRope, True)):
        rope = cls(theta=10000, axes_dim=list(axes), scale_rope=True)
        vid, txt = rope([shapes], max_txt_seq_len=9, device=torch.device("cpu"))
        img_ids, txt_ids = Q.position_ids(shapes, 9, layer3d=layer3d)
        for ids, ref in ((img_ids, vid), (txt_ids, txt)):
            cos, sin = modeling.rope_tables(ids, axes)
            # float32 angles equal; cos/sin of float32 differ by an ulp between libms (angles < 20 rad here).
            np.testing.assert_allclose(np.asarray(cos), ref.real.numpy(), rtol=0, atol=2e-6)
            np.testing.assert_allclose(np.asarray(sin), ref.imag.numpy(), rtol=0, atol=2e-6)


def test_config_roundtrip_and_errors(tmp_path):
    dcfg = TINY_CONFIGS["zero_cond_t"]
    cfg = QwenImageConfig.from_diffusers({**dcfg, "_class_name": "QwenImageTransformer2DModel"})
    d = cfg.to_diffusers()
    assert {k: d[k] for k in dcfg} == {**dcfg, "axes_dims_rope": list(dcfg["axes_dims_rope"])}
    with pytest.raises(ValueError, match="axes_dims_rope"):
        QwenImageConfig.from_diffusers({**dcfg, "axes_dims_rope": (2, 2, 2)})
    with pytest.raises(ValueError, match="guidance_embeds"):
        QwenImageConfig(guidance_embeds=True)
    model = QwenImageTransformer(cfg, rngs=nnx.Rngs(0))
    inp = make_inputs(dcfg, batch=1)
    hidden = np.concatenate([inp["x_t"], inp["ref"]], 1)
    with pytest.raises(ValueError, match="num_target_tokens"):
        model(hidden, inp["prompt"], inp["mask"], inp["sigma"], inp["img_ids"], inp["txt_ids"])
    with pytest.raises(ValueError, match="img_ids"):
        qwen_image_velocity(model, inp["x_t"], inp["ref"], inp["prompt"], inp["mask"], inp["sigma"],
                            inp["img_ids"][:3], inp["txt_ids"])
    # A checkpoint that does not fit is refused before anything is written, naming the key.
    tm = make_torch_model(TINY_CONFIGS["base"])
    src = tmp_path / "t"
    tm.save_pretrained(src)
    cfg_file = src / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"num_layers": 2', '"num_layers": 1'))
    with pytest.raises(weights.ConversionError, match="transformer_blocks.1"):
        convert_main(["qwen-image-transformer", "--src", str(src), "--dst", str(tmp_path / "out")])
    assert not (tmp_path / "out" / weights.PARAMS_FILE).exists()


def test_full_size_structure_matches_diffusers():
    """The default config is the released 20B model: at full width (2 of the 60 identical blocks, to keep the
    abstract init fast) every parameter shape equals diffusers' through the real rules (meta tensors, nothing
    allocated), and the 60-block parameter count equals diffusers' default model."""
    import re

    from diffusers import QwenImageTransformer2DModel

    from edit_r1_jax.models.qwen_image import params

    with torch.device("meta"):
        full = QwenImageTransformer2DModel()  # diffusers defaults = Qwen-Image / Qwen-Image-Edit-2509
        tm = QwenImageTransformer2DModel(num_layers=2)
    cfg = QwenImageConfig.from_diffusers(dict(full.config))
    assert (cfg.num_layers, cfg.inner_dim, cfg.joint_attention_dim, cfg.out_dim) == (60, 3072, 3584, 64)
    ours = weights.flat_shapes(params.transformer_abstract_state(dataclasses.replace(cfg, num_layers=2)))
    mapped = {}
    for key, p in tm.state_dict().items():
        rule, m = next((r, m) for r in params.transformer_rules() if (m := re.fullmatch(r.pattern, key)))
        mapped[m.expand(rule.targets[0])] = tuple(p.shape[::-1]) if rule.transform.__name__ == "LINEAR" \
            else tuple(p.shape)
    assert mapped == {k: tuple(v.shape) for k, v in ours.items()}
    per_block = sum(int(np.prod(v.shape)) for k, v in ours.items() if k.startswith("transformer_blocks.0."))
    n_ours = sum(int(np.prod(v.shape)) for v in ours.values()) + 58 * per_block
    n_ref = sum(p.numel() for p in full.parameters())
    assert n_ours == n_ref and 20.0e9 < n_ref < 20.6e9, (n_ours, n_ref)  # "20B"


def test_layered_variant_additional_t_cond_and_layer3d_rope(tmp_path):
    """use_additional_t_cond + use_layer3d_rope (Qwen-Image-Layered): the condition image on frame -1, a learned
    2-entry timestep addition. Full-sequence output through __call__."""
    dcfg = dict(TINY_CONFIGS["base"], num_layers=1, use_additional_t_cond=True, use_layer3d_rope=True)
    tm = make_torch_model(dcfg, seed=5)
    model = load_model(convert_diffusers(tm, tmp_path))
    inp = make_inputs(dcfg, seed=6)
    img_ids, txt_ids = Q.position_ids(inp["img_shapes"], inp["prompt"].shape[1], layer3d=True)
    hidden = np.concatenate([inp["x_t"], inp["ref"]], 1)
    cond = np.array([0, 1])
    with torch.no_grad():
        ref = tm(hidden_states=torch.from_numpy(hidden), encoder_hidden_states=torch.from_numpy(inp["prompt"]),
                 encoder_hidden_states_mask=torch.from_numpy(inp["mask"]), timestep=torch.from_numpy(inp["sigma"]),
                 img_shapes=[list(inp["img_shapes"])] * 2, additional_t_cond=torch.from_numpy(cond)).sample.numpy()
    out = np.asarray(nnx.jit(lambda m, *a: m(*a[:-1], additional_t_cond=a[-1]))(
        model, hidden, inp["prompt"], inp["mask"], inp["sigma"], img_ids, txt_ids, cond))
    assert np.abs(out - ref).max() / np.abs(ref).max() < RTOL
    with pytest.raises(ValueError, match="additional_t_cond"):
        model(hidden, inp["prompt"], inp["mask"], inp["sigma"], img_ids, txt_ids)
