"""``lora.lora_linear`` (the LoRA Linear's custom backward) against autodiff of the plain expression it computes,
``x @ W + b + ((x @ A) @ B) * s``: values and the gradient of every argument, with and without bias, float32 at the
highest matmul precision. RTOL = 1e-6 of max|grad| per argument: the same products, at most summed in another order
(observed: x, kernel, a, b exact, bias 2e-7); the scalar ``scale`` gradient sums all 2960 output products in
another order, SCALE_RTOL = 1e-5 (observed 1.1e-6). A wrong transpose, a lost scale or a missing term is O(1)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_r1_jax.models.lora import lora_linear

RTOL = 1e-6
SCALE_RTOL = 1e-5


def reference(x, kernel, bias, a, b, scale):
    y = jnp.dot(x, kernel)
    if bias is not None:
        y = y + bias
    return y + jnp.dot(jnp.dot(x, a), b) * scale


@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_match_autodiff(with_bias):
    rng = np.random.default_rng(0)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    x, kernel, a, b = f32(2, 37, 24), f32(24, 40), f32(24, 4), f32(4, 40)
    bias = f32(40) if with_bias else None
    scale = jnp.float32(3.0)
    w = f32(2, 37, 40)
    np.testing.assert_allclose(lora_linear(x, kernel, bias, a, b, scale), reference(x, kernel, bias, a, b, scale),
                               rtol=1e-6, atol=1e-5)

    def grads(f):
        args = (x, kernel, bias, a, b, scale)
        return jax.jit(jax.grad(lambda *p: jnp.sum(f(*p) * w), argnums=tuple(range(6))))(*args)

    ours, ref = grads(lora_linear), grads(reference)
    for name, g, r in zip(("x", "kernel", "bias", "a", "b", "scale"), ours, ref):
        if r is None:
            assert g is None, name
            continue
        assert g.shape == r.shape and g.dtype == r.dtype, name
        err = float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
        assert err < (SCALE_RTOL if name == "scale" else RTOL), f"{name}: relative error {err:.2e}"


def test_backward_never_transposes_a_token_by_feature_gradient():
    """What the custom backward is for: the compiled gradient of the LoRA factors never materialises dy [tokens, out]
    or x [tokens, in] transposed (autodiff of the plain expression makes XLA:CPU copy dy into an [out, tokens] array)."""
    tokens, d_in, d_out, r = 512, 256, 384, 8
    shapes = ((d_in, r), (r, d_out), (1, tokens, d_in), (d_in, d_out), (d_out,), (1, tokens, d_out))
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]  # abstract: nothing is constant-folded

    def hlo(f):
        loss = lambda a, b, x, k, bias, w: jnp.sum(f(x, k, bias, a, b, jnp.float32(2.0)) * w)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()

    def big_transposes(text):  # any op whose result is an [in or out, tokens] transpose of x or dy
        return [line for line in text.splitlines()
                if re.search(rf"= f32\[({d_in}|{d_out}),(1,)?{tokens}\]", line)]

    assert big_transposes(hlo(lora_linear)) == []
    # The check can fail: autodiff of the plain expression does transpose dy on this backend.
    if jax.default_backend() == "cpu":
        assert big_transposes(hlo(reference)) != []
