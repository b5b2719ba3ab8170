"""Converter faults (issue 11): atomic output, --overwrite, --dst inside --src, BFL RoPE split, errors that name
the source key and file, non-finite weights. Real tiny diffusers models saved in their on-disk layout."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from edit_r1_jax import weights
from test_flux_convert import to_bfl
from test_flux_parity import TINY_CONFIGS, make_torch_model
from tools.convert_weights.__main__ import main as convert_main

KEY = "transformer_blocks.0.attn.add_k_proj.weight"


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux") / "src"
    make_torch_model(TINY_CONFIGS["no_guidance"], seed=6).save_pretrained(d)  # one file + config.json
    return d


def _copy(src, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst, dst / "diffusion_pytorch_model.safetensors"


def _snapshot(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _convert(src, dst, *extra):
    return convert_main(["flux-transformer", "--src", str(src), "--dst", str(dst), *extra])


def test_existing_destination_needs_overwrite_and_survives_a_failure(diffusers_dir, tmp_path):
    src, f = _copy(diffusers_dir, tmp_path)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    with pytest.raises(weights.ConversionError, match="exists and is not empty; pass --overwrite"):
        _convert(src, dst)
    assert _snapshot(dst) == {"keep.txt": b"user data"}
    _convert(src, dst, "--overwrite")
    assert sorted(_snapshot(dst)) == ["config.json", "params.safetensors"]
    good = _snapshot(dst)
    # A failure half-way through (a NaN in a tensor streamed after others were written) leaves --dst as it was
    # and no partial sibling behind.
    sd = np_load_file(str(f))
    sd[KEY][0, 0] = np.nan
    np_save_file(sd, str(f))
    with pytest.raises(weights.ConversionError) as e:
        _convert(src, dst, "--overwrite")
    assert f"source key {KEY!r}" in str(e.value) and str(f) in str(e.value) and "NaN or inf" in str(e.value)
    assert _snapshot(dst) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    # ... unless asked to go on: a warning, and the NaN arrives in the output.
    _convert(src, tmp_path / "nan_ok", "--allow-nonfinite")
    out = np_load_file(str(tmp_path / "nan_ok" / weights.PARAMS_FILE))
    assert np.isnan(out["transformer_blocks.0.attn.add_k_proj.kernel"]).any()


def test_destination_inside_source_is_refused(diffusers_dir, tmp_path):
    src, _ = _copy(diffusers_dir, tmp_path)
    before = _snapshot(src)
    for dst in (src, src / "converted"):
        with pytest.raises(weights.ConversionError, match="inside --src"):
            _convert(src, dst, "--overwrite")
    assert _snapshot(src) == before  # config.json of the source untouched


# A truncated safetensors file was already named before issue 11 (kept as a guard); a truncated config.json was not.
@pytest.mark.parametrize("which", ["weights", "config.json"])
def test_truncated_source_names_the_file(diffusers_dir, tmp_path, which):
    src, f = _copy(diffusers_dir, tmp_path)
    if which == "config.json":
        f = src / "config.json"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.ConversionError, match=str(f)):
        _convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bfl_head_size_not_128_needs_config(diffusers_dir, tmp_path):
    cfg = TINY_CONFIGS["no_guidance"]
    assert cfg["attention_head_dim"] != 128
    from safetensors.torch import save_file

    tm = make_torch_model(cfg, seed=6)
    bfl = tmp_path / "flux1-tiny.safetensors"
    save_file(to_bfl(dict(tm.state_dict()), cfg["num_layers"], cfg["num_single_layers"]), str(bfl))
    with pytest.raises(weights.ConversionError, match="RoPE split .* pass --config"):
        _convert(bfl, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _convert(bfl, tmp_path / "out", "--config", str(diffusers_dir / "config.json"))
    assert weights.read_config(tmp_path / "out")["axes_dims_rope"] == list(cfg["axes_dims_rope"])


def test_kontext_failure_leaves_no_partial_output(tmp_path):
    from kontext_tiny import build_pipeline

    pipe = build_pipeline(with_text=False)
    pipe.save_pretrained(tmp_path / "pipeline")
    vae = next((tmp_path / "pipeline" / "vae").glob("*.safetensors"))
    sd = np_load_file(str(vae))
    sd.pop(sorted(sd)[0])  # the transformer converts, then the VAE fails
    np_save_file(sd, str(vae))
    with pytest.raises(weights.ConversionError, match="missing"):
        convert_main(["kontext", "--src", str(tmp_path / "pipeline"), "--dst", str(tmp_path / "converted")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]


def test_qwen_failure_leaves_no_partial_output(tmp_path):
    from qwen_fixtures import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "hf", tokenizer_dir=None)  # weights convert, then the tokenizer is missing
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        convert_main(["qwen2.5-vl", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "converted")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())  # the source is untouched
