"""Toy editing task: generation, instruction embedding, verifier sanity."""

import grain
import numpy as np
import pytest

from edit_r1_jax.data import toy
from edit_r1_jax.rewards import verifiers


@pytest.fixture(scope="module")
def batch():
    return toy.make_batch([toy.make_row(i, seed=0, resolution=16) for i in range(300)])


def test_rows_deterministic_and_well_formed(batch):
    a, b = toy.make_row(17, seed=3), toy.make_row(17, seed=3)
    np.testing.assert_array_equal(a["source"], b["source"])
    assert a["prompt"] == b["prompt"] and a["spec"] == b["spec"]
    assert toy.make_row(17, seed=4)["prompt"] != a["prompt"] or not np.array_equal(
        toy.make_row(17, seed=4)["source"], a["source"])
    assert batch["source"].shape == (300, 16, 16, 3) and batch["source"].dtype == np.float32
    assert batch["source"].min() >= -1 and batch["source"].max() <= 1
    ops = {s.op for s in batch["spec"]}
    assert ops == {"recolor", "remove", "move"}
    # every row has a real edit
    assert np.all(np.abs(batch["source"] - batch["target"]).reshape(300, -1).max(axis=1) > 0.5)
    for spec, prompt in zip(batch["spec"], batch["prompt"]):
        assert spec.shape in prompt
        if spec.op == "recolor":
            assert prompt == f"make the {spec.colour} {spec.shape} {spec.new_colour}"


def test_remove_and_recolor_semantics():
    for i in range(40):
        row = toy.make_row(i, seed=1)
        s, t, spec = row["source"], row["target"], row["spec"]
        changed = np.any(s != t, axis=-1)
        if spec.op == "remove":
            assert np.all(t[changed] == np.float32(toy.BACKGROUND))
            assert np.all(s[changed] == np.float32(toy.COLOURS[spec.colour]))
        elif spec.op == "recolor":
            assert np.all(t[changed] == np.float32(toy.COLOURS[spec.new_colour]))


def test_encode_instruction_roles():
    tok, pooled = toy.encode_instruction("make the red circle blue", max_len=8, dim=32)
    tok2, pooled2 = toy.encode_instruction("make the blue circle red", max_len=8, dim=32)
    assert tok.shape == (8, 32) and pooled.shape == (32,)
    assert not np.array_equal(pooled, pooled2)  # order of colours is encoded by role, not position
    assert tok[4:].sum() == 0 and tok[:4, toy.VOCAB_DIM - 1].sum() == 4
    t3, p3 = toy.encode_instruction("move the triangle to the left")
    assert p3.sum() == 2 * 3  # move, triangle, left (+ is-token each)
    with pytest.raises(ValueError, match="unknown word"):
        toy.encode_instruction("make the red circle purple")


def test_toy_source_with_grain():
    ds = grain.MapDataset.source(toy.ToySource(10, seed=2)).map(lambda r: r["tokens"].shape)
    assert ds[3] == (8, 32) and len(ds) == 10


def test_verifier_sanity(batch):
    s, t = batch["source"], batch["target"]
    score = verifiers.toy_edit_score
    np.testing.assert_allclose(score(t, s, t), 1.0)  # ground truth
    assert score(s, s, t).max() == 0.0  # no edit
    rng = np.random.default_rng(0)
    assert score(rng.uniform(-1, 1, s.shape), s, t).mean() < 0.03  # noise
    assert score(np.zeros_like(s), s, t).mean() < 0.3  # blank canvas does not pay
    noisy = [score(t + sd * rng.standard_normal(t.shape), s, t).mean() for sd in (0.05, 0.2, 0.4)]
    assert 1.0 > noisy[0] > noisy[1] > noisy[2] > 0.05  # graded, so RL has signal
    u8 = np.rint((t + 1) * 127.5).astype(np.uint8)
    np.testing.assert_allclose(score(u8, s, t), 1.0, atol=2e-2)  # uint8 grey is 128 -> 0.004 off
    assert np.isnan(score(np.full_like(s, np.nan), s, t)).all()
