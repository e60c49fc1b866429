"""
Prepare a text-to-image data set as flat arrays that train.py can memory-map: images (or VAE latents), one
frozen text-encoder feature per caption, and meta.json.

    python prepare_data.py                                   # data/toyfaces: 20000 faces of toyfaces.py, ~15 s
    python prepare_data.py --n 2000 --out data/toyfaces_small
    python prepare_data.py --resolution 64 --out data/toyfaces64

The paper's data set, CelebA-HQ 256 px ("celebahq"), is a folder of photos (CelebAMask-HQ, MM-CelebA-HQ or any
folder with a metadata.jsonl: read_source), encoded once by a frozen SD-VAE into 4x32x32 latents of each image and
of its mirror image (V = 2 views); the captions (ours: the paper's run is unconditional) by a frozen CLIP text
encoder; and, while the images are at hand, the Inception statistics of all of them for fid.py (docs/reproduce.md):

    python prepare_data.py --dataset celebahq --source ~/CelebAMask-HQ       # data/celebahq, 256 px
    python prepare_data.py --dataset celebahq --source DIR --vae /path/to/sd-vae-ft-mse --clip /path/to/clip \
        --inception pt_inception-2015-12-05-6726825d.pth

Written to --out, meta.json last (a half-written directory never looks complete; load_data reads it all back):
    x1.npy              float16 (N, V, C, H, W): pixels in [-1, 1] (toyfaces) or VAE latents x scaling_factor
    text_features.npy   float32 (K, D), one row per caption; caption_image.npy int64 (K,): its row of x1
    captions.json       the K captions; attributes.npy int8 (N, 5) and clip/, the text encoder (toyfaces only)
    meta.json           shapes; "text_encoder" and "vae": hub names or directories ("none": pixels)
    fid_stats.npz       celebahq: mu, sigma, n and the Inception weights' hash of the real images (fid.load_stats)

# expected output of `python prepare_data.py` (about 15 s on 2 CPU cores):
# wrote data/toyfaces: x1 (20000, 1, 3, 32, 32) float16 117.2 MiB, 80000 captions (276 distinct),
# text_features (80000, 64) float32 19.5 MiB, text encoder data/toyfaces/clip
"""
import argparse
import json
import os
import re
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from data import encode_text, image_batches, load_vae, local_or_hub, read_source
from inception import RunningStats, inception_hash, load_inception, load_stats, made_on, real_features, save_stats
from toyfaces import ATTRIBUTES, HAIR_COLOURS, PROMPT_WORDS, caption, make_faces, make_tiny_clip

# -----------------------------------------------------------------------------
# writing: flat arrays, meta.json last (data.load_data reads them back)

def begin_dataset(out):
    """Make out and remove its meta.json: until write_dataset ends, the directory does not look complete. FID
    statistics of the data that was there go too: they describe other images."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name == "meta.json" or (name.startswith("fid_stats") and name.endswith(".npz")):
            os.remove(os.path.join(out, name))


def write_dataset(out, x1, captions, caption_image, text_features, meta, extra_arrays=()):
    """Write the flat arrays, then meta.json last (its presence means 'complete'), into a directory begin_dataset
    made. x1 is an array, or the memmap of out/x1.npy that the latents were already streamed into."""
    path = os.path.join(out, "x1.npy")
    if not (isinstance(x1, np.memmap) and x1.filename == os.path.abspath(path)):
        np.save(path, x1.astype(np.float16))
    np.save(os.path.join(out, "text_features.npy"), text_features.astype(np.float32))
    np.save(os.path.join(out, "caption_image.npy"), np.asarray(caption_image, np.int64))
    for name, arr in extra_arrays:
        np.save(os.path.join(out, name), arr)
    with open(os.path.join(out, "captions.json"), "w") as f:
        json.dump(list(captions), f)
    N, V, C, H, W = x1.shape
    meta = dict(meta, shape=[C, H, W], views=V, num_images=N, num_captions=len(captions),
                feature_dim=int(text_features.shape[1]))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def prepare_toyfaces(out, n=20000, seed=0, resolution=32, captions_per_image=4):
    begin_dataset(out)
    images, attrs = make_faces(n, seed, resolution)
    x1 = (images.transpose(0, 3, 1, 2)[:, None] / 127.5 - 1).astype(np.float16)  # (N, V=1, C, H, W)
    rng = np.random.default_rng([seed, 1])
    captions = [caption(a, rng, full=(k == 0)) for a in attrs for k in range(captions_per_image)]
    caption_image = np.repeat(np.arange(n), captions_per_image)
    clip_path = os.path.join(out, "clip")
    # every caption word and prompt word parse_prompt knows becomes a single token
    words = sorted({w for c in captions for w in re.findall(r"[a-z]+", c)} | set(PROMPT_WORDS))
    make_tiny_clip(clip_path, words, seed)
    feats = encode_text(captions, clip_path)
    meta = dict(dataset="toyfaces", vae="none", latent_scale=1.0, text_encoder="clip",
                attributes=ATTRIBUTES, hair_colours=HAIR_COLOURS, seed=seed, resolution=resolution)
    return write_dataset(out, x1, captions, caption_image, feats, meta, [("attributes.npy", attrs)])


# -----------------------------------------------------------------------------
# real data: CelebA-HQ and image folders (data.read_source) -> SD-VAE latents of both flips + CLIP features

def load_fid_inception(path, device):
    """fid.py's Inception network for the real-image FID statistics, or None (path None or "none", or no weights:
    then one line says so; fid.py makes the statistics later from the source folder)."""
    if path in (None, "none"):
        return None
    try:
        return load_inception(None if path == "auto" else path, device)
    except SystemExit as e:
        print(f"no real-image FID statistics now ({str(e).removeprefix('error: ')}); "
              "fid.py computes them from --source later")
        return None


def prepare_images(out, source, vae="stabilityai/sd-vae-ft-mse", clip="openai/clip-vit-base-patch32", resolution=256,
                   n=None, captions_per_image=4, batch_size=16, workers=4, seed=0, inception=None):
    """Encode a folder of captioned images (layouts: read_source) into a latent data set. Returns its meta.

    x1[i, 0] = scaling_factor * the VAE posterior mean of image i, x1[i, 1] the same of its mirror image. The mean,
    not a sample: a cached sample would freeze one draw of the posterior noise into the data for every epoch
    (DiT, encoding on the fly, draws afresh each step); the mean is deterministic and reproducible.
    inception: Inception weights for fid.py ("auto": the torch hub cache or a download; None: skip). With them,
    fid_stats.npz holds the Inception statistics of every image as training sees it (cropped and resized, not
    mirrored): the official FID compares with real images, not with what the VAE makes of them.
    """
    layout, paths, captions = read_source(source, captions_per_image, seed)
    paths, captions = paths[:n], captions[:n]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # both frozen models first: a missing one fails now, not after hours of encoding
    autoencoder = load_vae(vae, device)
    features = encode_text([c for text in captions for c in text], clip, device)   # (K, D), every caption
    fid_net = load_fid_inception(inception, device)
    f = 2 ** (len(autoencoder.config.block_out_channels) - 1)                      # 8 for SD-VAE
    if resolution % f:
        raise SystemExit(f"error: --resolution {resolution} is not a multiple of the VAE's downsampling {f}")
    scale = autoencoder.config.scaling_factor

    # stream the latents into a memmap: memory stays bounded by one batch, whatever N is
    begin_dataset(out)
    partial = os.path.join(out, "x1.partial.npy")
    x1 = np.lib.format.open_memmap(partial, "w+", np.float16,
                                   (len(paths), 2, autoencoder.config.latent_channels, resolution // f, resolution // f))
    loader = image_batches(paths, resolution, batch_size, workers)
    if fid_net is not None:
        real = RunningStats()
    ok, n_ok, start = [], 0, time.time()
    with tqdm(total=len(paths), unit="img", desc=f"encode on {device}") as bar, torch.inference_mode():
        for images, read, errors in loader:
            for path, error in errors.items():
                tqdm.write(f"warning: skipping unreadable image {path}: {error}", file=sys.stderr)
            if len(images):
                x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1  # (b, 3, R, R)
                x = torch.stack([x, x.flip(3)], 1).flatten(0, 1)        # (2b, 3, R, R): each image, then its mirror
                z = autoencoder.encode(x).latent_dist.mean * scale        # (2b, C, R/f, R/f)
                x1[n_ok:n_ok + len(images)] = z.unflatten(0, (-1, 2)).half().cpu().numpy()
                n_ok += len(images)
                if fid_net is not None:
                    real.update(real_features(images, fid_net))
            ok.append(read)
            bar.update(len(read))
    seconds, ok = time.time() - start, np.concatenate(ok)
    print(f"{layout} layout: encoded {len(paths)} images and their mirrors in {seconds:.1f} s, "
          f"{len(paths) / seconds:.2f} img/s on {device}; skipped {(~ok).sum()} unreadable images")
    if n_ok == 0:
        raise SystemExit(f"error: none of the {len(paths)} images in {source} could be read")

    final = os.path.join(out, "x1.npy")
    if n_ok == len(paths):
        x1.flush()
        os.replace(partial, final)
    else:  # drop the rows of the skipped images, a chunk at a time
        kept = np.lib.format.open_memmap(final, "w+", np.float16, (n_ok, *x1.shape[1:]))
        for i in range(0, n_ok, 4096):
            kept[i:i + 4096] = x1[i:min(i + 4096, n_ok)]
        kept.flush()
        os.remove(partial)
    del x1
    source_image = np.repeat(np.arange(len(paths)), [len(text) for text in captions])  # (K,) caption -> path index
    keep = ok[source_image]
    caption_image = (np.cumsum(ok) - 1)[source_image[keep]]                          # index among the kept images
    meta = dict(dataset="celebahq", layout=layout, source=os.path.abspath(source), vae=local_or_hub(vae),
                latent_scale=float(scale), text_encoder=local_or_hub(clip), resolution=resolution,
                skipped=int((~ok).sum()), seed=seed)
    kept_captions = [c for text, o in zip(captions, ok) if o for c in text]
    if fid_net is not None:  # before meta.json: a complete data set has its statistics
        save_stats(os.path.join(out, "fid_stats.npz"), *real.stats(), n=real.n, inception=inception_hash(fid_net),
                   **made_on(fid_net),
                   reference=f"real images of {os.path.abspath(source)} at {resolution} px")
    return write_dataset(out, np.load(final, mmap_mode="r+"), kept_captions, caption_image, features[keep], meta)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="toyfaces", choices=["toyfaces", "celebahq"])
    p.add_argument("--out", default=None, help="output directory (default data/<dataset>)")
    p.add_argument("--n", type=int, default=None, help="number of images (default: toyfaces 20000, celebahq all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=None, help="image size (default: toyfaces 32, celebahq 256)")
    p.add_argument("--captions-per-image", type=int, default=4, help="captions made from attributes, per image")
    # real data: --dataset celebahq
    p.add_argument("--source", help="folder of captioned images: CelebAMask-HQ, MM-CelebA-HQ or metadata.jsonl")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-mse", help="diffusers AutoencoderKL: hub name or local dir")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIP text encoder: hub name or local dir")
    p.add_argument("--batch-size", type=int, default=16, help="images per VAE batch (each is encoded twice: both flips)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-reading processes")
    p.add_argument("--inception", default="auto",
                   help="FID Inception weights for the real-image statistics (auto: the torch hub cache or download; "
                        "none: no statistics now)")
    args = p.parse_args()
    out = args.out or os.path.join("data", args.dataset)
    if args.dataset == "toyfaces":
        meta = prepare_toyfaces(out, args.n or 20000, args.seed, args.resolution or 32, args.captions_per_image)
    elif args.source is None:
        raise SystemExit("error: --dataset celebahq needs --source DIR, the folder that holds the images")
    else:
        meta = prepare_images(out, args.source, args.vae, args.clip, args.resolution or 256, args.n,
                              args.captions_per_image, args.batch_size, args.workers, args.seed, args.inception)
    mib = lambda name: os.path.getsize(os.path.join(out, name)) / 2 ** 20
    N, V, (C, H, W) = meta["num_images"], meta["views"], meta["shape"]
    K = meta["num_captions"]
    with open(os.path.join(out, "captions.json")) as f:
        distinct = len(set(json.load(f)))
    encoder = os.path.join(out, meta["text_encoder"])  # shipped with the data, or a hub name
    print(f"wrote {out}: x1 ({N}, {V}, {C}, {H}, {W}) float16 {mib('x1.npy'):.1f} MiB, "
          f"{K} captions ({distinct} distinct),\n"
          f"text_features ({K}, {meta['feature_dim']}) float32 {mib('text_features.npy'):.1f} MiB, "
          f"text encoder {encoder if os.path.isdir(encoder) else meta['text_encoder']}")
    if os.path.isfile(os.path.join(out, "fid_stats.npz")):
        info = load_stats(os.path.join(out, "fid_stats.npz"))[2]
        print(f"fid_stats.npz: Inception statistics of {info['n']} real images (weights {info['inception']})")
