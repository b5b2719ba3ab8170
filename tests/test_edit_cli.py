"""``python -m edit_r1_jax.edit``: documented handling of awkward inputs, refusals with clear messages, and
one real end-to-end run on a tiny converted Kontext model."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edit_r1_jax.data.images import ImageLoadError, center_crop_resize, load_image, to_model_range
from edit_r1_jax.edit import main as edit_main
from kontext_tiny import RESOLUTION, T5_LENGTH, save_and_convert


def write_png16(path, arr: np.ndarray) -> None:
    """Minimal 16-bit PNG writer (PIL cannot write 16-bit RGB): arr uint16 [H, W, C], C in {1, 3, 4}."""
    h, w, c = arr.shape
    color_type = {1: 0, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) +
                     chunk(b"IEND", b""))


# ------------------------------------------------------------------------------ image loading (unit level)
def test_missing_and_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "nope.png", 64)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError, match="cannot read image"):
        load_image(bad, 64)
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageLoadError, match="cannot read image"):
        load_image(trunc, 64)
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path, 64)


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((32, 32, 4), np.uint8)
    a[..., 0] = 200  # red everywhere...
    a[:, :16, 3] = 0  # ...but left half fully transparent
    a[:, 16:, 3] = 255
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[:, :16] == 255).all()  # transparent -> white (not the stored black/red)
    assert (out[:, 16:] == [200, 0, 0]).all()


def test_grayscale_palette_and_16bit(tmp_path):
    g = np.tile(np.arange(32, dtype=np.uint8)[None] * 8, (32, 1))
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png", 32)
    assert (out == g[..., None]).all()  # L -> RGB with equal channels
    rgb = np.stack([g, 255 - g, g], -1)
    Image.fromarray(rgb).quantize(256).save(tmp_path / "p.png")  # 32 colours: an exact adaptive palette
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert (load_image(tmp_path / "p.png", 32) == rgb).all()
    g16 = np.full((32, 32, 1), 40000, np.uint16)
    write_png16(tmp_path / "g16.png", g16)
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert (load_image(tmp_path / "g16.png", 32) == round(40000 * 255 / 65535)).all()  # 156, not clipped 255
    rgb16 = np.zeros((32, 32, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 0x80FF, 257
    write_png16(tmp_path / "rgb16.png", rgb16)
    assert (load_image(tmp_path / "rgb16.png", 32) == [255, 128, 1]).all()


def test_too_small_and_crop(tmp_path):
    Image.fromarray(np.zeros((15, 40, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ImageLoadError, match="at least 16x16"):
        load_image(tmp_path / "small.png", 64)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png", 64).shape == (64, 64, 3)  # one patch is enough (upscaled)
    # center crop with floor offsets: 31 wide x 20 high -> columns 5..24
    cols = np.tile(np.arange(31, dtype=np.uint8)[None, :, None] * 8, (20, 1, 3))
    cropped = center_crop_resize(Image.fromarray(cols), 20)
    assert np.asarray(cropped)[0, 0, 0] == 5 * 8 and np.asarray(cropped)[0, -1, 0] == 24 * 8
    with pytest.raises(ValueError, match="multiple of 16"):
        load_image(tmp_path / "ok.png", 40)
    x = to_model_range(np.array([0, 255, 128], np.uint8))
    np.testing.assert_allclose(x, [-1.0, 1.0, 128 / 255 * 2 - 1], atol=1e-7)


# -------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_and_convert(tmp_path_factory.mktemp("kontext"))[1]


def _run(model, image, out, instruction="make the sky red", extra=()):
    return edit_main(["--model", str(model), "--image", str(image), "--instruction", instruction, "--out", str(out),
                      "--steps", "2", "--resolution", str(RESOLUTION), "--t5-length", str(T5_LENGTH),
                      "--no-progress", *extra])


@pytest.mark.parametrize("case,expect", [
    ("missing", "image file not found"),
    ("unreadable", "cannot read image"),
    ("tiny", "at least 16x16"),
    ("empty_instruction", "instruction is empty"),
    ("bad_out_ext", "output format"),
])
def test_cli_refusals(tmp_path, capsys, case, expect):
    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    model = tmp_path / "no_model_needed"  # refused before the model is looked at, except where noted
    model.mkdir()
    out = tmp_path / "out.png"
    instruction = "make the sky red"
    if case == "missing":
        img = tmp_path / "missing.png"
    elif case == "unreadable":
        img.write_bytes(b"garbage")
    elif case == "tiny":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    elif case == "empty_instruction":
        instruction = "   "
    elif case == "bad_out_ext":
        out = tmp_path / "out.weird"
    rc = _run(model, img, out, instruction)
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and err.startswith("error:")
    assert not out.exists()


def test_cli_edits_rgba_and_16bit(tmp_path, model_dir, monkeypatch):
    from edit_r1_jax import compile_cache

    asked = []  # the flag reaches the cache set-up (tests/test_compile_cache.py checks the set-up itself)
    monkeypatch.setattr(compile_cache, "use", lambda setting, flag: asked.append((setting, flag)))
    rgba = np.zeros((40, 30, 4), np.uint8)
    rgba[..., 1] = 180
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    write_png16(tmp_path / "g16.png", np.full((24, 24, 1), 30000, np.uint16))
    outs = []
    for name, seed in (("rgba.png", 0), ("g16.png", 1)):  # each run compiles anew: keep it to two
        out = tmp_path / "out" / f"seed{seed}_{name}"
        assert _run(model_dir, tmp_path / name, out, extra=("--seed", str(seed), "--compile-cache-dir",
                                                            str(tmp_path / f"xla{seed}"))) == 0
        img = Image.open(out)
        assert img.size == (RESOLUTION, RESOLUTION) and img.mode == "RGB"
        outs.append(np.asarray(img))
    assert not np.array_equal(outs[0], outs[1])
    assert outs[0].std() > 1.0  # not a constant image
    assert asked == [(str(tmp_path / f"xla{s}"), "--compile-cache-dir") for s in (0, 1)]


def test_cli_bad_model_dir(tmp_path, capsys):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "in.png")
    (tmp_path / "empty").mkdir()
    rc = _run(tmp_path / "empty", tmp_path / "in.png", tmp_path / "o.png")
    err = capsys.readouterr().err
    # one line naming the folder and how to make one of either family
    assert rc == 2 and "not a converted editor folder" in err and str(tmp_path / "empty") in err, err
    assert "convert_weights kontext" in err and "convert_weights qwen-image-edit" in err, err
    # a Kontext folder with its VAE missing: the family's own check names the component
    import shutil

    shutil.copytree(tmp_path / "empty", tmp_path / "half")
    (tmp_path / "half" / "transformer").mkdir()
    (tmp_path / "half" / "transformer" / "config.json").write_text('{"num_single_layers": 1}')
    (tmp_path / "half" / "transformer" / "params.safetensors").write_bytes(b"")
    rc = _run(tmp_path / "half", tmp_path / "in.png", tmp_path / "o.png")
    err = capsys.readouterr().err
    assert rc == 2 and "vae" in err and "converted Kontext directory" in err, err
