"""
Train a text-conditioned shortcut model (Frans et al. 2024): flow matching plus self-consistency targets.

    python train.py --batch 64                                  # the paper's setting: DiT-B/2, lr 1e-4, EMA 0.999
    python train.py --model DiT-T/4 --lr 1e-3 --ema-decay 0.99 --lr-schedule cosine --bootstrap-every 4 \
                    --max-steps 2500 --sample-every 500                       # toyfaces on a 2-core CPU, ~11 min
    python train.py --bootstrap-every 0 ...                     # the flow-matching baseline, same script

Reads the dataset written by prepare_data.py (--data-dir), writes to --out: ckpt.pt (plain dict, loads with
weights_only=True), log.csv (loss, flow/bootstrap loss, img/s) and grid_<step>.png (rows = fixed prompts,
columns = 1, 2, 4, 128 sampling steps).
"""

import argparse
import contextlib
import copy
import csv
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import save_image
from tqdm import tqdm

from model import DiT, DiT_models
from prepare_data import encode_text, load_meta, load_vae
from sample import steps_grid

GRID_PROMPTS = ["a man with glasses", "a smiling woman with red hair", "a woman with blond hair",
                "a bearded man with black hair", "a person with brown hair and glasses", "a smiling man"]
GRID_STEPS = [1, 2, 4, 128]


def shortcut_targets(teacher, x1, y, bootstrap_every=8, denoise_steps=128):
    """Algorithm 1 of the paper, as the official code does it. Returns (x_t, t, d, y, v_target) for the whole
    batch such that the loss is mse(model(x_t, t, d, y), v_target).

    The first B/bootstrap_every rows get self-consistency targets from the teacher (the EMA model), the rest
    flow-matching targets at the smallest step d = 1/denoise_steps. bootstrap_every=0 is plain flow matching.
    """
    B, device = x1.shape[0], x1.device
    num_levels = int(math.log2(denoise_steps))  # 7 bootstrap levels: d = 1, 1/2 ... 1/64
    n_boot = 0 if bootstrap_every == 0 else min(max(B // bootstrap_every, 1), B - 1)

    # 1. x0 ~ N(0, I): the noise end of each row's straight path to its data point x1.
    x0 = torch.randn_like(x1)

    # 2. Bootstrap rows: level k gives d = 2^-k. The levels are a randomly rotated 0, 1 ... 6, 0, 1 ... so every
    #    level gets rows even in small batches (the official fixed schedule drops some: its issues #10, #11).
    #    t is a multiple of d, t in {0, d ... 1 - d}, so that t + d <= 1.
    k = (torch.randint(num_levels, (1,), device=device) + torch.arange(n_boot, device=device)) % num_levels
    d_boot = 2.0 ** -k.float()
    t_boot = torch.floor(torch.rand(n_boot, device=device) * 2 ** k) * d_boot

    # 3. Flow rows: the smallest step d = 1/128 (the paper's "d = 0") and t on the 128-point grid.
    t_flow = torch.randint(denoise_steps, (B - n_boot,), device=device) / denoise_steps
    d_flow = torch.full((B - n_boot,), 1 / denoise_steps, device=device)
    t, d = torch.cat([t_boot, t_flow]), torch.cat([d_boot, d_flow])            # (B,), (B,)

    # 4. Noise the data: x_t = (1 - (1 - 1e-5) t) x0 + t x1 (the 1e-5 keeps a sliver of noise at t = 1).
    t_ = t.view(B, 1, 1, 1)
    x_t = (1 - (1 - 1e-5) * t_) * x0 + t_ * x1

    # 5. Flow-matching target for every row: the velocity of the straight path.
    v_target = x1 - (1 - 1e-5) * x0

    # 6. Self-consistency target for the bootstrap rows: two teacher steps of d/2 make one step of d.
    #    The teacher runs without gradient: the student learns the big step from its own (EMA) small steps.
    if n_boot > 0:
        with torch.no_grad():
            xb, tb, yb, half = x_t[:n_boot], t[:n_boot], y[:n_boot], d_boot / 2
            v1 = teacher(xb, tb, half, yb)
            x_mid = (xb + half.view(-1, 1, 1, 1) * v1).clamp(-4, 4)             # clipped as the official code
            v2 = teacher(x_mid, tb + half, half, yb)
            v_target[:n_boot] = ((v1 + v2) / 2).clamp(-4, 4)
    return x_t, t, d, y, v_target


def save_checkpoint(ckpt, path):
    """Write to a temporary file and rename: a crash mid-write never leaves a truncated ckpt.pt."""
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/toyfaces")
    parser.add_argument("--out", default="out")
    parser.add_argument("--model", default="DiT-B/2", choices=list(DiT_models))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                        help="constant (the paper) or cosine decay to 0 at --max-steps (short runs)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--bootstrap-every", type=int, default=8, help="1/N of each batch is self-consistency; 0 = flow matching")
    parser.add_argument("--denoise-steps", type=int, default=128, help="smallest step 1/M; sampling allows up to M steps")
    parser.add_argument("--cfg-dropout", type=float, default=0.1, help="fraction of captions replaced by the null one")
    parser.add_argument("--max-steps", type=int, default=410_000)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--sample-every", type=int, default=5000, help="grid PNG and checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # --- device: bf16 autocast on CUDA; fp32 on CPU, where bf16 matmuls are very slow
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    # --- data: x1 (N, V, C, H, W) memory-mapped; one row per caption in text_features / caption_image
    meta = load_meta(args.data_dir)
    x1_all = np.load(os.path.join(args.data_dir, "x1.npy"), mmap_mode="r")
    features = np.load(os.path.join(args.data_dir, "text_features.npy"))      # (K, D)
    caption_image = np.load(os.path.join(args.data_dir, "caption_image.npy"))  # (K,)

    def get_batch():
        k = rng.integers(len(features), size=args.batch)                       # random captions ...
        view = rng.integers(x1_all.shape[1], size=args.batch)                  # ... and a random flip of each image
        x1 = torch.from_numpy(x1_all[caption_image[k], view].astype(np.float32))
        return x1.to(device), torch.from_numpy(features[k]).to(device)

    # --- model, its EMA (the bootstrap teacher and the weights we sample with), optimizer
    model = DiT(**DiT_models[args.model], input_size=meta["shape"][1], in_channels=meta["shape"][0],
                feature_dim=meta["feature_dim"]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.999), fused=device == "cuda")
    grid_y = torch.from_numpy(encode_text(GRID_PROMPTS, meta["text_encoder"], device)).to(device)
    if meta["vae"] != "none":
        load_vae(meta["vae"], str(grid_y.device))  # a missing VAE fails now, not at the first grid
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, data {args.data_dir}: "
          f"{meta['num_images']} images {meta['shape']}, {meta['num_captions']} captions, device {device}")

    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "log.csv"), "w", newline="")
    writer = csv.writer(log)
    writer.writerow(["step", "loss", "loss_flow", "loss_bootstrap", "img_per_s", "elapsed_s"])
    t_start = t_log = time.time()
    bar = tqdm(range(args.max_steps + 1), desc="train", dynamic_ncols=True)
    for step in bar:
        # --- every N steps and at the end: a steps x prompts grid and a checkpoint
        if step > 0 and (step % args.sample_every == 0 or step == args.max_steps):
            images = steps_grid(ema, grid_y, GRID_STEPS, meta, flow_only=args.bootstrap_every == 0)  # (P, 1, S, 3, H, W)
            save_image(images.flatten(0, 2), os.path.join(args.out, f"grid_{step:06d}.png"), nrow=len(GRID_STEPS),
                       padding=1)
            save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                             "step": step, "args": vars(args), "meta": meta, "text_encoder": meta["text_encoder"]},
                            os.path.join(args.out, "ckpt.pt"))
        if step == args.max_steps:
            break

        # --- one training step
        if args.lr_schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.max_steps))
        x1, y = get_batch()
        keep = (torch.rand(args.batch, 1, device=device) >= args.cfg_dropout).float()
        y = y * keep  # caption dropout: zero rows are the null caption (classifier-free guidance)
        with ctx:
            x_t, t, d, y, v_target = shortcut_targets(ema, x1, y, args.bootstrap_every, args.denoise_steps)
            v = model(x_t, t, d, y)
        row_loss = F.mse_loss(v.float(), v_target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        loss = row_loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # EMA: ema <- decay * ema + (1 - decay) * model
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - args.ema_decay)

        # --- log (loss.item() waits for the GPU, so only every log_every steps)
        if (step + 1) % args.log_every == 0:
            now = time.time()
            is_flow = d == 1 / args.denoise_steps
            row_loss = row_loss.detach()
            loss_boot = row_loss[~is_flow].mean().item() if (~is_flow).any() else float("nan")
            img_s = args.log_every * args.batch / (now - t_log)
            writer.writerow([step + 1, f"{loss.item():.5f}", f"{row_loss[is_flow].mean().item():.5f}",
                             f"{loss_boot:.5f}", f"{img_s:.1f}", f"{now - t_start:.1f}"])
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{img_s:.0f}")
            t_log = now
    log.close()
    print(f"done: {args.max_steps} steps in {(time.time() - t_start) / 60:.1f} min, "
          f"checkpoint {os.path.join(args.out, 'ckpt.pt')}")
