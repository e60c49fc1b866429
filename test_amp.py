"""
The GPU's precision path, tested on the CPU. torch.autocast("cpu", dtype=torch.bfloat16) applies the casting rules
of CUDA's autocast, so `--amp bf16` runs here what train.py and sample.py run on a GPU by default (bf16 forward
passes; weights, AdamW, the EMA and the Euler updates in fp32). Every objective trains a few steps in bf16 with the
losses of fp32 within a few percent; a bf16 checkpoint holds only fp32 tensors and resumes bit for bit; 1- and
4-step samples are within bf16 tolerance of fp32. The slow tests take minutes on a CPU: --compile, and the dry
runs of .ci/gpu 1 and 2, the two commands that check a GPU machine end to end.

    OMP_NUM_THREADS=1 python -m pytest -q test_amp.py              # the default run leaves slow tests out
    OMP_NUM_THREADS=1 python -m pytest -q test_amp.py -m slow      # torch.compile, bash .ci/gpu 1|2 --dry-run
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import run_script
from model import DiT, DiT_models, autocast, load_checkpoint
from objectives import alpha_flow, interval_times, meanflow
from sample import sample
from test_bench import inputs, small_dit
from test_train import args, data, log_losses, train_here  # noqa: F401 (data: the 16 px toyfaces fixture)

HERE = os.path.dirname(os.path.abspath(__file__))

OBJECTIVES = {"flow": ["--objective", "flow"], "shortcut": [],  # shortcut: args()'s own, with its EMA teacher
              "meanflow": ["--objective", "meanflow", "--time-scale", "1"],
              "meanflow-tangent-model": ["--objective", "meanflow", "--time-scale", "1", "--tangent", "model"],
              "alphaflow": ["--objective", "alphaflow", "--time-scale", "1"]}

AMP_RUN = ["--lr", "1e-2", "--lr-schedule", "constant", "--long-jump-rows", "0"]  # a large lr: the output counts; the objectives alone


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """trained(objective, amp, *extra) -> the --out of a 4-step run of test_train's tiny config (DiT-T/4 on 16 px
    faces, batch 8) with AMP_RUN, trained once per module."""
    runs = {}

    def get(objective, amp, *extra):
        key = (objective, amp, *extra)
        if key not in runs:
            out = tmp_path_factory.mktemp(f"{objective}_{amp}") / "out"
            mp = pytest.MonkeyPatch()
            try:
                train_here(args(data, out, *OBJECTIVES[objective], *AMP_RUN, "--amp", amp, *extra, steps=4), mp)
            finally:
                mp.undo()
            runs[key] = out
        return runs[key]
    return get


def losses(out):
    """Every loss log.csv holds, step by step: the loss, then the mean MSE of each step-size level (unweighted: the
    adaptive weight of meanflow and alphaflow brings their loss to ~1 whatever the precision)."""
    return [float(v) for _, *row in log_losses(out) for v in row if v != ""]


def assert_fp32(tensors, where):
    for name, w in tensors.items():
        if torch.is_tensor(w) and w.is_floating_point():
            assert w.dtype == torch.float32, (where, name, w.dtype)


def test_autocast_follows_amp():
    x = torch.randn(4, 4)
    dtypes = {}
    for amp in ("auto", "bf16", "fp32"):
        with autocast("cpu", amp):
            dtypes[amp] = (x @ x).dtype
    assert dtypes == {"auto": torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}  # auto: fp32 on a CPU


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains_in_bf16_like_fp32(trained, objective):
    fp32, bf16 = losses(trained(objective, "fp32")), losses(trained(objective, "bf16"))
    assert len(fp32) == len(bf16) >= 8 and all(map(torch.isfinite, torch.tensor(bf16)))
    rel = [abs(a - b) / max(abs(a), 1e-3) for a, b in zip(fp32, bf16)]  # (a big step's first loss is 0)
    print(objective, f"bf16 vs fp32: max relative difference {max(rel):.2%}, mean {sum(rel) / len(rel):.2%}")
    assert max(rel) < 0.05, rel  # the same batches, the same steps: only the rounding differs ...
    assert max(rel) > 1e-5, rel  # ... and it does: bf16 really ran (the log keeps 5 decimals)
    ckpt = torch.load(trained(objective, "bf16") / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["amp"] == "bf16" and ckpt["step"] == 4
    assert_fp32(ckpt["model"], "model")
    assert_fp32(ckpt["ema"], "ema")
    for k, state in ckpt["optimizer"]["state"].items():
        assert_fp32(state, f"optimizer state {k}")
    ema, model = ckpt["ema"], ckpt["model"]
    assert any(not torch.equal(ema[k], model[k]) for k in model)  # the EMA is its own average, also in fp32


def test_bf16_run_resumes_bit_for_bit(trained, data, monkeypatch):
    """2 steps, then --resume to 4 == 4 steps straight, both in bf16 with the EMA teacher: a GPU run after a crash."""
    resumed = trained("shortcut", "bf16", "--max-steps", "2", "--sample-every", "2")
    train_here(args(data, resumed, *AMP_RUN, "--amp", "bf16", "--sample-every", "2", "--resume", steps=4), monkeypatch)
    a, b = (torch.load(run / "ckpt.pt", weights_only=True) for run in (trained("shortcut", "bf16"), resumed))
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(w, b[key][name]) for name, w in a[key].items()), key
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(s_a[k], s_b[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert log_losses(resumed) == log_losses(trained("shortcut", "bf16"))


@pytest.mark.parametrize("tangent", ["v", "model"])
def test_meanflow_target_is_fp32_under_bf16_autocast(tangent):
    """objectives.meanflow runs its JVP with autocast off: in a bf16 run the target is the fp32 one, bit for bit."""
    model, (x1, _, _, y) = small_dit(), inputs(8)
    x0 = torch.randn_like(x1)
    t, d, n_big = interval_times(8, 0.5)
    x_t, fp32 = meanflow(model, x0, x1, y, t, d, n_big, tangent)
    with autocast("cpu", "bf16"):
        _, bf16 = meanflow(model, x0, x1, y, t, d, n_big, tangent)
        assert model(x_t, t, d, y).dtype == torch.bfloat16  # (the autocast is on around it)
    assert bf16.dtype == torch.float32 and torch.equal(bf16, fp32)


def test_alpha_flow_target_is_fp32_under_bf16_autocast():
    """alpha-Flow's target divides the difference of two forwards by alpha: at alpha = 0.02 a bf16 forward's
    rounding, x 50, was 23% (relative RMS) of the target. objectives.alpha_flow runs them in fp32 under any autocast."""
    torch.manual_seed(0)
    model = DiT(**DiT_models["DiT-T/2"], input_size=16, in_channels=3, feature_dim=7, predict="x", time_scale=1.0,
                x_floor=0.02)
    for p in model.parameters():  # adaLN-Zero starts as the identity: perturb so the forwards differ
        p.data.add_(0.05 * torch.randn_like(p))
    (x1, _, _, y), x0 = inputs(16), torch.randn(16, 3, 16, 16)
    t, d, n_big = interval_times(16, 0.5)
    _, fp32 = alpha_flow(model, x0, x1, y, t, d, n_big, alpha=0.02)
    with autocast("cpu", "bf16"):
        _, bf16 = alpha_flow(model, x0, x1, y, t, d, n_big, alpha=0.02)
    rel = ((bf16 - fp32)[:n_big].norm() / fp32[:n_big].norm()).item()
    assert bf16.dtype == torch.float32 and rel < 0.02, rel


@pytest.mark.parametrize("steps", [1, 4])
def test_bf16_samples_are_within_bf16_tolerance_of_fp32(steps):
    model, (noise, _, _, y) = small_dit().eval(), inputs(8)
    fp32 = sample(model, noise, y, steps)
    with autocast("cpu", "bf16"):
        bf16 = sample(model, noise, y, steps)
    assert bf16.dtype == torch.float32  # the Euler updates stay fp32: x + d * v promotes the bf16 v
    rel = ((bf16 - fp32).norm() / (fp32 - noise).norm()).item()  # relative to how far the sampler moved
    assert 1e-4 < rel < 2e-2, rel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: bash .ci/gpu 1 runs it on a GPU machine")
def test_cuda_bf16_is_the_cpu_bf16_path():
    """What the CPU tests above stand for: on CUDA, --amp auto is bf16, its forward pass is the CPU's bf16 one within
    bf16 rounding, and MeanFlow's target is the fp32 one (TF32 matmuls on the GPU)."""
    model, x = small_dit().eval(), inputs(8)
    x0, (t, d, n_big) = torch.randn_like(x[0]), interval_times(8, 0.5)
    with autocast("cpu", "bf16"):
        cpu = model(*x).float()
        _, cpu_target = meanflow(model, x0, x[0], x[3], t, d, n_big)
    model, x, x0, t, d = model.cuda(), [v.cuda() for v in x], x0.cuda(), t.cuda(), d.cuda()
    with autocast("cuda"):
        gpu = model(*x)
        _, gpu_target = meanflow(model, x0, x[0], x[3], t, d, n_big)
    assert gpu.dtype == torch.bfloat16 and gpu_target.dtype == torch.float32
    assert ((gpu.float().cpu() - cpu).norm() / cpu.norm()).item() < 2e-2
    assert ((gpu_target.cpu() - cpu_target).norm() / cpu_target.norm()).item() < 1e-2


def test_sample_cli_in_bf16(trained, tmp_path, capsys):
    """sample.py --amp bf16 on a bf16 run's checkpoint: the EMA loads and 1 and 4 steps draw images."""
    ckpt = trained("shortcut", "bf16") / "ckpt.pt"
    model, _ = load_checkpoint(str(ckpt), "cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    run_script("sample.py", "--ckpt", ckpt, "--steps", 1, 4, "--n", 4, "--amp", "bf16", "--out", tmp_path)
    out = capsys.readouterr().out
    assert "wrote" in out and " 4 steps: attribute reader agrees on" in out, out


@pytest.mark.slow
def test_compile_trains_like_eager_and_saves_plain_keys(trained, data, tmp_path, monkeypatch):
    """train.py --compile (student and EMA teacher; ~2 minutes to compile on this CPU): the losses of eager mode, and a
    checkpoint of the plain modules, without torch.compile's "_orig_mod." key prefix."""
    from torch._dynamo.utils import counters
    counters.clear()
    train_here(args(data, tmp_path, *AMP_RUN, "--amp", "fp32", "--compile", steps=4), monkeypatch)
    assert counters["stats"]["unique_graphs"] >= 2  # it compiled (the student and the teacher)
    eager, compiled = losses(trained("shortcut", "fp32")), losses(tmp_path)
    rel = [abs(a - b) / max(abs(a), 1e-3) for a, b in zip(eager, compiled)]
    print(f"compiled vs eager: max relative difference {max(rel):.2e}")
    assert len(eager) == len(compiled) and max(rel) < 1e-3, rel  # fused kernels round differently, not more
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert not [k for key in ("model", "ema") for k in ckpt[key] if "_orig_mod." in k]
    assert load_checkpoint(str(tmp_path / "ckpt.pt"), "cpu")[0] is not None  # sample.py loads it strictly


@pytest.mark.slow
@pytest.mark.parametrize("part, stages", [(1, ["setup", "data", "pytest", "resume", "torchrun"]),
                                          (2, ["setup", "bench", "toyfaces", "sample"])])
def test_gpu_check_dry_run_passes_every_stage(part, stages, tmp_path):
    """bash .ci/gpu 1|2 --dry-run: every stage of each part of the GPU check at CPU sizes, and gpu.json says so."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["bash", os.path.join(HERE, ".ci", "gpu"), str(part), "--dry-run", "--out", str(tmp_path / "c")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.load(open(tmp_path / "c" / "gpu.json"))
    assert report["passed"] and report["dry_run"] and report["part"] == part
    assert [s["stage"] for s in report["stages"]] == stages
    if part == 2:
        assert "train_meanflow" in report["bench"] and len(report["accuracy"]) == 4  # sample.py's line per step count
    print(r.stdout)
