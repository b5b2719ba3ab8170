"""Small building blocks shared by the Qwen2.5-VL vision tower and language model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from edit_r1_jax.parallel import rules


def _init(key, shape, dtype, std=0.02):
    return (std * jax.random.normal(key, shape)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel stored [in, out] with logical axes ``axes``."""

    def __init__(self, din: int, dout: int, *, axes: tuple, bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = rules.param(_init(rngs.params(), (din, dout), param_dtype), axes)
        self.bias = rules.param(jnp.zeros((dout,), param_dtype), (axes[1],)) if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """T5-style RMSNorm; statistics in float32, result cast back before the scale (as transformers)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.weight = rules.param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        in_dtype = x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(self.dtype) * xf.astype(in_dtype).astype(self.dtype))


def rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` [..., L, H, D] with float32 cos/sin [..., L, D]; computed in float32, cast back."""
    xf = x.astype(jnp.float32)
    out = xf * cos[..., None, :] + rotate_half(xf) * sin[..., None, :]
    return out.astype(x.dtype)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``: the MLP of both the Qwen2 decoder (no biases) and the vision blocks."""

    def __init__(self, hidden: int, intermediate: int, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate, hidden, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        h = rules.constrain(h, ("batch", "length", "act_mlp"))
        return self.down_proj(h)
