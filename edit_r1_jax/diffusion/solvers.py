"""Rollout solver steps (spec A.5): flow (Flow-GRPO SDE / Euler), dance, ddim, dpm1, dpm2.

Every step maps the current latent ``z`` at noise level ``s = sigmas[i]`` and the model velocity ``v`` to the
latent at ``t = sigmas[i+1]``. Arithmetic is float32 whatever the latent dtype; the result is cast back.
Notation: ``x0_hat = z - s v``, ``eps_hat = z + (1 - s) v`` (= ``(z - (1-s) x0_hat) / s``).

``step(solver, z, v, i, sigmas, state, xi_fn, eta)`` is the single entry point used by the jitted rollout
scan: ``i`` may be a traced step index, ``sigmas`` a float32 array ``[N+1]`` ending in 0 (N is static from its
shape). Branches on the step index are ``jnp.where`` selections between finite values (no inf/NaN arithmetic:
lambda(1) = -inf and lambda(0) = +inf are never evaluated).

Log-probabilities are not computed (spec H.7: NFT does not use them).
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

__all__ = ["SOLVERS", "STOCHASTIC_SOLVERS", "flow_step", "dance_step", "ddim_step", "dpm_step", "init_state",
           "step", "validate"]

SOLVERS = ("flow", "dance", "ddim", "dpm1", "dpm2")
STOCHASTIC_SOLVERS = ("flow", "dance", "ddim")  # draw noise when eta > 0


def validate(solver: str, eta: float) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    if solver in ("dpm1", "dpm2") and float(eta) != 0.0:
        raise ValueError(f"solver {solver!r} is deterministic (DPM-Solver++); it requires eta == 0, got {eta}. "
                         "Pass eta=0 (the reference's deterministic=True).")
    if float(eta) < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def flow_step(z, v, s, t, sigma1, eta, xi=None):
    """Flow-GRPO SDE step; plain Euler ``z + (t - s) v`` when ``eta == 0`` (then ``xi`` is unused).

    ``std = eta sqrt(s / (1 - s'))`` with ``s' = sigma1`` when ``s == 1`` (avoids 1/0), else ``s``.
    """
    z, v, s, t = _f32(z), _f32(v), _f32(s), _f32(t)
    dt = t - s
    if isinstance(eta, (int, float)) and eta == 0:
        return z + dt * v
    s_den = jnp.where(s >= 1.0, _f32(sigma1), s)
    std = eta * jnp.sqrt(s / (1.0 - s_den))
    mean = z * (1.0 + std ** 2 / (2.0 * s) * dt) + v * (1.0 + std ** 2 * (1.0 - s) / (2.0 * s)) * dt
    return mean + std * jnp.sqrt(-dt) * xi


def dance_step(z, v, s, t, eta, xi=None):
    """DanceGRPO SDE step: ``score = -(z - (1-s) x0_hat) / s^2``, ``mean = z + dt v - eta^2/2 score dt``."""
    z, v, s, t = _f32(z), _f32(v), _f32(s), _f32(t)
    dt = t - s
    if isinstance(eta, (int, float)) and eta == 0:
        return z + dt * v
    x0_hat = z - s * v
    score = -(z - (1.0 - s) * x0_hat) / (s * s)
    mean = z + dt * v - 0.5 * eta ** 2 * score * dt
    std = eta * jnp.sqrt(s - t)
    return mean + std * xi


def ddim_step(z, v, s, t, eta, xi=None):
    """Stochastic DDIM in x0 parameterisation; equals Euler when ``eta == 0``.

    ``std = eta t``, ``d = sqrt(1 - t^2 (1-s)^2 / (s^2 (1-t)^2))``, ``rho = std d``,
    ``z' = (1-t) x0_hat + sqrt(t^2 - rho^2) eps_hat + rho xi``.
    """
    z, v, s, t = _f32(z), _f32(v), _f32(s), _f32(t)
    x0_hat = z - s * v
    eps_hat = z + (1.0 - s) * v
    if isinstance(eta, (int, float)) and eta == 0:
        return (1.0 - t) * x0_hat + t * eps_hat
    ratio = t * (1.0 - s) / (s * (1.0 - t))  # < 1 since t < s; finite since t < 1
    d = jnp.sqrt(jnp.maximum(1.0 - ratio ** 2, 0.0))
    rho = eta * t * d
    mean = (1.0 - t) * x0_hat + jnp.sqrt(jnp.maximum(t * t - rho * rho, 0.0)) * eps_hat
    return mean + rho * xi


def _lambda(sigma):
    """logit-SNR ``log((1 - sigma) / sigma)`` for sigma strictly inside (0, 1)."""
    return jnp.log1p(-sigma) - jnp.log(sigma)


def dpm_step(z, v, m_prev, i, sigmas, order: int):
    """Multistep DPM-Solver++ (data prediction), order 1 or 2. Returns ``(z_next, x0_hat)``.

    * ``i == 0`` or ``i == N-1``: DDIM/eta=0 ``(1-t) x0_hat + t eps_hat`` (at the last step t = 0: x0_hat).
    * otherwise first order: ``(t/s) z - alpha_t (e^{-h} - 1) x0_hat``, where
      ``alpha_t (e^{-h} - 1) = t (1-s) / s - (1-t)`` exactly (no logs needed).
    * order 2, ``2 <= i <= N-2``: adds ``-0.5 alpha_t (e^{-h} - 1) D1`` with
      ``D1 = (x0_hat - m_prev) h / h0``, ``h = lambda_t - lambda_s``, ``h0 = lambda_s - lambda_{s_prev}``.
      At ``i == 1`` the reference has ``s_prev = 1`` (lambda = -inf, so D1 = 0): first order, branched
      explicitly here.
    """
    n = sigmas.shape[0] - 1  # static
    sigmas = _f32(sigmas)
    z, v = _f32(z), _f32(v)
    s, t = sigmas[i], sigmas[i + 1]
    x0_hat = z - s * v
    eps_hat = z + (1.0 - s) * v
    z_ddim = (1.0 - t) * x0_hat + t * eps_hat
    coef = t * (1.0 - s) / s - (1.0 - t)  # alpha_t (e^{-h} - 1)
    z_first = (t / s) * z - coef * x0_hat
    if order == 1:
        z_multi = z_first
    else:
        second = jnp.logical_and(i >= 2, i <= n - 2)
        # Safe stand-ins keep every log finite in the unselected branch.
        s_prev = jnp.where(second, sigmas[jnp.maximum(i - 1, 0)], 0.75)
        s_safe = jnp.where(second, s, 0.5)
        t_safe = jnp.where(second, t, 0.25)
        lam_s = _lambda(s_safe)
        h = _lambda(t_safe) - lam_s
        h0 = lam_s - _lambda(s_prev)
        w1 = jnp.where(second, h / h0, 0.0)  # 1 / r0
        d1 = (x0_hat - m_prev) * w1
        z_multi = z_first - 0.5 * coef * d1
    edge = jnp.logical_or(i == 0, i == n - 1)
    return jnp.where(edge, z_ddim, z_multi), x0_hat


def init_state(solver: str, z):
    """Solver carry for the scan: the previous x0 prediction for dpm*, an empty tuple otherwise."""
    if solver in ("dpm1", "dpm2"):
        return jnp.zeros(z.shape, jnp.float32)
    return ()


def step(solver: str, z, v, i, sigmas, state, xi_fn: Callable | None, eta: float):
    """One solver step ``z(sigmas[i]) -> z(sigmas[i+1])``; returns ``(z_next cast to z.dtype, state)``.

    ``xi_fn()`` returns standard normal noise shaped like ``z`` (called only for stochastic solvers with
    eta != 0). ``solver`` and ``eta`` are static Python values.
    """
    sigmas = _f32(sigmas)
    s, t = sigmas[i], sigmas[i + 1]
    noisy = solver in STOCHASTIC_SOLVERS and not (isinstance(eta, (int, float)) and eta == 0)
    xi = xi_fn() if noisy else None
    if solver == "flow":
        z_next = flow_step(z, v, s, t, sigmas[1], eta, xi)
    elif solver == "dance":
        z_next = dance_step(z, v, s, t, eta, xi)
    elif solver == "ddim":
        z_next = ddim_step(z, v, s, t, eta, xi)
    elif solver in ("dpm1", "dpm2"):
        z_next, state = dpm_step(z, v, state, i, sigmas, order=1 if solver == "dpm1" else 2)
    else:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    return z_next.astype(z.dtype), state
