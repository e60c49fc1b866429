"""
The training objectives, side by side. All four train the same network s(x_t, t, d, y): the average velocity
over the step [t, t + d], so that one Euler step x_{t+d} = x_t + d s lands where the flow would. They share the
straight path from noise x0 (t = 0) to data x1 (t = 1) and its velocity v = x1 - x0, and differ in ONE line, the
target of a row with a big step d:

    flow matching   s_target = v                                                  (every row: d -> 0)
    shortcut        s_target = 1/2 s(x_t, t, d/2) + 1/2 s(x_t + d/2 s(x_t, t, d/2), t + d/2, d/2)
    MeanFlow        s_target = v + d (ds/dx v + ds/dt - ds/dd)                    (one forward-mode JVP)
    alpha-Flow      s_target = alpha v + (1 - alpha) s(x_t + alpha d v, t + alpha d, (1 - alpha) d)
    + long jumps    s_target = sg(Phi_K(x0)) - x0 on a few rows at t = 0, d = 1     (the model's own K-step sample)

Each target function returns (x_t, s_target) for rows whose noise x0, time t and step d were drawn already
(shortcut_times, interval_times), the big-step rows first. No target carries a gradient: the model teaches itself
only through the loss. training_loss, at the bottom, is one whole training step's loss for any objective: it draws
the rows (for the whole global batch, so DDP ranks each keep their share of the same rows), builds the targets and
weighs the regression of s(x_t, t, d, y) onto them. train.py's loop and bench.py call it.

    pytest test_objectives.py      # each target against an analytic model
"""

import math
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# What each objective brings with it; a flag on train.py's command line wins (train.apply_recipe).
#   time_scale  t and d x this before their embedding (model.py): 1000 as DiT; MeanFlow and alpha-Flow take the
#               derivative in t and d through the embedding, which must then see them raw (1).
#   x_floor     --predict x: the floor on 1 - t in v = (x1_hat - x_t) / (1 - t). An error in the image costs
#               1 / (1 - t)^2 in the loss on v; under plain MSE a floor of 0.25 keeps the nearly clean rows from
#               drowning the noisy ones; MeanFlow's adaptive weight normalises every row, so 0.02 (docs/experiments.md).
#   bootstrap_every, flow_fraction   how many rows take big steps (shortcut_times, interval_times).
SETTINGS = {
    "flow": dict(time_scale=1000.0, x_floor=0.25),
    "shortcut": dict(time_scale=1000.0, x_floor=0.25, bootstrap_every=8),
    "meanflow": dict(time_scale=1.0, x_floor=0.02, flow_fraction=0.75),
    "alphaflow": dict(time_scale=1.0, x_floor=0.02, flow_fraction=0.75),
}
# The objectives' options that no recipe sets: train.py's flags default to these, bench.py times them.
DEFAULTS = dict(denoise_steps=128, intervals="uniform", tangent="v", long_jump_steps=8, long_jump_start=0.3,
                long_jump_power=1.0)
OBJECTIVES = list(SETTINGS)
ADAPTIVE = ("meanflow", "alphaflow")  # their targets hold the model's own derivatives: weigh rows adaptively


def told_step(train_args):
    """The step size d to tell a checkpoint's model when it steps by 1/steps: None (that step itself) for a model
    that learnt big steps; a flow-matching model (--objective flow) only ever saw the smallest step,
    1/denoise_steps, and is told that at every step: plain Euler along its flow."""
    return 1 / train_args["denoise_steps"] if train_args.get("objective") == "flow" else None


def path(x0, x1, t):
    """The straight path and its velocity: x_t = (1 - (1 - 1e-5) t) x0 + t x1, v = dx_t/dt (the 1e-5 keeps a
    sliver of noise at t = 1, as the official code)."""
    t_ = t.view(-1, 1, 1, 1)
    return (1 - (1 - 1e-5) * t_) * x0 + t_ * x1, x1 - (1 - 1e-5) * x0


# -----------------------------------------------------------------------------
# Which steps to train: (t, d) for B rows, the n_big big-step rows first.

def dyadic_steps(n, num_levels=7, device="cpu"):
    """n steps a sampler takes: d = 2^-k, k in 0 ... num_levels - 1, t a multiple of d (so t + d <= 1). The levels
    are a randomly rotated 0, 1 ... 6, 0, 1 ... so that every level gets rows even in small batches (the official
    fixed schedule drops some: its issues #10, #11). -> (t, d)"""
    k = (torch.randint(num_levels, (1,), device=device) + torch.arange(n, device=device)) % num_levels
    d = 2.0 ** -k.float()
    return torch.floor(torch.rand(n, device=device) * 2 ** k) * d, d


def bootstrap_rows(B, bootstrap_every):
    """How many of B rows shortcut_times makes big steps: B / bootstrap_every, at least one and one flow row left;
    none for bootstrap_every = 0 (flow matching)."""
    return 0 if bootstrap_every == 0 else min(max(B // bootstrap_every, 1), B - 1)


def interval_rows(B, flow_fraction):
    """How many of B rows interval_times makes intervals: the 1 - flow_fraction that are not flow rows."""
    return B - round(flow_fraction * B)


def shortcut_times(B, bootstrap_every=8, denoise_steps=128, device="cpu"):
    """The shortcut paper's p(t, d): B / bootstrap_every rows at the levels d = 1, 1/2 ... 1/64 (dyadic_steps), the
    rest flow rows at the smallest step d = 1/denoise_steps with t on its grid. bootstrap_every = 0: flow rows only
    (flow matching). -> (t, d, n_big)"""
    n_big = bootstrap_rows(B, bootstrap_every)
    t_big, d_big = dyadic_steps(n_big, int(math.log2(denoise_steps)), device)  # 7 levels for 128 steps
    t_flow = torch.randint(denoise_steps, (B - n_big,), device=device) / denoise_steps
    d_flow = torch.full((B - n_big,), 1 / denoise_steps, device=device)
    return torch.cat([t_big, t_flow]), torch.cat([d_big, d_flow]), n_big


def interval_times(B, flow_fraction=0.75, intervals="uniform", device="cpu"):
    """MeanFlow's p(t, d): 1 - flow_fraction of the rows are intervals [t, t + d], the rest flow rows, d = 0 with
    t ~ U[0, 1] on its own (the smaller of two draws would starve t near 1, the last, detail-drawing steps of a
    many-step sample). intervals="uniform": from two uniform times, every interval equally likely (MeanFlow);
    "dyadic": only the steps a 1, 2, 4 ... 64-step sampler takes (dyadic_steps). -> (t, d, n_big)"""
    n_big = interval_rows(B, flow_fraction)
    if intervals == "dyadic":
        t_big, d_big = dyadic_steps(n_big, device=device)
    else:
        pair = torch.rand(n_big, 2, device=device)
        t_big, d_big = pair.min(dim=1).values, pair.max(dim=1).values - pair.min(dim=1).values
    t_flow = torch.rand(B - n_big, device=device)
    return torch.cat([t_big, t_flow]), torch.cat([d_big, torch.zeros(B - n_big, device=device)]), n_big


# -----------------------------------------------------------------------------
# The targets: the same three steps each, and the third is where they differ.

def flow_matching(x0, x1, t):
    """Flow matching (Lipman et al. 2023; Liu et al. 2023), the shortcut paper's d = 0 rows: s_target = v for
    every row. A big step along the learned v lands on the average of the data: one step draws a blur."""
    # 1. Noise the data: x_t on the straight path.
    # 2. Every row: s_target = v, the conditional velocity.
    return path(x0, x1, t)


@torch.no_grad()
def shortcut(teacher, x0, x1, y, t, d, n_big):
    """Shortcut models (Frans et al. 2024, Algorithm 1): a step of d is two of the model's own steps of d/2.
    teacher: the EMA model, as the official code."""
    # 1. Noise the data: x_t on the straight path.
    x_t, v = path(x0, x1, t)
    # 2. Flow rows: s_target = v.
    s_target = v.clone()
    # 3. Big steps: two teacher half steps make one step of d; the midpoint and the target are clipped to [-4, 4]
    #    as the official code.
    if n_big == 0:
        return x_t, s_target
    xb, tb, yb, half = x_t[:n_big], t[:n_big], y[:n_big], d[:n_big] / 2
    s1 = teacher(xb, tb, half, yb)
    x_mid = (xb + half.view(-1, 1, 1, 1) * s1).clamp(-4, 4)
    s2 = teacher(x_mid, tb + half, half, yb)
    s_target[:n_big] = ((s1 + s2) / 2).clamp(-4, 4)
    return x_t, s_target


@torch.no_grad()
def meanflow(model, x0, x1, y, t, d, n_big, tangent="v"):
    """MeanFlow (Geng et al. 2025, Algorithm 1), t = 0 noise: holding the end t + d fixed and differentiating
    d s = x_{t+d} - x_t in t (dx_t/dt = v, dd/dt = -1) gives s = v + d (ds/dx v + ds/dt - ds/dd), one forward-mode
    JVP along (v, 1, -1). tangent="model": the x-tangent is the model's own velocity sg(s(x_t, t, 0)) instead of
    the conditional v, whose variance the JVP amplifies (improved MeanFlow, arXiv 2512.02012)."""
    # 1. Noise the data: x_t on the straight path.
    x_t, v = path(x0, x1, t)
    # 2. Flow rows (d = 0): s_target = v.
    s_target = v.clone()
    # 3. Intervals: the JVP of the online model, without gradient. Fused CPU attention has no forward-mode
    #    derivative; the MATH backend (plain softmax) has. And in fp32 under any --amp (TF32 on a GPU): bf16 JVPs
    #    are where PyTorch MeanFlow ports report NaN losses late in training, the JVP runs on the interval rows
    #    only (1/4 at --flow-fraction 0.75), and the target is then the same in bf16 and fp32 runs (test_amp.py).
    if n_big == 0:
        return x_t, s_target
    xi, ti, di, yi, vi = x_t[:n_big], t[:n_big], d[:n_big], y[:n_big], v[:n_big]
    ones = torch.ones_like(ti)
    with sdpa_kernel(SDPBackend.MATH), torch.autocast(xi.device.type, enabled=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated")  # said by torch.func itself
        dx = model(xi, ti, torch.zeros_like(di), yi) if tangent == "model" else vi
        _, ds_dt = torch.func.jvp(lambda x, tt, dd: model(x, tt, dd, yi), (xi, ti, di), (dx, ones, -ones))
    s_target[:n_big] = vi + di.view(-1, 1, 1, 1) * ds_dt
    return x_t, s_target


@torch.no_grad()
def alpha_flow(model, x0, x1, y, t, d, n_big, alpha):
    """alpha-Flow (Zhang et al. 2025): the first alpha of the step follows the data's velocity v, the rest is the
    model's own step from there. alpha = 1 is flow matching, alpha = 1/2 a shortcut-style self-consistency, and
    alpha -> 0 MeanFlow (its first-order limit is the JVP target), reached without a JVP. The paper's loss weighs
    rows by 1/alpha; the same gradient comes from regressing onto sg(s) + (s_target - sg(s)) / alpha, which is what
    this returns: v at alpha = 1, MeanFlow's target as alpha -> 0. Under the adaptive weight the two forms part, and
    the paper's read worse on toyfaces (78% vs 85% at 1 step, 93% vs 100% at 128; docs/experiments.md)."""
    # 1. Noise the data: x_t on the straight path.
    x_t, v = path(x0, x1, t)
    # 2. Flow rows (d = 0): s_target = v.
    s_target = v.clone()
    # 3. Intervals: one batched call gives s at (x_t, t, d) and the model's step from x_t + alpha d v. In fp32
    #    under any --amp: the target divides their difference by alpha, which would scale bf16's rounding by 50.
    if n_big == 0:
        return x_t, s_target
    xi, ti, di, yi, vi = x_t[:n_big], t[:n_big], d[:n_big], y[:n_big], v[:n_big]
    x_s = xi + alpha * di.view(-1, 1, 1, 1) * vi
    with torch.autocast(xi.device.type, enabled=False):
        s, s_rest = model(torch.cat([xi, x_s]), torch.cat([ti, ti + alpha * di]), torch.cat([di, (1 - alpha) * di]),
                          torch.cat([yi, yi])).chunk(2)
    s_target[:n_big] = s + (alpha * vi + (1 - alpha) * s_rest - s) / alpha
    return x_t, s_target


def alpha_schedule(progress, alpha_min=0.02):
    """alpha-Flow's curriculum: alpha = 1 (flow matching) for the first part of training, a sigmoid down to
    alpha_min around the middle, then nearly MeanFlow. progress = step / max_steps."""
    return max(1 / (1 + math.exp(25 * (progress - 0.5))), alpha_min)  # 1 - sigmoid(25 (progress - 1/2))


@torch.no_grad()
def long_jump(teacher, x0, y, steps=4):
    """The long jump learns from the model's own few-step sampler (TwinFlow's "e2e" rows): rows at t = 0, d = 1
    from pure noise x0, whose target is where the teacher's K-step Euler sample from the same x0 and caption lands,

        s_target = sg(Phi_K(x0, y)) - x0,    Phi_K: K steps x <- x + (1/K) s(x, k/K, 1/K, y),  k = 0 ... K-1.

    The other objectives build the d = 1 target from one random data point x1: right on average over x1, but a
    small network regressing onto it settles between the modes (half a beard). Phi_K is one decided image per
    noise, so there is nothing to average. teacher: the EMA model. -> s_target of these rows (x_t = x0 at t = 0)."""
    # 1. The rows: t = 0 (x_t is the noise itself) and d = 1, one step from noise to data.
    # 2. The teacher's K small steps from the same noise and caption, without gradient.
    x, d = x0, torch.full((x0.shape[0],), 1 / steps, device=x0.device)
    for k in range(steps):
        x = x + d.view(-1, 1, 1, 1) * teacher(x, k * d, d, y)
    # 3. The one step of d = 1 that lands where the K steps did.
    return x - x0


def adaptive_weighted(row_loss, p=1.0):
    """MeanFlow's adaptive weight sg(1 / (mse + 1e-3)^p) per row: at p = 1 each row's loss is ~1, so the rows with
    large, noisy JVP targets cannot drown the others; p < 1 lets a row with a larger error pull harder. mse is the
    mean over pixels, so 1e-3 is an error floor. p: a number or one per row."""
    return row_loss / (row_loss.detach() + 1e-3) ** p


# -----------------------------------------------------------------------------
# One training step's loss, for any objective: its rows, its target, its weight. train.py's loop and bench.py
# call this one function.

def draw_rows(cfg, B, shape, rank=0, world_size=1, device="cpu"):
    """The noise x0 and the objective's (t, d) for all B rows of the global batch, then this rank's rows
    rank, rank + world_size ...: every rank has the same RNG state, so N ranks compute exactly the rows one process
    would. -> (x0, t, d, n_big): n_big of this rank's rows, the first ones, take big steps."""
    x0 = torch.randn(B, *shape, device=device)
    if cfg.objective in ADAPTIVE:
        t, d, n_big = interval_times(B, cfg.flow_fraction, cfg.intervals, device)
    else:
        t, d, n_big = shortcut_times(B, cfg.bootstrap_every if cfg.objective == "shortcut" else 0,
                                     cfg.denoise_steps, device)
    rows = slice(rank, None, world_size)
    return x0[rows], t[rows], d[rows], len(range(rank, n_big, world_size))


def jumping_rows(cfg, B, progress, rank=0, world_size=1, device="cpu"):
    """Which of this rank's rows are long jumps (long_jump): the last cfg.long_jump_rows of the global batch (flow
    rows), once training is cfg.long_jump_start of the way through (before, the teacher's few-step samples are no
    better than noise). -> a bool mask over this rank's rows."""
    on = progress >= cfg.long_jump_start
    return torch.arange(B, device=device)[rank::world_size] >= B - cfg.long_jump_rows * on


def targets(cfg, model, teacher, x0, x1, y, t, d, n_big, progress):
    """(x_t, s_target) of cfg.objective, by its function above (they differ in the big steps' target)."""
    if cfg.objective == "flow":
        return flow_matching(x0, x1, t)
    if cfg.objective == "shortcut":
        return shortcut(teacher, x0, x1, y, t, d, n_big)
    if cfg.objective == "meanflow":
        return meanflow(model, x0, x1, y, t, d, n_big, cfg.tangent)
    return alpha_flow(model, x0, x1, y, t, d, n_big, alpha_schedule(progress))


def training_loss(cfg, net, model, teacher, x1, y, progress, rank=0, world_size=1):
    """The loss of one training step of cfg.objective on this rank's rows x1, y (captions already dropped).
    cfg: train.py's arguments (objective, flow_fraction, intervals, tangent, bootstrap_every, denoise_steps,
    long_jump_*). net: the network to train (the model, or its DDP / compiled view); model: the plain online model
    (a JVP cannot run through DDP or torch.compile); teacher: the EMA. progress: step / max_steps.
    -> (loss, row_loss (B,), d (B,)): the mean, and each row's loss and step for the log's levels."""
    # 1. The rows: noise and (t, d) for the whole global batch, this rank's share; the long jumps at t = 0, d = 1.
    B = x1.shape[0] * world_size
    x0, t, d, n_big = draw_rows(cfg, B, x1.shape[1:], rank, world_size, x1.device)
    jump = jumping_rows(cfg, B, progress, rank, world_size, x1.device)
    t, d = t.masked_fill(jump, 0), d.masked_fill(jump, 1)
    # 2. The targets: the objective's own function above; the long jumps' from the teacher's K-step sample.
    x_t, s_target = targets(cfg, model, teacher, x0, x1, y, t, d, n_big, progress)
    if jump.any():
        s_target[jump] = long_jump(teacher, x0[jump], y[jump], cfg.long_jump_steps)
    # 3. Regress s(x_t, t, d, y) onto the target; MeanFlow and alpha-Flow weigh each row adaptively.
    s = net(x_t, t, d, y)
    row_loss = F.mse_loss(s.float(), s_target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if cfg.objective in ADAPTIVE:
        row_loss_weighted = adaptive_weighted(row_loss, torch.where(jump, cfg.long_jump_power, 1.0))
    else:
        row_loss_weighted = row_loss
    return row_loss_weighted.mean(), row_loss, d
