"""
Tests of train.py's reliability: exact resume after SIGKILL, atomic checkpoints, the NaN guard, one-line errors
for bad inputs, and DDP (2 CPU processes over gloo give the same step as one). CPU only, no downloads.

    OMP_NUM_THREADS=1 python -m pytest -q test_train.py

Most runs are in-process (runpy) to skip Python start-up; the kill and the DDP run are real subprocesses.
"""

import argparse
import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import run_script
from prepare_data import prepare_toyfaces
from model import load_checkpoint
from objectives import SETTINGS, told_step
from train import RECIPES, apply_recipe, setup_ddp

pytestmark = pytest.mark.usefixtures("cpu_only")  # the CPU path on purpose, on a GPU machine too (conftest.py)

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "train.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # subprocesses: the CPU path, gloo


def args(data, out, *extra, steps=8):
    """A tiny run: DiT-T/4 on 16x16 faces, batch 8 (2 bootstrap rows, 2 long jumps from 30% of the steps on), a
    checkpoint every 4 steps, no reader check (test_shortcut.py has one)."""
    return ["--data-dir", str(data), "--out", str(out), "--model", "DiT-T/4", "--batch", "8", "--lr", "1e-3",
            "--predict", "v", "--objective", "shortcut", "--time-scale", "1000",
            "--ema-decay", "0.9", "--bootstrap-every", "4", "--long-jump-rows", "2", "--max-steps", str(steps),
            "--log-every", "1", "--sample-every", "4", "--quality-n", "0", *extra]


def train_here(argv, monkeypatch):
    """python train.py argv, in this process, on the CPU whatever the machine has (bit-for-bit comparisons)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_script("train.py", *argv)


def error_line(argv, monkeypatch, capsys):
    """Run train.py expecting a failure: returns its message, asserted to be one line starting with 'error: '."""
    with pytest.raises(SystemExit) as e:
        train_here(argv, monkeypatch)
    code = e.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err  # SystemExit(str) exits 1; argparse 2
    assert code not in (0, None)
    lines = message.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), message
    return lines[0]


def log_losses(out):
    with open(os.path.join(out, "log.csv")) as f:
        return [(int(r["step"]), r["loss"], *(r[k] for k in r if k.startswith("loss_d"))) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("toyfaces16")
    prepare_toyfaces(str(out), n=64, resolution=16)
    return out


@pytest.fixture(scope="module")
def run4(data, tmp_path_factory):
    """A run trained in-process to its checkpoint at step 4. Tests copy it before touching it."""
    out = tmp_path_factory.mktemp("run4") / "out"
    mp = pytest.MonkeyPatch()
    try:
        train_here(args(data, out, steps=4), mp)
    finally:
        mp.undo()
    return out


def copy_run(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run, out)
    return out


# ---------------------------------------------------------------------------- DDP: the global batch, split

def test_ddp_two_processes_take_the_same_step_as_one(data, tmp_path, monkeypatch):
    """torchrun, 2 CPU processes over gloo, batch 2 x 4 vs one process with batch 8: one step each."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
                        *args(data, tmp_path / "ddp", steps=1)], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("2 processes") == 1  # only rank 0 prints
    train_here(args(data, tmp_path / "one", steps=1), monkeypatch)
    ddp, one = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("ddp", "one"))
    for key in ("model", "ema"):
        for name, w in one[key].items():
            assert (ddp[key][name] - w).abs().max() < 1e-5, (key, name)
    # AdamW's first moment after one step is 0.1 x the gradient: the same mean gradient over the same 8 rows
    moved = 0
    for state_ddp, state_one in zip(ddp["optimizer"]["state"].values(), one["optimizer"]["state"].values()):
        assert (state_ddp["exp_avg"] - state_one["exp_avg"]).abs().max() < 1e-5
        moved += state_one["exp_avg"].abs().sum()
    assert moved > 1e-3  # the step was real: the comparison above is not between zeros
    assert log_losses(tmp_path / "ddp")[0][0] == 1


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    """torchrun --nproc_per_node=2 on a 1-GPU machine: refused before any process group, naming the fix."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        setup_ddp()
    assert str(e.value.code) == ("error: 2 processes on this machine but 1 GPU(s): use --nproc_per_node=1, or "
                                 "CUDA_VISIBLE_DEVICES= for CPU processes")


# ---------------------------------------------------------------------------- resume after a crash

def test_resume_after_sigkill_matches_the_straight_run(data, tmp_path, monkeypatch):
    """4 steps, SIGKILL while training steps 5..8, --resume to 8 == 8 steps straight, bit for bit."""
    killed = subprocess.Popen([sys.executable, TRAIN, *args(data, tmp_path / "killed")], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = tmp_path / "killed" / "log.csv", time.time() + 300
    while killed.poll() is None and time.time() < deadline:  # step 5 logged: past the checkpoint at 4
        if log.exists() and any(line.startswith("5,") for line in log.read_text().splitlines()):
            os.kill(killed.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)["step"] == 4
    assert max(step for step, *_ in log_losses(tmp_path / "killed")) > 4  # steps were lost: the resume must redo them

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the killed run: the same kernels, the same bits
    try:
        train_here(args(data, tmp_path / "killed", "--resume"), monkeypatch)
        train_here(args(data, tmp_path / "straight"), monkeypatch)
    finally:
        torch.set_num_threads(threads)
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("straight", "killed"))
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        assert all(torch.equal(w, b[key][name]) for name, w in a[key].items()), key
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(s_a[k], s_b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["numpy"] == b["rng"]["numpy"]
    # the log: every step once, the same losses
    assert log_losses(tmp_path / "killed") == log_losses(tmp_path / "straight")
    assert [step for step, *_ in log_losses(tmp_path / "straight")] == list(range(1, 9))


def test_checkpoint_holds_only_plain_data(run4):
    ckpt = torch.load(run4 / "ckpt.pt", weights_only=True)  # would fail on any pickled object
    assert ckpt["step"] == 4 and isinstance(ckpt["args"], dict) and ckpt["args"]["model"] == "DiT-T/4"
    assert {"model", "ema", "optimizer", "rng", "meta"} <= set(ckpt)
    assert not os.path.exists(str(run4 / "ckpt.pt") + ".tmp")


# ---------------------------------------------------------------------------- failures keep the last checkpoint

def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(data, run4, tmp_path, monkeypatch, capsys):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(data, poisoned)
    x1 = np.load(poisoned / "x1.npy")
    x1[:] = np.nan  # every batch of this copy has NaN pixels: the first step's loss is NaN
    np.save(poisoned / "x1.npy", x1)
    out = copy_run(run4, tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    line = error_line(args(poisoned, out, "--resume"), monkeypatch, capsys)
    assert "loss is nan at step 5" in line and "step 4) is untouched" in line
    assert (out / "ckpt.pt").read_bytes() == before
    assert not (out / "grid_000008.png").exists()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(run4, data, tmp_path, monkeypatch, capsys):
    """A file size limit makes the checkpoint's write fail halfway, as a full disk would."""
    resource = pytest.importorskip("resource")
    out = copy_run(run4, tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, limits[1]))  # 1 MiB: log.csv fits, the 22 MB checkpoint not
    try:
        line = error_line(args(data, out, "--resume"), monkeypatch, capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert line.startswith(f"error: cannot save {out / 'ckpt.pt'}") and "previous checkpoint is untouched" in line
    assert (out / "ckpt.pt").read_bytes() == before
    assert not os.path.exists(str(out / "ckpt.pt") + ".tmp")


# ---------------------------------------------------------------------------- bad inputs: one line, exit != 0

def half_written(data, tmp_path):  # prepare_data.py writes meta.json last
    shutil.copytree(data, tmp_path / "half", ignore=shutil.ignore_patterns("meta.json"))
    return ["--data-dir", str(tmp_path / "half")]


def wrong_shape(data, tmp_path):
    shutil.copytree(data, tmp_path / "wrong")
    np.save(tmp_path / "wrong" / "x1.npy", np.zeros((64, 1, 3, 16, 8), np.float16))
    return ["--data-dir", str(tmp_path / "wrong")]


def other_resolution(data, tmp_path):
    prepare_toyfaces(str(tmp_path / "res8"), n=16, resolution=8)
    return ["--data-dir", str(tmp_path / "res8"), "--out", str(tmp_path / "run"), "--resume"]


def truncated_checkpoint(data, tmp_path):
    path = tmp_path / "run" / "ckpt.pt"
    path.write_bytes(path.read_bytes()[:1000])
    return ["--out", str(tmp_path / "run"), "--resume"]


def checkpoint_without_rng(data, tmp_path):  # as written before --resume existed
    path = tmp_path / "run" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["rng"]
    torch.save(ckpt, path)
    return ["--out", str(tmp_path / "run"), "--resume"]


def out_is_a_file(data, tmp_path):
    (tmp_path / "file").write_text("")
    return ["--out", str(tmp_path / "file")]


BAD = {
    "half-written data dir": (half_written, "meta.json not found"),
    "wrong array shape": (wrong_shape, "x1.npy has shape (64, 1, 3, 16, 8) but meta.json says (64, 1, 3, 16, 16)"),
    "batch larger than the data": (lambda data, tmp: ["--batch", "65"], "larger than the data set (64 images"),
    "batch 0": (lambda data, tmp: ["--batch", "0"], "argument --batch: must be a whole number >= 1, got '0'"),
    "unknown model": (lambda data, tmp: ["--model", "DiT-Q/3"], "argument --model: invalid choice: 'DiT-Q/3'"),
    "out dir not writable": (out_is_a_file, "cannot write to --out"),
    "checkpoint exists, no --resume": (lambda data, tmp: ["--out", str(tmp / "run")], "exists: add --resume"),
    "--resume without checkpoint": (lambda data, tmp: ["--resume"], "not found"),
    "--resume truncated checkpoint": (truncated_checkpoint, "cannot load checkpoint"),
    "--resume older checkpoint": (checkpoint_without_rng, "cannot resume from"),
    "--resume other model": (lambda data, tmp: ["--out", str(tmp / "run"), "--resume", "--model", "DiT-T/2"],
                             "is DiT-T/4 --objective shortcut --predict v --x-floor 0.25 --time-scale 1000 on [3, 16, 16] "
                             "data with 64-dim text features, this run is DiT-T/2 --objective shortcut --predict v "
                             "--x-floor 0.25 --time-scale 1000 on [3, 16, 16] with 64-dim"),
    "--resume other prediction": (lambda data, tmp: ["--out", str(tmp / "run"), "--resume", "--predict", "x"],
                                  "this run is DiT-T/4 --objective shortcut --predict x --x-floor 0.25 --time-scale"),
    "--resume other floor": (lambda data, tmp: ["--out", str(tmp / "run"), "--resume", "--x-floor", "0.02"],
                             "this run is DiT-T/4 --objective shortcut --predict v --x-floor 0.02 --time-scale"),
    "--resume other objective": (lambda data, tmp: ["--out", str(tmp / "run"), "--resume", "--objective", "meanflow"],
                                 "this run is DiT-T/4 --objective meanflow --predict v --x-floor 0.02 --time-scale"),
    "--resume other time scale": (lambda data, tmp: ["--out", str(tmp / "run"), "--resume", "--time-scale", "1"],
                                  "--x-floor 0.25 --time-scale 1 on [3, 16, 16]"),
    "--resume unconditional": (lambda data, tmp: ["--out", str(tmp / "run"), "--resume", "--unconditional"],
                               "this run is DiT-T/4 --objective shortcut --predict v --x-floor 0.25 --time-scale 1000 "
                               "--unconditional on [3, 16, 16]"),
    "--resume level embedding": (lambda data, tmp: ["--out", str(tmp / "run"), "--resume", "--d-embedding", "level"],
                                 "--time-scale 1000 --d-embedding level on [3, 16, 16]"),
    "level embedding with meanflow": (lambda data, tmp: ["--objective", "meanflow", "--d-embedding", "level"],
                                      "--d-embedding level needs d > 0: not with --objective meanflow"),
    "flow fraction above 1": (lambda data, tmp: ["--objective", "meanflow", "--flow-fraction", "1.5"],
                              "need 0 <= --flow-fraction <= 1 and --time-scale > 0, got 1.5 and 1000"),
    "x floor of zero": (lambda data, tmp: ["--x-floor", "0"], "need 0 < --x-floor <= 1, got 0.0"),
    "--resume other data shape": (other_resolution, "--time-scale 1000 on [3, 16, 16] data with 64-dim text "
                                                    "features, this run is DiT-T/4 --objective shortcut --predict v "
                                                    "--x-floor 0.25 --time-scale 1000 on [3, 8, 8] with 64-dim"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_are_one_line_and_overwrite_nothing(case, data, run4, tmp_path, monkeypatch, capsys):
    make, expected = BAD[case]
    run = copy_run(run4, tmp_path).rename(tmp_path / "run")  # an earlier run, for the cases that name it
    argv = args(data, tmp_path / "new") + make(data, tmp_path)  # later flags override earlier ones
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    line = error_line(argv, monkeypatch, capsys)
    assert expected in line, line
    assert all((run / name).read_bytes() == b for name, b in before.items())  # the existing run is untouched
    assert not (tmp_path / "new" / "ckpt.pt").exists()


# ---------------------------------------------------------------------------- recipes, MeanFlow end to end

def test_recipe_follows_the_data_and_a_given_flag_wins():
    flags = dict.fromkeys([*RECIPES["paper"], "time_scale", "x_floor", "bootstrap_every", "flow_fraction"])
    args = argparse.Namespace(**dict(flags, batch=32))
    assert apply_recipe(args, {"dataset": "toyfaces"}) == "toyfaces recipe, --batch 32"
    assert args.batch == 32 and all(getattr(args, k) == v for k, v in RECIPES["toyfaces"].items() if k != "batch")
    assert (args.time_scale, args.x_floor, args.flow_fraction, args.bootstrap_every) == (1, 0.02, 0.75, None)
    args = argparse.Namespace(**flags)
    assert apply_recipe(args, {"dataset": "celebahq"}) == "paper recipe"
    assert vars(args) == dict(RECIPES["paper"], **SETTINGS["shortcut"], flow_fraction=None)
    assert args.model == "DiT-B/2" and args.max_steps == 410_000 and args.time_scale == 1000


def test_an_objective_brings_its_own_settings_whatever_the_data():
    """--objective meanflow on the paper's data takes MeanFlow's raw time embedding, not the shortcut recipe's."""
    flags = dict.fromkeys([*RECIPES["paper"], "time_scale", "x_floor", "bootstrap_every", "flow_fraction"])
    args = argparse.Namespace(**dict(flags, objective="meanflow"))
    assert apply_recipe(args, {"dataset": "celebahq"}) == "paper recipe, --objective meanflow"
    assert (args.time_scale, args.x_floor, args.flow_fraction, args.bootstrap_every) == (1, 0.02, 0.75, None)
    args = argparse.Namespace(**dict(flags, objective="shortcut", time_scale=1.0))
    assert apply_recipe(args, {"dataset": "toyfaces"}) == "toyfaces recipe, --objective shortcut, --time-scale 1"
    assert (args.time_scale, args.x_floor, args.bootstrap_every) == (1, 0.25, 8)


def test_meanflow_run_saves_its_objective_and_time_scale(data, tmp_path, monkeypatch, capsys):
    train_here(args(data, tmp_path / "mf", "--objective", "meanflow", "--time-scale", "1", steps=4), monkeypatch)
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("DiT-T/4 (1.4M params), toyfaces recipe, --batch 8, --lr 0.001, --ema-decay 0.9, --predict v, "
                     "--long-jump-rows 2, "
                     "--max-steps 4, --sample-every 4: 4 steps at batch 8, device cpu")  # the recipe's objective
    model, ckpt = load_checkpoint(tmp_path / "mf" / "ckpt.pt", "cpu")
    assert ckpt["args"]["objective"] == "meanflow" and model.t_embedder.scale == model.d_embedder.scale == 1
    assert ckpt["args"]["x_floor"] == model.x_floor == 0.02  # the objective's floor, saved and loaded
    assert told_step(ckpt["args"]) is None  # sampled with the step it takes, whatever --bootstrap-every says
    rows = log_losses(tmp_path / "mf")
    # batch 8: 6 flow rows (d = 0, logged as d = 1/128) and 2 interval rows a step, binned by their nearest level
    assert len(rows) == 4 and all(r[-1] and sum(map(bool, r[2:-1])) in (1, 2) for r in rows)
