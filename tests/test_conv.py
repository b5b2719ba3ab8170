"""models/conv.py: the VAE upsampler computed at the input resolution equals torch's nearest x2 upsample followed
by a 3x3 conv (diffusers Upsample2D's two steps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from edit_r1_jax.models.conv import upsample2x_conv3x3


def _torch_reference(x, kernel, bias):
    """NHWC / HWIO numpy -> torch's F.interpolate(nearest, x2) + conv2d(padding 1), back to NHWC."""
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    wt = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
    with torch.no_grad():
        y = torch.nn.functional.conv2d(torch.nn.functional.interpolate(xt, scale_factor=2.0, mode="nearest"), wt,
                                       torch.from_numpy(bias), padding=1)
    return y.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 4), (1, 1, 1, 2, 3), (1, 4, 2, 8, 8)])
def test_upsample_conv_matches_torch(shape):
    b, h, w, cin, cout = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((b, h, w, cin)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, cin, cout)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(upsample2x_conv3x3(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), jnp.float32))
    ref = _torch_reference(x, kernel, bias)
    assert ours.shape == (b, 2 * h, 2 * w, cout)
    # float32: the folded taps change only the summation order of <= 9 * cin products of O(1) terms (~1e-6);
    # a wrong phase or tap gives O(1) errors.
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)


def test_upsample_conv_bf16_stays_close():
    """bf16: the summed taps are rounded once; the result stays within bf16 rounding of the float32 reference."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 6, 6, 16)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, 16, 8)) / 12).astype(np.float32)
    bias = np.zeros(8, np.float32)
    ours = upsample2x_conv3x3(jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16),
                              jnp.asarray(bias, jnp.bfloat16), jnp.bfloat16)
    assert ours.dtype == jnp.bfloat16
    ref = _torch_reference(x, kernel, bias)
    # bf16 inputs, weights and output: 3 roundings of 2^-9 relative each on values of scale ~1; 0.05 absolute is
    # ~6x that and far below a wrong tap's O(1).
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref, atol=0.05, rtol=0)


def test_upsample_conv_rejects_other_kernels():
    with pytest.raises(ValueError, match="3x3 kernel"):
        upsample2x_conv3x3(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 1, 1, 1)), jnp.zeros((1,)), jnp.float32)
