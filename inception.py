"""
The FID network and statistics: pytorch-fid's port of the TF Inception graph the FID paper used, running mean
and covariance of its 2048-d features, and the Frechet distance between two such Gaussians. fid.py scores a
checkpoint with them; prepare_data.py keeps the real images' statistics while it has them at hand.

    python -c "from inception import load_inception; load_inception('pt_inception-2015-12-05-6726825d.pth')"
"""

import hashlib
import os

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torchvision.models import inception as tv_inception
from tqdm import tqdm

from data import image_batches

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
    """mu, sigma and what they are: info = n (images), inception (inception_hash), reference (in words), device
    and precision (made_on)."""
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
    """images (B, 3, H, W) in [0, 1] -> float64 numpy (B, 2048), on the device Inception lives on, in true fp32:
    with TF32 (which train.py switches on) cuDNN's convolutions would move the features by ~1e-3, and statistics
    made on a CPU and on a GPU would no longer compare."""
    images = (images.float().clamp(0, 1) * 255).round() / 255  # 8-bit, as if saved as PNG, for both sides
    device = next(inception.parameters()).device
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            return inception(images.to(device)).double().cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def made_on(inception):
    """What a statistics file records of how it was made: the device type and the precision (always fp32)."""
    return dict(device=next(inception.parameters()).device.type, precision="fp32")


def real_features(images, inception):
    """uint8 (B, R, R, 3) images as data.load_images gives them -> features (B, 2048)."""
    return inception_features(torch.from_numpy(images).permute(0, 3, 1, 2) / 255, inception)


def image_file_stats(paths, resolution, inception, batch=50, workers=0):
    """Inception statistics of image files read exactly as prepare_data.py reads them for training (centre crop,
    bicubic resize to `resolution`), unreadable files skipped as there -> (mu, sigma, n). prepare_data.py computes
    the same while it encodes; this is for a data set prepared without Inception weights."""
    running = RunningStats()
    for images, _, _ in tqdm(image_batches(paths, resolution, batch, workers), total=-(-len(paths) // batch),
                             desc=f"real-image stats ({len(paths)} files)", leave=False):
        if len(images):
            running.update(real_features(images, inception))
    return (*running.stats(), running.n)


def inception_stats(batches, inception, total=None, desc="inception"):
    """Streams batches of images through Inception -> (mu, sigma); never holds more than one batch."""
    running = RunningStats()
    for images in tqdm(batches, total=total, desc=desc, leave=False):
        running.update(inception_features(images, inception))
    return running.stats()
