"""MeanFlow targets (train.meanflow_targets): the formula against finite differences, the sign convention against
an exactly known average velocity, flow rows, no gradient, DDP rows, and the JVP path of the DiT.

    pytest test_meanflow.py        # ~2 s on one CPU core
"""

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import DiT
from train import meanflow_targets

C = 1 - 1e-5  # x_t = (1 - C t) x0 + t x1, v = x1 - C x0


def a_fn(t, d):
    return torch.sin(1.3 * t + 0.7 * d) + 0.5 * t * d


def b_fn(t, d):
    return torch.cos(2 * t - d) + t ** 2 * d


def analytic(x, t, d, y):
    """s(x, t, d) = a(t, d) x + b(t, d): J_x s v = a v, and dt, dd by finite differences below."""
    return a_fn(t, d).view(-1, 1, 1, 1) * x + b_fn(t, d).view(-1, 1, 1, 1)


def recover_v(x_t, t, x1):
    t_ = t.view(-1, 1, 1, 1)
    x0 = (x_t - t_ * x1) / (1 - C * t_)
    return x1 - C * x0


def test_target_matches_finite_differences():
    torch.manual_seed(0)
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            x1, y = torch.randn(16, 3, 4, 4), torch.randn(16, 8)
            x_t, t, d, _, target = meanflow_targets(analytic, x1, y, flow_fraction=0.5)
            v = recover_v(x_t, t, x1)
            eps, x_ = 1e-5, x_t
            ds_dt = (analytic(x_, t + eps, d, y) - analytic(x_, t - eps, d, y)) / (2 * eps)
            ds_dd = (analytic(x_, t, d + eps, y) - analytic(x_, t, d - eps, y)) / (2 * eps)
            jv = a_fn(t, d).view(-1, 1, 1, 1) * v
            expected = v + d.view(-1, 1, 1, 1) * (jv + ds_dt - ds_dd)
        finally:
            torch.set_default_dtype(torch.float32)
    assert (d[:8] > 0).all() and (d[8:] == 0).all()
    assert (t + d <= 1).all() and (t >= 0).all()
    torch.testing.assert_close(target, expected, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(target[8:], v[8:], rtol=0, atol=1e-12)  # flow rows: the velocity itself


def test_formula_is_a_fixed_point_of_the_exact_average_velocity():
    """The sign convention: for dx/dtau = lam x the average velocity over [t, t + d] is s = x (e^{lam d} - 1) / d
    exactly; with v = lam x, v + d (J_x s v + ds/dt - ds/dd) must give s back (a + sign on dd would not)."""
    lam, x, t, d, eps = 0.8, torch.tensor(1.7, dtype=torch.float64), 0.3, 0.5, 1e-6
    s = lambda x, t, d: x * math.expm1(lam * d) / d
    v = lam * x
    jv = math.expm1(lam * d) / d * v
    ds_dt = 0.0  # autonomous ODE
    ds_dd = (s(x, t, d + eps) - s(x, t, d - eps)) / (2 * eps)
    assert abs(v + d * (jv + ds_dt - ds_dd) - s(x, t, d)) < 1e-8
    assert abs(v + d * (jv + ds_dt + ds_dd) - s(x, t, d)) > 1e-2


def tiny_dit():
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=3, feature_dim=8, hidden_size=32, depth=2, num_heads=4, patch_size=2,
                predict="x", time_scale=1.0)
    for p in model.parameters():  # adaLN-Zero starts as the identity: perturb so the derivatives are not trivial
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def test_no_gradient_through_target_and_ddp_rows():
    model = tiny_dit()
    x1, y = torch.randn(8, 3, 8, 8), torch.randn(8, 8)
    torch.manual_seed(1)
    out = meanflow_targets(model, x1, y)
    for tensor in (out[0], out[1], out[2], out[4]):
        assert not tensor.requires_grad and tensor.grad_fn is None
    assert torch.isfinite(out[4]).all()
    assert (out[2][:2] > 0).all() and (out[2][2:] == 0).all()  # 8 rows, 75% flow: 2 interval rows first
    # two DDP ranks compute exactly the rows one process does
    halves = []
    for rank in range(2):
        torch.manual_seed(1)
        halves.append(meanflow_targets(model, x1[rank::2], y[rank::2], rank=rank, world_size=2))
    for k in (0, 1, 2, 4):
        merged = torch.empty_like(out[k])
        merged[0::2], merged[1::2] = halves[0][k], halves[1][k]
        torch.testing.assert_close(merged, out[k], rtol=1e-5, atol=1e-5)


def test_jvp_primal_equals_plain_forward_and_tangent_matches_finite_differences():
    model = tiny_dit()
    x, t, d, y = torch.randn(4, 3, 8, 8), torch.rand(4) * 0.5, torch.rand(4) * 0.5, torch.randn(4, 8)
    y[0] = 0  # a null caption row too
    v, ones = torch.randn_like(x), torch.ones(4)
    f = lambda x, t, d: model(x, t, d, y)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        primal, tangent = torch.func.jvp(f, (x, t, d), (v, ones, -ones))
    with torch.no_grad():
        plain = model(x, t, d, y)  # the fused attention kernel
        eps = 1e-3
        fd = (f(x + eps * v, t + eps, d - eps) - f(x - eps * v, t - eps, d + eps)) / (2 * eps)
    torch.testing.assert_close(primal, plain, rtol=0, atol=1e-5)
    assert (primal - plain).abs().max() < 1e-5
    torch.testing.assert_close(tangent, fd, rtol=1e-2, atol=1e-2 * fd.abs().max().item())


def test_math_attention_equals_fused():
    q, k, v = (torch.randn(2, 4, 16, 32) for _ in range(3))
    fused = F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(SDPBackend.MATH):
        math_ = F.scaled_dot_product_attention(q, k, v)
    plain = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(32), dim=-1) @ v
    assert (fused - math_).abs().max() < 1e-5 and (fused - plain).abs().max() < 1e-5
