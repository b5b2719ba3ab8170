"""Sampling rollouts as one ``lax.scan`` over solver steps (spec A.5/A.6).

``rollout`` is meant to be called inside a function the caller jits (``solver``/``eta`` static). Noise is
keyed per *global* sample index (``jax.random.fold_in``), so the result does not depend on how many devices
or hosts share the batch (spec H.15).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from edit_r1_jax.diffusion import solvers

__all__ = ["initial_noise", "sample_keys", "rollout"]


def _is_batched_key(key) -> bool:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2  # raw uint32 keys [B, 2]


def sample_keys(key, global_indices):
    """Per-sample keys ``fold_in(key, global_index)``, shape ``[B]`` (typed) or ``[B, 2]`` (raw)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(global_indices, jnp.uint32))


def initial_noise(key, global_indices, shape, dtype=jnp.float32):
    """Standard normal noise ``[B, *shape]``; sample b depends only on ``(key, global_indices[b])``."""
    keys = sample_keys(key, global_indices)
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), jnp.float32))(keys).astype(dtype)


def rollout(velocity_fn: Callable[[Any, jax.Array, jax.Array], jax.Array], params, z0, sigmas, solver: str,
            eta: float = 0.0, key=None, return_trajectory: bool = False):
    """Integrate from ``z0`` (noise at ``sigmas[0]``) down to ``sigmas[-1]`` (= 0).

    Args:
      velocity_fn: ``velocity_fn(params, z [B, N, C], sigma [B] float32) -> v [B, N, C]``. Conditioning
        (text embeddings, reference latents) goes into ``params`` (any pytree) or a closure.
      params: pytree passed through to ``velocity_fn`` (e.g. ``(lora_old, cond)``).
      z0: initial latent ``[B, N, C]`` (e.g. from :func:`initial_noise`); its dtype is kept along the path.
      sigmas: ``[S+1]`` schedule ending in 0 (host float64 is fine: cast to float32 here). S is static.
      solver: one of ``solvers.SOLVERS`` (static).
      eta: noise scale (static Python float); must be 0 for dpm1/dpm2.
      key: needed only for stochastic solvers with eta > 0: either one key (noise keyed per step) or per-sample
        keys ``[B]`` from :func:`sample_keys` (noise of sample b at step i = ``normal(fold_in(key_b, i))``,
        independent of device count).
      return_trajectory: also return the stacked latents ``[S+1, B, N, C]`` (z_0 ... z_S).

    Returns:
      the final latent ``[B, N, C]`` (plus the trajectory when asked).
    """
    solvers.validate(solver, eta)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    num_steps = sigmas.shape[0] - 1
    noisy = solver in solvers.STOCHASTIC_SOLVERS and float(eta) != 0.0
    if noisy and key is None:
        raise ValueError(f"solver {solver!r} with eta={eta} draws noise: pass a key")
    batch = z0.shape[0]

    def body(carry, i):
        z, state = carry
        sigma = jnp.broadcast_to(sigmas[i], (batch,))
        v = velocity_fn(params, z, sigma)

        def xi_fn():
            if _is_batched_key(key):
                return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), z.shape[1:],
                                                            jnp.float32))(key)
            return jax.random.normal(jax.random.fold_in(key, i), z.shape, jnp.float32)

        z_next, state = solvers.step(solver, z, v, i, sigmas, state, xi_fn, eta)
        return (z_next, state), (z_next if return_trajectory else None)

    (z, _), traj = jax.lax.scan(body, (z0, solvers.init_state(solver, z0)), jnp.arange(num_steps))
    if return_trajectory:
        return z, jnp.concatenate([z0[None], traj], axis=0)
    return z
