"""The four objectives (objectives.py) against analytic models: flow matching, the shortcut's two half steps,
MeanFlow's JVP against finite differences and an exactly known average velocity, the improved-MeanFlow tangent,
alpha-Flow's two ends (flow matching at alpha = 1, MeanFlow as alpha -> 0), no gradient through any target, and
DDP: N ranks compute exactly the rows one process does.

    pytest test_objectives.py        # ~5 s on one CPU core
"""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import DiT
from objectives import (alpha_flow, alpha_schedule, draw_rows, flow_matching, interval_times, jumping_rows, long_jump,
                        meanflow, shortcut, shortcut_times, targets)

C = 1 - 1e-5  # x_t = (1 - C t) x0 + t x1, v = x1 - C x0


def known_teacher(calls):
    """A fixed nonlinear function of every input, so the bootstrap target can be recomputed by hand."""
    def teacher(x, t, d, y):
        calls.append((x.clone(), t.clone(), d.clone()))
        return torch.sin(x) + (t + 3 * d).view(-1, 1, 1, 1) + y.mean(dim=1).view(-1, 1, 1, 1)
    return teacher


def a_fn(t, d):
    return torch.sin(1.3 * t + 0.7 * d) + 0.5 * t * d


def b_fn(t, d):
    return torch.cos(2 * t - d) + t ** 2 * d


def analytic(x, t, d, y):
    """s(x, t, d) = a(t, d) x + b(t, d): J_x s v = a v; d/dt and d/dd by finite differences below."""
    return a_fn(t, d).view(-1, 1, 1, 1) * x + b_fn(t, d).view(-1, 1, 1, 1)


def meanflow_by_hand(x_t, t, d, v, y, eps=1e-5):
    """v + d (J_x s v + ds/dt - ds/dd) of the analytic model, the derivatives by central differences."""
    ds_dt = (analytic(x_t, t + eps, d, y) - analytic(x_t, t - eps, d, y)) / (2 * eps)
    ds_dd = (analytic(x_t, t, d + eps, y) - analytic(x_t, t, d - eps, y)) / (2 * eps)
    return v + d.view(-1, 1, 1, 1) * (a_fn(t, d).view(-1, 1, 1, 1) * v + ds_dt - ds_dd)


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def rows(B=16, flow_fraction=0.5, seed=0):
    torch.manual_seed(seed)
    x0, x1, y = torch.randn(B, 3, 4, 4), torch.randn(B, 3, 4, 4), torch.randn(B, 8)
    t, d, n_big = interval_times(B, flow_fraction)
    return x0, x1, y, t, d, n_big


# ---------------------------------------------------------------------------- the times each objective trains

def test_shortcut_times_levels_grid_and_every_level_in_small_batches():
    torch.manual_seed(0)
    t, d, n_big = shortcut_times(64, bootstrap_every=8)
    assert n_big == 8 and torch.all(d[n_big:] == 1 / 128)
    assert torch.allclose(t[n_big:] * 128, (t[n_big:] * 128).round())  # flow rows: t on the 128 grid
    levels = -torch.log2(d[:n_big])
    assert torch.allclose(levels, levels.round()) and levels.min() >= 0 and levels.max() <= 6
    tb, db = t[:n_big], d[:n_big]
    assert torch.allclose(tb / db, (tb / db).round()) and torch.all(tb + db <= 1)  # t a multiple of d
    counts = torch.zeros(7)
    for _ in range(700):
        t, d, n_big = shortcut_times(16, bootstrap_every=8)
        assert n_big == 2 and (d > 1 / 128).sum() == 2
        for level in (-torch.log2(d[:n_big])).round().int():
            counts[level] += 1
    assert counts.min() > 0.75 * counts.mean()  # the official schedule would give levels 2 ... 6 no rows at B = 16
    assert shortcut_times(8, bootstrap_every=0)[2] == 0  # flow matching: no big steps


def test_interval_times():
    torch.manual_seed(0)
    t, d, n_big = interval_times(1000, flow_fraction=0.75)
    assert n_big == 250 and (d[:n_big] > 0).all() and (d[n_big:] == 0).all()
    assert (t >= 0).all() and (t + d <= 1).all()
    assert 0.45 < t[n_big:].mean() < 0.55  # flow rows: t ~ U[0, 1], not the smaller of two draws (mean 1/3)
    t, d, n_big = interval_times(1000, flow_fraction=0.5, intervals="dyadic")
    levels = -torch.log2(d[:n_big])
    assert n_big == 500 and set(levels.round().int().tolist()) == set(range(7)) and torch.allclose(levels, levels.round())
    assert torch.allclose(t[:n_big] / d[:n_big], (t[:n_big] / d[:n_big]).round()) and (t + d <= 1).all()


# ---------------------------------------------------------------------------- each target against its formula

def test_flow_matching_is_the_straight_path_and_its_velocity():
    x0, x1, _, t, _, _ = rows()
    x_t, target = flow_matching(x0, x1, t)
    t_ = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - C * t_) * x0 + t_ * x1)
    torch.testing.assert_close(target, x1 - C * x0)


def test_shortcut_flow_rows_exact_and_big_rows_are_two_half_steps():
    torch.manual_seed(0)
    x0, x1, y = torch.randn(64, 3, 8, 8), torch.randn(64, 3, 8, 8), torch.randn(64, 5)
    t, d, n = shortcut_times(64, bootstrap_every=8)
    calls = []
    x_t, target = shortcut(known_teacher(calls), x0, x1, y, t, d, n)
    torch.testing.assert_close(target[n:], x1[n:] - C * x0[n:])
    assert len(calls) == 2  # two teacher calls at d/2, the second from the midpoint, averaged
    tb, db, half = t[:n], d[:n], (d[:n] / 2).view(-1, 1, 1, 1)
    teacher = known_teacher([])
    s1 = teacher(x_t[:n], tb, db / 2, y[:n])
    s2 = teacher((x_t[:n] + half * s1).clamp(-4, 4), tb + db / 2, db / 2, y[:n])
    assert torch.allclose(calls[1][1], tb + db / 2) and torch.allclose(calls[1][2], db / 2)
    torch.testing.assert_close(target[:n], ((s1 + s2) / 2).clamp(-4, 4))


def test_meanflow_target_matches_finite_differences(float64):
    x0, x1, y, t, d, n = rows()
    x_t, target = meanflow(analytic, x0, x1, y, t, d, n)
    v = x1 - C * x0
    torch.testing.assert_close(target, meanflow_by_hand(x_t, t, d, v, y), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(target[n:], v[n:], rtol=0, atol=1e-12)  # flow rows: the velocity itself


def test_meanflow_formula_is_a_fixed_point_of_the_exact_average_velocity():
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


def test_improved_meanflow_tangent_is_the_models_velocity(float64):
    """tangent="model" puts s(x_t, t, 0) where v was: with a model whose d = 0 output IS the conditional v (one
    data point, so v is a function of x_t and t), the target equals the plain one; with the analytic model, it is
    the finite-difference formula with v-hat in the x-tangent, still v outside."""
    x0, x1, y, t, d, n = rows()
    point = x1[:1]  # one data point: x0 = (x_t - t x1) / (1 - C t)
    x1 = point.expand_as(x1)
    velocity = lambda x, t: point - C * (x - t.view(-1, 1, 1, 1) * point) / (1 - C * t.view(-1, 1, 1, 1))
    knows_v = lambda x, t, d, y: (1 + d.view(-1, 1, 1, 1)) * velocity(x, t) + (d * t).view(-1, 1, 1, 1) * torch.sin(x)
    _, plain = meanflow(knows_v, x0, x1, y, t, d, n, tangent="v")
    _, improved = meanflow(knows_v, x0, x1, y, t, d, n, tangent="model")
    torch.testing.assert_close(improved, plain, rtol=1e-9, atol=1e-9)
    x_t, improved = meanflow(analytic, x0, x1, y, t, d, n, tangent="model")
    v, v_hat = x1 - C * x0, analytic(x_t, t, torch.zeros_like(d), y)
    by_hand = meanflow_by_hand(x_t, t, d, v, y) + d.view(-1, 1, 1, 1) * a_fn(t, d).view(-1, 1, 1, 1) * (v_hat - v)
    torch.testing.assert_close(improved[:n], by_hand[:n], rtol=1e-7, atol=1e-7)


def test_alpha_flow_is_flow_matching_at_alpha_one_and_meanflow_as_alpha_goes_to_zero(float64):
    x0, x1, y, t, d, n = rows()
    _, at_one = alpha_flow(analytic, x0, x1, y, t, d, n, alpha=1.0)
    torch.testing.assert_close(at_one, flow_matching(x0, x1, t)[1], rtol=1e-12, atol=1e-12)
    x_t, mf = meanflow(analytic, x0, x1, y, t, d, n)
    errors = [(alpha_flow(analytic, x0, x1, y, t, d, n, alpha)[1] - mf).abs().max().item() for alpha in (0.02, 0.01)]
    assert errors[0] < 0.05 * mf.abs().max() and 1.9 < errors[0] / errors[1] < 2.1  # O(alpha): half the error
    torch.testing.assert_close(alpha_flow(analytic, x0, x1, y, t, d, n, 0.3)[1][n:], mf[n:])  # flow rows: v


def test_alpha_schedule_anneals_from_one_to_its_floor():
    alphas = [alpha_schedule(p / 10) for p in range(11)]
    assert alphas[0] > 0.9999 and abs(alphas[5] - 0.5) < 1e-9 and alphas[-1] == 0.02
    assert all(a >= b for a, b in zip(alphas, alphas[1:]))


# ---------------------------------------------------------------------------- as train.py calls them

def tiny_dit():
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=3, feature_dim=8, hidden_size=32, depth=2, num_heads=4, patch_size=2,
                predict="x", time_scale=1.0, x_floor=0.02)
    for p in model.parameters():  # adaLN-Zero starts as the identity: perturb so the derivatives are not trivial
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def run_args(objective):
    return argparse.Namespace(objective=objective, bootstrap_every=4, denoise_steps=128, flow_fraction=0.5,
                              intervals="uniform", tangent="model" if objective == "meanflow" else "v")


@pytest.mark.parametrize("objective", ["flow", "shortcut", "meanflow", "alphaflow"])
def test_no_gradient_through_any_target_and_ddp_rows(objective):
    """The targets hold no graph, and N ranks, each drawing the global batch and keeping its rows, compute exactly
    the rows one process does."""
    model, args = tiny_dit(), run_args(objective)
    x1, y = torch.randn(16, 3, 8, 8), torch.randn(16, 8)
    torch.manual_seed(3)
    x0, t, d, n_big = draw_rows(args, 16, x1.shape[1:])
    x_t, target = targets(args, model, model, x0, x1, y, t, d, n_big, progress=0.6)
    assert not target.requires_grad and target.grad_fn is None and torch.isfinite(target).all()
    assert n_big == {"flow": 0, "shortcut": 4}.get(objective, 8)
    for world_size in (2, 4):
        for rank in range(world_size):
            torch.manual_seed(3)  # every rank has the same RNG state
            r = slice(rank, None, world_size)
            x0_r, t_r, d_r, n_r = draw_rows(args, 16, x1.shape[1:], rank, world_size)
            part = targets(args, model, model, x0_r, x1[r], y[r], t_r, d_r, n_r, progress=0.6)
            assert n_r == len(range(rank, n_big, world_size))  # the big-step rows are spread over the ranks
            for a, b in zip((x0, t, d, x_t, target), (x0_r, t_r, d_r) + part):
                torch.testing.assert_close(a[r], b, rtol=1e-5, atol=1e-5)


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
    assert (primal - plain).abs().max() < 1e-5
    torch.testing.assert_close(tangent, fd, rtol=1e-2, atol=1e-2 * fd.abs().max().item())


def test_math_attention_equals_fused():
    q, k, v = (torch.randn(2, 4, 16, 32) for _ in range(3))
    fused = F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(SDPBackend.MATH):
        math_ = F.scaled_dot_product_attention(q, k, v)
    plain = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(32), dim=-1) @ v
    assert (fused - math_).abs().max() < 1e-5 and (fused - plain).abs().max() < 1e-5


def test_long_jump_target_is_the_teachers_k_step_sample_without_gradient():
    """An analytic teacher s(x, t, d, y) = a x + t + y: the target is Phi_K(x0) - x0 of its K Euler steps, holds
    no graph, and the rows a rank keeps (jumping_rows) are the last rows of the global batch."""
    a = torch.tensor(0.3, requires_grad=True)
    teacher = lambda x, t, d, y: a * x + t.view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1)
    x0, y = torch.randn(5, 3, 4, 4), torch.randn(5)
    for K in (2, 4):
        x = x0.clone()
        for k in range(K):
            x = x + (a.detach() * x + k / K + y.view(-1, 1, 1, 1)) / K
        target = long_jump(teacher, x0, y, K)
        assert target.grad_fn is None
        torch.testing.assert_close(target, x - x0)
    args = argparse.Namespace(long_jump_rows=3, long_jump_start=0.5)
    assert not jumping_rows(args, 8, progress=0.4).any()
    one = jumping_rows(args, 8, progress=0.5)
    assert one.tolist() == [False] * 5 + [True] * 3
    for world_size in (2, 4):
        parts = [jumping_rows(args, 8, 0.5, rank, world_size) for rank in range(world_size)]
        assert all((one[rank::world_size] == p).all() for rank, p in enumerate(parts))
