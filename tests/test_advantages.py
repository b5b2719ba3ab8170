"""Advantages, r, group filter and reward statistics on hand-crafted groups."""

import numpy as np
import pytest

from edit_r1_jax.nft import advantages as adv_lib


def test_global_std_advantages_and_r():
    rewards = np.array([0.0, 1.0, 0.5, 0.5, 0.2, 0.4])
    groups = np.array([7, 7, 3, 3, 9, 9])
    res = adv_lib.compute_advantages(rewards, groups, global_std=True, adv_clip_max=5.0)
    mu = np.array([0.5, 0.5, 0.5, 0.5, 0.3, 0.3])
    sd = rewards.std() + 1e-4  # population std of the whole epoch
    np.testing.assert_allclose(res.advantages, (rewards - mu) / sd, rtol=1e-12)
    np.testing.assert_allclose(res.group_mean, mu)
    np.testing.assert_allclose(res.group_std, [0.5, 0.5, 0, 0, 0.1, 0.1], atol=1e-12)
    np.testing.assert_allclose(res.r, np.clip(np.clip(res.advantages, -5, 5) / 10 + 0.5, 0, 1))


def test_per_group_std_and_clip():
    rewards = np.array([0.0, 1.0, 0.50, 0.5001])
    groups = np.array([1, 1, 2, 2])
    res = adv_lib.compute_advantages(rewards, groups, global_std=False, adv_clip_max=5.0)
    np.testing.assert_allclose(res.advantages[:2], [-0.5 / 0.5001, 0.5 / 0.5001])
    # group 2: std 5e-5 + 1e-4 -> |A| = 5e-5 / 1.5e-4 = 1/3
    np.testing.assert_allclose(res.advantages[2:], [-1 / 3, 1 / 3], rtol=1e-6)
    big = adv_lib.compute_advantages(np.array([0.0, 0.0, 0.0, 1.0]), np.array([1, 1, 1, 1]), global_std=False,
                                     adv_clip_max=1.0)
    assert big.advantages[3] > 1.0 and big.shaped[3] == 1.0 and big.r[3] == 1.0


@pytest.mark.parametrize("mode,expected", [
    ("all", [-5, -1, 0, 2, 5]), ("positive_only", [0, 0, 0, 2, 5]), ("negative_only", [-5, -1, 0, 0, 0]),
    ("one_only", [0, 0, 0, 1, 1]), ("binary", [-1, -1, 0, 1, 1])])
def test_adv_modes(mode, expected):
    np.testing.assert_allclose(adv_lib.shape_advantages(np.array([-7, -1, 0, 2, 9.0]), 5.0, mode), expected)


def test_group_ids_must_be_integers():
    with pytest.raises(TypeError, match="integers"):
        adv_lib.compute_advantages([0.1, 0.2], np.array(["a", "b"]))


def test_invalid_samples_excluded():
    rewards = np.array([0.0, 1.0, np.nan, 0.5])
    res = adv_lib.compute_advantages(rewards, np.array([1, 1, 1, 2]), valid=np.array([1, 1, 0, 1], bool))
    assert res.advantages[2] == 0 and res.r[2] == 0.5
    np.testing.assert_allclose(res.group_mean[:2], 0.5)
    np.testing.assert_allclose(res.advantages[0], -0.5 / (np.std([0.0, 1.0, 0.5]) + 1e-4))
    with pytest.raises(ValueError, match="non-finite rewards at sample indices \\[2\\]"):
        adv_lib.compute_advantages(rewards, np.array([1, 1, 1, 2]))


def _crafted():
    # group 10: high mean, low var -> filtered by both rules; group 11: low mean, low var; group 12: high mean,
    # high var; group 13: normal.
    groups = np.repeat([10, 11, 12, 13], 3)
    rewards = np.array([0.95, 0.95, 0.96, 0.2, 0.2, 0.21, 0.8, 1.0, 1.0, 0.1, 0.5, 0.9])
    res = adv_lib.compute_advantages(rewards, groups)
    return groups, res


def test_filter_paper_rule():
    groups, res = _crafted()
    f = adv_lib.filter_groups(groups, res.group_mean, res.group_std, rule="paper")
    np.testing.assert_array_equal(f.mask, np.repeat([0, 1, 1, 1], 3))
    np.testing.assert_array_equal(f.ban_ids, [10])
    assert f.filtered_groups == 1


def test_filter_reference_rule():
    groups, res = _crafted()
    f = adv_lib.filter_groups(groups, res.group_mean, res.group_std, rule="reference")
    # mask drops low-variance OR high-mean groups (10, 11, 12); ban adds only low-var AND high-mean (10)
    np.testing.assert_array_equal(f.mask, np.repeat([0, 0, 0, 1], 3))
    np.testing.assert_array_equal(f.ban_ids, [10])
    assert f.filtered_groups == 3


def test_filter_disabled():
    groups, res = _crafted()
    f = adv_lib.filter_groups(groups, res.group_mean, res.group_std, enabled=False,
                              valid=np.arange(12) != 4)
    np.testing.assert_array_equal(f.mask, (np.arange(12) != 4).astype(float))
    assert len(f.ban_ids) == 0


def test_reward_stats():
    groups = np.repeat([1, 2], 4)
    rewards = np.array([0.5, 0.5, 0.5, 0.5, 0.0, 0.25, 0.5, 1.0])
    st = adv_lib.reward_stats(rewards, groups)
    assert st["zero_std_ratio"] == 0.5 and st["group_size"] == 4
    np.testing.assert_allclose(st["reward_std_mean"], (0 + np.std([0, 0.25, 0.5, 1.0])) / 2)
    np.testing.assert_allclose(st["mean_reward_100"], (0.5 + 0.4375) / 2)
    # group 2 top 25%: >= 75th percentile (0.625) -> {1.0}
    np.testing.assert_allclose(st["mean_reward_25"], (0.5 + 1.0) / 2)
    np.testing.assert_allclose(st["mean_reward_50"], (0.5 + 0.75) / 2)
