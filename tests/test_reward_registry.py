"""Reward registry: weighted combination and loud failures."""

import numpy as np
import pytest

from edit_r1_jax.rewards import registry


def _reg():
    reg = registry.Registry()
    reg.register("a", lambda b: np.asarray(b["x"], float))
    reg.register("b", lambda b: 2 * np.asarray(b["x"], float))

    @reg.register("nan_at_2")
    def _(b):
        out = np.asarray(b["x"], float).copy()
        out[np.asarray(b["idx"]) == 2] = np.nan
        return out

    @reg.register("raises_at_1")
    def _(b):
        if 1 in list(b["idx"]):
            raise RuntimeError("server error")
        return np.asarray(b["x"], float)

    return reg


BATCH = {"x": np.array([0.1, 0.2, 0.3, 0.4]), "idx": np.arange(4), "prompt": ["p0", "p1", "p2", "p3"]}


def test_weighted_sum():
    total, info = _reg().combine({"a": 1.0, "b": 0.5})(BATCH)
    np.testing.assert_allclose(total, 2 * BATCH["x"])
    np.testing.assert_allclose(info["b"], 2 * BATCH["x"])
    assert info["num_masked"] == 0 and info["valid"].all()


def test_nan_names_sample():
    with pytest.raises(registry.RewardError, match="'nan_at_2' returned nan for sample 2"):
        _reg().combine({"a": 1.0, "nan_at_2": 1.0})(BATCH)


def test_raise_names_sample():
    with pytest.raises(registry.RewardError, match="'raises_at_1' failed on sample 1: RuntimeError: server error"):
        _reg().combine({"raises_at_1": 1.0})(BATCH)


def test_mask_mode():
    total, info = _reg().combine({"nan_at_2": 1.0, "raises_at_1": 1.0}, on_error="mask")(BATCH)
    assert info["num_masked"] == 2
    np.testing.assert_array_equal(info["valid"], [True, False, False, True])
    assert np.isnan(total[1]) and np.isnan(total[2])
    np.testing.assert_allclose(total[[0, 3]], 2 * BATCH["x"][[0, 3]])


def test_registry_errors():
    reg = _reg()
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", lambda b: b)
    with pytest.raises(KeyError, match="unknown reward 'zzz'"):
        reg.combine({"zzz": 1.0})
    assert "toy_edit" in registry.default_registry.names()


def test_reward_error_is_not_rerun_per_sample():
    """A RewardError names its samples: "raise" re-raises it after one call; "mask" masks its indices with its
    scores after one call; only an error without indices is retried sample by sample (1 + n calls)."""
    calls = []

    def knows(b):
        calls.append(len(b["x"]))
        x = np.asarray(b["x"], float)
        raise registry.RewardError("samples [1]: non-finite logits", indices=[1], scores=x)

    def unsure(b):
        calls.append(len(b["x"]))
        if len(b["x"]) > 1 or list(b["idx"]) == [2]:
            raise registry.RewardError("something failed somewhere")
        return np.asarray(b["x"], float)

    reg = registry.Registry()
    reg.register("knows", knows)
    reg.register("unsure", unsure)
    with pytest.raises(registry.RewardError, match="samples \\[1\\]"):
        reg.combine({"knows": 1.0})(BATCH)
    assert calls == [4]
    calls.clear()
    total, info = reg.combine({"knows": 1.0}, on_error="mask")(BATCH)
    assert calls == [4]
    np.testing.assert_array_equal(info["valid"], [True, False, True, True])
    np.testing.assert_allclose(total[[0, 2, 3]], BATCH["x"][[0, 2, 3]])
    calls.clear()
    with pytest.raises(registry.RewardError, match="something failed"):
        reg.combine({"unsure": 1.0})(BATCH)
    assert calls == [4]
    calls.clear()
    total, info = reg.combine({"unsure": 1.0}, on_error="mask")(BATCH)
    assert calls == [4, 1, 1, 1, 1]
    np.testing.assert_array_equal(info["valid"], [True, True, False, True])
