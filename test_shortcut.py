"""
Tests of the model, the sampler and the scripts end to end. CPU only, no downloads.

    python -m pytest -q
"""

import csv
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import run_script
from model import DiT, DiT_models
from model import load_checkpoint
from sample import parse_args, sample

pytestmark = pytest.mark.usefixtures("cpu_only")  # the CPU path on purpose, on a GPU machine too (conftest.py)

HERE = os.path.dirname(os.path.abspath(__file__))


def test_level_embedding_of_d_is_the_official_log2():
    model = DiT(**DiT_models["DiT-T/4"], input_size=16, in_channels=3, feature_dim=7, d_embedding="level")
    seen = []
    model.d_embedder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    model(torch.randn(3, 3, 16, 16), torch.rand(3), torch.tensor([1, 0.5, 1 / 128]), torch.randn(3, 7))
    assert torch.equal(seen[0], torch.tensor([0.0, 1.0, 7.0])) and model.d_embedder.scale == 1  # raw, as official
    assert DiT(**DiT_models["DiT-T/4"], input_size=16, in_channels=3, feature_dim=7).d_embedder.scale == 1000


def test_model_shapes_zero_init_and_null_caption():
    model = DiT(**DiT_models["DiT-T/4"], input_size=16, in_channels=3, feature_dim=7)
    x, t, d, y = torch.randn(4, 3, 16, 16), torch.rand(4), torch.tensor([1, 0.5, 1 / 64, 1 / 128]), torch.randn(4, 7)
    v = model(x, t, d, y)
    assert v.shape == x.shape
    assert torch.all(v == 0)  # adaLN-Zero: an untrained model predicts zero velocity
    # x-prediction: the untrained network draws x1 = 0, so v = (0 - x_t) / (1 - t), and a 1-step sample
    # x0 + v is exactly that drawing: the noise x0 cancels instead of passing through the network
    model.predict = "x"
    torch.testing.assert_close(model(x, t, d, y), -x / (1 - t).clamp(min=model.x_floor).view(-1, 1, 1, 1))
    t0 = torch.zeros(4)
    assert torch.equal(x + 1.0 * model(x, t0, torch.ones(4), y), torch.zeros_like(x))
    model.predict = "v"
    # zero rows select the learned null embedding, others go through the projection
    emb = model.y_embedder
    torch.nn.init.normal_(emb.null)
    y[1] = 0
    out = emb(y)
    assert torch.equal(out[1], emb.null) and not torch.allclose(out[0], emb.null)


def test_text_features_standardised_with_training_stats():
    emb = DiT(**DiT_models["DiT-T/4"], input_size=16, in_channels=3, feature_dim=7).y_embedder
    features = 5 + 0.1 * torch.randn(100, 7)  # a large common component, small differences: like frozen CLIP
    emb.set_feature_stats(features)
    z = (features - features.mean(0)) / features.std(0)
    assert torch.allclose(emb(features[:3]), emb.proj(z[:3]), atol=1e-5)
    assert torch.equal(emb(torch.zeros(1, 7))[0], emb.null)  # the null caption is still a zero row
    assert {"feature_mean", "feature_std"} <= set(emb.state_dict())  # checkpoints carry the stats


def test_dit_b2_parameter_count():
    model = DiT(**DiT_models["DiT-B/2"], input_size=32, in_channels=4, feature_dim=512)
    n = sum(p.numel() for p in model.parameters())
    assert 128e6 < n < 133e6, n  # the paper's ~130M


@pytest.mark.parametrize("steps", [1, 4, 128])
def test_sampler_calls_model_steps_times_with_right_t_and_d(steps):
    calls = []

    def model(x, t, d, y):
        calls.append((t.clone(), d.clone(), x.shape[0]))
        return torch.ones_like(x)

    noise = torch.zeros(3, 2, 4, 4)
    x = sample(model, noise, torch.randn(3, 5), steps)
    assert len(calls) == steps
    for i, (t, d, b) in enumerate(calls):
        assert b == 3 and torch.allclose(t, torch.full((3,), i / steps)) and torch.allclose(d, torch.full((3,), 1 / steps))
    assert torch.allclose(x, torch.ones_like(x))  # steps x (1/steps) x velocity 1

    calls.clear()
    sample(model, noise, torch.randn(3, 5), steps, cfg_scale=2.0)  # guidance: same number of calls, twice the batch
    assert len(calls) == steps and calls[0][2] == 6


# ---------------------------------------------------------------------------- scripts end to end

def run(*args, cwd):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU path on purpose
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """prepare a small toyfaces set -> train a tiny model for a few steps, in this process on the CPU (no torch
    import per script). Shared by the tests below."""
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        mp.chdir(root)
        for argv in [["prepare_data.py", "--n", "512", "--out", "data"],
                     ["train.py", "--data-dir", "data", "--out", "out", "--model", "DiT-T/4", "--batch", "32", "--lr", "2e-3",
                      "--predict", "x", "--objective", "shortcut", "--time-scale", "1000", "--max-steps", "60",
                      "--log-every", "5", "--sample-every", "30", "--quality-n", "4"]]:
            run_script(*argv)
    return root


def test_train_loss_falls_and_writes_grid_and_checkpoint(trained):
    with open(trained / "out" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(row["loss"]) for row in rows]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    # the reader's accuracy at 1, 2 and 4 steps on 4 x 6 fixed noises, at each checkpoint only, and its plot
    checked = [row["step"] for row in rows if row["accuracy_1step"]]
    assert checked == ["30", "60"] and all(0 <= float(rows[-1][f"accuracy_{s}step"]) <= 1 for s in (1, 2, 4))
    assert (trained / "out" / "quality.png").exists()
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:2]) / 2
    assert (trained / "out" / "grid_000030.png").exists() and (trained / "out" / "grid_000060.png").exists()
    ckpt = torch.load(trained / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 60 and {"model", "ema", "optimizer", "args", "meta", "text_encoder"} <= set(ckpt)
    assert load_checkpoint(trained / "out" / "ckpt.pt", "cpu")[0].predict == "x"  # sampled as it was trained


def test_sample_cli_writes_png(trained):
    r = run(os.path.join(HERE, "sample.py"), "--ckpt", "out/ckpt.pt", "--prompt", "a man with glasses", "a woman",
            "--steps", "1", "2", "--n", "3", "--out", "samples", cwd=trained)
    assert r.returncode == 0, r.stderr
    path = r.stdout.split("wrote ")[1].split()[0]
    from PIL import Image
    w, h = Image.open(trained / path).size
    # a block of 3 faces per step count, a band per prompt; 32 px faces x4 + 2 px apart, 18 px headings
    assert (w, h) == (2 * (3 * 130 + 6), 18 + 2 * (18 + 130))
    assert "attribute reader agrees on" in r.stdout


@pytest.mark.parametrize("bad", [["--steps", "3"], ["--steps", "0"], ["--steps", "-1"], ["--steps", "256"],
                                 ["--steps", "x"], ["--steps", "1.5"], ["--prompt", ""], ["--prompt", "  "],
                                 ["--n", "0"], ["--cfg", "nan"]])
def test_sample_bad_arguments_are_one_clear_line(bad, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(bad)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("bad", [["--steps", "x"], ["--ckpt", "missing.pt"]])
def test_sample_cli_bad_inputs_exit_without_traceback(trained, bad):
    r = run(os.path.join(HERE, "sample.py"), "--ckpt", "out/ckpt.pt", *bad, cwd=trained)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ")


def test_sample_cli_corrupt_checkpoint(trained):
    data = (trained / "out" / "ckpt.pt").read_bytes()
    (trained / "broken.pt").write_bytes(data[: len(data) // 2])
    r = run(os.path.join(HERE, "sample.py"), "--ckpt", "broken.pt", cwd=trained)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "cannot load checkpoint" in r.stderr
