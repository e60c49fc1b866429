"""docs/reproduce.md cannot drift: its commands run as written, in order, on fixtures (a 10-image CelebAMask-HQ
folder of 64 px images, a tiny random VAE, CLIP and Inception, two training steps of DiT-T/4), with flags appended
for the tiny sizes (argparse: the last one wins; fid.py: one step count, each FID being a 2048-d eigensolve of
seconds).    python -m pytest -q test_reproduce.py
"""
import os
import re
import shlex

import numpy as np
import pytest
import torch

from conftest import run_script
from test_celebahq import HERE, N, make_source

pytestmark = pytest.mark.usefixtures("cpu_only")  # the CPU path on purpose, on a GPU machine too (conftest.py)


def commands():
    """The `python ...` lines of the doc's bash blocks, in order."""
    with open(os.path.join(HERE, "docs", "reproduce.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python ")]


def test_reproduce_commands_run_on_fixtures(models, inception_file, tmp_path, monkeypatch, capsys):
    vae, clip = models
    src, _ = make_source(tmp_path, "CelebAMask-HQ")
    tiny = {"prepare_data.py": ["--vae", vae, "--clip", clip, "--inception", inception_file, "--workers", "0",
                                 "--resolution", "64"],
            "train.py": ["--model", "DiT-T/4", "--batch", "4", "--max-steps", "2", "--sample-every", "2"],
            "fid.py": ["--n", "3", "--batch", "3", "--inception", inception_file, "--workers", "0", "--steps", "1"],
            "sample.py": ["--n", "2"]}
    lines = commands()
    assert [shlex.split(c)[1] for c in lines] == ["prepare_data.py", "train.py", "fid.py", "fid.py", "fid.py",
                                                  "train.py", "fid.py", "sample.py"]
    monkeypatch.chdir(tmp_path)
    printed = {}
    for line in lines:
        argv = [str(src) if a == "~/CelebAMask-HQ" else a for a in shlex.split(line)]  # as the shell expands ~
        run_script(argv[1], *argv[2:], *tiny[argv[1]])
        printed[line] = capsys.readouterr().out

    prepare, train_u, fid_online, fid_ema, fid_vae, train_t, fid_text, sample = printed.values()
    assert f"fid_stats.npz: Inception statistics of {N} real images" in prepare
    assert "(unused: --unconditional)" in train_u and "paper recipe" in train_u
    assert torch.load("out_uncond/ckpt.pt", weights_only=True)["args"]["unconditional"]
    reference = f"reference: real images of {src} at 64 px, N = {N} (data/celebahq/fid_stats.npz)"
    for out, weights in [(fid_online, "online"), (fid_ema, "ema"), (fid_text, "online")]:
        assert reference in out and f"({weights} weights)" in out
        steps, fd = out.split("steps       FID\n")[1].split()[:2]
        assert steps == "1" and np.isfinite(float(fd))
    assert "unconditional" in fid_online and "cfg 1.0" in fid_text
    assert "reference: VAE reconstructions of" in fid_vae and "the VAE's share: its reconstructions are at FID" in fid_vae
    assert "paper recipe" in train_t and "unused" not in train_t and "wrote samples/" in sample
    for d in ["fid_uncond", "fid_uncond_ema", "fid_vae", "fid_text"]:
        assert (tmp_path / d / "fid.csv").exists()
