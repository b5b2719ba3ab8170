"""FLUX sigma schedule with the resolution-dependent dynamic exponential shift (spec A.4).

``sigmas(N, L)`` reproduces diffusers' FluxKontextPipeline + FlowMatchEulerDiscreteScheduler
(``use_dynamic_shifting=True``, ``time_shift_type="exponential"``) for the default ``sigmas=linspace(1, 1/N, N)``:

    s_k     = linspace(1, 1/N, N)
    mu      = m*L + b,  m = (max_shift-base_shift)/(max_seq-base_seq),  b = base_shift - m*base_seq
    sigma_k = e^mu / (e^mu + (1/s_k - 1)),   sigma_N = 0

computed in float64 (diffusers ends up with float32 tensors; the difference is < 1e-7).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["mu_for", "shift_sigmas", "sigmas", "timesteps"]


def mu_for(image_seq_len: int, base_seq: int = 256, max_seq: int = 4096, base_shift: float = 0.5,
           max_shift: float = 1.15) -> float:
    """The shift ``mu`` for ``image_seq_len`` generated-image tokens (reference tokens are NOT counted)."""
    m = (max_shift - base_shift) / (max_seq - base_seq)
    b = base_shift - m * base_seq
    return image_seq_len * m + b


def shift_sigmas(base: np.ndarray, mu: float) -> np.ndarray:
    """Exponential time shift ``e^mu / (e^mu + (1/s - 1))`` (s=1 maps to 1)."""
    base = np.asarray(base, np.float64)
    with np.errstate(divide="ignore"):
        return math.exp(mu) / (math.exp(mu) + (1.0 / base - 1.0))


def sigmas(num_steps: int, image_seq_len: int, base_seq: int = 256, max_seq: int = 4096,
           base_shift: float = 0.5, max_shift: float = 1.15) -> np.ndarray:
    """``[num_steps + 1]`` float64 sigmas, from 1.0 down to the trailing 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be >= 1, got {image_seq_len}")
    base = np.linspace(1.0, 1.0 / num_steps, num_steps)
    mu = mu_for(image_seq_len, base_seq, max_seq, base_shift, max_shift)
    return np.concatenate([shift_sigmas(base, mu), [0.0]])


def timesteps(num_steps: int, image_seq_len: int, **kwargs) -> np.ndarray:
    """``1000 * sigmas[:N]`` (the values diffusers stores as ``scheduler.timesteps``)."""
    return 1000.0 * sigmas(num_steps, image_seq_len, **kwargs)[:-1]
