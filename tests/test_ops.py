"""Behaviour of the pure-PyTorch StyleGAN2 ops against direct, independent formulations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.nets.ops import (
    ACTIVATIONS,
    bias_act,
    conv2d_resample,
    downsample2d,
    filter2d,
    modulated_conv2d,
    normalize_2nd_moment,
    setup_filter,
    upfirdn2d,
    upsample2d,
)

torch.set_num_threads(2)


def _dense_upfirdn(x, f2d, up, down, pad):
    """Loop-free direct definition: zero-insert, pad, true 2-D convolution, decimate."""
    n, c, h, w = x.shape
    z = torch.zeros(n, c, h * up, w * up, dtype=x.dtype)
    z[:, :, ::up, ::up] = x
    z = F.pad(z, [pad[0], pad[1], pad[2], pad[3]])
    k = f2d.flip([0, 1])[None, None].repeat(c, 1, 1, 1)
    y = F.conv2d(z, k, groups=c)
    return y[:, :, ::down, ::down]


def test_setup_filter_normalised_outer_product():
    f = setup_filter([1, 3, 3, 1])
    assert f.shape == (4, 4)
    assert torch.allclose(f.sum(), torch.tensor(1.0))
    assert torch.allclose(f, torch.outer(torch.tensor([1, 3, 3, 1.0]), torch.tensor([1, 3, 3, 1.0])) / 64)
    assert setup_filter([1] * 8).ndim == 1  # long filters stay separable
    assert torch.allclose(setup_filter([1, 2], flip_filter=True, normalize=False), torch.tensor([[4.0, 2], [2, 1]]))
    assert torch.allclose(setup_filter([1, 3, 3, 1], gain=4).sum(), torch.tensor(4.0))


@pytest.mark.parametrize("up,down,pad", [(1, 1, [1, 2, 1, 2]), (2, 1, [2, 1, 2, 1]), (1, 2, [1, 1, 1, 1]),
                                         (2, 2, [1, 2, 0, 3])])
def test_upfirdn2d_matches_direct_definition(up, down, pad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7)
    f = torch.rand(3, 4)  # asymmetric, so a wrong flip or axis swap shows up
    got = upfirdn2d(x, f, up=up, down=down, padding=pad)
    assert torch.allclose(got, _dense_upfirdn(x, f, up, down, pad), atol=1e-5)


def test_upfirdn2d_negative_padding_crops_and_separable_equals_2d():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 8, 8)
    assert torch.equal(upfirdn2d(x, None, padding=[-1, -2, 0, -3]), x[:, :, 0:5, 1:6])
    f1 = torch.tensor([1.0, 2, 3, 4, 4, 3, 2, 1])
    sep = upfirdn2d(x, setup_filter(f1), padding=3)
    full = upfirdn2d(x, setup_filter(f1, separable=False), padding=3)
    assert torch.allclose(sep, full, atol=1e-6)


def test_resampling_shapes_and_dc_gain():
    x = torch.ones(1, 1, 8, 8)
    f = setup_filter([1, 3, 3, 1])
    up = upsample2d(x, f)
    down = downsample2d(x, f)
    assert up.shape[-2:] == (16, 16) and down.shape[-2:] == (4, 4)
    # A constant image stays constant away from the zero-padded border.
    assert torch.allclose(up[..., 3:-3, 3:-3], torch.ones(1, 1, 10, 10), atol=1e-6)
    assert torch.allclose(down[..., 1:-1, 1:-1], torch.ones(1, 1, 2, 2), atol=1e-6)
    assert filter2d(x, f).shape == x.shape


def test_bias_act_defaults_and_clamp():
    x = torch.tensor([[-2.0, 0.5], [1.0, -0.1]]).reshape(1, 2, 2, 1)
    b = torch.tensor([0.5, -1.0])
    pre = x + b.reshape(1, 2, 1, 1)
    got = bias_act(x, b, act="lrelu")
    assert torch.allclose(got, F.leaky_relu(pre, 0.2) * math.sqrt(2))
    assert torch.allclose(bias_act(x, b, act="lrelu", gain=1, clamp=0.3), F.leaky_relu(pre, 0.2).clamp(-0.3, 0.3))
    assert torch.allclose(bias_act(x, act="linear"), x)
    assert torch.allclose(bias_act(x, act="swish"), torch.sigmoid(x) * x * math.sqrt(2))
    y = torch.randn(3, 4)
    assert torch.allclose(bias_act(y, torch.ones(4), dim=1, act="relu", gain=1), F.relu(y + 1))
    assert set(ACTIVATIONS) >= {"linear", "relu", "lrelu", "tanh", "sigmoid", "elu", "selu", "softplus", "swish"}


def test_conv2d_resample_up_and_down_equal_explicit_composition():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(5, 4, 3, 3)
    f = setup_filter([1, 3, 3, 1])
    # Upsampling conv (transposed-conv fast path) == zero-insert + pad + FIR filter, then a valid conv.
    # Total padding 1 + (4 + 2 - 1) // 2 = 3 before and 1 + (4 - 2) // 2 = 2 after.
    up = conv2d_resample(x, w, f=f, up=2, padding=1, flip_weight=False)
    ref = F.conv2d(upfirdn2d(x, f, up=2, padding=[3, 2, 3, 2], gain=4), w.flip([2, 3]))
    assert up.shape == (2, 5, 12, 12)
    assert torch.allclose(up, ref, atol=1e-4)
    # Downsampling conv (filter + strided conv) == pad, valid conv, then FIR-downsample.
    down = conv2d_resample(x, w, f=f, down=2, padding=1)
    ref = upfirdn2d(F.conv2d(F.pad(x, [2, 2, 2, 2]), w), f, down=2)
    assert down.shape == (2, 5, 3, 3)
    assert torch.allclose(down, ref, atol=1e-4)
    # Grouped upsampling matches per-group calls.
    wg = torch.randn(6, 2, 3, 3)
    grouped = conv2d_resample(x, wg, f=f, up=2, padding=1, groups=2, flip_weight=False)
    parts = [conv2d_resample(x[:, 2 * g:2 * g + 2], wg[3 * g:3 * g + 3], f=f, up=2, padding=1, flip_weight=False)
             for g in range(2)]
    assert torch.allclose(grouped, torch.cat(parts, 1), atol=1e-5)


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv2d_fused_equals_batched_and_per_sample(up, demodulate):
    torch.manual_seed(3)
    x = torch.randn(3, 4, 5, 5)
    weight = torch.randn(6, 4, 3, 3)
    styles = torch.randn(3, 4)
    noise = torch.randn(3, 1, 5 * up, 5 * up)
    f = setup_filter([1, 3, 3, 1])
    kwargs = dict(up=up, padding=1, resample_filter=f, demodulate=demodulate, flip_weight=(up == 1))
    fused = modulated_conv2d(x, weight, styles, noise=noise, fused_modconv=True, **kwargs)
    batched = modulated_conv2d(x, weight, styles, noise=noise, fused_modconv=False, **kwargs)
    assert fused.shape == (3, 6, 5 * up, 5 * up)
    assert torch.allclose(fused, batched, atol=1e-4)
    for i in range(3):  # explicit per-sample weight
        wi = weight * styles[i].reshape(1, -1, 1, 1)
        if demodulate:
            wi = wi / (wi.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        yi = conv2d_resample(x[i:i + 1], wi, f=f, up=up, padding=1, flip_weight=(up == 1)) + noise[i:i + 1]
        assert torch.allclose(fused[i:i + 1], yi, atol=1e-4)


def test_modulated_conv2d_demodulation_gives_unit_variance_weights():
    torch.manual_seed(4)
    x = torch.zeros(1, 8, 3, 3)
    x[0, :, 1, 1] = torch.randn(8)
    out = modulated_conv2d(x, torch.randn(16, 8, 1, 1), torch.randn(1, 8) * 10, demodulate=True)
    # A 1x1 demodulated conv of a single pixel: every output is bounded by the input's norm.
    assert out.abs().max() <= x.norm() + 1e-5


def test_normalize_2nd_moment():
    z = torch.randn(4, 16) * 7
    assert torch.allclose(normalize_2nd_moment(z).square().mean(dim=1), torch.ones(4), atol=1e-5)
