"""FLUX AutoencoderKL: encode (mean) / decode parity with diffusers for both checkpoint layouts
(diffusers vae/ folder and the BFL/ldm single file ae.safetensors), converted with our CLI."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from edit_r1_jax.models.flux.autoencoder_params import load_vae
from edit_r1_jax.weights import ConversionError
from tools.convert_weights.__main__ import main as convert_main



@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """No autograd in this module's reference calls (scoped: a global switch would leak into other tests)."""
    with torch.no_grad():
        yield

# float32 with highest matmul/conv precision: differences are summation-order noise (~1e-6 on O(1) outputs
# after ~20 convs); 2e-4 absolute leaves margin and still catches any layout bug (those give O(0.1) errors).
ATOL = 2e-4

CFG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=2,
           latent_channels=16, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False)


@pytest.fixture(scope="module")
def ref_vae():
    torch.manual_seed(0)
    vae = AutoencoderKL(**CFG).eval()
    # randomise the GroupNorm affine params too (default init is 1/0, which would hide a scale/bias swap)
    for name, p in vae.named_parameters():
        if "norm" in name:
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return vae


def to_ldm(sd: dict, n_blocks: int) -> dict:
    """Inverse of diffusers' convert_ldm_vae_checkpoint: diffusers keys -> BFL ae.safetensors keys."""
    out = {}
    for k, v in sd.items():
        k2 = k
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k2)
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                    lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                    lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample", k2)
        k2 = k2.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        k2 = k2.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        k2 = k2.replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
        m = re.fullmatch(r"(.*)mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)", k2)
        if m:
            name = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
            k2 = f"{m[1]}mid.attn_1.{name}.{m[3]}"
            if m[3] == "weight":
                v = v[:, :, None, None]  # BFL stores them as 1x1 convs
        out[k2] = v.contiguous()
    return out


def _check(ours, ref, x):
    ref_mean = ref.encode(x).latent_dist.mean
    ref_dec = ref.decode(ref_mean).sample
    nhwc = x.numpy().transpose(0, 2, 3, 1)
    mean = np.asarray(ours.encode(nhwc))
    np.testing.assert_allclose(mean.transpose(0, 3, 1, 2), ref_mean.numpy(), atol=ATOL, rtol=0)
    dec = np.asarray(ours.decode(ref_mean.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(dec.transpose(0, 3, 1, 2), ref_dec.numpy(), atol=ATOL, rtol=0)
    # FLUX latent normalisation round trip
    z = np.asarray(ours.encode_normalized(nhwc))
    np.testing.assert_allclose(z, (mean - 0.1159) * 0.3611, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ours.denormalize(z)), mean, atol=1e-6)


def test_diffusers_layout_parity(tmp_path, ref_vae):
    ref_vae.save_pretrained(tmp_path / "vae")
    convert_main(["flux-vae", "--src", str(tmp_path / "vae"), "--dst", str(tmp_path / "out")])
    ours = load_vae(tmp_path / "out")
    assert ours.cfg.block_out_channels == (16, 32, 64) and ours.cfg.scaling_factor == 0.3611
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 48) * 2 - 1  # non-square: catches H/W swaps and the asymmetric downsample pad
    _check(ours, ref_vae, x)


def test_ldm_single_file_parity(tmp_path, ref_vae):
    sd = ref_vae.state_dict()
    ldm = to_ldm(sd, 3)
    # our inverse mapping is right iff diffusers' own converter maps it back
    back = convert_ldm_vae_checkpoint(ldm, dict(ref_vae.config))
    assert set(back) == set(sd) and all(torch.equal(back[k].reshape(sd[k].shape), sd[k]) for k in sd)
    save_file(ldm, tmp_path / "ae.safetensors")
    with pytest.raises(ValueError, match="GroupNorm groups"):  # FLUX default of 32 groups does not fit 16 channels
        convert_main(["flux-vae", "--src", str(tmp_path / "ae.safetensors"), "--dst", str(tmp_path / "out")])
    ref_vae.save_config(tmp_path / "cfg")
    convert_main(["flux-vae", "--src", str(tmp_path / "ae.safetensors"), "--dst", str(tmp_path / "out"),
                  "--config", str(tmp_path / "cfg" / "config.json")])
    ours = load_vae(tmp_path / "out")
    assert ours.cfg.block_out_channels == (16, 32, 64) and ours.cfg.layers_per_block == 2
    torch.manual_seed(2)
    _check(ours, ref_vae, torch.rand(1, 3, 48, 32) * 2 - 1)


def test_converter_refuses_mismatch(tmp_path, ref_vae):
    ref_vae.save_pretrained(tmp_path / "vae")
    cfg_file = tmp_path / "vae" / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"layers_per_block": 2', '"layers_per_block": 1'))
    with pytest.raises(ConversionError, match="parameters the model does not have, 48"):
        convert_main(["flux-vae", "--src", str(tmp_path / "vae"), "--dst", str(tmp_path / "out")])


def test_ldm_config_inferred_without_config(tmp_path):
    """ae.safetensors carries no config: FLUX defaults (32 groups, 0.3611/0.1159) + widths/depth from shapes."""
    torch.manual_seed(3)
    ref = AutoencoderKL(**dict(CFG, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                               up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                               norm_num_groups=32)).eval()
    save_file(to_ldm(ref.state_dict(), 2), tmp_path / "ae.safetensors")
    convert_main(["flux-vae", "--src", str(tmp_path / "ae.safetensors"), "--dst", str(tmp_path / "out")])
    ours = load_vae(tmp_path / "out")
    c = ours.cfg
    assert (c.block_out_channels, c.layers_per_block, c.latent_channels, c.norm_num_groups) == ((32, 64), 1, 16, 32)
    assert (c.scaling_factor, c.shift_factor, c.use_quant_conv) == (0.3611, 0.1159, False)
    _check(ours, ref, torch.rand(1, 3, 16, 16) * 2 - 1)
