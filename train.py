"""
Train a text-conditioned shortcut model (Frans et al. 2024): flow matching plus self-consistency targets.

    python train.py --batch 64                                  # the paper's setting: DiT-B/2, lr 1e-4, EMA 0.999
                                                                # (on data/celebahq once prepared, else toyfaces)
    python train.py --model DiT-T/4 --lr 3e-3 --ema-decay 0.99 --lr-schedule cosine --bootstrap-every 4 --predict x \
                    --max-steps 3000 --sample-every 500                       # toyfaces on a 2-core CPU, ~13 min
    python train.py --bootstrap-every 0 ...                     # the flow-matching baseline, same script
    python train.py ... --resume                                # after a crash: the same command plus --resume
                                                                # continues out/ckpt.pt (bit for bit on a CPU)
    torchrun --standalone --nproc_per_node=8 train.py --batch 64                   # DDP on the 8 GPUs of one machine
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \
             train.py --batch 128                               # two machines: run on both, --node_rank=1 on the second
    python train.py --batch 256 --compile                       # fastest on a GPU (bench.py measures it)

Reads the dataset written by prepare_data.py (--data-dir), writes to --out: ckpt.pt (plain dict, loads with
weights_only=True; written to a temporary file and renamed, so it is always complete), log.csv (loss,
flow/bootstrap loss, img/s) and grid_<step>.png (rows = fixed prompts, columns = 1, 2, 4, 128 sampling steps).
--batch is the global batch: with DDP each of the N processes trains on batch/N rows of it. A non-finite loss
stops training before it reaches the weights; an existing ckpt.pt is never overwritten without --resume.
"""

import argparse
import copy
import csv
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import save_image
from tqdm import tqdm

from model import DiT, DiT_models
from prepare_data import encode_text, load_meta, load_vae
from sample import autocast, one_line_errors, read_checkpoint, steps_grid, told_step

GRID_PROMPTS = ["a man with glasses", "a smiling woman with red hair", "a woman with blond hair",
                "a bearded man with black hair", "a person with brown hair and glasses", "a smiling man"]
GRID_STEPS = [1, 2, 4, 128]
LOG_HEADER = ["step", "loss", "loss_flow", "loss_bootstrap", "img_per_s", "elapsed_s"]


def shortcut_targets(teacher, x1, y, bootstrap_every=8, denoise_steps=128, rank=0, world_size=1):
    """Algorithm 1 of the paper, as the official code does it. Returns (x_t, t, d, y, v_target) for the whole
    batch such that the loss is mse(model(x_t, t, d, y), v_target).

    The first B/bootstrap_every rows get self-consistency targets from the teacher (the EMA model), the rest
    flow-matching targets at the smallest step d = 1/denoise_steps. bootstrap_every=0 is plain flow matching.

    With DDP, x1 and y are rows rank, rank + world_size ... of the global batch of B rows. The random draws are
    made for all B rows (every rank has the same RNG state) and sliced the same way, so N ranks compute exactly
    the rows one process would: the same update for any N, and bootstrap rows (teacher calls) on every rank.
    """
    B, device = x1.shape[0] * world_size, x1.device                          # B: the global batch
    rows = slice(rank, None, world_size)                                      # this rank's rows of it
    num_levels = int(math.log2(denoise_steps))  # 7 bootstrap levels: d = 1, 1/2 ... 1/64
    n_boot = 0 if bootstrap_every == 0 else min(max(B // bootstrap_every, 1), B - 1)

    # 1. x0 ~ N(0, I): the noise end of each row's straight path to its data point x1.
    x0 = torch.randn(B, *x1.shape[1:], device=device)[rows]

    # 2. Bootstrap rows: level k gives d = 2^-k. The levels are a randomly rotated 0, 1 ... 6, 0, 1 ... so every
    #    level gets rows even in small batches (the official fixed schedule drops some: its issues #10, #11).
    #    t is a multiple of d, t in {0, d ... 1 - d}, so that t + d <= 1.
    k = (torch.randint(num_levels, (1,), device=device) + torch.arange(n_boot, device=device)) % num_levels
    d_boot = 2.0 ** -k.float()
    t_boot = torch.floor(torch.rand(n_boot, device=device) * 2 ** k) * d_boot

    # 3. Flow rows: the smallest step d = 1/128 (the paper's "d = 0") and t on the 128-point grid.
    t_flow = torch.randint(denoise_steps, (B - n_boot,), device=device) / denoise_steps
    d_flow = torch.full((B - n_boot,), 1 / denoise_steps, device=device)
    t, d = torch.cat([t_boot, t_flow])[rows], torch.cat([d_boot, d_flow])[rows]  # (B / world_size,) each
    n_boot = len(range(rank, n_boot, world_size))  # the global batch's first rows are this rank's first rows

    # 4. Noise the data: x_t = (1 - (1 - 1e-5) t) x0 + t x1 (the 1e-5 keeps a sliver of noise at t = 1).
    t_ = t.view(-1, 1, 1, 1)
    x_t = (1 - (1 - 1e-5) * t_) * x0 + t_ * x1

    # 5. Flow-matching target for every row: the velocity of the straight path.
    v_target = x1 - (1 - 1e-5) * x0

    # 6. Self-consistency target for the bootstrap rows: two teacher steps of d/2 make one step of d.
    #    The teacher runs without gradient: the student learns the big step from its own (EMA) small steps.
    if n_boot > 0:
        with torch.no_grad():
            xb, tb, yb, half = x_t[:n_boot], t[:n_boot], y[:n_boot], d[:n_boot] / 2
            v1 = teacher(xb, tb, half, yb)
            x_mid = (xb + half.view(-1, 1, 1, 1) * v1).clamp(-4, 4)             # clipped as the official code
            v2 = teacher(x_mid, tb + half, half, yb)
            v_target[:n_boot] = ((v1 + v2) / 2).clamp(-4, 4)
    return x_t, t, d, y, v_target


def save_checkpoint(ckpt, path):
    """Write a temporary file in the same directory, fsync it, rename it over path. The rename is atomic, so path
    is always the previous complete checkpoint or the new complete one, whatever stops us mid-write (a kill, a
    power cut, a full disk). A failed write is one line and leaves the previous checkpoint untouched."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them ckpt.pt
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        os.fsync(fd)  # ... and the rename itself is on disk too
        os.close(fd)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(path) or ".").free / 2 ** 30
        raise SystemExit(f"error: cannot save {path} ({str(e).splitlines()[0]}; {free:.1f} GiB free on its disk): "
                         "stopped, the previous checkpoint is untouched")


def load_data(data_dir):
    """(meta, x1, features, caption_image): the arrays prepare_data.py wrote, checked against meta.json.
    A missing, half-written (no meta.json: it is written last) or inconsistent data set is one clear line."""
    meta = load_meta(data_dir)
    try:
        x1 = np.load(os.path.join(data_dir, "x1.npy"), mmap_mode="r")               # (N, V, C, H, W), memory-mapped
        features = np.load(os.path.join(data_dir, "text_features.npy"))            # (K, D)
        caption_image = np.load(os.path.join(data_dir, "caption_image.npy"))       # (K,) row of x1 per caption
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read the data in {data_dir}: {str(e).splitlines()[0]}")
    N, K = meta["num_images"], meta["num_captions"]
    for name, array, shape in [("x1.npy", x1, (N, meta["views"], *meta["shape"])),
                               ("text_features.npy", features, (K, meta["feature_dim"])),
                               ("caption_image.npy", caption_image, (K,))]:
        if array.shape != shape:
            raise SystemExit(f"error: {os.path.join(data_dir, name)} has shape {array.shape} but meta.json says "
                             f"{shape}: prepare the data again")
    if K and not 0 <= caption_image.min() <= caption_image.max() < N:
        raise SystemExit(f"error: {os.path.join(data_dir, 'caption_image.npy')} points outside x1.npy (N = {N})")
    return meta, x1, features, caption_image


def positive_int(s):
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {s!r}")
    return int(s)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="default: data/celebahq once prepared (the paper's "
                        "setting), else data/toyfaces")
    parser.add_argument("--out", default="out")
    parser.add_argument("--model", default="DiT-B/2", choices=list(DiT_models))
    parser.add_argument("--batch", type=positive_int, default=64, help="global batch, split across DDP processes")
    parser.add_argument("--predict", default="v", choices=["v", "x"],
                        help="the network outputs the velocity (the paper) or the clean image (small models, pixels)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                        help="constant (the paper) or cosine decay to 0 at --max-steps (short runs)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--bootstrap-every", type=int, default=8, help="1/N of each batch is self-consistency; 0 = flow matching")
    parser.add_argument("--denoise-steps", type=int, default=128, help="smallest step 1/M; sampling allows up to M steps")
    parser.add_argument("--cfg-dropout", type=float, default=0.1, help="fraction of captions replaced by the null one")
    parser.add_argument("--max-steps", type=positive_int, default=410_000)
    parser.add_argument("--log-every", type=positive_int, default=50)
    parser.add_argument("--sample-every", type=positive_int, default=5000, help="checkpoint and grid PNG every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue --out/ckpt.pt where it stopped")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model and its EMA teacher")
    one_line_errors(parser)
    args = parser.parse_args()
    if args.data_dir is None:
        args.data_dir = "data/celebahq" if os.path.exists("data/celebahq/meta.json") else "data/toyfaces"

    # --- DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world_size, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        if device != "cpu":
            torch.cuda.set_device(device)
    else:
        rank, world_size = 0, 1
        device = "cuda" if torch.cuda.is_available() else "cpu"
    master = rank == 0  # only rank 0 logs, saves checkpoints and draws grids
    if args.batch % world_size:
        parser.error(f"--batch {args.batch} does not split evenly across {world_size} processes")
    rows = slice(rank, None, world_size)  # this rank's rows of every global batch

    # --- device: bf16 autocast on CUDA; fp32 on CPU, where bf16 matmuls are very slow
    ctx = autocast(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # The same seed on every rank: each one draws the randomness of the whole global batch and keeps its rows
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    # --- data: x1 (N, V, C, H, W) memory-mapped; one row per caption in text_features / caption_image
    meta, x1_all, features, caption_image = load_data(args.data_dir)
    if args.batch > meta["num_images"]:
        parser.error(f"--batch {args.batch} is larger than the data set "
                     f"({meta['num_images']} images in {args.data_dir})")

    def get_batch():
        k = rng.integers(len(features), size=args.batch)[rows]                 # random captions ...
        view = rng.integers(x1_all.shape[1], size=args.batch)[rows]            # ... and a random flip of each image
        x1, y = torch.from_numpy(x1_all[caption_image[k], view].astype(np.float32)), torch.from_numpy(features[k])
        if device != "cpu":  # page-locked memory: the copies are asynchronous, the CPU goes on queueing work
            x1, y = x1.pin_memory(), y.pin_memory()
        return x1.to(device, non_blocking=True), y.to(device, non_blocking=True)

    # --- model, its EMA (the bootstrap teacher and the weights we sample with), optimizer
    model = DiT(**DiT_models[args.model], input_size=meta["shape"][1], in_channels=meta["shape"][0],
                feature_dim=meta["feature_dim"], predict=args.predict).to(device)
    model.y_embedder.set_feature_stats(torch.from_numpy(features).to(device))
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    # compiled views share the parameters; we save and sample with the plain modules, so no "_orig_mod." keys
    student, teacher = (torch.compile(model), torch.compile(ema)) if args.compile else (model, ema)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.999), fused=device != "cpu")
    # DDP averages the gradients of all ranks in backward, so every rank takes the same step: the weights and the
    # EMA (updated on every rank) stay identical everywhere. Checkpoints hold the unwrapped model.
    ddp_model = DDP(student, device_ids=[local_rank] if device != "cpu" else None) if ddp else student
    grid_y = torch.from_numpy(encode_text(GRID_PROMPTS, meta["text_encoder"], device)).to(device)
    if meta["vae"] != "none":
        load_vae(meta["vae"], str(grid_y.device))  # a missing VAE fails now, not at the first grid

    # --- resume: the same command plus --resume continues exactly where ckpt.pt stopped: weights, EMA, AdamW
    #     moments, step, and the RNG states (batches are random draws, so the RNG state is the data order position)
    ckpt_path, start = os.path.join(args.out, "ckpt.pt"), 0
    if args.resume:
        ckpt = read_checkpoint(ckpt_path, "cpu")  # on the CPU: RNG states must be CPU tensors
        try:
            theirs = (f"{ckpt['args']['model']} --predict {ckpt['args'].get('predict', 'v')}", ckpt["meta"]["shape"],
                      ckpt["meta"]["feature_dim"])
            ours = (f"{args.model} --predict {args.predict}", meta["shape"], meta["feature_dim"])
            if theirs != ours:
                raise SystemExit(f"error: {ckpt_path} is {theirs[0]} on {theirs[1]} data with {theirs[2]}-dim text "
                                 f"features, this run is {ours[0]} on {ours[1]} with {ours[2]}-dim: resume with "
                                 "the --model, --predict and --data-dir it was trained with")
            if ckpt["step"] > args.max_steps:
                parser.error(f"{ckpt_path} is at step {ckpt['step']}, beyond --max-steps {args.max_steps}")
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device != "cpu" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
            rng.bit_generator.state = ckpt["rng"]["numpy"]
            start = ckpt["step"]
        except Exception as e:  # an older or foreign checkpoint: missing keys, wrong shapes ...
            raise SystemExit(f"error: cannot resume from {ckpt_path}: {type(e).__name__} {str(e).splitlines()[0]}")
    elif os.path.exists(ckpt_path):  # never overwrite a run by accident
        raise SystemExit(f"error: {ckpt_path} exists: add --resume to continue that run, or choose another --out")

    if master:
        print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, data {args.data_dir}: "
              f"{meta['num_images']} images {meta['shape']}, {meta['num_captions']} captions, device {device}"
              + (f" x {world_size} processes" if ddp else "") + (f", resuming at step {start}" if args.resume else ""))
        log_path, lines = os.path.join(args.out, "log.csv"), [LOG_HEADER]
        try:
            os.makedirs(args.out, exist_ok=True)
            if start and os.path.exists(log_path):  # resuming: keep the log up to the checkpoint, drop lost steps
                with open(log_path, newline="") as f:
                    lines += [line for line in list(csv.reader(f))[1:] if int(line[0]) <= start]
            log = open(log_path, "w", newline="")
        except OSError as e:
            raise SystemExit(f"error: cannot write to --out {args.out}: {e}")
        writer = csv.writer(log)
        writer.writerows(lines)
    t_start = t_log = time.time()
    saved = start  # the step of the checkpoint on disk (0: none yet)
    bar = tqdm(range(start, args.max_steps + 1), initial=start, total=args.max_steps + 1, desc="train",
               dynamic_ncols=True, disable=not master)
    for step in bar:
        # --- every N steps and at the end: a checkpoint, then a steps x prompts grid (by rank 0)
        if step > start and (step % args.sample_every == 0 or step == args.max_steps):
            if master:
                rng_states = {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state}
                if device != "cpu":
                    rng_states["cuda"] = torch.cuda.get_rng_state()
                save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(),
                                 "optimizer": optimizer.state_dict(), "step": step, "rng": rng_states,
                                 "args": vars(args), "meta": meta, "text_encoder": meta["text_encoder"]}, ckpt_path)
                images = steps_grid(ema, grid_y, GRID_STEPS, meta, model_d=told_step(vars(args)))  # (P, 1, S, 3, H, W)
                save_image(images.flatten(0, 2), os.path.join(args.out, f"grid_{step:06d}.png"),
                           nrow=len(GRID_STEPS), padding=1)
            saved = step
        if step == args.max_steps:
            break

        # --- one training step (with DDP: on this rank's rows of the global batch)
        if args.lr_schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.max_steps))
        x1, y = get_batch()
        keep = (torch.rand(args.batch, 1, device=device)[rows] >= args.cfg_dropout).float()
        y = y * keep  # caption dropout: zero rows are the null caption (classifier-free guidance)
        with ctx:
            x_t, t, d, y, v_target = shortcut_targets(teacher, x1, y, args.bootstrap_every, args.denoise_steps,
                                                      rank, world_size)
            v = ddp_model(x_t, t, d, y)
        row_loss = F.mse_loss(v.float(), v_target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        loss = row_loss.mean()

        # --- NaN guard: a non-finite loss stops us before it reaches the weights, the EMA or a checkpoint. With
        #     DDP the check is on the sum over ranks, so all stop at the same step. It syncs CPU and GPU every step:
        #     cheap next to a DiT step, and it names the exact step.
        loss_all = loss.detach().clone()
        if ddp:
            dist.all_reduce(loss_all)
        if not torch.isfinite(loss_all):
            last = f"{ckpt_path} (step {saved}) is untouched" if saved else "no checkpoint was written yet"
            raise SystemExit(f"error: loss is {loss_all.item()} at step {step + 1}: stopped before updating the "
                             f"weights; {last}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # EMA: ema <- decay * ema + (1 - decay) * model
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - args.ema_decay)

        # --- log rank 0's rows every log_every steps
        if master and (step + 1) % args.log_every == 0:
            now = time.time()
            is_flow = d == 1 / args.denoise_steps
            row_loss = row_loss.detach()
            loss_boot = row_loss[~is_flow].mean().item() if (~is_flow).any() else float("nan")
            img_s = args.log_every * args.batch / (now - t_log)  # all ranks together
            writer.writerow([step + 1, f"{loss.item():.5f}", f"{row_loss[is_flow].mean().item():.5f}",
                             f"{loss_boot:.5f}", f"{img_s:.1f}", f"{now - t_start:.1f}"])
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{img_s:.0f}")
            t_log = now
    if master:
        log.close()
        print(f"done: {args.max_steps - start} steps in {(time.time() - t_start) / 60:.1f} min, "
              f"checkpoint {ckpt_path}")
    if ddp:
        dist.destroy_process_group()
