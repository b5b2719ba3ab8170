"""Qwen-Image VAE (AutoencoderKLQwenImage) encode (mean) / decode parity on single images, converted with our CLI,
and the pipeline's latent layout (normalisation, 2x2 packing, unpacking) against QwenImageEditPlusPipeline's own
methods.

Tolerance: float32 with highest precision; differences are summation-order noise (~1e-6 on O(1) values after ~25
convs); ATOL = 2e-4 absolute leaves margin and still catches any layout bug (those give O(0.1) errors).
``attn_scales=[]``: diffusers 0.42.1 cannot encode with a non-empty ``attn_scales`` (the mid-block attention, which
every config has, is covered).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

from edit_r1_jax import weights
from edit_r1_jax.diffusion import qwen_image as Q
from edit_r1_jax.models.qwen_image.params import load_vae
from tools.convert_weights.__main__ import main as convert_main

ATOL = 2e-4
Z = 4
CFG = dict(base_dim=8, z_dim=Z, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True, True], latents_mean=[0.3, -0.2, 0.1, 0.5],
           latents_std=[1.5, 0.7, 2.0, 1.1])


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    from diffusers import AutoencoderKLQwenImage

    tmp = tmp_path_factory.mktemp("qvae")
    torch.manual_seed(0)
    tm = AutoencoderKLQwenImage(**CFG).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    tm.save_pretrained(tmp / "vae")
    convert_main(["qwen-image-vae", "--src", str(tmp / "vae"), "--dst", str(tmp / "vae_jax")])
    return tm, load_vae(tmp / "vae_jax"), tmp


_JIT = {name: nnx.jit(lambda m, a, name=name: getattr(m, name)(a)) for name in ("encode", "decode")}


def _call(vae, method, x):
    return np.asarray(_JIT[method](vae, x))


def _images(seed=0, b=2, h=32, w=48):
    return np.random.default_rng(seed).uniform(-1, 1, (b, h, w, 3)).astype(np.float32)


def test_encode_mean_matches(vaes):
    tm, vae, _ = vaes
    x = _images()
    with torch.no_grad():
        ref = tm.encode(torch.from_numpy(x).permute(0, 3, 1, 2)[:, :, None]).latent_dist.mean
    ref = ref[:, :, 0].permute(0, 2, 3, 1).numpy()
    out = _call(vae, "encode", x)
    assert out.shape == (2, 4, 6, Z)
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)
    assert np.abs(ref).max() > 0.1  # not a degenerate comparison


def test_decode_matches(vaes):
    tm, vae, _ = vaes
    z = np.random.default_rng(1).standard_normal((2, 4, 6, Z)).astype(np.float32)
    with torch.no_grad():
        ref = tm.decode(torch.from_numpy(z).permute(0, 3, 1, 2)[:, :, None]).sample
    ref = ref[:, :, 0].permute(0, 2, 3, 1).numpy()
    out = _call(vae, "decode", z)
    assert out.shape == (2, 32, 48, 3)
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)
    assert np.mean(np.abs(ref) < 1.0) > 0.1, "mostly clamped output would hide decoder errors"


def test_pipeline_latent_layout(vaes):
    """Normalised reference latents, packing and unpacking as QwenImageEditPlusPipeline computes them."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    tm, vae, _ = vaes
    pipe = QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tm, text_encoder=None,
                                     tokenizer=None, processor=None, transformer=None)
    x = _images(seed=2)  # same shapes as above: the jitted encode/decode are reused
    with torch.no_grad():
        ref = pipe._encode_vae_image(torch.from_numpy(x).permute(0, 3, 1, 2)[:, :, None], generator=None)
        packed_ref = pipe._pack_latents(ref, 2, Z, ref.shape[3], ref.shape[4]).numpy()
    z = np.asarray(vae.normalize(_call(vae, "encode", x)))
    np.testing.assert_allclose(z, ref[:, :, 0].permute(0, 2, 3, 1).numpy(), rtol=0, atol=ATOL * 2)
    packed = np.asarray(Q.pack(z))
    np.testing.assert_allclose(packed, packed_ref, rtol=0, atol=ATOL * 2)
    # _unpack_latents takes pixel sizes; our unpack takes latent sizes (H/8, W/8).
    unpacked_ref = pipe._unpack_latents(torch.from_numpy(packed), 32, 48, 8)[:, :, 0].permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.asarray(Q.unpack(packed, 4, 6)), unpacked_ref)
    # The pipeline's decode path: latents / (1 / std) + mean, then vae.decode.
    std = torch.tensor(CFG["latents_std"]).view(1, Z, 1, 1, 1)
    mean = torch.tensor(CFG["latents_mean"]).view(1, Z, 1, 1, 1)
    with torch.no_grad():
        zt = torch.from_numpy(z.copy()).permute(0, 3, 1, 2)[:, :, None]
        img_ref = tm.decode(zt / (1.0 / std) + mean).sample[:, :, 0].permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(_call(vae, "decode", np.asarray(vae.denormalize(z))), img_ref, rtol=0, atol=ATOL)


def test_config_and_conversion_checks(vaes, tmp_path):
    _, vae, tmp = vaes
    cfg = weights.read_config(tmp / "vae_jax")
    assert {k: cfg[k] for k in CFG} == CFG  # latents_mean/std travel with the converted VAE
    assert vae.cfg.scale_factor == 8
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(np.zeros((1, 20, 32, 3), np.float32))
    # A checkpoint with a different depth is refused naming the keys.
    from diffusers import AutoencoderKLQwenImage

    bad = AutoencoderKLQwenImage(**{**CFG, "num_res_blocks": 2})
    bad.save_pretrained(tmp_path / "bad")
    cfg_file = tmp_path / "bad" / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"num_res_blocks": 2', '"num_res_blocks": 1'))
    with pytest.raises(weights.ConversionError, match="missing"):
        convert_main(["qwen-image-vae", "--src", str(tmp_path / "bad"), "--dst", str(tmp_path / "out")])


def test_full_size_structure_matches_diffusers():
    """The default config is Qwen-Image's VAE: every diffusers parameter (meta tensors) maps through the real rules
    onto our parameter of the same shape, except the temporal resampling convs, which are dropped on purpose."""
    import re

    import jax
    from diffusers import AutoencoderKLQwenImage

    from edit_r1_jax.models.qwen_image import params
    from edit_r1_jax.models.qwen_image.autoencoder import QwenImageVAEConfig

    with torch.device("meta"):
        tm = AutoencoderKLQwenImage()
    cfg = QwenImageVAEConfig.from_diffusers(dict(tm.config))
    assert cfg == QwenImageVAEConfig()
    ours = {k: tuple(v.shape) for k, v in weights.flat_shapes(params.vae_abstract_state(cfg)).items()}
    mapped, dropped = {}, []
    for key, p in tm.state_dict().items():
        hit = next(((r, m) for r in params.vae_rules() if (m := re.fullmatch(r.pattern, key))), None)
        if hit is None:
            assert any(re.fullmatch(i, key) for i in params.VAE_IGNORE), key
            dropped.append(key)
            continue
        rule, m = hit
        out = jax.eval_shape(rule.transform, jax.ShapeDtypeStruct(tuple(p.shape), np.float32))
        mapped[m.expand(rule.targets[0])] = tuple(out.shape)
    assert mapped == ours
    assert len(dropped) == 8 and all(".time_conv." in k for k in dropped)  # 2 down3d + 2 up3d, weight + bias
