"""
FID (Frechet Inception Distance) of a trained shortcut model at several step counts, plus prompt accuracy on toyfaces.

    python fid.py --ckpt out/ckpt.pt --steps 1 2 4 8 16 32 128 --n 10000
    python fid.py --ckpt out/ckpt.pt --steps 1 4 128 --n 1000 --batch 100 --cfg 1.5 --seed 0
    python fid.py --ckpt out/ckpt.pt --steps 1 128 --inception pt_inception-2015-12-05-6726825d.pth --out fid_out
    python fid.py --ckpt out_uncond/ckpt.pt --steps 1 2 4 8 128 --n 50000 --weights online   # the paper's FID-50k

Samples --n images per step count, prompted by --n random captions of the training set (an unconditional model:
the null caption), with the EMA weights (ours) or the online ones (--weights online, the official evaluation's), and
compares their Inception statistics with those of the real images (--reference real, the paper's way): every image
of the data set at the training resolution, data_dir/fid_stats.npz, written by prepare_data.py or made here once.
--reference vae compares with the VAE's reconstructions of the cached latents instead (fid_stats_vae.npz): the VAE's
error is then invisible; the FID of the reconstructions to the real images is that error, a floor for any model.
Prints a steps x FID table naming the reference and its N, writes fid.csv and fid.png (drawn with Pillow, which
torchvision already depends on) to --out. Memory stays bounded for any --n: --batch samples at a time, the VAE
decodes 16 at a time, the DiT and VAE in bf16 autocast on CUDA (Inception in fp32). The Inception weights are
pytorch-fid's port of the TF FID network: downloaded once into the torch hub cache, or --inception PATH offline.
On toyfaces the table also has prompt accuracy (the fraction of samples showing every attribute their caption
names; unconditional: the fraction of clean faces); if no Inception weights can be had there, FID is skipped with a
one-line note and accuracy still printed.
"""

import argparse
import csv
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import toyfaces
from data import one_line_errors, power_of_two_steps, read_source, save_plot, to_images
from inception import (RunningStats, frechet_distance, image_file_stats, inception_features, inception_hash,
                       inception_stats, load_inception, load_stats, made_on, save_stats)
from model import autocast, is_unconditional, load_checkpoint
from objectives import told_step
from sample import sample

def read_samples(images):
    """toyfaces' attribute reader on a batch of samples in [0, 1] (B, 3, H, W): a dict per face, None otherwise."""
    return toyfaces.read_attributes((images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())


def reference_stats(data_dir, meta, kind, inception, batch, workers=0):
    """Inception statistics of the data side -> (mu, sigma, info, path), cached in data_dir.

    kind="real" (the official evaluation's): every real image at the training resolution, fid_stats.npz, which
    prepare_data.py writes while it holds the images; made here if missing, from x1.npy on pixel data (those are
    the images) or from the source folder on latent data. kind="vae": every x1.npy latent decoded by the VAE,
    fid_stats_vae.npz: its FID against the real statistics is the VAE's own share of any sample's FID, a floor
    the VAE reference would hide."""
    real = kind == "real" or meta["vae"] == "none"  # pixel data: the decoded x1 are the real images
    path = os.path.join(data_dir, "fid_stats.npz" if real else "fid_stats_vae.npz")
    digest = inception_hash(inception)
    if os.path.isfile(path):
        mu, sigma, info = load_stats(path)
        if info.get("inception") != digest:
            raise SystemExit(f"error: {path} was computed with other Inception weights ({info.get('inception')}, "
                             f"these are {digest}): delete it to recompute it")
        return mu, sigma, info, path
    if kind == "real" and meta["vae"] != "none":
        source = meta.get("source", "")
        if not os.path.isdir(source):
            raise SystemExit(f"error: {path} is missing and the source folder '{source}' is gone: put it back, "
                             "or compare with VAE reconstructions (--reference vae)")
        paths = read_source(source)[1][:meta["num_images"] + meta["skipped"]]  # prepare_data's --n, then skipped
        mu, sigma, n = image_file_stats(paths, meta["resolution"], inception, batch, workers)
        what = f"real images of {source} at {meta['resolution']} px"
    else:
        x1 = np.load(os.path.join(data_dir, "x1.npy"), mmap_mode="r")  # (N, V, C, H, W): read a batch at a time
        n, device = len(x1), next(inception.parameters()).device

        def decode(i):  # bf16 on CUDA for the VAE, but not for Inception: FID's features stay fp32
            with autocast(device):
                return to_images(torch.from_numpy(x1[i:i + batch, 0].astype(np.float32)).to(device), meta)
        batches = (decode(i) for i in range(0, n, batch))
        mu, sigma = inception_stats(batches, inception, total=-(-n // batch), desc=f"{kind} reference ({n} images)")
        what = "the data's images" if real else f"VAE reconstructions of {os.path.join(data_dir, 'x1.npy')}"
    info = dict(n=n, inception=digest, reference=what, **made_on(inception))
    save_stats(path, mu, sigma, **info)
    return mu, sigma, info, path


@torch.no_grad()
def evaluate(model, meta, feats, captions, steps, inception, batch, seed=0, cfg=1.0, model_d=None, dist=None):
    """Samples one image per caption in `steps` steps -> (Inception (mu, sigma) or None, prompt accuracy or None,
    diversity or None). On toyfaces: accuracy is the fraction showing every attribute its caption names,
    diversity the largest total variation of an open attribute from the data's (toyfaces.open_attribute_tv)."""
    device = next(model.parameters()).device
    running, reads = RunningStats(), []
    g = torch.Generator().manual_seed(seed)  # the same noise at every step count: only the step count differs
    for i in tqdm(range(0, len(feats), batch), desc=f"{steps:3d} steps", leave=False):
        y = torch.from_numpy(np.asarray(feats[i:i + batch], np.float32)).to(device)
        noise = torch.randn(len(y), *meta["shape"], generator=g).to(device)
        with autocast(device):  # the DiT and the VAE in bf16 on CUDA; Inception (below) in fp32, as pytorch-fid
            images = to_images(sample(model, noise, y, steps, cfg_scale=cfg, model_d=model_d), meta)
        if inception is not None:
            running.update(inception_features(images, inception))
        if meta["dataset"] == "toyfaces":
            reads += read_samples(images)
    if meta["dataset"] != "toyfaces":
        return running.stats() if inception is not None else None, None, None
    tv = toyfaces.open_attribute_tv(reads, captions, dist)
    return (running.stats() if inception is not None else None,
            float(np.mean([toyfaces.shows(r, c) for r, c in zip(reads, captions)])), max(tv.values(), default=float("nan")))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="out/ckpt.pt")
    parser.add_argument("--steps", nargs="+", type=power_of_two_steps, default=[1, 2, 4, 8, 16, 32, 128])
    parser.add_argument("--n", type=int, default=10000, help="samples per step count (the paper: 50000)")
    parser.add_argument("--batch", type=int, default=250, help="samples per batch (the VAE decodes 16 at a time)")
    parser.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--weights", choices=["ema", "online"], default="ema",
                        help="the EMA (ours, DiT's) or the online weights (the official evaluation's, use_ema=0)")
    parser.add_argument("--reference", choices=["real", "vae"], default="real",
                        help="real images (the paper's) or VAE reconstructions of the cached latents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inception", default=None, help="pt_inception-2015-12-05-6726825d.pth if offline")
    parser.add_argument("--data-dir", default=None, help="default: the one the checkpoint was trained on")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image-reading processes, when the real-image statistics are made from the source")
    parser.add_argument("--out", default="fid", help="directory for fid.csv and fid.png")
    one_line_errors(parser)
    args = parser.parse_args()
    if args.n < 2 or args.batch < 1:
        raise SystemExit(f"error: need --n >= 2 (a covariance) and --batch >= 1, got {args.n} and {args.batch}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, ckpt = load_checkpoint(args.ckpt, device, args.weights)
    meta, data_dir = ckpt["meta"], args.data_dir or ckpt["args"]["data_dir"]
    model_d = told_step(ckpt["args"])  # the flow-matching baseline is always told the smallest step
    on_toyfaces, unconditional = meta["dataset"] == "toyfaces", is_unconditional(ckpt)
    if unconditional and args.cfg != 1:
        raise SystemExit(f"error: {args.ckpt} is unconditional (train.py --unconditional): no --cfg")
    try:
        inception = load_inception(args.inception, device)
    except SystemExit as e:
        if not on_toyfaces:  # FID is the only metric there
            raise
        print(f"FID skipped (prompt accuracy only): {str(e).removeprefix('error: ')}")
        inception = None
    if inception is not None:  # the data side, computed once per data set and kind
        mu_ref, sigma_ref, ref, ref_path = reference_stats(data_dir, meta, args.reference, inception, args.batch,
                                                           args.workers)

    # prompts: the text features of --n random caption rows of the training set, the same for every step count;
    # an unconditional model gets the null caption (zeros) --n times, which toyfaces reads as the empty prompt
    with open(os.path.join(data_dir, "captions.json")) as f:
        all_captions = json.load(f)
    if unconditional:
        feats, captions = np.zeros((args.n, meta["feature_dim"]), np.float32), [""] * args.n
    else:
        feats = np.load(os.path.join(data_dir, "text_features.npy"), mmap_mode="r")
        rows = np.sort(np.random.default_rng(args.seed).choice(len(feats), size=args.n, replace=args.n > len(feats)))
        feats, captions = feats[rows], [all_captions[k] for k in rows]

    dist = None
    if on_toyfaces:
        dist = toyfaces.data_distribution(data_dir, captions)
    results = []  # (steps, fid or None, accuracy or None, diversity or None)
    for steps in args.steps:
        stats, acc, tv = evaluate(model, meta, feats, captions, steps, inception, args.batch, args.seed, args.cfg,
                                  model_d, dist)
        results.append((steps, None if stats is None else frechet_distance(*stats, mu_ref, sigma_ref), acc, tv))

    print(f"\n{meta['dataset']}, N = {args.n} samples per row, {'unconditional' if unconditional else f'cfg {args.cfg}'}"
          f", {args.ckpt} ({args.weights} weights)")
    if inception is not None:
        print(f"reference: {ref['reference']}, N = {ref['n']} ({ref_path})")
        if args.reference == "vae" and meta["vae"] != "none":  # the floor the VAE puts under every FID above
            mu_real, sigma_real = reference_stats(data_dir, meta, "real", inception, args.batch, args.workers)[:2]
            print(f"the VAE's share: its reconstructions are at FID "
                  f"{frechet_distance(mu_ref, sigma_ref, mu_real, sigma_real):.2f} from the real images")
    accuracy = "  is a face" if unconditional else "  accuracy"  # the empty prompt's accuracy: a clean face
    print("steps" + ("       FID" if inception is not None else "") + (f"{accuracy}  open-attribute TV" if on_toyfaces else ""))
    for steps, fd, acc, tv in results:
        print(f"{steps:5d}" + (f"{fd:10.2f}" if fd is not None else "")
              + (f"{acc:{len(accuracy)}.1%}{tv:19.2f}" if acc is not None else ""))
    os.makedirs(args.out, exist_ok=True)
    reference = (args.reference, ref["n"]) if inception is not None else ("", "")
    with open(os.path.join(args.out, "fid.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("steps", "n", "fid", "prompt_accuracy", "open_attribute_tv", "weights", "reference",
                                  "reference_n")] + [(s, args.n, *("" if v is None else f"{v:.4f}" for v in (fd, a, tv)),
                                                      args.weights, *reference) for s, fd, a, tv in results])
    panels = {f"{name} vs sampling steps": {name: [r[i] for r in results]}
              for i, name in [(1, f"FID (N={args.n})"), (2, "prompt accuracy"), (3, "open-attribute TV")]
              if results[0][i] is not None}
    save_plot(os.path.join(args.out, "fid.png"), args.steps, panels, log_x=True)
    print(f"wrote {os.path.join(args.out, 'fid.csv')} and {os.path.join(args.out, 'fid.png')}")
