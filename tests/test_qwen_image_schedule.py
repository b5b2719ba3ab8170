"""Qwen-Image sigma schedule vs diffusers' FlowMatchEulerDiscreteScheduler (as QwenImageEditPlusPipeline drives it),
position ids and img_shapes, and the whole-pipeline converter ``qwen-image-edit``.

Tolerance for sigmas: 1e-6 absolute (diffusers rounds its float32 input sigmas first and returns float32; we compute
in float64: the differences are float32 roundoff, ~1e-7).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edit_r1_jax import weights
from edit_r1_jax.diffusion import qwen_image as Q
from tools.convert_weights.__main__ import main as convert_main

# The published Qwen-Image-Edit-2509 scheduler/scheduler_config.json (values as on the hub).
PUBLISHED = {
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}


def diffusers_sigmas(config, steps, image_seq_len):
    """What QwenImageEditPlusPipeline.__call__ hands the scheduler (its own calculate_shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift(image_seq_len, sched.config.get("base_image_seq_len", 256),
                         sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                         sched.config.get("max_shift", 1.15))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched.sigmas.numpy().astype(np.float64), sched.timesteps.numpy().astype(np.float64)


def test_spec_g_sigmas_at_512():
    tokens = (512 // 16) ** 2  # 1024 generated-image tokens at 512^2 (reference tokens do not count)
    s = Q.sigmas(6, tokens, PUBLISHED)
    np.testing.assert_allclose(s[:-1], [1.0, 0.8625, 0.7028, 0.5151, 0.2913, 0.02], atol=5e-5)  # spec G, 4 digits
    assert s[-1] == 0.0
    ref, ref_t = diffusers_sigmas(PUBLISHED, 6, tokens)
    np.testing.assert_allclose(s, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(Q.timesteps(6, tokens, PUBLISHED), ref_t, rtol=0, atol=1e-3)  # 1000 * sigma


@pytest.mark.parametrize("steps,tokens,over", [
    (15, 1024, {}),  # the evaluation schedule
    (6, 4096, {}),  # 1024^2
    (4, 300, {"shift_terminal": None}),  # no terminal stretch
    (5, 700, {"time_shift_type": "linear"}),
    (6, 700, {"use_dynamic_shifting": False, "shift": 3.0, "shift_terminal": None}),  # static shift
])
def test_sigmas_match_diffusers(steps, tokens, over):
    cfg = {**PUBLISHED, **over}
    ref, _ = diffusers_sigmas(cfg, steps, tokens)
    np.testing.assert_allclose(Q.sigmas(steps, tokens, cfg), ref, rtol=0, atol=1e-6)


def test_schedule_errors():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        Q.sigmas(6, 1024, {**PUBLISHED, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="time_shift_type"):
        Q.sigmas(6, 1024, {**PUBLISHED, "time_shift_type": "cosine"})
    with pytest.raises(ValueError, match="num_steps"):
        Q.sigmas(0, 1024, PUBLISHED)


def test_img_shapes_and_positions():
    shapes = Q.img_shapes_for(512, 512, refs=[(384, 640)])
    assert shapes == [(1, 32, 32), (1, 24, 40)]  # as the pipeline: (1, H/8/2, W/8/2)
    img, txt = Q.position_ids([(1, 2, 3), (1, 3, 2)], 4)
    assert img.shape == (12, 3) and txt.shape == (4, 3)
    # target on frame 0, reference on frame 1; rows -(h - h//2)..h//2-1, same for columns
    np.testing.assert_array_equal(img[:6], [[0, r, c] for r in (-1, 0) for c in (-2, -1, 0)])
    np.testing.assert_array_equal(img[6:], [[1, r, c] for r in (-2, -1, 0) for c in (-1, 0)])
    # text after the grid: max(h//2, w//2) over both images = 1
    np.testing.assert_array_equal(txt, [[1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4]])
    with pytest.raises(ValueError, match="multiple of 16"):
        Q.img_shapes_for(500, 512)
    with pytest.raises(ValueError, match="img_shapes"):
        Q.position_ids([], 3)


def test_convert_whole_edit_pipeline(tmp_path, tmp_path_factory):
    """qwen-image-edit on a saved tiny QwenImageEditPlusPipeline folder: every component converted and loadable."""
    from edit_r1_jax.models.qwen2_5_vl.params import load_model as load_vl
    from edit_r1_jax.models.qwen_image.params import load_transformer, load_vae
    from qwen_fixtures import qwen_tokenizer_dir, save_tiny_edit_pipeline

    tok_dir = qwen_tokenizer_dir(tmp_path_factory.getbasetemp().parent / "qwen_cache")
    src = tmp_path / "pipe"
    pipe = save_tiny_edit_pipeline(src, tok_dir, scheduler_config=PUBLISHED)
    te, transformer = pipe.text_encoder, pipe.transformer
    index = json.loads((src / "model_index.json").read_text())

    dst = tmp_path / "out"
    convert_main(["qwen-image-edit", "--src", str(src), "--dst", str(dst)])
    for sub in ("transformer", "vae", "text_encoder"):
        assert (dst / sub / weights.PARAMS_FILE).exists(), sub
    assert (dst / "text_encoder" / "tokenizer.json").exists()  # the text encoder is loadable on its own
    assert (dst / "text_encoder" / "preprocessor_config.json").exists()
    assert (dst / "processor" / "preprocessor_config.json").exists() and (dst / "tokenizer" / "tokenizer.json").exists()
    info = json.loads((dst / "qwen_image_edit.json").read_text())
    assert info["pipeline_class"] == "QwenImageEditPlusPipeline"

    cfg, _, base, _ = load_transformer(dst / "transformer")
    assert cfg.num_layers == 1 and cfg.joint_attention_dim == 32
    np.testing.assert_array_equal(np.asarray(base["img_in"]["kernel"][...]),
                                  transformer.img_in.weight.detach().numpy().T)
    assert load_vae(dst / "vae").cfg.latents_std == (1.0, 2.0, 3.0, 4.0)
    vl = load_vl(dst / "text_encoder")
    np.testing.assert_array_equal(np.asarray(vl.model.embed_tokens.embedding[...][:5]),
                                  te.model.language_model.embed_tokens.weight.detach().numpy()[:5])
    # The schedule is read from the converted folder and equals the pipeline's scheduler.
    sched = Q.read_scheduler_config(dst)
    ref, _ = diffusers_sigmas(json.loads((src / "scheduler" / "scheduler_config.json").read_text()), 6, 1024)
    np.testing.assert_allclose(Q.sigmas(6, 1024, sched), ref, rtol=0, atol=1e-6)

    # A folder that is not a Qwen-Image pipeline is refused by name.
    (src / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    with pytest.raises(ValueError, match="FluxKontextPipeline"):
        convert_main(["qwen-image-edit", "--src", str(src), "--dst", str(tmp_path / "bad")])

