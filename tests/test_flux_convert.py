"""FLUX transformer converter: BFL single-file layout == diffusers layout (bitwise), and loud rejections."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file

from edit_r1_jax import weights
from edit_r1_jax.models.flux import params
from test_flux_parity import TINY_CONFIGS, make_torch_model
from tools.convert_weights.__main__ import main as convert_main


def to_bfl(sd: dict[str, torch.Tensor], num_layers: int, num_single: int, prefix: str = "") -> dict:
    """Inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` (written independently here)."""
    out = {}
    pop = sd.pop

    def lin(dst, src):
        out[prefix + dst + ".weight"] = pop(src + ".weight")
        out[prefix + dst + ".bias"] = pop(src + ".bias")

    def fused(dst, srcs):
        for s in ("weight", "bias"):
            out[f"{prefix}{dst}.{s}"] = torch.cat([pop(f"{x}.{s}") for x in srcs], 0)

    tt = "time_text_embed."
    lin("time_in.in_layer", tt + "timestep_embedder.linear_1")
    lin("time_in.out_layer", tt + "timestep_embedder.linear_2")
    lin("vector_in.in_layer", tt + "text_embedder.linear_1")
    lin("vector_in.out_layer", tt + "text_embedder.linear_2")
    if tt + "guidance_embedder.linear_1.weight" in sd:
        lin("guidance_in.in_layer", tt + "guidance_embedder.linear_1")
        lin("guidance_in.out_layer", tt + "guidance_embedder.linear_2")
    lin("txt_in", "context_embedder")
    lin("img_in", "x_embedder")
    for i in range(num_layers):
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        lin(d + "img_mod.lin", s + "norm1.linear")
        lin(d + "txt_mod.lin", s + "norm1_context.linear")
        fused(d + "img_attn.qkv", [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v"])
        fused(d + "txt_attn.qkv", [s + "attn.add_q_proj", s + "attn.add_k_proj", s + "attn.add_v_proj"])
        for a, b in (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                     ("txt_attn.norm.query_norm", "attn.norm_added_q"),
                     ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            out[prefix + d + a + ".scale"] = pop(s + b + ".weight")
        lin(d + "img_attn.proj", s + "attn.to_out.0")
        lin(d + "txt_attn.proj", s + "attn.to_add_out")
        lin(d + "img_mlp.0", s + "ff.net.0.proj")
        lin(d + "img_mlp.2", s + "ff.net.2")
        lin(d + "txt_mlp.0", s + "ff_context.net.0.proj")
        lin(d + "txt_mlp.2", s + "ff_context.net.2")
    for i in range(num_single):
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        lin(d + "modulation.lin", s + "norm.linear")
        fused(d + "linear1", [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"])
        out[prefix + d + "norm.query_norm.scale"] = pop(s + "attn.norm_q.weight")
        out[prefix + d + "norm.key_norm.scale"] = pop(s + "attn.norm_k.weight")
        lin(d + "linear2", s + "proj_out")
    lin("final_layer.linear", "proj_out")
    for s in ("weight", "bias"):
        scale, shift = pop(f"norm_out.linear.{s}").chunk(2, 0)
        out[f"{prefix}final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale], 0)  # BFL: (shift, scale)
    assert not sd, f"inverse map left keys behind: {sorted(sd)}"
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize("name,prefix", [("guidance", ""), ("no_guidance", "model.diffusion_model.")])
def test_bfl_single_file_matches_diffusers_bitwise(name, prefix, tmp_path):
    dcfg = TINY_CONFIGS[name]
    tm = make_torch_model(dcfg, seed=5)
    tm.save_pretrained(tmp_path / "diffusers", max_shard_size="20KB")
    convert_main(["flux-transformer", "--src", str(tmp_path / "diffusers"), "--dst", str(tmp_path / "a")])

    bfl = to_bfl(dict(tm.state_dict()), dcfg["num_layers"], dcfg["num_single_layers"], prefix)
    save_file(bfl, str(tmp_path / "flux1-tiny.safetensors"))
    # The tiny head size is not FLUX's 128, so the RoPE split must come from --config (tests/test_faults_convert.py
    # checks the refusal without it); every other field is checked against the shapes by the converter.
    convert_main(["flux-transformer", "--src", str(tmp_path / "flux1-tiny.safetensors"), "--dst", str(tmp_path / "b"),
                  "--config", str(tmp_path / "diffusers" / "config.json")])

    a = np_load_file(str(tmp_path / "a" / weights.PARAMS_FILE))
    b = np_load_file(str(tmp_path / "b" / weights.PARAMS_FILE))
    assert sorted(a) == sorted(b)
    assert "transformer_blocks.0.attn.to_out.0.kernel" in a and "single_transformer_blocks.0.proj_mlp.kernel" in a
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32
        assert np.array_equal(a[k], b[k]), k
    # The inferred config describes the same model.
    ca, cb = weights.read_config(tmp_path / "a"), weights.read_config(tmp_path / "b")
    for key in ("in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "pooled_projection_dim", "guidance_embeds"):
        assert ca[key] == cb[key], key
    assert (cb["out_channels"] or cb["in_channels"]) == (ca["out_channels"] or ca["in_channels"])
    assert sum(cb["axes_dims_rope"]) == dcfg["attention_head_dim"]


def test_bfl_full_size_config_inference():
    shapes = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
              "final_layer.linear.weight": (64, 3072), "guidance_in.in_layer.weight": (3072, 256),
              "double_blocks.0.img_attn.norm.query_norm.scale": (128,)}
    shapes.update({f"double_blocks.{i}.img_mod.lin.weight": (18432, 3072) for i in range(19)})
    shapes.update({f"single_blocks.{i}.linear2.weight": (3072, 15360) for i in range(38)})
    cfg = params.infer_bfl_config({"model.diffusion_model." + k: v for k, v in shapes.items()})
    assert cfg == {"patch_size": 1, "in_channels": 64, "out_channels": 64, "num_layers": 19, "num_single_layers": 38,
                   "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}


def _single_diffusers_file(tmp_path):
    dcfg = TINY_CONFIGS["no_guidance"]
    tm = make_torch_model(dcfg, seed=6)
    tm.save_pretrained(tmp_path / "src")  # one file + config.json
    f = tmp_path / "src" / "diffusion_pytorch_model.safetensors"
    assert f.exists()
    return f, np_load_file(str(f))


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape"])
def test_converter_rejects_bad_checkpoints(problem, tmp_path):
    f, sd = _single_diffusers_file(tmp_path)
    key = "transformer_blocks.0.attn.add_k_proj.weight"
    if problem == "missing":
        del sd[key]
        expect = ["transformer_blocks.0.attn.add_k_proj.kernel", "missing"]
    elif problem == "unexpected":
        key = "transformer_blocks.0.attn.to_qkv_extra.weight"
        sd[key] = np.zeros((3, 3), np.float32)
        sd["some_buffer"] = np.zeros((2,), np.float32)
        expect = [key, "some_buffer"]
    else:
        sd[key] = np.zeros((sd[key].shape[0] + 1, sd[key].shape[1]), np.float32)
        expect = [key, "shape mismatch"]
    np_save_file(sd, str(f))
    dst = tmp_path / "dst"
    with pytest.raises(weights.ConversionError) as e:
        convert_main(["flux-transformer", "--src", str(tmp_path / "src"), "--dst", str(dst)])
    for s in expect:
        assert s in str(e.value), (s, str(e.value))
    assert not dst.exists() or not any(dst.iterdir()), "converter wrote files despite errors"


def test_single_diffusers_file_needs_config(tmp_path):
    f, _ = _single_diffusers_file(tmp_path)
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").rename(tmp_path / "cfg.json")
    with pytest.raises(weights.ConversionError, match="--config"):
        convert_main(["flux-transformer", "--src", str(f), "--dst", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    convert_main(["flux-transformer", "--src", str(f), "--dst", str(tmp_path / "y"), "--config",
                  str(tmp_path / "cfg.json"), "--dtype", "bfloat16"])
    src = weights.SafetensorsSource(tmp_path / "y" / weights.PARAMS_FILE)
    assert str(src.dtype("proj_out.kernel")) == "bfloat16"
    assert weights.read_config(tmp_path / "y")["num_single_layers"] == cfg["num_single_layers"]
