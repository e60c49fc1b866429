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
import math
import os
import re

import torch

import toyfaces
from data import encode_text, load_vae, one_line_errors, power_of_two_steps, save_grid, steps_grid
from model import AMP, autocast, is_unconditional, load_checkpoint
from objectives import told_step


@torch.no_grad()
def sample(model, noise, y, steps, cfg_scale=1.0, model_d=None):
    """Algorithm 2 of the paper: `steps` Euler steps of size d = 1/steps from noise (t = 0) to data (t = 1).

    The model is told the step size d, so with few steps it takes the learned shortcut instead of following
    the local flow direction. A flow-matching baseline (train.py --objective flow) only ever saw the smallest
    step, so it is told model_d = 1/128 whatever step it takes (objectives.told_step): plain Euler on the flow.
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
    model_d = told_step(ckpt["args"])
    with autocast(device, args.amp):
        images = steps_grid(lambda noise, y, steps: sample(model, noise, y, steps, args.cfg, model_d), y, args.steps,
                            meta, n=args.n, seed=args.seed)

    os.makedirs(args.out, exist_ok=True)
    name = re.sub("[^a-zA-Z0-9]+", "_", labels[0])[:60]  # a safe file name for any prompt
    path = os.path.join(args.out, f"{name}_steps{'-'.join(map(str, args.steps))}_seed{args.seed}.png")
    save_grid(images, labels, args.steps, path)
    print(f"wrote {path}")
    if meta["dataset"] == "toyfaces":
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
