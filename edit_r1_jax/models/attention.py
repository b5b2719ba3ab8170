"""Scaled dot-product attention shared by all edit_r1_jax models.

``attention(q, k, v, *, mask=None, implementation=None)`` takes ``q``/``k``/``v`` of shape ``[B, L, H, D]``
(``k``/``v`` may have fewer heads for GQA) and returns ``[B, Lq, H, D]`` in ``q.dtype``. It wraps
``jax.nn.dot_product_attention``; the logits are accumulated and the softmax is evaluated in float32 regardless of
the input dtype (jax's XLA path promotes the logits to float32 and runs softmax in float32; cuDNN does the same
internally), so float32 inputs give float32-exact semantics and bf16 inputs get f32 softmax statistics.

``implementation``:
    * ``None`` (auto): on GPU ``"cudnn"`` when the inputs are bf16/fp16 (cuDNN flash attention supports only those),
        otherwise ``"xla"``; on TPU and CPU ``"xla"`` (XLA fuses the attention; no Pallas splash kernel is wired in).
    * ``"xla"``: always the XLA reference implementation.
    * ``"cudnn"``: cuDNN fused attention; raises if it is unavailable (never a silent fallback).

Which implementation runs is logged once per (implementation, backend, dtype) via the python logger
``edit_r1_jax.attention`` (INFO), including the reason when auto mode picks XLA on a GPU.
"""

from __future__ import annotations

import logging
import threading

import jax
import jax.numpy as jnp

logger = logging.getLogger("edit_r1_jax.attention")

_LOGGED: set = set()
_LOCK = threading.Lock()
_VALID = (None, "xla", "cudnn")


def _log_once(impl: str, backend: str, dtype, reason: str) -> None:
    key = (impl, backend, str(dtype))
    with _LOCK:
        if key in _LOGGED:
            return
        _LOGGED.add(key)
    logger.info("attention implementation=%s backend=%s dtype=%s (%s)", impl, backend, dtype, reason)


def resolve_implementation(implementation: str | None, dtype) -> tuple[str, str]:
    """Returns (implementation, reason) that ``attention`` will use for inputs of ``dtype``."""
    if implementation not in _VALID:
        raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {_VALID}")
    backend = jax.default_backend()
    if implementation == "cudnn":
        if backend != "gpu":
            raise RuntimeError(f"attention implementation 'cudnn' requested but the default backend is {backend!r}")
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise RuntimeError(f"attention implementation 'cudnn' requires bf16/fp16 inputs, got {jnp.dtype(dtype)}")
        return "cudnn", "requested"
    if implementation == "xla":
        return "xla", "requested"
    # auto
    if backend == "gpu":
        if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return "cudnn", "auto: GPU with half-precision inputs"
        return "xla", f"auto: GPU but dtype {jnp.dtype(dtype)} is not supported by cuDNN flash attention"
    return "xla", f"auto: backend {backend} (no fused kernel wired in, XLA attention runs)"


def attention(q, k, v, *, mask=None, implementation: str | None = None):
    """Multi-head attention on ``[B, L, H, D]`` tensors; ``mask`` is a boolean array broadcastable to
    ``[B, H, Lq, Lk]`` (True = attend). Scale is ``1/sqrt(D)``."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects [B, L, H, D] inputs, got {q.shape}, {k.shape}, {v.shape}")
    impl, reason = resolve_implementation(implementation, q.dtype)
    _log_once(impl, jax.default_backend(), q.dtype, reason)
    if mask is not None:
        mask = jnp.asarray(mask, dtype=bool)
        while mask.ndim < 4:
            mask = mask[None]
    try:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    except Exception as e:  # never fall back silently
        if impl == "cudnn":
            raise RuntimeError(f"cuDNN attention failed for q{q.shape} {q.dtype}: {e}") from e
        raise
    return out.astype(q.dtype)
