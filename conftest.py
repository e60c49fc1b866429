"""Fixtures shared by test_celebahq.py and test_reproduce.py, made once per test session."""
import pytest
import torch

import toyfaces


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
