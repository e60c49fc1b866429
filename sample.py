"""
Sample images from a trained shortcut model in 1, 2, 4 ... 128 steps.

    python sample.py --prompt "a man with glasses" --steps 1 128            # 64 seeds, 1 and 128 steps
    python sample.py --prompt "a man with glasses" "a smiling woman" --steps 1 2 4 128 --n 8
    python sample.py --prompt "a woman with red hair" --steps 128 --cfg 2.0 --seed 3
    python sample.py --ckpt out_uncond/ckpt.pt --steps 1 128 --weights online    # a train.py --unconditional run

Loads the EMA weights from out/ckpt.pt (--ckpt; --weights online: the trained weights themselves, what the
official code samples and evaluates with) and writes one PNG (its path is printed): a block of columns per step
count, the same seed in the same place in every block, a band of rows per prompt, small images enlarged (nearest)
to 128 px. On toyfaces it also prints, per prompt and step count, how many samples the attribute reader finds
showing every attribute the prompt names, and how far the attributes the prompt leaves open are from the training
data's (total variation: 0 = the data's mix, 1 = none of it; toyfaces.open_attribute_tv). An unconditional model
(train.py --unconditional, the paper's CelebA-HQ setting) takes no prompt: there the reader counts clean faces and
the TV covers all five attributes against the whole data set, the empty prompt's view of the same two figures.
"""

import argparse
import contextlib
import math
import os
import re

import numpy as np
import torch

from model import DiT, DiT_models
from prepare_data import encode_text, load_vae


@torch.no_grad()
def sample(model, noise, y, steps, cfg_scale=1.0, model_d=None):
    """Algorithm 2 of the paper: `steps` Euler steps of size d = 1/steps from noise (t = 0) to data (t = 1).

    The model is told the step size d, so with few steps it takes the learned shortcut instead of following
    the local flow direction. A flow-matching baseline (trained with --bootstrap-every 0) only ever saw the
    smallest step, so it is told model_d = 1/128 whatever step it takes (see told_step): plain Euler on the flow.
    With cfg_scale = 1 this is exactly `steps` model calls; otherwise each call also evaluates the null
    caption (a batch twice as large) and extrapolates away from it.
    """
    x = noise                                                         # (B, C, H, W), x0 ~ N(0, I)
    B, d = x.shape[0], 1.0 / steps
    d_vec = torch.full((B,), d if model_d is None else model_d, device=x.device)
    for i in range(steps):
        t = torch.full((B,), i * d, device=x.device)
        if cfg_scale == 1.0:
            v = model(x, t, d_vec, y)
        else:
            v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([d_vec, d_vec]),
                                     torch.cat([y, torch.zeros_like(y)])).chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        x = x + d * v
    return x


def read_checkpoint(path, device):
    """The checkpoint dict of train.py, loaded with weights_only=True: tensors, dicts, lists, strings and numbers
    only, never pickled code. A missing, truncated or foreign file is one clear line (SystemExit)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found: train one first with `python train.py`")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot load checkpoint {path}: {str(e).splitlines()[0]}")


def load_checkpoint(path, device, weights="ema"):
    """Returns (model in eval mode, checkpoint dict). weights="ema": the EMA weights (DiT's habit and ours);
    "online": the weights the optimiser trained, which the official code samples and evaluates with (use_ema=0).
    Any problem is one clear line (SystemExit)."""
    ckpt = read_checkpoint(path, device)
    try:
        meta, args = ckpt["meta"], ckpt["args"]
        model = DiT(**DiT_models[args["model"]], input_size=meta["shape"][1], in_channels=meta["shape"][0],
                    feature_dim=meta["feature_dim"], predict=args.get("predict", "v"),
                    time_scale=args.get("time_scale", 1000.0), x_floor=args.get("x_floor", 0.25),
                    d_embedding=args.get("d_embedding", "value")).to(device)
        model.load_state_dict(ckpt[{"ema": "ema", "online": "model"}[weights]])
    except Exception as e:  # missing keys, shape mismatch ...
        raise SystemExit(f"error: cannot load checkpoint {path}: {str(e).splitlines()[0]}")
    return model.eval(), ckpt


AMP = ["auto", "bf16", "fp32"]  # --amp of train.py and sample.py


def autocast(device, amp="auto"):
    """The precision of the model's forward passes: bf16 autocast (tensor cores; weights, optimizer, EMA and Euler
    updates stay fp32) or plain fp32. "auto": bf16 on CUDA, fp32 on a CPU, where bf16 matmuls are slow (hundreds of
    times on one without AMX). A CPU's bf16 autocast applies CUDA's casting rules, so --amp bf16 on a CPU runs the
    GPU's dtype path (test_amp.py)."""
    device_type = torch.device(device).type
    if amp == "bf16" or (amp == "auto" and device_type == "cuda"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def told_step(train_args):
    """The step size d to tell a checkpoint's model: None (the step it takes) for a model that learnt big steps; a
    flow-matching model (--objective flow, or shortcut with --bootstrap-every 0) only ever saw the smallest step,
    1/denoise_steps."""
    objective = train_args.get("objective", "shortcut")
    if objective == "flow" or (objective == "shortcut" and train_args["bootstrap_every"] == 0):
        return 1 / train_args["denoise_steps"]
    return None


def is_unconditional(ckpt):
    """A model trained with train.py --unconditional: every row had the null caption (the paper's CelebA-HQ run)."""
    return ckpt["args"].get("unconditional", False)


def to_images(x, meta, chunk=16):
    """Model space -> RGB in [0, 1], (B, 3, H, W): toyfaces are pixels in [-1, 1]; latents go through the VAE,
    `chunk` at a time: the SD-VAE decoder's activations at 256 px are ~100 MB per image, so a whole sampling batch
    of 250 at once would not fit a 24 GB card."""
    if meta["vae"] != "none":
        vae = load_vae(meta["vae"], str(x.device))
        x = torch.cat([vae.decode(z / meta["latent_scale"]).sample for z in x.split(chunk)])
    return ((x.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def steps_grid(model, y, steps_list, meta, n=1, seed=0, cfg_scale=1.0, model_d=None):
    """Samples n seeds per text feature at every step count, the same noise in every column.
    y: (P, D) -> images (P, n, S, 3, H, W) in [0, 1]."""
    device = y.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(n, *meta["shape"], generator=g).to(device)              # (n, C, H, W)
    noise = noise.repeat(y.shape[0], 1, 1, 1)                                    # (P*n, C, H, W)
    y = y.repeat_interleave(n, dim=0)                                            # (P*n, D)
    cols = [to_images(sample(model, noise, y, s, cfg_scale, model_d), meta) for s in steps_list]
    return torch.stack(cols, dim=1).view(-1, n, len(steps_list), *cols[0].shape[1:])


def save_grid(images, prompts, steps_list, path, cols=8):
    """images (P, n, S, 3, H, W) in [0, 1] -> a labelled PNG: one block of min(n, cols) columns per step count
    (headed "1 step", "2 steps" ...), one band of rows per prompt (headed by the prompt), enlarged with nearest
    neighbours so that a face is at least 128 px."""
    from PIL import Image, ImageDraw, ImageFont
    P, n, S, _, H, W = images.shape
    k = -(-128 // W)                                           # enlargement: 32 px -> x4, 256 px -> x1
    cols, rows, pad, head = min(n, cols), -(-n // cols), 2, 18
    cell, block_w = W * k + pad, min(n, cols) * (W * k + pad) + 3 * pad
    canvas = Image.new("RGB", (S * block_w, head + P * (head + rows * cell)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=13)
    pixels = (images * 255).round().byte().permute(0, 1, 2, 4, 5, 3).cpu().numpy()  # (P, n, S, H, W, 3)
    for s, steps in enumerate(steps_list):
        draw.text((s * block_w + pad, 2), f"{steps} step{'s' if steps > 1 else ''}", fill="black", font=font)
    for p, prompt in enumerate(prompts):
        top = head + p * (head + rows * cell)
        draw.text((pad, top + 2), prompt, fill="black", font=font)
        for i in range(n):
            for s in range(S):
                face = Image.fromarray(pixels[p, i, s]).resize((W * k, H * k), Image.NEAREST)
                canvas.paste(face, (s * block_w + (i % cols) * cell, top + head + (i // cols) * cell))
    canvas.save(path)


def save_plot(path, x, panels, log_x=False, log_y=False):
    """Line plots stacked vertically, panels = {title: {label: ys}}, drawn with Pillow (which torchvision brings;
    matplotlib is not one of this repo's requirements). Points that are not finite (on a log axis: <= 0) are left
    out."""
    from PIL import Image, ImageDraw, ImageFont
    W, H, pad, legend = 760, 320, 56, 80
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    img = Image.new("RGB", (W, H * len(panels)), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=12)
    with np.errstate(divide="ignore", invalid="ignore"):
        fx = lambda v: np.log2(np.asarray(v, float)) if log_x else np.asarray(v, float)
        fy = lambda v: np.log10(np.asarray(v, float)) if log_y else np.asarray(v, float)
        xs = fx(x)
        for row, (title, series) in enumerate(panels.items()):
            top, ys = row * H, {label: fy(v) for label, v in series.items()}
            seen = np.concatenate([v[np.isfinite(v)] for v in ys.values()] + [np.zeros(0)])
            lo, hi = (seen.min(), max(seen.max(), seen.min() + 1e-9)) if len(seen) else (0, 1)
            px = lambda v: pad + (v - xs.min()) / max(xs.max() - xs.min(), 1e-9) * (W - 2 * pad - legend)
            py = lambda v: top + H - pad - (v - lo) / (hi - lo) * (H - 2 * pad)
            draw.rectangle([pad, top + pad, W - pad - legend, top + H - pad], outline="gray")
            draw.text((pad, top + 12), title, fill="black", font=font)
            for k, (label, v) in enumerate(ys.items()):
                colour, ok = colours[k % len(colours)], np.isfinite(v)
                points = [(px(a), py(b)) for a, b in zip(xs[ok], v[ok])]
                if len(points) > 1:
                    draw.line(points, fill=colour, width=2)
                for a, b in points if len(points) <= 16 else []:  # few points: mark each one
                    draw.ellipse([a - 3, b - 3, a + 3, b + 3], fill=colour)
                if len(ys) > 1:
                    draw.text((W - pad - legend + 6, top + pad + 14 * k), label, fill=colour, font=font)
            ticks = x if len(x) <= 16 else [x[0], x[-1]]
            for a, b in zip(fx(ticks), ticks):
                draw.text((px(a) - 6, top + H - pad + 6), f"{b:g}", fill="black", font=font)
            for v in (lo, hi):
                draw.text((4, py(v) - 6), f"{10 ** v if log_y else v:.3g}", fill="black", font=font)
    img.save(path)


def power_of_two_steps(s):
    if not s.lstrip("-").isdigit() or int(s) not in [2 ** k for k in range(8)]:
        raise argparse.ArgumentTypeError(f"--steps must be a power of two from 1 to 128, got {s!r}")
    return int(s)


def one_line_errors(parser):
    """Make argparse report a bad value as one line, "error: ...", exit code 2, without the usage dump."""
    parser.error = lambda message: parser.exit(2, f"error: {message}\n")


def parse_args(argv=None):
    """The command line; any bad value is one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", nargs="+", help='default "a man with glasses"; none for an unconditional model')
    parser.add_argument("--steps", nargs="+", type=power_of_two_steps, default=[1], help="1, 2, 4 ... 128")
    parser.add_argument("--n", type=int, default=64, help="samples (seeds) per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--ckpt", default="out/ckpt.pt")
    parser.add_argument("--weights", choices=["ema", "online"], default="ema",
                        help="the EMA (ours, DiT's) or the online weights (the official evaluation's)")
    parser.add_argument("--out", default="samples", help="directory for the PNG")
    parser.add_argument("--amp", choices=AMP, default="auto", help="auto: bf16 autocast on CUDA, fp32 on a CPU")
    one_line_errors(parser)
    args = parser.parse_args(argv)
    if any(not p.strip() for p in args.prompt or []):
        parser.error("empty prompt: say what to draw, e.g. --prompt \"a man with glasses\"")
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    if not math.isfinite(args.cfg):
        parser.error(f"--cfg must be a finite number, got {args.cfg}")
    return args


if __name__ == "__main__":
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, ckpt = load_checkpoint(args.ckpt, device, args.weights)
    meta = ckpt["meta"]
    if is_unconditional(ckpt):
        if args.prompt or args.cfg != 1:
            raise SystemExit(f"error: {args.ckpt} is unconditional (train.py --unconditional): it takes no --prompt "
                             "and no --cfg")
        labels, prompts = ["unconditional"], [""]  # the empty prompt names no attribute: the reader's view of it
        y = torch.zeros(1, meta["feature_dim"], device=device)  # the learned null caption, what it was trained on
    else:
        labels = prompts = args.prompt or ["a man with glasses"]
        y = torch.from_numpy(encode_text(prompts, meta["text_encoder"], device)).to(device)  # (P, D)
    if meta["vae"] != "none":
        load_vae(meta["vae"], str(y.device))  # a missing VAE fails now, not after sampling
    with autocast(device, args.amp):
        images = steps_grid(model, y, args.steps, meta, n=args.n, seed=args.seed, cfg_scale=args.cfg,
                            model_d=told_step(ckpt["args"]))

    os.makedirs(args.out, exist_ok=True)
    name = re.sub("[^a-zA-Z0-9]+", "_", labels[0])[:60]  # a safe file name for any prompt
    path = os.path.join(args.out, f"{name}_steps{'-'.join(map(str, args.steps))}_seed{args.seed}.png")
    save_grid(images, labels, args.steps, path)
    print(f"wrote {path}")
    if meta["dataset"] == "toyfaces":
        import toyfaces
        data_dir = ckpt["args"]["data_dir"]
        dist = toyfaces.data_distribution(data_dir, prompts) if os.path.isdir(data_dir) else None
        found = "finds a clean face in" if is_unconditional(ckpt) else "agrees on"
        for p, (prompt, label) in enumerate(zip(prompts, labels)):
            for s, steps in enumerate(args.steps):
                pixels = (images[p, :, s] * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)
                reads = toyfaces.read_attributes(pixels)
                right = sum(toyfaces.shows(r, prompt) for r in reads)
                line = (f"{label!r} {steps:3d} step{'s' if steps > 1 else ' '}: attribute reader {found} "
                        f"{right}/{args.n} = {right / args.n:.0%}")
                if dist is not None:  # the data set is needed for its attribute distribution
                    tv = toyfaces.open_attribute_tv(reads, [prompt] * len(reads), dist)
                    line += f"; open attributes vs data (TV): {toyfaces.diversity_line(tv)}"
                print(line)
