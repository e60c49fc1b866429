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
import hashlib
import os

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torchvision.models import inception as tv_inception
from tqdm import tqdm

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")

# -----------------------------------------------------------------------------
# The FID Inception network: torchvision's InceptionV3 with the four block types patched to match the TF graph
# the FID paper used (as in mseitzer/pytorch-fid). Parameters are unchanged, so the state dict keys are too.


def _tf_avg_pool(x):  # TF's average pool does not count the zero padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tv_inception.InceptionA):
    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionC(tv_inception.InceptionC):
    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(bd)))
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionE_1(tv_inception.InceptionE):
    pool = staticmethod(_tf_avg_pool)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))], 1)


class FIDInceptionE_2(FIDInceptionE_1):
    # The TF FID graph max-pools in its last block (an oddity of that model); copied so scores stay comparable.
    pool = staticmethod(lambda x: F.max_pool2d(x, kernel_size=3, stride=1, padding=1))


class FIDInceptionV3(tv_inception.Inception3):
    """images (B, 3, H, W) float in [0, 1] -> pool3 features (B, 2048). Same keys as torchvision's inception_v3
    (num_classes=1008, aux_logits=False), so pytorch-fid's weight file loads strictly."""

    LAYERS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]

    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        self.Mixed_5b, self.Mixed_5c = FIDInceptionA(192, pool_features=32), FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c, self.Mixed_6d = FIDInceptionC(768, channels_7x7=160), FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b, self.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # any input size works
        x = 2 * x - 1  # [0, 1] -> [-1, 1], what the TF network was trained on
        for name in self.LAYERS:  # stop at the 2048-d average pool: FID never uses the classifier
            x = getattr(self, name)(x)
        return x.flatten(1)


def load_inception(path=None, device="cpu"):
    """The FID Inception network in eval mode. path=None: pytorch-fid's weights from the torch hub cache,
    downloading them there once; offline without the file -> SystemExit saying where to put it."""
    model = FIDInceptionV3()
    if path is None:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))
        if os.path.isfile(cached):
            path = cached
        else:
            try:
                state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", progress=True)
            except Exception as e:  # no network, proxy, HTTP error ...
                raise SystemExit(f"error: no Inception weights ({type(e).__name__}): put the file at {cached} "
                                 f"or pass --inception PATH; download it from {FID_WEIGHTS_URL}")
    if path is not None:
        if not os.path.isfile(path):
            raise SystemExit(f"error: Inception weights {path} not found; download them from {FID_WEIGHTS_URL}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)  # strict: a wrong file fails loudly instead of giving meaningless FIDs
    return model.eval().requires_grad_(False).to(device)


# -----------------------------------------------------------------------------
# Statistics and the Frechet distance between two Gaussians N(mu1, sigma1) and N(mu2, sigma2):
#   d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))


def compute_stats(features):
    """features (N, D) -> (mu (D,), sigma (D, D)) in float64, sigma unbiased like np.cov / pytorch-fid."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


class RunningStats:
    """compute_stats without keeping the features: accumulates N, sum and the sum of outer products."""

    def __init__(self, dim=2048):
        self.n, self.sum, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def update(self, features):
        f = np.asarray(features, dtype=np.float64)
        self.n, self.sum, self.outer = self.n + len(f), self.sum + f.sum(0), self.outer + f.T @ f

    def stats(self):
        mu = self.sum / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def inception_hash(inception):
    """The first 16 hex digits of a sha256 over the network's weights: statistics from other weights (another file,
    a random test network) are not comparable, so every statistics file names the weights it was made with."""
    h = hashlib.sha256()
    for name, tensor in inception.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_stats(path, mu, sigma, **info):
    """mu, sigma and what they are: info = n (images), inception (inception_hash), reference (in words)."""
    np.savez(path, mu=mu, sigma=sigma, **info)


def load_stats(path):  # -> (mu, sigma, info)
    with np.load(path) as f:
        return f["mu"], f["sigma"], {k: f[k].item() for k in f.files if k not in ("mu", "sigma")}


def _trace_sqrt_product(sigma1, sigma2, method):  # Tr sqrt(sigma1 sigma2)
    if method == "sqrtm":  # pytorch-fid's route: a general (Schur) matrix square root, several times slower
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if np.iscomplexobj(covmean):  # round-off gives a tiny imaginary part; a large one means bad input
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"Frechet distance: imaginary component {np.abs(covmean.imag).max():.3g}")
            covmean = covmean.real
        return np.trace(covmean)
    if method == "eigh":
        # If sigma1 = r^T r then sigma1 sigma2 = r^T (r sigma2) has the eigenvalues of r sigma2 r^T, a symmetric PSD
        # matrix: the trace we want is the sum of their square roots. One symmetric eigensolve, exact, and fast.
        try:
            r = scipy.linalg.cholesky(sigma1)  # the cheapest r
        except np.linalg.LinAlgError:  # singular sigma1 (e.g. fewer samples than dimensions): r = sqrt(w) v^T over
            w, v = scipy.linalg.eigh(sigma1)  # its positive eigenvalues only: (k, D), and the solve below is k x k
            r = (v[:, w > 0] * np.sqrt(w[w > 0])).T
        ev = scipy.linalg.eigh(r @ sigma2 @ r.T, eigvals_only=True)
        if ev.min() < -1e-3 * max(ev.max(), 1e-12):  # same sanity check as the imaginary part above
            raise ValueError(f"Frechet distance: negative eigenvalue {ev.min():.3g}; not covariance matrices?")
        return np.sqrt(np.clip(ev, 0, None)).sum()  # tiny negatives are round-off on singular matrices
    raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, method="eigh"):
    """FID between two sets of Inception statistics. method="sqrtm" is pytorch-fid's computation (same value)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape, "statistics of different dimensions"
    tr_covmean = _trace_sqrt_product(sigma1, sigma2, method)
    if not np.isfinite(tr_covmean):  # product (nearly) singular: regularize both covariances a little
        print(f"fid: singular product, adding {eps} to the diagonal of both covariances")
        offset = eps * np.eye(len(sigma1))
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset, method)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


@torch.no_grad()
def inception_features(images, inception):
    """images (B, 3, H, W) in [0, 1] -> float64 numpy (B, 2048), on the device Inception lives on."""
    images = (images.float().clamp(0, 1) * 255).round() / 255  # 8-bit, as if saved as PNG, for both sides
    return inception(images.to(next(inception.parameters()).device)).double().cpu().numpy()


def real_features(images, inception):
    """uint8 (B, R, R, 3) images as prepare_data.load_images gives them -> features (B, 2048)."""
    return inception_features(torch.from_numpy(images).permute(0, 3, 1, 2) / 255, inception)


def image_file_stats(paths, resolution, inception, batch=50, workers=0):
    """Inception statistics of image files read exactly as prepare_data.py reads them for training (centre crop,
    bicubic resize to `resolution`), unreadable files skipped as there -> (mu, sigma, n). prepare_data.py computes
    the same while it encodes; this is for a data set prepared without Inception weights."""
    from prepare_data import image_batches
    running = RunningStats()
    for images, _, _ in tqdm(image_batches(paths, resolution, batch, workers), total=-(-len(paths) // batch),
                             desc=f"real-image stats ({len(paths)} files)", leave=False):
        if len(images):
            running.update(real_features(images, inception))
    return (*running.stats(), running.n)


def inception_stats(image_batches, inception, total=None, desc="inception"):
    """Streams batches of images through Inception -> (mu, sigma); never holds more than one batch."""
    running = RunningStats()
    for images in tqdm(image_batches, total=total, desc=desc, leave=False):
        running.update(inception_features(images, inception))
    return running.stats()


# -----------------------------------------------------------------------------
# Evaluating a checkpoint. sample.py / prepare_data.py are imported here, not at the top, so the Inception and
# Frechet-distance code above can be used on its own.


def read_samples(images):
    """toyfaces' attribute reader on a batch of samples in [0, 1] (B, 3, H, W): a dict per face, None otherwise."""
    from toyfaces import read_attributes
    return read_attributes((images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())


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
        from prepare_data import read_source
        source = meta.get("source", "")
        if not os.path.isdir(source):
            raise SystemExit(f"error: {path} is missing and the source folder '{source}' is gone: put it back, "
                             "or compare with VAE reconstructions (--reference vae)")
        paths = read_source(source)[1][:meta["num_images"] + meta["skipped"]]  # prepare_data's --n, then skipped
        mu, sigma, n = image_file_stats(paths, meta["resolution"], inception, batch, workers)
        what = f"real images of {source} at {meta['resolution']} px"
    else:
        from sample import autocast, to_images
        x1 = np.load(os.path.join(data_dir, "x1.npy"), mmap_mode="r")  # (N, V, C, H, W): read a batch at a time
        n, device = len(x1), next(inception.parameters()).device

        def decode(i):  # bf16 on CUDA for the VAE, but not for Inception: FID's features stay fp32
            with autocast(device):
                return to_images(torch.from_numpy(x1[i:i + batch, 0].astype(np.float32)).to(device), meta)
        batches = (decode(i) for i in range(0, n, batch))
        mu, sigma = inception_stats(batches, inception, total=-(-n // batch), desc=f"{kind} reference ({n} images)")
        what = "the data's images" if real else f"VAE reconstructions of {os.path.join(data_dir, 'x1.npy')}"
    info = dict(n=n, inception=digest, reference=what)
    save_stats(path, mu, sigma, **info)
    return mu, sigma, info, path


@torch.no_grad()
def evaluate(model, meta, feats, captions, steps, inception, batch, seed=0, cfg=1.0, model_d=None, dist=None):
    """Samples one image per caption in `steps` steps -> (Inception (mu, sigma) or None, prompt accuracy or None,
    diversity or None). On toyfaces: accuracy is the fraction showing every attribute its caption names,
    diversity the largest total variation of an open attribute from the data's (toyfaces.open_attribute_tv)."""
    from sample import autocast, sample, to_images
    from toyfaces import open_attribute_tv, shows
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
    tv = open_attribute_tv(reads, captions, dist)
    return (running.stats() if inception is not None else None,
            float(np.mean([shows(r, c) for r, c in zip(reads, captions)])), max(tv.values(), default=float("nan")))


if __name__ == "__main__":
    import csv
    import json

    from sample import is_unconditional, load_checkpoint, one_line_errors, power_of_two_steps, save_plot, told_step

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
    toyfaces, unconditional = meta["dataset"] == "toyfaces", is_unconditional(ckpt)
    if unconditional and args.cfg != 1:
        raise SystemExit(f"error: {args.ckpt} is unconditional (train.py --unconditional): no --cfg")
    try:
        inception = load_inception(args.inception, device)
    except SystemExit as e:
        if not toyfaces:  # FID is the only metric there
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
    if toyfaces:
        from toyfaces import data_distribution
        dist = data_distribution(data_dir, captions)
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
    print("steps" + ("       FID" if inception is not None else "") + (f"{accuracy}  open-attribute TV" if toyfaces else ""))
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
