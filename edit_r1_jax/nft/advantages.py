"""Per-group advantages, the optimality probability r, low-variance group filtering and reward statistics.

Runs once per epoch on host (NumPy float64) over the gathered rewards of the whole epoch (spec B.2, B.3, C, E.2).
Groups are integer ids per sample (the dataset row id, spec H.2), never instruction text.

Filter rule (spec C, H.3), chosen by ``filter_rule``:

* ``"paper"`` (default): a group is *filtered* iff ``std_g < std_thres`` **and** ``mu_g > mean_thres`` (the
  paper's "filter high-mean, low-variance groups": the policy already solves these prompts reliably, so they
  carry no signal). The training mask drops exactly the filtered groups, and the ban set adds exactly them.
  Mask and ban agree.
* ``"reference"``: the PyTorch reference's asymmetric behaviour: the mask keeps a group iff
  ``std_g > std_thres`` **and** ``mu_g < mean_thres`` (so it drops low-variance *or* high-mean groups), while the
  ban adds groups with ``std_g < std_thres`` **and** ``mu_g > mean_thres``.

With ``enabled=False`` (the reference's ``ban_prompt=False``) the mask is all ones and the ban set is empty.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["ADV_MODES", "FILTER_RULES", "AdvantageResult", "FilterResult", "compute_advantages",
           "shape_advantages", "optimality_probability", "filter_groups", "reward_stats"]

ADV_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")
FILTER_RULES = ("paper", "reference")
STD_EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class AdvantageResult:
    advantages: np.ndarray   # [n] raw (R - mu_g) / std, float64 (0 for invalid samples)
    shaped: np.ndarray       # [n] clipped to +-A_max and adv_mode applied
    r: np.ndarray            # [n] optimality probability in [0, 1]
    group_mean: np.ndarray   # [n] mu_g of each sample's group
    group_std: np.ndarray    # [n] population std of each sample's group
    valid: np.ndarray        # [n] bool, samples whose reward exists (see ``valid`` argument)


@dataclasses.dataclass(frozen=True)
class FilterResult:
    mask: np.ndarray         # [n] float64 in {0, 1}: training validity m_i
    ban_ids: np.ndarray      # sorted unique group ids to ban from future sampling
    filtered_groups: int     # number of groups whose samples got mask 0


def _group_index(group_ids):
    group_ids = np.asarray(group_ids)
    if group_ids.ndim != 1:
        raise ValueError(f"group_ids must be 1-D, got shape {group_ids.shape}")
    if not np.issubdtype(group_ids.dtype, np.integer):
        raise TypeError(f"group_ids must be integers (dataset row ids), got {group_ids.dtype}")
    uniq, inv = np.unique(group_ids, return_inverse=True)
    return uniq, inv


def _group_stats(rewards, inv, num_groups, valid):
    w = valid.astype(np.float64)
    cnt = np.bincount(inv, weights=w, minlength=num_groups)
    safe = np.maximum(cnt, 1.0)
    mean = np.bincount(inv, weights=rewards * w, minlength=num_groups) / safe
    var = np.bincount(inv, weights=((rewards - mean[inv]) ** 2) * w, minlength=num_groups) / safe
    return mean, np.sqrt(var), cnt


def shape_advantages(adv, adv_clip_max: float, adv_mode: str = "all"):
    """Clip to ``[-A_max, A_max]`` then apply ``adv_mode`` (spec B.3)."""
    if adv_mode not in ADV_MODES:
        raise ValueError(f"adv_mode must be one of {ADV_MODES}, got {adv_mode!r}")
    a = np.clip(np.asarray(adv, np.float64), -adv_clip_max, adv_clip_max)
    if adv_mode == "positive_only":
        a = np.clip(a, 0.0, adv_clip_max)
    elif adv_mode == "negative_only":
        a = np.clip(a, -adv_clip_max, 0.0)
    elif adv_mode == "one_only":
        a = (a > 0).astype(np.float64)
    elif adv_mode == "binary":
        a = np.sign(a)
    return a


def optimality_probability(shaped_adv, adv_clip_max: float):
    """``r = clip(A / (2 A_max) + 0.5, 0, 1)``."""
    return np.clip(np.asarray(shaped_adv, np.float64) / (2.0 * adv_clip_max) + 0.5, 0.0, 1.0)


def compute_advantages(rewards, group_ids, *, global_std: bool = True, adv_clip_max: float = 5.0,
                       adv_mode: str = "all", valid=None) -> AdvantageResult:
    """Group-normalised advantages ``A_i = (R_i - mu_g) / (std + 1e-4)`` (spec B.2).

    ``std`` is the population std (ddof 0) of all valid rewards of the epoch (``global_std=True``) or of the
    sample's group. ``valid`` (bool [n], default all) excludes samples whose reward could not be computed
    (registry ``on_error="mask"``): they do not enter any statistic, get A = 0, r = 0.5, and should also get
    training mask 0 (``filter_groups`` does that when given the same ``valid``).
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [n], got shape {rewards.shape}")
    uniq, inv = _group_index(group_ids)
    if len(inv) != len(rewards):
        raise ValueError(f"{len(rewards)} rewards but {len(inv)} group ids")
    valid = np.ones(len(rewards), bool) if valid is None else np.asarray(valid, bool)
    if not np.all(np.isfinite(rewards[valid])):
        bad = np.flatnonzero(valid & ~np.isfinite(rewards))
        raise ValueError(f"non-finite rewards at sample indices {bad.tolist()[:10]}")
    r_clean = np.where(valid, rewards, 0.0)
    mean, std, _ = _group_stats(r_clean, inv, len(uniq), valid)
    if global_std:
        denom = (np.std(r_clean[valid]) if valid.any() else 0.0) + STD_EPS
    else:
        denom = std[inv] + STD_EPS
    adv = np.where(valid, (r_clean - mean[inv]) / denom, 0.0)
    shaped = np.where(valid, shape_advantages(adv, adv_clip_max, adv_mode), 0.0)
    r = np.where(valid, optimality_probability(shaped, adv_clip_max), 0.5)
    return AdvantageResult(adv, shaped, r, mean[inv], std[inv], valid)


def filter_groups(group_ids, group_mean, group_std, *, std_thres: float = 0.05, mean_thres: float = 0.9,
                  rule: str = "paper", enabled: bool = True, valid=None) -> FilterResult:
    """Training mask and ban set from per-sample group stats (spec C; rules in the module docstring).

    ``group_mean``/``group_std`` are per sample (as returned by :func:`compute_advantages`). Samples with
    ``valid == False`` always get mask 0 (even when ``enabled`` is False).
    """
    if rule not in FILTER_RULES:
        raise ValueError(f"filter_rule must be one of {FILTER_RULES}, got {rule!r}")
    group_ids = np.asarray(group_ids)
    mu, sd = np.asarray(group_mean, np.float64), np.asarray(group_std, np.float64)
    valid = np.ones(len(group_ids), bool) if valid is None else np.asarray(valid, bool)
    ban_cond = (sd < std_thres) & (mu > mean_thres)
    if not enabled:
        keep = np.ones(len(group_ids), bool)
        ban_ids = np.zeros((0,), group_ids.dtype)
    else:
        keep = ~ban_cond if rule == "paper" else (sd > std_thres) & (mu < mean_thres)
        ban_ids = np.unique(group_ids[ban_cond])
    filtered = len(np.unique(group_ids[~keep]))
    mask = (keep & valid).astype(np.float64)
    return FilterResult(mask, ban_ids, filtered)


def reward_stats(rewards, group_ids, valid=None, percents=(100, 75, 50, 25, 10)) -> dict:
    """Epoch reward statistics (spec E.2): ``zero_std_ratio`` (fraction of groups whose std is exactly 0),
    ``reward_std_mean`` (mean over groups of the group std), ``group_size`` (mean), ``num_groups`` and
    ``mean_reward_{p}``: for each group, the mean of its rewards >= its (100 - p)-th percentile, averaged over
    groups."""
    rewards = np.asarray(rewards, np.float64)
    group_ids = np.asarray(group_ids)
    valid = np.ones(len(rewards), bool) if valid is None else np.asarray(valid, bool)
    rewards, group_ids = rewards[valid], group_ids[valid]
    out = {}
    groups = [rewards[group_ids == g] for g in np.unique(group_ids)]
    if not groups:
        return {"num_groups": 0}
    stds = np.array([g.std() for g in groups])
    out["num_groups"] = len(groups)
    out["group_size"] = float(np.mean([len(g) for g in groups]))
    out["zero_std_ratio"] = float(np.mean(stds == 0.0))
    out["reward_std_mean"] = float(stds.mean())
    for p in percents:
        tops = [g[g >= np.percentile(g, 100 - p)].mean() for g in groups]
        out[f"mean_reward_{p}"] = float(np.mean(tops))
    return out
