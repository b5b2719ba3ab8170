"""DiffusionNFT loss (spec B.4, B.5) with a global normaliser (spec H.4).

Two levels:

* :func:`nft_terms` -- one micro-batch at one timestep column, **un-normalised sums**:
  ``policy_sum = A_max * sum_i P_i`` with ``P_i = m_i (r_i L+_i + (1 - r_i) L-_i) / b`` and
  ``kl_sum = sum_i m_i mean((v_i - v_ref_i)^2)``. The caller divides by ``count`` = number of valid
  (sample, timestep) pairs of the **whole optimizer step, all devices** (``T_train * sum(mask)`` over the global
  batch)::

      loss = (sum over all (micro-batch, column) of policy_sum + kl_weight * kl_sum) / count

  With one micro-batch and one column this is exactly the reference's per-micro-batch masked mean; with many it
  gives every valid pair the same weight (the reference instead divides per micro-batch by its own valid count
  and then by the fixed accumulation count 20).
* :func:`nft_step_loss` / :func:`nft_step_value_and_grad` -- a whole optimizer step: per-sample training
  timesteps, fresh noise per (sample, timestep slot), the three forwards (theta_old and reference under
  ``stop_gradient``, theta with gradient), accumulated with ``lax.scan`` over micro-batches (outer) and timestep
  slots (inner) so only one micro-batch is live at a time.

Precision: everything here is float32 (the reference computes the adaptive weights and r in float64). Random
draws are keyed by the *global* sample index, so results do not depend on the device count or on how samples
are grouped into micro-batches. Because the normaliser is global, the reference's random permutation of samples
into micro-batches has no effect on the loss and is not done.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["NFTConfig", "nft_terms", "num_train_timesteps", "train_timesteps", "train_noise",
           "nft_step_loss", "nft_step_value_and_grad"]

TIMESTEP_MODES = ("grid", "uniform")


@dataclasses.dataclass(frozen=True)
class NFTConfig:
    nft_beta: float = 1.0          # reference config.beta: NFT interpolation strength b (also divides the loss)
    kl_weight: float = 1e-4        # reference train.beta
    adv_clip_max: float = 5.0      # A_max
    timestep_mode: str = "grid"    # "grid": permutation of the rollout grid sigmas[:N]; "uniform": t ~ U(0, 1)
    timestep_fraction: float = 0.99  # T_train = int(N * fraction) (N = rollout steps)
    num_train_timesteps: int | None = None  # overrides T_train when set
    num_micro_batches: int = 1     # samples per step are split into this many micro-batches

    def __post_init__(self):
        if self.timestep_mode not in TIMESTEP_MODES:
            raise ValueError(f"timestep_mode must be one of {TIMESTEP_MODES}, got {self.timestep_mode!r}")
        if self.nft_beta <= 0:
            raise ValueError(f"nft_beta must be > 0, got {self.nft_beta}")
        if self.adv_clip_max <= 0:
            raise ValueError(f"adv_clip_max must be > 0, got {self.adv_clip_max}")
        if self.num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be >= 1, got {self.num_micro_batches}")


def _bcast(x, like):
    return jnp.reshape(x, x.shape + (1,) * (like.ndim - x.ndim))


def _mean_rest(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def nft_terms(v, v_old, v_ref, x_t, x0, t, r, mask, *, nft_beta: float, kl_weight: float, adv_clip_max: float):
    """Un-normalised NFT sums for one micro-batch and one timestep column (spec B.5).

    Args:
      v: theta velocity ``[B, ...]`` (gradients flow through it only).
      v_old, v_ref: theta_old and reference velocities (stop-gradient applied here too).
      x_t: noised input ``(1 - t) x0 + t eps``; x0: clean latent; t, r, mask: ``[B]``.

    Returns:
      ``(policy_sum, kl_sum, metrics)``: ``policy_sum = A_max * sum_i P_i``, ``kl_sum = sum_i K_i``, and metrics
      (all sums/maxima over this micro-batch): ``loss_sum = policy_sum + kl_weight * kl_sum``, ``count``
      (sum of mask), ``num_pairs`` (B), ``unweighted_policy_sum`` (sum_i P_i), and unmasked
      ``old_kl_sum`` / ``old_deviate_sum`` / ``x0_norm_sum`` (sums over samples of per-sample means of
      ``(v_old - v_ref)^2``, ``(v - v_old)^2``, ``x0^2``) with ``old_deviate_max`` / ``x0_norm_max``.
    """
    f32 = jnp.float32
    v, x_t, x0 = v.astype(f32), x_t.astype(f32), x0.astype(f32)
    v_old = jax.lax.stop_gradient(v_old).astype(f32)
    v_ref = jax.lax.stop_gradient(v_ref).astype(f32)
    t, r, mask = t.astype(f32), r.astype(f32), mask.astype(f32)
    b = nft_beta
    tb = _bcast(t, x0)
    v_pos = b * v + (1.0 - b) * v_old
    v_neg = (1.0 + b) * v_old - b * v
    x0_pos = x_t - tb * v_pos
    x0_neg = x_t - tb * v_neg
    w_pos = jax.lax.stop_gradient(jnp.maximum(_mean_rest(jnp.abs(x0_pos - x0)), 1e-5))
    w_neg = jax.lax.stop_gradient(jnp.maximum(_mean_rest(jnp.abs(x0_neg - x0)), 1e-5))
    l_pos = _mean_rest((x0_pos - x0) ** 2) / w_pos
    l_neg = _mean_rest((x0_neg - x0) ** 2) / w_neg
    p = mask * (r * l_pos + (1.0 - r) * l_neg) / b
    policy_sum = adv_clip_max * jnp.sum(p)
    kl_sum = jnp.sum(mask * _mean_rest((v - v_ref) ** 2))
    dev = jax.lax.stop_gradient((v - v_old) ** 2)
    metrics = {
        "loss_sum": policy_sum + kl_weight * kl_sum,
        "count": jnp.sum(mask),
        "num_pairs": jnp.asarray(v.shape[0], f32),
        "unweighted_policy_sum": jax.lax.stop_gradient(jnp.sum(p)),
        "old_kl_sum": jnp.sum(_mean_rest((v_old - v_ref) ** 2)),
        "old_deviate_sum": jnp.sum(_mean_rest(dev)),
        "old_deviate_max": jnp.max(dev),
        "x0_norm_sum": jnp.sum(_mean_rest(x0 ** 2)),
        "x0_norm_max": jnp.max(x0 ** 2),
    }
    return policy_sum, kl_sum, metrics


def num_train_timesteps(num_steps: int, cfg: NFTConfig) -> int:
    """``T_train``: ``cfg.num_train_timesteps`` or ``int(num_steps * timestep_fraction)`` (spec B.4)."""
    n = cfg.num_train_timesteps if cfg.num_train_timesteps is not None else int(num_steps * cfg.timestep_fraction)
    if n < 1 or (cfg.timestep_mode == "grid" and n > num_steps):
        raise ValueError(f"T_train = {n} is invalid for {num_steps} rollout steps in mode {cfg.timestep_mode!r} "
                         "(check timestep_fraction / num_train_timesteps)")
    return n


def _sample_key(key, index, stream):
    return jax.random.fold_in(jax.random.fold_in(key, index), stream)


def train_timesteps(key, global_indices, sigmas, cfg: NFTConfig):
    """``[n, T_train]`` float32 training timesteps (spec B.4).

    "grid": per sample an independent random permutation of the rollout grid ``sigmas[:N]`` (``sigmas`` is the
    ``[N+1]`` schedule ending in 0), truncated to T_train. "uniform": ``t ~ U(0, 1)`` per (sample, slot).
    Sample b depends only on ``(key, global_indices[b])``.
    """
    grid = jnp.asarray(sigmas, jnp.float32)[:-1]
    n_steps = grid.shape[0]
    n_train = num_train_timesteps(n_steps, cfg)
    idx = jnp.asarray(global_indices, jnp.uint32)

    def one(i):
        k = _sample_key(key, i, 0)
        if cfg.timestep_mode == "grid":
            return grid[jax.random.permutation(k, n_steps)[:n_train]]
        return jax.random.uniform(k, (n_train,), jnp.float32)

    return jax.vmap(one)(idx)


def train_noise(key, global_indices, slot, shape):
    """Fresh ``eps ~ N(0, I)`` ``[n, *shape]`` for timestep slot ``slot`` (keyed by global sample index)."""
    idx = jnp.asarray(global_indices, jnp.uint32)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(_sample_key(key, i, 1), slot), tuple(shape),
                                                jnp.float32))(idx)


def _to_micro(x, num_micro):
    """``[n, ...] -> [num_micro, n / num_micro, ...]``; micro-batch k holds samples k, k + num_micro, ...

    (Strided, so a batch sharded contiguously over devices stays sharded the same way inside each micro-batch.)
    """
    n = x.shape[0]
    return jnp.swapaxes(x.reshape((n // num_micro, num_micro) + x.shape[1:]), 0, 1)


_SUM_KEYS = ("loss_sum", "count", "num_pairs", "unweighted_policy_sum", "old_kl_sum", "old_deviate_sum",
             "x0_norm_sum")
_MAX_KEYS = ("old_deviate_max", "x0_norm_max")


def _prepare(batch, key, sigmas, cfg):
    x0 = batch["x0"]
    n = x0.shape[0]
    if n % cfg.num_micro_batches:
        raise ValueError(f"{n} samples per step are not divisible into {cfg.num_micro_batches} micro-batches")
    index = jnp.asarray(batch["index"])
    t_all = train_timesteps(key, index, sigmas, cfg)  # [n, T]
    n_train = t_all.shape[1]
    micro = {"x0": x0, "r": jnp.asarray(batch["r"], jnp.float32), "mask": jnp.asarray(batch["mask"], jnp.float32),
             "index": index, "t": t_all, "cond": batch.get("cond")}
    micro = jax.tree.map(lambda a: _to_micro(a, cfg.num_micro_batches), micro)
    count = n_train * jnp.sum(jnp.asarray(batch["mask"], jnp.float32))
    return micro, n_train, count


def _init_acc():
    acc = {k: jnp.zeros((), jnp.float32) for k in _SUM_KEYS + ("policy_sum", "kl_sum")}
    acc.update({k: jnp.full((), -jnp.inf, jnp.float32) for k in _MAX_KEYS})
    return acc


def _accumulate(acc, policy_sum, kl_sum, m):
    out = dict(acc)
    out["policy_sum"] = acc["policy_sum"] + jax.lax.stop_gradient(policy_sum)
    out["kl_sum"] = acc["kl_sum"] + jax.lax.stop_gradient(kl_sum)
    for k in _SUM_KEYS:
        out[k] = acc[k] + jax.lax.stop_gradient(m[k])
    for k in _MAX_KEYS:
        out[k] = jnp.maximum(acc[k], m[k])
    return out


def _finalise(acc, norm, cfg):
    pairs = jnp.maximum(acc["num_pairs"], 1.0)
    policy = acc["policy_sum"] / norm
    kl = acc["kl_sum"] / norm
    return {
        "total_loss": policy + cfg.kl_weight * kl,
        "policy_loss": policy,
        "unweighted_policy_loss": policy / cfg.adv_clip_max,
        "kl_div_loss": kl,
        "kl_div": kl,
        "old_kl_div": acc["old_kl_sum"] / pairs,
        "old_deviate": acc["old_deviate_sum"] / pairs,
        "old_deviate_max": acc["old_deviate_max"],
        "x0_norm": acc["x0_norm_sum"] / pairs,
        "x0_norm_max": acc["x0_norm_max"],
        "valid_pairs": acc["count"],
    }


VelocityFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


def _column(velocity_fn, params, old_params, ref_params, mb, j, key, cfg, norm):
    """Per-(micro-batch, slot) normalised loss as a function of ``params``; v_old/v_ref computed outside."""
    t = mb["t"][:, j]
    x0 = mb["x0"].astype(jnp.float32)
    eps = train_noise(key, mb["index"], j, x0.shape[1:])
    tb = _bcast(t, x0)
    x_t = ((1.0 - tb) * x0 + tb * eps).astype(mb["x0"].dtype)
    v_old = jax.lax.stop_gradient(velocity_fn(old_params, x_t, t, mb["cond"]))
    v_ref = jax.lax.stop_gradient(velocity_fn(ref_params, x_t, t, mb["cond"]))

    def loss_fn(p):
        v = velocity_fn(p, x_t, t, mb["cond"])
        policy_sum, kl_sum, m = nft_terms(v, v_old, v_ref, x_t, x0, t, mb["r"], mb["mask"], nft_beta=cfg.nft_beta,
                                          kl_weight=cfg.kl_weight, adv_clip_max=cfg.adv_clip_max)
        return m["loss_sum"] / norm, (policy_sum, kl_sum, m)

    return loss_fn


def _normaliser(count, normaliser):
    return jnp.maximum(count if normaliser is None else jnp.asarray(normaliser, jnp.float32), 1.0)


def nft_step_loss(velocity_fn: VelocityFn, params, old_params, ref_params, batch: dict, key, sigmas,
                  cfg: NFTConfig, normaliser=None):
    """Total NFT loss of one optimizer step, for ``jax.grad`` w.r.t. ``params`` inside jit.

    Args:
      velocity_fn: ``velocity_fn(params, x_t [mb, L, C], t [mb] float32, cond_mb) -> v [mb, L, C]``; cond_mb is
        the micro-batch slice of ``batch["cond"]`` (any pytree with leading dim n, or None).
      params / old_params / ref_params: theta (differentiated), theta_old, reference (e.g. LoRA pytrees; the
        reference may be a "LoRA off" pytree understood by ``velocity_fn``).
      batch: ``x0 [n, L, C]`` (clean rollout latents), ``r [n]``, ``mask [n]``, ``index [n]`` (global sample
        index, keys the timestep permutation and noise), optional ``cond``.
      key: step key (e.g. fold_in(base, global_step)).
      sigmas: the rollout schedule ``[N+1]`` (grid of training timesteps in "grid" mode).
      normaliser: defaults to ``T_train * sum(mask)`` of this (global) batch; pass an all-reduced count when the
        batch is only this host's share and the step is not one global jit.

    Returns:
      ``(loss, metrics)``; ``loss = sum(policy_sum + kl_weight * kl_sum) / max(normaliser, 1)``. The loop body is
      rematerialised (``jax.checkpoint``) so the backward pass keeps one micro-batch of activations at a time.
    """
    micro, n_train, count = _prepare(batch, key, sigmas, cfg)
    norm = _normaliser(count, normaliser)

    def outer(acc, mb):
        @jax.checkpoint
        def inner(carry, j):
            total, acc = carry
            loss, (policy_sum, kl_sum, m) = _column(velocity_fn, params, old_params, ref_params, mb, j, key, cfg,
                                                    norm)(params)
            return (total + loss, _accumulate(acc, policy_sum, kl_sum, m)), None

        (total, acc), _ = jax.lax.scan(inner, acc, jnp.arange(n_train))
        return (total, acc), None

    (loss, acc), _ = jax.lax.scan(outer, (jnp.zeros((), jnp.float32), _init_acc()), micro)
    return loss, _finalise(acc, norm, cfg)


def nft_step_value_and_grad(velocity_fn: VelocityFn, params, old_params, ref_params, batch: dict, key, sigmas,
                            cfg: NFTConfig, normaliser=None):
    """Same loss as :func:`nft_step_loss`, with gradients accumulated explicitly inside the scan (one forward
    and one backward per (micro-batch, slot), no rematerialisation). Returns ``((loss, metrics), grads)``;
    grads have the structure of ``params`` (float32 accumulation)."""
    micro, n_train, count = _prepare(batch, key, sigmas, cfg)
    norm = _normaliser(count, normaliser)
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

    def outer(carry, mb):
        def inner(carry, j):
            total, grads, acc = carry
            fn = _column(velocity_fn, params, old_params, ref_params, mb, j, key, cfg, norm)
            (loss, (policy_sum, kl_sum, m)), g = jax.value_and_grad(fn, has_aux=True)(params)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (total + loss, grads, _accumulate(acc, policy_sum, kl_sum, m)), None

        carry, _ = jax.lax.scan(inner, carry, jnp.arange(n_train))
        return carry, None

    (loss, grads, acc), _ = jax.lax.scan(outer, (jnp.zeros((), jnp.float32), zeros, _init_acc()), micro)
    return (loss, _finalise(acc, norm, cfg)), grads
