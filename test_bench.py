"""
Tests of the fast path (it computes what the plain path does), the FLOP count behind MFU, and bench.py's smoke run.

    python -m pytest -q test_bench.py
"""

import contextlib
import copy
import json

import pytest
import torch

from bench import (PRESETS, build_vae, count_flops, flop_counts, main, make_train_step, peak_tflops, plain_mode,
                   train_flops_per_image)
from model import DiT


def small_dit(seed=0):
    """A small DiT with random weights everywhere: adaLN-Zero's zero output would make every comparison pass."""
    torch.manual_seed(seed)
    model = DiT(input_size=16, in_channels=3, feature_dim=7, hidden_size=64, depth=2, num_heads=4, patch_size=2)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def inputs(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3, 16, 16, generator=g), torch.rand(B, generator=g), torch.rand(B, generator=g),
            torch.randn(B, 7, generator=g))


def test_flops_per_image_is_what_pytorch_counts_and_matches_the_dit_paper():
    model = small_dit()
    with torch.no_grad():
        counted = count_flops(lambda: model(*inputs(3)))
    assert counted == 3 * model.flops_per_image()  # exact: every matmul, attention included


def test_flop_counts_of_the_gpu_preset_match_the_published_figures():
    g = flop_counts(PRESETS["DiT-B/2"], (4, 32, 32))
    assert abs(g["forward"] - 2 * 23.01) < 0.2  # the DiT paper's 23.01 "Gflops" for DiT-B/2 are multiply-adds
    assert abs(g["train_step"] / g["forward"] - (3 + 2 / 8)) < 1e-9
    assert 600 < g["vae_decode"] < 640 and 260 < g["vae_encode"] < 285  # SD-VAE at 256 px: ~620 and ~270
    assert 11 < g["inception"] < 12  # InceptionV3 at 299 px: ~11.4


def test_training_step_flops_are_three_forwards_plus_two_teacher_forwards_on_bootstrap_rows():
    model = small_dit()
    step = make_train_step(model, torch.optim.AdamW(model.parameters()), 8, contextlib.nullcontext())
    x1, y = torch.randn(16, 3, 16, 16), torch.randn(16, 7)
    counted = count_flops(lambda: step(x1, y))
    expected = 16 * train_flops_per_image(model, 16, 8)  # (3 + 2 * 2/16) forwards per image
    assert 0.99 * expected < counted <= expected  # less only by the input gradient of the patch embedding


@pytest.mark.parametrize("objective", ["flow", "meanflow", "alphaflow"])
def test_training_step_flops_of_the_other_objectives_are_what_pytorch_counts(objective):
    """MeanFlow: 3 forwards for the student plus a JVP (3 forwards as counted) on 1/4 of the rows; alpha-Flow: two
    no-grad forwards there; flow matching: the student alone."""
    model = small_dit()
    step = make_train_step(model, torch.optim.AdamW(model.parameters()), 8, contextlib.nullcontext(),
                           objective=objective)
    x1, y = torch.randn(16, 3, 16, 16), torch.randn(16, 7)
    counted = count_flops(lambda: step(x1, y))
    expected = 16 * train_flops_per_image(model, 16, 8, objective)
    assert 0.99 * expected < counted <= expected, (counted / expected)


def test_fused_attention_equals_plain_and_bf16_autocast_is_within_bf16_tolerance():
    model = small_dit().eval()
    x = inputs(4)
    with torch.no_grad():
        fast = model(*x)  # F.scaled_dot_product_attention picks a fused kernel
        with plain_mode():
            plain = model(*x)  # matmul, softmax, matmul
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what CUDA runs in; the CPU autocast has the same rules
            half = model(*x).float()
    assert plain.abs().mean() > 0.1  # a real output, not adaLN-Zero's zeros
    assert torch.allclose(fast, plain, atol=1e-5, rtol=1e-4)
    rel = (half - plain).norm() / plain.norm()
    assert rel < 2e-2, rel  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
    assert rel > 1e-4  # (and autocast really ran in bf16)


def test_fast_and_baseline_training_steps_do_the_same_work():
    """bench.py's fast step (fused attention, foreach AdamW) and its --baseline one (plain attention, for-loop AdamW)
    give the same losses and weights in fp32 from the same start: the speed-up is not bought with other work."""
    fast_model, plain_model = small_dit(), small_dit()
    fast = make_train_step(fast_model, torch.optim.AdamW(fast_model.parameters(), lr=1e-3), 4,
                           contextlib.nullcontext())
    plain = make_train_step(plain_model, torch.optim.AdamW(plain_model.parameters(), lr=1e-3, foreach=False), 4,
                            contextlib.nullcontext())
    g = torch.Generator().manual_seed(2)
    for i in range(3):
        x1, y = torch.randn(16, 3, 16, 16, generator=g), torch.randn(16, 7, generator=g)
        torch.manual_seed(i)
        loss_fast = fast(x1, y)
        torch.manual_seed(i)
        with plain_mode():
            loss_plain = plain(x1, y)
        assert torch.allclose(loss_fast, loss_plain, rtol=1e-5), (loss_fast, loss_plain)
    before = small_dit()
    for (name, p), q in zip(fast_model.named_parameters(), plain_model.parameters()):
        if name.endswith("attn.qkv.bias"):  # skip the key bias: softmax ignores a shift shared by all keys, so its
            p, q = p.view(3, -1)[[0, 2]], q.view(3, -1)[[0, 2]]  # true gradient is 0 and Adam scales round-off to lr
        assert torch.allclose(p, q, atol=1e-5), name
    assert any(not torch.allclose(p, p0) for p, p0 in zip(fast_model.parameters(), before.parameters()))  # it trained


def test_channels_last_vae_decodes_the_same():
    vae = build_vae(dict(block_out_channels=(32, 32), layers_per_block=1), 16)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        plain = vae.decode(z).sample
        fast = copy.deepcopy(vae).to(memory_format=torch.channels_last).decode(z).sample
    assert torch.allclose(fast, plain, atol=1e-5)


def test_bench_quick_run_prints_and_writes_every_figure(tmp_path, capsys):
    path = tmp_path / "bench.json"
    main(["--preset", "tiny", "--quick", "--baseline", "--out", str(path)])
    out = capsys.readouterr().out
    r = json.loads(path.read_text())
    assert r["preset"] == "tiny" and r["config"]["latent_shape"] == [4, 16, 16] and r["torch"] == torch.__version__
    keys = ["flops", "train", "train_flow", "train_meanflow", "train_alphaflow", "train_baseline",
            "sample_1step_batch1", "sample_4step_batch1", "sample_1step_batch8", "sample_4step_batch8", "inception",
            "frechet", "frechet_baseline"]
    for key in keys:
        assert key in r and f"\n{key} " in "\n" + out, key  # one printed line per figure
    for key in keys[1:-2]:
        assert r[key]["img_per_s"] > 0
    assert r["train_baseline"]["speedup"] > 0
    assert all(r[f"train_{o}"]["vs_shortcut"] > 0 for o in ("flow", "meanflow", "alphaflow"))
    assert abs(r["flops"]["train_step_gflops"] / r["flops"]["forward_gflops"] - 3.25) < 1e-9  # 3 + 2/8 at batch 8
    s = r["sample_4step_batch8"]
    assert abs(s["dit_ms"] + s["vae_ms"] - s["latency_ms"]) < 1e-6 and 0 < s["vae_share"] < 1
    assert abs(r["frechet"]["value"] - r["frechet_baseline"]["value"]) < 1e-6 * r["frechet"]["value"]


def test_peak_table_knows_the_nvl_boards_apart():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == peak_tflops("NVIDIA H200") == 989
    assert peak_tflops("NVIDIA H200 NVL") == peak_tflops("NVIDIA H100 NVL") == 835
    assert peak_tflops("NVIDIA H100 PCIe") == 756 and peak_tflops("NVIDIA GeForce RTX 4090") is None
