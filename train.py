"""
Train a text-conditioned shortcut model (Frans et al. 2024), the network s(x_t, t, d, y) that steps from noise to
data in 1, 2, 4 ... 128 steps, with one of four objectives (objectives.py): flow matching, the shortcut paper's
self-consistency, MeanFlow (Geng et al. 2025) or alpha-Flow (Zhang et al. 2025).

    python train.py                      # the recipe that fits the data found: toyfaces (MeanFlow) or the paper's
    python train.py --batch 32           # the same recipe, a flag given on the command line wins
    python train.py --objective shortcut --bootstrap-every 4 --max-steps 3000 --out out_sc   # the paper's objective
    python train.py --objective flow --max-steps 3000 --out out_fm       # the flow-matching baseline
    python train.py --objective alphaflow --flow-fraction 0.5 --out out_af   # alpha-Flow
    python train.py --unconditional --out out_uncond             # no text: the paper's CelebA-HQ setting
    python train.py --resume             # after a crash: the same command plus --resume (bit for bit on a CPU)
    torchrun --standalone --nproc_per_node=8 train.py            # DDP on the 8 GPUs of one machine

Recipes (RECIPES below): on data/toyfaces (prepare_data.py's default) a 1.4M-parameter DiT-T/4 trained with
MeanFlow plus long jumps (8 rows of 64 learn the EMA's 8-step sample, objectives.long_jump) for 2,000 steps on a
2-core CPU; on data/celebahq the paper's shortcut objective, DiT-B/2, lr 1e-4, EMA
0.999, batch 64, 410k steps. Each objective brings its own settings (objectives.SETTINGS: time scale, x floor, how
many rows take big steps). The first line printed names the recipe, the model and the device.
The training step is one call, objectives.training_loss: its rows, targets and loss weight, for any objective.
Writes to --out: ckpt.pt (a plain dict, loads with weights_only=True, always complete), log.csv (the loss of each
step-size level d, img/s), levels.png (those losses over training) and grid_<step>.png (fixed prompts at 1, 2, 4
and 128 steps).
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
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import toyfaces
from data import encode_text, load_data, load_vae, one_line_errors, save_grid, save_plot, steps_grid
from model import AMP, DiT, DiT_models, autocast, read_checkpoint
from objectives import ADAPTIVE, DEFAULTS, OBJECTIVES, SETTINGS, told_step, training_loss
from sample import sample

# What `python train.py` trains, by the data set it finds: the data's model, budget and objective (whose own
# settings come from objectives.SETTINGS). Any flag given on the command line wins. Why these: docs/experiments.md.
RECIPES = {
    "paper": dict(model="DiT-B/2", batch=64, lr=1e-4, lr_schedule="constant", ema_decay=0.999, predict="v",
                  objective="shortcut", long_jump_rows=0, max_steps=410_000, sample_every=5000),
    "toyfaces": dict(model="DiT-T/4", batch=64, lr=3e-3, lr_schedule="cosine", ema_decay=0.99, predict="x",
                     objective="meanflow", long_jump_rows=8, max_steps=2000, sample_every=500),
}
GRID_PROMPTS = ["a man with glasses", "a smiling woman with red hair", "a woman with blond hair",
                "a bearded man with black hair", "a person with brown hair and glasses", "a smiling man"]
GRID_STEPS = [1, 2, 4, 128]
LEVELS = [f"1/{2 ** k}" if k else "1" for k in range(8)]  # the step sizes d = 1, 1/2 ... 1/128 (flow rows)
QUALITY_STEPS = [1, 2, 4]  # toyfaces: the reader's accuracy at these step counts at every checkpoint
LOG_HEADER = (["step", "loss", "img_per_s", "elapsed_s"] + [f"loss_d{d}" for d in LEVELS]
              + [f"accuracy_{s}step" for s in QUALITY_STEPS])


def quality(ema, y, meta, model_d, n):
    """toyfaces: the fraction of samples the reader finds showing their prompt at QUALITY_STEPS steps, on fixed
    noises (n of each grid prompt, --quality-n), so checkpoints and runs compare by looking."""
    images = steps_grid(lambda noise, y, steps: sample(ema, noise, y, steps, model_d=model_d), y, QUALITY_STEPS,
                        meta, n=n, seed=1234)                                                 # (P, n, S, 3, H, W)
    pixels = (images * 255).round().byte().permute(0, 1, 2, 4, 5, 3).cpu().numpy()
    return [np.mean([toyfaces.shows(r, prompt) for p, prompt in enumerate(GRID_PROMPTS)
                     for r in toyfaces.read_attributes(pixels[p, :, s])]) for s in range(len(QUALITY_STEPS))]


def level_of(d):
    """The index into LEVELS of each row's step size: d = 2^-k -> k; flow rows (d <= 1/128) -> 7."""
    return (-torch.log2(d.float().clamp(min=1 / 128))).round().long().clamp(0, 7)


# -----------------------------------------------------------------------------
# plumbing: the command line and its recipe, devices, checkpoints, the log

def whole_number(s, least=1):
    if not s.isdigit() or int(s) < least:
        raise argparse.ArgumentTypeError(f"must be a whole number >= {least}, got {s!r}")
    return int(s)


def parse_args():
    """The command line. Flags left out (None) are filled in from the recipe of the data set (apply_recipe)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="default: data/celebahq once prepared, else data/toyfaces")
    parser.add_argument("--out", default="out")
    parser.add_argument("--model", choices=list(DiT_models))
    parser.add_argument("--batch", type=whole_number, help="global batch, split across DDP processes")
    parser.add_argument("--predict", choices=["v", "x"], help="the network outputs v (the paper) or x1 (pixels)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], help="cosine: decay to 0 at --max-steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float)
    parser.add_argument("--objective", choices=OBJECTIVES, help="how the big steps learn (objectives.py)")
    parser.add_argument("--flow-fraction", type=float, help="meanflow, alphaflow: the fraction of rows with d = 0")
    parser.add_argument("--intervals", choices=["uniform", "dyadic"],
                        help="meanflow, alphaflow: train every interval, or only the steps of a 1, 2, 4 ... step sampler")
    parser.add_argument("--tangent", choices=["v", "model"],
                        help="meanflow: the JVP's x-tangent, the data's v or the model's own (improved MeanFlow)")
    parser.add_argument("--x-floor", type=float, help="--predict x: the floor on 1 - t (default: the objective's)")
    parser.add_argument("--time-scale", type=float, help="t and d x this before their embedding (1000 or 1)")
    parser.add_argument("--d-embedding", choices=["value", "level"], default="value",
                        help="d enters its embedding as its value x --time-scale (ours) or its level log2(1/d) (official)")
    parser.add_argument("--long-jump-rows", type=int, help="rows per batch at t = 0, d = 1 learning the EMA's K-step sample")
    parser.add_argument("--long-jump-steps", type=whole_number, help="K, the teacher's steps for a long jump")
    parser.add_argument("--long-jump-start", type=float, help="long jumps from this fraction of max-steps")
    parser.add_argument("--long-jump-power", type=float,
                        help="meanflow, alphaflow: the adaptive weight's power p on the long-jump rows")
    parser.add_argument("--bootstrap-every", type=whole_number, help="shortcut: 1/N of each batch is self-consistency")
    parser.add_argument("--denoise-steps", type=int, help="smallest step 1/M; sampling allows up to M steps")
    parser.add_argument("--cfg-dropout", type=float, default=0.1, help="fraction of captions replaced by the null one")
    parser.add_argument("--unconditional", action="store_true",
                        help="every row gets the null caption: no text (the paper's CelebA-HQ run has no labels)")
    parser.add_argument("--max-steps", type=whole_number)
    parser.add_argument("--log-every", type=whole_number, default=50)
    parser.add_argument("--sample-every", type=whole_number, help="checkpoint and grid PNG every N steps")
    parser.add_argument("--quality-n", type=lambda s: whole_number(s, 0), default=32,
                        help="toyfaces: the reader checks N samples of each grid prompt per checkpoint (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue --out/ckpt.pt where it stopped")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model and its EMA teacher")
    parser.add_argument("--amp", choices=AMP, default="auto", help="auto: bf16 autocast on CUDA, fp32 on a CPU")
    one_line_errors(parser)
    parser.set_defaults(**DEFAULTS)  # the objectives' options no recipe sets (objectives.DEFAULTS)
    args = parser.parse_args()
    if args.data_dir is None:
        args.data_dir = "data/celebahq" if os.path.exists("data/celebahq/meta.json") else "data/toyfaces"
    return parser, args


def apply_recipe(args, meta):
    """Fill the flags not given from the recipe of the data set, then from the settings of the objective
    (objectives.SETTINGS). -> 'toyfaces recipe' (+ ', --lr 0.001' for each flag given that differs from them)."""
    name = "toyfaces" if meta["dataset"] == "toyfaces" else "paper"
    defaults = dict(RECIPES[name], **SETTINGS[args.objective or RECIPES[name]["objective"]])
    shown = lambda value: f"{value:g}" if isinstance(value, float) else value  # 1.0 -> 1, 0.001 stays
    changed = "".join(f", --{k.replace('_', '-')} {shown(getattr(args, k))}"
                      for k, v in defaults.items() if getattr(args, k) not in (None, v))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return f"{name} recipe{changed}"


def setup_ddp():
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE: one process per GPU (NCCL; gloo on a CPU), nanoGPT style.
    Without them, one process. -> (ddp, rank, world_size, local_rank, device)"""
    if "RANK" not in os.environ:
        return False, 0, 1, 0, "cuda" if torch.cuda.is_available() else "cpu"
    local_ranks, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
    if torch.cuda.is_available() and local_ranks > gpus:  # rank gpus would ask for a cuda:N that does not exist
        raise SystemExit(f"error: {local_ranks} processes on this machine but {gpus} GPU(s): use "
                         f"--nproc_per_node={gpus}, or CUDA_VISIBLE_DEVICES= for CPU processes")
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    return True, rank, world_size, local_rank, device


def save_checkpoint(ckpt, path):
    """Write a temporary file beside path, fsync it, rename it over path: the rename is atomic, so path is always a
    complete checkpoint, whatever stops us mid-write. A failed write is one line and leaves the previous one."""
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


def run_flags(a):
    """The flags that fix what a run's network is and learns, from its args as a dict; an older checkpoint's args
    lack the newer flags: their defaults then."""
    return (f"{a['model']} --objective {a.get('objective', 'shortcut')} --predict {a.get('predict', 'v')} "
            f"--x-floor {a.get('x_floor', 0.25):g} --time-scale {a.get('time_scale', 1000.0):g}"
            + " --d-embedding level" * (a.get("d_embedding", "value") == "level")
            + " --unconditional" * bool(a.get("unconditional", False)))


def resume(ckpt_path, args, meta, model, ema, optimizer, rng, device):
    """Load ckpt.pt into the model, its EMA, AdamW's moments and the RNG states (batches are random draws, so the
    RNG state is the position in the data order). -> the step to continue from. Any mismatch is one line."""
    ckpt = read_checkpoint(ckpt_path, "cpu")  # on the CPU: RNG states must be CPU tensors
    try:
        theirs = (run_flags(ckpt["args"]), ckpt["meta"]["shape"], ckpt["meta"]["feature_dim"])
        ours = (run_flags(vars(args)), meta["shape"], meta["feature_dim"])
        if theirs != ours:
            raise SystemExit(f"error: {ckpt_path} is {theirs[0]} on {theirs[1]} data with {theirs[2]}-dim text "
                             f"features, this run is {ours[0]} on {ours[1]} with {ours[2]}-dim: resume with "
                             "the --model, --objective, --predict, --x-floor, --time-scale, --d-embedding, --unconditional "
                             "and --data-dir it was trained with")
        if ckpt["step"] > args.max_steps:
            raise SystemExit(f"error: {ckpt_path} is at step {ckpt['step']}, beyond --max-steps {args.max_steps}")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device != "cpu" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        rng.bit_generator.state = ckpt["rng"]["numpy"]
        return ckpt["step"]
    except Exception as e:  # an older or foreign checkpoint: missing keys, wrong shapes ...
        raise SystemExit(f"error: cannot resume from {ckpt_path}: {type(e).__name__} {str(e).splitlines()[0]}")


def open_log(out, start):
    """log.csv, opened for writing; when resuming, the rows up to the checkpoint's step are kept and the steps
    after it (redone now) dropped. -> (file, csv writer, the rows so far)"""
    path, rows = os.path.join(out, "log.csv"), []
    try:
        os.makedirs(out, exist_ok=True)
        if start and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [row for row in list(csv.reader(f))[1:] if int(row[0]) <= start]
        log = open(path, "w", newline="")
    except OSError as e:
        raise SystemExit(f"error: cannot write to --out {out}: {e}")
    writer = csv.writer(log)
    writer.writerows([LOG_HEADER] + rows)
    return log, writer, rows


def plot_levels(rows, path):
    """levels.png: the loss of each step-size level over training (log scale): the small steps learn first."""
    if rows:
        columns = np.array([[float(v or "nan") for v in row] for row in rows]).T   # (len(LOG_HEADER), rows)
        save_plot(path, columns[0], {"loss by step size d (log scale) vs training step": {
            f"d = {d}": columns[4 + k] for k, d in enumerate(LEVELS)}}, log_y=True)


def plot_quality(rows, path):
    """quality.png (toyfaces): the reader's accuracy at 1, 2 and 4 steps vs minutes of training."""
    rows = [row for row in rows if row[-1]]
    if rows:
        columns = np.array([[float(v or "nan") for v in row] for row in rows]).T
        minutes = columns[3] / 60
        save_plot(path, minutes, {"reader accuracy on fixed noises vs minutes of training": {
            f"{s} step{'s' * (s > 1)}": columns[-len(QUALITY_STEPS) + k] for k, s in enumerate(QUALITY_STEPS)}},
                  ticks=[m for m in range(0, int(minutes.max()) + 1, 5 if minutes.max() > 10 else 1)])


if __name__ == "__main__":
    parser, args = parse_args()
    meta, x1_all, features, caption_image = load_data(args.data_dir)
    recipe = apply_recipe(args, meta)
    if not (0 <= (args.flow_fraction or 0) <= 1 and args.time_scale > 0):
        parser.error(f"need 0 <= --flow-fraction <= 1 and --time-scale > 0, got {args.flow_fraction} and {args.time_scale}")
    if not 0 < args.x_floor <= 1:  # v = (x1_hat - x_t) / max(1 - t, floor): a floor of 0 divides by zero at t = 1
        parser.error(f"need 0 < --x-floor <= 1, got {args.x_floor}")
    if args.d_embedding == "level" and args.objective in ADAPTIVE:
        parser.error(f"--d-embedding level needs d > 0: not with --objective {args.objective}, whose flow rows have d = 0")
    if not 0 <= args.long_jump_rows < args.batch:
        parser.error(f"need 0 <= --long-jump-rows < --batch, got {args.long_jump_rows}")
    if args.batch > meta["num_images"]:
        parser.error(f"--batch {args.batch} is larger than the data set ({meta['num_images']} images in {args.data_dir})")
    ddp, rank, world_size, local_rank, device = setup_ddp()
    master = rank == 0  # only rank 0 logs, saves checkpoints and draws grids
    if args.batch % world_size:
        parser.error(f"--batch {args.batch} does not split evenly across {world_size} processes")
    rows = slice(rank, None, world_size)  # this rank's rows of every global batch
    ctx = autocast(device, args.amp)  # --amp auto: bf16 autocast on CUDA; fp32 on a CPU, where bf16 is very slow
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)  # the same seed on every rank: each draws the whole global batch, keeps its rows
    rng = np.random.default_rng(args.seed)

    def get_batch():
        k = rng.integers(len(features), size=args.batch)[rows]                 # random captions ...
        view = rng.integers(x1_all.shape[1], size=args.batch)[rows]            # ... and a random flip of each image
        x1, y = torch.from_numpy(x1_all[caption_image[k], view].astype(np.float32)), torch.from_numpy(features[k])
        if args.unconditional:  # all-zero rows: the learned null embedding is the model's only condition
            y = torch.zeros_like(y)
        if device != "cpu":  # page-locked memory: the copies are asynchronous, the CPU goes on queueing work
            x1, y = x1.pin_memory(), y.pin_memory()
        return x1.to(device, non_blocking=True), y.to(device, non_blocking=True)

    # the model, its EMA (the bootstrap teacher and the weights we sample with), AdamW
    model = DiT(**DiT_models[args.model], input_size=meta["shape"][1], in_channels=meta["shape"][0],
                feature_dim=meta["feature_dim"], predict=args.predict, time_scale=args.time_scale, x_floor=args.x_floor,
                d_embedding=args.d_embedding).to(device)
    model.y_embedder.set_feature_stats(torch.from_numpy(features).to(device))
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=device != "cpu")
    # DDP averages the gradients of all ranks in backward, so every rank takes the same step and the EMA stays
    # identical everywhere; no buffer changes in training, so none is broadcast. DDP first, then torch.compile:
    # the compiled graph is split at DDP's gradient buckets, so their all-reduce overlaps the rest of backward. The
    # teacher sees several batch sizes (bootstrap rows, long jumps): dynamic=False, one static graph for each.
    # Compiled views share the parameters; we save and sample with the plain modules, so no "_orig_mod." keys.
    net = DDP(model, device_ids=[local_rank] if device != "cpu" else None, broadcast_buffers=False) if ddp else model
    net, teacher = (torch.compile(net), torch.compile(ema, dynamic=False)) if args.compile else (net, ema)
    if args.unconditional:  # one band of 6 seeds of the null caption instead of 6 prompts
        grid_prompts, grid_n, grid_y = ["unconditional"], 6, torch.zeros(1, meta["feature_dim"], device=device)
    else:
        grid_prompts, grid_n = GRID_PROMPTS, 1
        grid_y = torch.from_numpy(encode_text(GRID_PROMPTS, meta["text_encoder"], device)).to(device)
    if meta["vae"] != "none":
        load_vae(meta["vae"], str(grid_y.device))  # a missing VAE fails now, not at the first grid

    ckpt_path, start = os.path.join(args.out, "ckpt.pt"), 0
    if args.resume:
        start = resume(ckpt_path, args, meta, model, ema, optimizer, rng, device)
    elif os.path.exists(ckpt_path):  # never overwrite a run by accident
        raise SystemExit(f"error: {ckpt_path} exists: add --resume to continue that run, or choose another --out")
    if master:
        print(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), {recipe}: "
              f"{args.max_steps} steps at batch {args.batch}, device {device}"
              + (f" x {world_size} processes" if ddp else "") + (f", resuming at step {start}" if start else ""))
        print(f"data {args.data_dir}: {meta['num_images']} images {meta['shape']}, {meta['num_captions']} captions"
              + (" (unused: --unconditional)" if args.unconditional else ""))
        log, writer, log_rows = open_log(args.out, start)
    level_sum, level_n = torch.zeros(len(LEVELS), device=device), torch.zeros(len(LEVELS), device=device)
    t_start = t_log = time.time()
    logged = start  # the step of the last log line
    saved = start  # the step of the checkpoint on disk (0: none yet)
    model_d = told_step(vars(args))  # the step size the grids tell the model (a flow-matching model: its smallest)
    bar = tqdm(range(start, args.max_steps + 1), initial=start, total=args.max_steps, desc="train",
               dynamic_ncols=True, disable=not master)
    for step in bar:
        # every N steps and at the end: a checkpoint, a steps x prompts grid and the level plot (rank 0)
        if step > start and (step % args.sample_every == 0 or step == args.max_steps):
            if master:
                rng_states = {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state}
                if device != "cpu":
                    rng_states["cuda"] = torch.cuda.get_rng_state()
                save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(),
                                 "optimizer": optimizer.state_dict(), "step": step, "rng": rng_states,
                                 "args": vars(args), "meta": meta, "text_encoder": meta["text_encoder"]}, ckpt_path)
                images = steps_grid(lambda noise, y, steps: sample(ema, noise, y, steps, model_d=model_d), grid_y,
                                    GRID_STEPS, meta, n=grid_n)
                save_grid(images, grid_prompts, GRID_STEPS, os.path.join(args.out, f"grid_{step:06d}.png"))
                plot_levels(log_rows, os.path.join(args.out, "levels.png"))
                plot_quality(log_rows, os.path.join(args.out, "quality.png"))
            saved = step
        if step == args.max_steps:
            break

        # one training step (with DDP: on this rank's rows of the global batch)
        if args.lr_schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.max_steps))
        x1, y = get_batch()
        keep = (torch.rand(args.batch, 1, device=device)[rows] >= args.cfg_dropout).float()
        y = y * keep  # caption dropout: zero rows are the null caption (classifier-free guidance)
        with ctx:  # the objective's rows, targets and weighted loss (objectives.py)
            loss, row_loss, d = training_loss(args, net, model, teacher, x1, y, step / args.max_steps, rank,
                                              world_size)

        # NaN guard: a non-finite loss stops us before it reaches the weights, the EMA or a checkpoint. With DDP
        # the check is on the sum over ranks, so all stop at the same step. A CPU-GPU sync, cheap next to a step.
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

        # log: the mean loss of each level d over rank 0's rows since the last log line
        level = level_of(d)
        level_sum.index_add_(0, level, row_loss.detach())
        level_n.index_add_(0, level, torch.ones_like(row_loss))
        checkpoint_next = (step + 1) % args.sample_every == 0 or step + 1 == args.max_steps
        if master and ((step + 1) % args.log_every == 0 or checkpoint_next):
            now = time.time()
            img_s = (step + 1 - logged) * args.batch / (now - t_log)  # all ranks together
            means, counts = (level_sum / level_n.clamp(min=1)).tolist(), level_n.tolist()
            levels = [f"{x:.5f}" if n else "" for x, n in zip(means, counts)]  # "": no row of that level
            acc = [""] * len(QUALITY_STEPS)
            if checkpoint_next and meta["dataset"] == "toyfaces" and not args.unconditional and args.quality_n > 0:
                acc = [f"{a:.4f}" for a in quality(ema, grid_y, meta, model_d, args.quality_n)]
            log_rows.append([step + 1, f"{loss.item():.5f}", f"{img_s:.1f}", f"{now - t_start:.1f}", *levels, *acc])
            writer.writerow(log_rows[-1])
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{img_s:.0f}")
            level_sum.zero_(), level_n.zero_()
            t_log, logged = time.time(), step + 1  # the quality check's time is not training's
    if master:
        log.close()
        print(f"done: {args.max_steps - start} steps in {(time.time() - t_start) / 60:.1f} min, checkpoint {ckpt_path}")
    if ddp:
        dist.destroy_process_group()
