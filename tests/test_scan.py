"""Layers under scan (models/scan.py): scan == python loop over the same stacked parameters (outputs and LoRA
gradients), the stacked <-> per-layer key convention, and stacked loading from per-layer checkpoint files.

Tolerance for scan vs loop: both run the same float32 ops per layer in the same order, but XLA fuses a scanned
body differently from the inlined blocks, so results may differ by float32 roundoff only: 1e-5 of max|x|.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from edit_r1_jax import weights
from edit_r1_jax.models import lora as L
from edit_r1_jax.models import scan
from edit_r1_jax.models.flux.modeling import FluxConfig, FluxTransformer, kontext_velocity
from edit_r1_jax.models.qwen2_5_vl.model import Qwen2_5_VL, Qwen2_5_VLConfig
from edit_r1_jax.models.qwen2_5_vl.language import TextConfig
from edit_r1_jax.models.qwen2_5_vl.vision import VisionConfig
from edit_r1_jax.models.qwen_image.modeling import QwenImageConfig, QwenImageTransformer, qwen_image_velocity

RTOL = 1e-5

CFG = FluxConfig(in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=12, pooled_projection_dim=6, axes_dims_rope=(4, 6, 6),
                 lora=L.LoRAConfig(rank=2, alpha=4.0))


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(1e-30, float(np.abs(b).max())))


def _flux_inputs(seed=0, n=6, t=5):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
    img_ids = np.stack([np.r_[np.zeros(n // 2), np.ones(n - n // 2)], np.arange(n) % 3, np.arange(n) // 3], -1)
    return dict(x_t=f(2, n // 2, 8), ref=f(2, n - n // 2, 8), prompt=f(2, t, 12), pooled=f(2, 6),
                sigma=jnp.asarray([0.3, 0.8]), img_ids=jnp.asarray(img_ids, jnp.float32),
                txt_ids=jnp.zeros((t, 3)), guidance=jnp.asarray([2.5, 2.5]))


def _random_lora(lora, seed):
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _scan_matches_loop(graphdef, loop_def, base, lora, apply_args, fn, must_have: str, dead=()):
    """Velocity and every layer's LoRA gradient of the scanned graph equal the python loop's; every LoRA leaf but
    the ``dead`` prefixes (layers whose output feeds nothing) gets a gradient. Returns the scanned velocity."""
    def loss(gd, lo):
        v = L.apply(gd, base, lo, *apply_args, fn=fn)
        return jnp.mean(jnp.square(v) * jnp.arange(v.shape[-1])), v

    (_, vs), gs = jax.jit(jax.value_and_grad(lambda lo: loss(graphdef, lo), has_aux=True))(lora)
    (_, vl), gl = jax.jit(jax.value_and_grad(lambda lo: loss(loop_def, lo), has_aux=True))(lora)
    assert np.abs(np.asarray(vs)).max() > 0.1
    _close(vs, vl)
    gflat_s, gflat_l = L.lora_to_flat(gs), L.lora_to_flat(gl)
    assert set(gflat_s) == set(gflat_l) and must_have in gflat_s
    for k in gflat_s:
        if not k.startswith(tuple(dead)):
            assert np.abs(np.asarray(gflat_l[k])).max() > 0, k  # every layer's LoRA gets a gradient
        _close(gflat_s[k], gflat_l[k])
    return vs


@pytest.mark.parametrize("remat", ["none", "full"])
def test_flux_scan_equals_loop(remat):
    cfg = dataclasses.replace(CFG, remat_policy=remat)
    graphdef, base, lora = L.split_policy(FluxTransformer(cfg, rngs=nnx.Rngs(0)))
    lora = _random_lora(lora, 1)  # B = 0 at init would hide a wrong LoRA path
    loop_def, _, _ = L.split_policy(FluxTransformer(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(0)))
    inp = _flux_inputs()
    args = [inp[k] for k in ("x_t", "ref", "prompt", "pooled", "sigma", "img_ids", "txt_ids", "guidance")]
    vs = _scan_matches_loop(graphdef, loop_def, base, lora, args, kontext_velocity,
                            "single_transformer_blocks.2.attn.to_q.lora_b")
    # The base model alone (LoRA disabled: placeholders keep the layer axis) runs under scan too.
    v0 = jax.jit(lambda: L.apply(graphdef, base, None, inp["x_t"], inp["ref"], inp["prompt"], inp["pooled"],
                                 inp["sigma"], inp["img_ids"], inp["txt_ids"], inp["guidance"],
                                 fn=kontext_velocity))()
    assert not np.allclose(np.asarray(v0), np.asarray(vs), atol=1e-3)


QI_CFG = QwenImageConfig(in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=12, axes_dims_rope=(4, 6, 6), zero_cond_t=True,
                         lora=L.LoRAConfig(rank=2, alpha=4.0))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_qwen_image_scan_equals_loop(remat):
    """Qwen-Image MMDiT: scanned blocks == python loop over the same stacked parameters (velocity and every
    layer's LoRA gradient), with what is broadcast to every block in play: a padded text mask and the zero_cond_t
    ``modulate_index`` (reference tokens modulated from timestep 0)."""
    from edit_r1_jax.diffusion import qwen_image as Q

    cfg = dataclasses.replace(QI_CFG, remat_policy=remat)
    graphdef, base, lora = L.split_policy(QwenImageTransformer(cfg, rngs=nnx.Rngs(0)))
    assert base["transformer_blocks"]["attn"]["to_q"]["kernel"].get_value().shape == (3, 32, 32)
    lora = _random_lora(lora, 1)  # B = 0 at init would hide a wrong LoRA path
    loop_def, _, _ = L.split_policy(QwenImageTransformer(dataclasses.replace(cfg, scan_layers=False),
                                                         rngs=nnx.Rngs(0)))
    r = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
    t = 5
    img_ids, txt_ids = Q.position_ids([(1, 2, 3), (1, 3, 2)], t)
    args = (f(2, 6, 16), f(2, 6, 16), f(2, t, 12), jnp.ones((2, t), jnp.int32).at[1, 3:].set(0),
            jnp.asarray([0.3, 0.8]), jnp.asarray(img_ids), jnp.asarray(txt_ids))
    # the last block's text output feeds nothing: its text-side output and query LoRA get no gradient
    _scan_matches_loop(graphdef, loop_def, base, lora, args, qwen_image_velocity,
                       "transformer_blocks.2.attn.add_k_proj.lora_b",
                       dead=("transformer_blocks.2.attn.to_add_out", "transformer_blocks.2.attn.add_q_proj"))


def test_stacked_layout_and_per_layer_keys():
    model = nnx.eval_shape(lambda: FluxTransformer(CFG, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    kernel = state["transformer_blocks"]["attn"]["to_q"]["kernel"]
    assert kernel.get_value().shape == (2, 32, 32)
    assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", "heads")
    shapes = weights.flat_shapes(state)
    # what converters write: exactly the diffusers per-layer names
    assert shapes["transformer_blocks.1.attn.to_q.kernel"].shape == (32, 32)
    assert shapes["single_transformer_blocks.2.proj_out.kernel"].shape == (160, 32)
    assert shapes["transformer_blocks.0.ff.net.0.proj.kernel"].shape == (32, 128)
    assert "transformer_blocks.attn.to_q.kernel" not in shapes and "transformer_blocks.2.norm1.linear.bias" not in shapes
    assert len([k for k in shapes if k.startswith("single_transformer_blocks.")]) == 3 * len(
        [k for k in shapes if k.startswith("single_transformer_blocks.0.")])

    # LoRA round trip stacked -> per-layer -> stacked, and a mismatch names the key
    _, _, lora = L.split_policy(FluxTransformer(CFG, rngs=nnx.Rngs(0)))
    lora = _random_lora(lora, 3)
    flat = L.lora_to_flat(lora)
    assert flat["transformer_blocks.1.attn.add_k_proj.lora_a"].shape == (32, 2)
    np.testing.assert_array_equal(flat["transformer_blocks.1.attn.add_k_proj.lora_a"],
                                  lora["transformer_blocks"]["attn"]["add_k_proj"]["lora_a"].get_value()[1])
    back = L.lora_from_flat(flat, lora)
    for (p, a), (_, b) in zip(nnx.to_flat_state(back), nnx.to_flat_state(lora)):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))
    broken = dict(flat)
    del broken["single_transformer_blocks.1.attn.to_v.lora_b"]
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.1\.attn\.to_v\.lora_b"):
        L.lora_from_flat(broken, lora)


def test_stacked_load_from_per_layer_file(tmp_path):
    model = FluxTransformer(CFG, rngs=nnx.Rngs(5))
    graphdef, base, _ = L.split_policy(model)
    flat = weights.flat_per_layer(base)
    assert "single_transformer_blocks.1.attn.norm_q.scale" in flat
    weights.save_tensors(tmp_path / weights.PARAMS_FILE, flat)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
    loaded = weights.load_state(tmp_path, abstract)
    for (p, a), (_, b) in zip(nnx.to_flat_state(loaded), nnx.to_flat_state(base)):
        assert a.get_metadata()["logical_axes"] == b.get_metadata()["logical_axes"]
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
    # a missing per-layer key is named in the error
    del flat["transformer_blocks.1.ff_context.net.2.kernel"]
    weights.save_tensors(tmp_path / "partial.safetensors", flat)
    with pytest.raises(weights.ConversionError, match=r"transformer_blocks\.1\.ff_context\.net\.2\.kernel"):
        weights.load_state(tmp_path / "partial.safetensors", abstract)


def test_stacked_load_reads_only_requested_layers(tmp_path):
    """The streaming stacked load builds each shard from per-layer slices: a sharding that splits the layer
    axis (here: 2 of 3 layers on one 'device' shard, checked through the callback's index) reads only those."""
    state = nnx.state(scan.stack(lambda r: nnx.Linear(3, 4, rngs=r), 3, nnx.Rngs(0)))
    flat = weights.flat_per_layer(state)
    assert sorted(flat) == [f"{i}.{n}" for i in range(3) for n in ("bias", "kernel")]
    weights.save_tensors(tmp_path / "p.safetensors", flat)
    calls = []
    orig = jax.make_array_from_callback

    def spy(shape, sharding, cb):
        calls.append(cb((slice(1, 3),) + (slice(None),) * (len(shape) - 1)))
        return orig(shape, sharding, cb)

    jax.make_array_from_callback, keep = spy, jax.make_array_from_callback
    try:
        loaded = weights.load_state(tmp_path / "p.safetensors", jax.tree.map(lambda x: x, state))
    finally:
        jax.make_array_from_callback = keep
    np.testing.assert_array_equal(calls[1], np.stack([flat["1.kernel"], flat["2.kernel"]]))
    np.testing.assert_array_equal(loaded["kernel"].get_value(), state["kernel"].get_value())


def test_qwen_scan_equals_loop():
    """Decoder layers and vision blocks (window and full attention chosen per layer by a scanned flag)."""
    text = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, mrope_section=(2, 1, 1), rope_theta=10000.0)
    vision = VisionConfig(depth=3, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=32,
                          fullatt_block_indexes=(1,), window_size=56)
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text)
    model = Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))
    assert nnx.state(model)["visual"]["blocks"]["attn"]["qkv"]["kernel"].get_value().shape == (3, 32, 96)
    loop_cfg = dataclasses.replace(cfg, scan_layers=False)
    assert not loop_cfg.vision_config.scan_layers and not loop_cfg.text_config.scan_layers
    graphdef, state = nnx.split(model)
    loop_def, _ = nnx.split(Qwen2_5_VL(loop_cfg, rngs=nnx.Rngs(0)))
    r = np.random.default_rng(0)
    grid = (1, 8, 12)  # 96 patches: several (ragged) windows, so window and full attention differ
    pix = jnp.asarray(r.standard_normal((2, 96, vision.patch_dim)), jnp.float32)
    ids = jnp.asarray(r.integers(0, 60, (2, 9)))
    pos = jnp.broadcast_to(jnp.arange(9), (3, 2, 9))
    mask = jnp.ones((2, 9), jnp.int32).at[0, :2].set(0)

    def fwd(gd):
        m = nnx.merge(gd, state)
        return m.encode_images(pix, grid), m(ids, mask, pos)

    (es, ls), (el, ll) = jax.jit(lambda: fwd(graphdef))(), jax.jit(lambda: fwd(loop_def))()
    _close(es, el)
    _close(ls, ll)
    # the per-layer flag matters: all-window attention gives other image embeddings
    win_cfg = dataclasses.replace(cfg, vision_config=dataclasses.replace(vision, fullatt_block_indexes=()))
    win_def, _ = nnx.split(Qwen2_5_VL(win_cfg, rngs=nnx.Rngs(0)))
    ew = jax.jit(lambda: nnx.merge(win_def, state).encode_images(pix, grid))()
    assert np.abs(np.asarray(ew) - np.asarray(es)).max() > 1e-3 * np.abs(np.asarray(es)).max()


def test_lora_targets_on_stacked_layers():
    """Stacked layers share one graph: a per-layer target (PEFT files name exact modules) enables that module on
    every layer of its stack, a suffix target works as before, and other stacks are not touched."""
    exact = L.LoRAConfig(targets=("transformer_blocks.0.attn.to_out.0", "single_transformer_blocks.1.attn.to_k"))
    assert L.lora_targeted("transformer_blocks.*.attn.to_out.0", exact)
    assert L.lora_targeted("single_transformer_blocks.*.attn.to_k", exact)
    assert not L.lora_targeted("transformer_blocks.*.attn.to_k", exact)
    assert L.lora_targeted("transformer_blocks.*.attn.to_q", L.LoRAConfig())
    assert not L.lora_targeted("transformer_blocks.*.norm1.linear", L.LoRAConfig())
