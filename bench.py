"""
Benchmark: training throughput and MFU, few-step sampling with VAE decode, Inception features, Frechet distance.

    python bench.py                                  # CUDA: DiT-B/2 at 256 px, batch 256; CPU: the tiny preset
    python bench.py --compile --baseline --out bench.json   # + the naive way in the same run, and the speed-up
    python bench.py --preset toyfaces                # the CPU quickstart's training step (DiT-T/4 on 32 px pixels)
    python bench.py --quick                          # one iteration of everything: a smoke test (test_bench.py)
    python bench.py --preset DiT-B/2 --flops-only    # FLOPs per image and the H100 ceilings, on any machine

Prints one line per figure and writes them all to --out as JSON, with the device, torch version and date.
Weights and data are random (the time does not depend on them) and of the real shapes: the DiT of model.py, the
SD-VAE architecture from its config (stabilityai/sd-vae-ft-mse), the FID Inception of inception.py. The training step
is train.py's (objectives.training_loss, the model in bf16 autocast on CUDA, AdamW, EMA) on cached latents already on the
device (train.py copies each batch from pinned memory while the GPU works). Timings are the steady state after
warm-up (torch.compile, cuDNN autotuning and the allocator settle in the first calls).

--baseline repeats the training step the naive way, as the public reimplementations do: fp32 without TF32, no
compile, attention as explicit matmuls + softmax, a for-loop AdamW, and the images encoded by the VAE at every
step instead of cached latents; and the Frechet distance with scipy's sqrtm instead of inception.py's eigh route.
"""

import argparse
import contextlib
import copy
import datetime
import json
import platform
import tempfile
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from data import to_images
from inception import FIDInceptionV3, compute_stats, frechet_distance, inception_features
from model import DiT, DiT_models, autocast
from objectives import ADAPTIVE, DEFAULTS, SETTINGS, bootstrap_rows, interval_rows, training_loss
from sample import sample

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)  # stabilityai/sd-vae-ft-mse's config
LATENT_SCALE = 0.18215

PRESETS = {
    # the paper's model on 256 px images (32x32x4 SD-VAE latents), 512-d CLIP text features, batch 256
    "DiT-B/2": dict(model="DiT-B/2", image_size=256, vae=SD_VAE, feature_dim=512, batch=256, bootstrap_every=8,
                    predict="v"),
    # the same code paths small enough for a CPU: 64 px images, a 3-level VAE -> 16x16x4 latents, 64 tokens
    "tiny": dict(model="DiT-T/2", image_size=64, vae=dict(block_out_channels=(32, 64, 64), layers_per_block=1),
                 feature_dim=64, batch=64, bootstrap_every=8, predict="v"),
    # the CPU quickstart's model: toyfaces are 32 px pixels (no VAE), DiT-T/4, batch 64, --predict x
    "toyfaces": dict(model="DiT-T/4", image_size=32, vae=None, feature_dim=64, batch=64, bootstrap_every=4,
                     predict="x"),
}

# dense bf16 tensor-core peak of the GPUs we know, TFLOP/s (NVIDIA's data sheets halve their sparse figures): the
# SXM boards 989, the NVL (PCIe) boards of H100 and H200 835, H100 PCIe 756. The first name found in
# torch.cuda.get_device_name() wins, so the longer names come first.
PEAK_TFLOPS = {"H100 NVL": 835.0, "H200 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device_name):
    """The dense bf16 peak of a GPU by its name, or None for one we do not know."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


# -----------------------------------------------------------------------------
# timing and FLOP counting

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()  # CUDA calls return before the GPU is done: wait for it before reading the clock


def timed(fn, iters, warmup, device):
    """Seconds per call of fn() in steady state: `warmup` untimed calls, then the mean of `iters` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def count_flops(fn):
    """FLOPs that fn() runs, as PyTorch counts them. Attention runs as plain matmuls here so every backend counts."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def train_flops_per_image(model, batch, bootstrap_every, objective="shortcut"):
    """Model FLOPs of one training step per image: the student's forward and backward (3 forwards) on every row,
    plus the target's work on the big-step rows: shortcut, the teacher's two half-step forwards on the
    B / bootstrap_every bootstrap rows; MeanFlow, one JVP on the interval rows, which PyTorch counts as 3 forwards
    (the primal, and the tangent through every product of two varying factors twice); its primal is a forward the
    student repeats, so 1 of those 3 does no new work; alpha-Flow, two no-grad forwards on the interval rows."""
    if objective in ADAPTIVE:  # as many rows as objectives.training_loss draws
        n_big = interval_rows(batch, SETTINGS[objective]["flow_fraction"])
        return model.flops_per_image() * (3 + (3 if objective == "meanflow" else 2) * n_big / batch)
    n_boot = bootstrap_rows(batch, bootstrap_every if objective == "shortcut" else 0)
    return model.flops_per_image() * (3 + 2 * n_boot / batch)


@contextlib.contextmanager
def plain_mode():
    """The naive way: fp32 matmuls and convolutions without TF32, attention as matmul + softmax + matmul."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# -----------------------------------------------------------------------------
# the work being timed

def make_train_step(model, optimizer, bootstrap_every, ctx, compile=False, ema_decay=0.999, objective="shortcut"):
    """train.py's training step as a function (x1, y) -> loss: objectives.training_loss, the very function train.py's
    loop calls, then backward, AdamW and the EMA (without caption dropout, logging and checkpoints)."""
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    student, teacher = (torch.compile(model), torch.compile(ema)) if compile else (model, ema)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    cfg = argparse.Namespace(objective=objective, long_jump_rows=0,
                             **{**DEFAULTS, **SETTINGS[objective], "bootstrap_every": bootstrap_every})

    def step(x1, y):
        with ctx:
            loss = training_loss(cfg, student, model, teacher, x1, y, progress=0.5)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - ema_decay)
        return loss  # a tensor: reading it (.item()) would make the CPU wait for the GPU every step
    return step


def build_vae(cfg, image_size):
    """The VAE architecture of cfg (diffusers' AutoencoderKL) with random weights."""
    from diffusers import AutoencoderKL
    levels = len(cfg["block_out_channels"])
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         latent_channels=4, sample_size=image_size, **cfg).eval().requires_grad_(False)


def bench_train(cfg, shape, device, iters, warmup, naive, compile, vae=None, objective="shortcut"):
    """-> (seconds per step, peak GPU memory in GiB or None). naive: the --baseline way (fp32, plain attention,
    for-loop AdamW, the VAE encodes the images every step); otherwise train.py's."""
    B = cfg["batch"]
    model = DiT(**DiT_models[cfg["model"]], input_size=shape[1], in_channels=shape[0],
                feature_dim=cfg["feature_dim"], predict=cfg["predict"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.999),
                                  **(dict(foreach=False) if naive else dict(fused=device == "cuda")))
    step = make_train_step(model, optimizer, cfg["bootstrap_every"], contextlib.nullcontext() if naive else
                           autocast(device), compile=compile and not naive, objective=objective)
    y = torch.randn(B, cfg["feature_dim"], device=device)
    if naive and vae is not None:  # pixels -> latents at every step, as the seed reimplementations do
        images = torch.rand(B, 3, cfg["image_size"], cfg["image_size"], device=device) * 2 - 1

        def work():
            with torch.no_grad():
                x1 = vae.encode(images).latent_dist.sample() * LATENT_SCALE
            step(x1, y)
    else:  # cached latents (prepare_data.py encodes once, both flips)
        x1 = torch.randn(B, *shape, device=device)
        work = lambda: step(x1, y)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with plain_mode() if naive else contextlib.nullcontext():
        seconds = timed(work, iters, warmup, device)
    return seconds, torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None


def bench_sampling(model, meta, shape, feature_dim, steps, batch, device, iters, warmup):
    """-> (seconds for `steps` DiT calls, seconds for the VAE decode) of sample.py's path at this batch size."""
    noise, y = torch.randn(batch, *shape, device=device), torch.randn(batch, feature_dim, device=device)
    with torch.no_grad(), autocast(device):
        x = sample(model, noise, y, steps)
        return (timed(lambda: sample(model, noise, y, steps), iters, warmup, device),
                timed(lambda: to_images(x, meta), iters, warmup, device))


def bench_frechet(dim, method):
    """-> (seconds, value) of inception.frechet_distance between two random full-rank dim-d Gaussians."""
    rng = np.random.default_rng(0)
    stats = [compute_stats(rng.standard_normal((2 * dim, dim)) * rng.uniform(0.5, 2, dim)) for _ in range(2)]
    start = time.perf_counter()
    value = frechet_distance(*stats[0], *stats[1], method=method)
    return time.perf_counter() - start, value


def flop_counts(cfg, shape):
    """GFLOPs per image of everything timed: the DiT from its formula, the rest counted by PyTorch on the "meta"
    device (shapes only, nothing computed, so even the SD-VAE is counted instantly on a CPU)."""
    model = DiT(**DiT_models[cfg["model"]], input_size=shape[1], in_channels=shape[0], feature_dim=cfg["feature_dim"])
    S = cfg["image_size"]
    flops = dict(forward=model.flops_per_image(), train_step=train_flops_per_image(model, cfg["batch"],
                                                                                   cfg["bootstrap_every"]))
    for objective in ("flow", "meanflow", "alphaflow"):
        flops[f"train_step_{objective}"] = train_flops_per_image(model, cfg["batch"], cfg["bootstrap_every"], objective)
    with torch.device("meta"), torch.no_grad():
        images = torch.rand(1, 3, S, S)
        flops["inception"] = count_flops(lambda: FIDInceptionV3()(images))
        if cfg["vae"] is not None:
            vae = build_vae(cfg["vae"], S)
            flops["vae_encode"] = count_flops(lambda: vae.encode(images))
            flops["vae_decode"] = count_flops(lambda: vae.decode(torch.randn(1, *shape)))
    return {k: v / 1e9 for k, v in flops.items()}


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default=None, help="default: DiT-B/2 on CUDA, tiny on CPU")
    parser.add_argument("--batch", type=int, default=None, help="training batch and large sampling batch (preset's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT (training and sampling)")
    parser.add_argument("--baseline", action="store_true", help="also time the naive way, and print the ratio")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per figure (20 on CUDA, 3 on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU; known GPUs are looked up")
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 1 timed call, batch 8: a smoke test")
    parser.add_argument("--flops-only", action="store_true", help="print the FLOP counts and ceilings, time nothing")
    parser.add_argument("--out", default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    torch.manual_seed(0)
    preset = args.preset or ("DiT-B/2" if device == "cuda" else "tiny")
    cfg = dict(PRESETS[preset], batch=8 if args.quick else args.batch or PRESETS[preset]["batch"])
    B, S, vae_cfg = cfg["batch"], cfg["image_size"], cfg["vae"]
    down = 1 if vae_cfg is None else 2 ** (len(vae_cfg["block_out_channels"]) - 1)  # the VAE's downsampling
    shape = (3, S, S) if vae_cfg is None else (4, S // down, S // down)                # what the DiT sees
    iters = 1 if args.quick else args.iters or (20 if device == "cuda" else 3)
    warmup = 5 if device == "cuda" and not args.quick else 1
    name = (torch.cuda.get_device_name() if device == "cuda" else
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    peak = args.peak_tflops or (peak_tflops(name) if device == "cuda" else None)
    results = {"device": name, "torch": torch.__version__, "date": datetime.date.today().isoformat(), "preset": preset,
               "config": {**cfg, "latent_shape": shape, "compile": args.compile, "iters": iters, "warmup": warmup,
                          "autocast": "bf16" if device == "cuda" else "fp32"}}
    print(f"bench {preset} on {name}, torch {torch.__version__}, {results['config']['autocast']}"
          f"{', compiled' if args.compile else ''}; {warmup} warm-up + {iters} timed calls per figure")

    def report(key, line, **values):  # every figure is in --out as soon as it is measured: a time-out loses none
        results[key] = values
        print(f"{key:22s} {line}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    def guarded(key, fn):  # an out-of-memory figure is reported, not fatal: the others still get measured
        try:
            return fn()
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            report(key, "out of memory", error="out of memory")

    # --- FLOPs and the H100 ceilings they imply (989 TFLOP/s dense bf16)
    g = flop_counts(cfg, shape)
    h100 = PEAK_TFLOPS["H100"] * 1e3  # GFLOP/s
    sample_1step = g["forward"] + g.get("vae_decode", 0)
    vae_share = f" (VAE decode {g['vae_decode'] / sample_1step:.0%}, encode {g['vae_encode']:.4g})" if vae_cfg else ""
    report("flops", f"{cfg['model']} forward {g['forward']:.2f} GFLOP/img; training step {g['train_step']:.2f} "
           f"(3 + 2/{cfg['bootstrap_every']} forwards) -> H100 ceiling {h100 / g['train_step']:,.0f} img/s; MeanFlow "
           f"{g['train_step_meanflow']:.2f} (3 + a JVP of 3 on 1/4 of the rows); "
           f"1-step sample {sample_1step:.4g}{vae_share} -> {h100 / sample_1step:,.0f} img/s; "
           f"Inception {g['inception']:.3g}",
           **{f"{k}_gflops": v for k, v in g.items()}, h100_train_img_s=h100 / g["train_step"],
           h100_sample_1step_img_s=h100 / sample_1step)
    if args.flops_only:
        return results

    # --- the VAE: random weights saved to a temporary directory, so sampling decodes through data.to_images
    tmp = tempfile.TemporaryDirectory()
    vae, meta = None, {"vae": "none", "latent_scale": LATENT_SCALE}
    if vae_cfg is not None:
        vae = build_vae(vae_cfg, S)
        vae.save_pretrained(tmp.name)
        vae, meta["vae"] = vae.to(device), tmp.name

    # --- training
    out = guarded("train", lambda: bench_train(cfg, shape, device, iters, warmup, naive=False, compile=args.compile))
    if out:
        sec, mem = out
        tflops = g["train_step"] * B / sec / 1e3
        report("train", f"batch {B}: {B / sec:,.1f} img/s ({sec * 1e3:.1f} ms/step), {tflops:.3g} TFLOP/s"
               + (f", MFU {tflops / peak:.1%} of {peak:g}" if peak else "")
               + (f", peak memory {mem:.1f} GiB" if mem is not None else ""),
               img_per_s=B / sec, step_ms=sec * 1e3, tflops=tflops, mfu=tflops / peak if peak else None,
               peak_mem_gib=mem)
    for objective, what in (("flow", "flow matching, no teacher"), ("meanflow", "one JVP on 1/4 of the rows"),
                            ("alphaflow", "one batched no-grad forward on 1/4 of the rows, two each")):
        out = guarded(f"train_{objective}", lambda: bench_train(cfg, shape, device, iters, warmup, naive=False,
                                                                compile=args.compile, objective=objective))
        if out and "step_ms" in results["train"]:
            (sec, mem), ratio = out, out[0] / results["train"]["step_ms"] * 1e3
            tflops = g[f"train_step_{objective}"] * B / sec / 1e3
            report(f"train_{objective}", f"batch {B}: {B / sec:,.1f} img/s ({sec * 1e3:.1f} ms/step: "
                   f"--objective {objective}, {what}) = {ratio:.2f}x the shortcut step's time, {tflops:.3g} TFLOP/s"
                   + (f", MFU {tflops / peak:.1%}" if peak else "")
                   + (f", peak memory {mem:.1f} GiB" if mem is not None else ""),
                   img_per_s=B / sec, step_ms=sec * 1e3, vs_shortcut=ratio, tflops=tflops,
                   mfu=tflops / peak if peak else None, peak_mem_gib=mem)
    if args.baseline:
        out = guarded("train_baseline", lambda: bench_train(cfg, shape, device, iters, min(warmup, 2), naive=True,
                                                            compile=False, vae=vae))
        if out:
            sec_b, mem_b = out
            ratio = sec_b / results["train"]["step_ms"] * 1e3 if "step_ms" in results["train"] else None
            report("train_baseline", f"batch {B}: {B / sec_b:,.1f} img/s ({sec_b * 1e3:.1f} ms/step: fp32, plain "
                   f"attention, for-loop AdamW{', VAE encode every step' if vae else ''})"
                   + (f" -> fast path {ratio:.2f}x" if ratio else ""),
                   img_per_s=B / sec_b, step_ms=sec_b * 1e3, speedup=ratio, peak_mem_gib=mem_b)

    # --- sampling: 1 and 4 steps at batch 1 and at the large batch, DiT and VAE decode timed apart
    model = DiT(**DiT_models[cfg["model"]], input_size=shape[1], in_channels=shape[0],
                feature_dim=cfg["feature_dim"], predict=cfg["predict"]).to(device).eval()
    for p in model.parameters():  # not adaLN-Zero's zero output: decode real-looking latents
        torch.nn.init.normal_(p, std=0.02)
    sampler = torch.compile(model) if args.compile else model
    for batch in (1, B):
        for steps in (1, 4):
            key = f"sample_{steps}step_batch{batch}"
            out = guarded(key, lambda: bench_sampling(sampler, meta, shape, cfg["feature_dim"], steps, batch, device,
                                                      iters, warmup))
            if out:
                t_dit, t_vae = out
                total = t_dit + t_vae
                tflops = (steps * g["forward"] + g.get("vae_decode", 0)) * batch / total / 1e3
                report(key, f"{batch / total:,.1f} img/s, {total * 1e3:.1f} ms = DiT {t_dit * 1e3:.1f} + VAE decode "
                       f"{t_vae * 1e3:.1f} ms ({t_vae / total:.0%}), {tflops:.3g} TFLOP/s",
                       img_per_s=batch / total, latency_ms=total * 1e3, dit_ms=t_dit * 1e3, vae_ms=t_vae * 1e3,
                       vae_share=t_vae / total, tflops=tflops)

    # --- Inception features (inception.py's network and preprocessing, in fp32 as fid.py runs it)
    inception = FIDInceptionV3().eval().requires_grad_(False).to(device)
    batch = B if device == "cuda" else 2 if args.quick else 4
    images = torch.rand(batch, 3, S, S, device=device)
    sec = guarded("inception", lambda: timed(lambda: inception_features(images, inception), iters, warmup, device))
    if sec:
        tflops = g["inception"] * batch / sec / 1e3
        report("inception", f"batch {batch}: {batch / sec:,.1f} img/s, {tflops:.3g} TFLOP/s",
               img_per_s=batch / sec, tflops=tflops)

    # --- the Frechet distance between two sets of 2048-d Inception statistics (CPU, float64)
    dim = 256 if args.quick else 2048
    sec, value = bench_frechet(dim, "eigh")
    report("frechet", f"{dim}-d, eigh: {sec:.2f} s (value {value:.6g})", dim=dim, seconds=sec, value=value)
    if args.baseline:
        sec_b, value_b = bench_frechet(dim, "sqrtm")
        report("frechet_baseline", f"{dim}-d, sqrtm: {sec_b:.2f} s (value {value_b:.6g}) -> eigh {sec_b / sec:.1f}x "
               f"faster, |difference| {abs(value_b - value):.2g}", dim=dim, seconds=sec_b, value=value_b,
               speedup=sec_b / sec)
    tmp.cleanup()

    if args.out:
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
