"""Fixtures shared by the tests: TF32 flags restored after every test, the CPU path on purpose (cpu_only), and
the tiny models of test_celebahq.py and test_reproduce.py, made once per test session; and run_script, a script's
command line run in the test's own process."""
import os
import runpy
import sys

import pytest
import torch

import toyfaces

HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(name, *args):
    """python name args, in this process: no second torch import per command (seconds, not tens of seconds)."""
    argv = sys.argv
    sys.argv = [name, *map(str, args)]
    try:
        runpy.run_path(os.path.join(HERE, name), run_name="__main__")
    finally:
        sys.argv = argv


@pytest.fixture(autouse=True)
def restore_tf32():
    """train.py switches TF32 on for the whole process; an in-process run must not leak it into later tests."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def cpu_only(monkeypatch):
    """Hide CUDA from this test and the subprocesses it starts: the code takes its CPU path, whose results are
    deterministic and whose printed lines say "device cpu", on a GPU machine too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A tiny AutoencoderKL and CLIP text encoder, saved with save_pretrained like the real ones."""
    from diffusers import AutoencoderKL
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    vae.save_pretrained(root / "vae")
    toyfaces.make_tiny_clip(str(root / "clip"), ["man", "woman", "glasses", "smiling"])
    return str(root / "vae"), str(root / "clip")


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """A random-weight FID Inception saved like pytorch-fid's file (the statistics mean nothing, the plumbing does)."""
    import inception
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(inception.FIDInceptionV3().state_dict(), path)
    return str(path)
