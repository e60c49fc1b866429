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
import functools
import json
import os
import re
import socket
import sys
import time
from urllib.parse import urlparse

import numpy as np

from toyfaces import ATTRIBUTES, HAIR_COLOURS, PROMPT_WORDS, caption, make_faces, make_tiny_clip

# -----------------------------------------------------------------------------
# text encoder: a real transformers CLIP text model, loaded with from_pretrained

def hub_offline():
    """True when HF_HUB_OFFLINE is set or the hub's host name does not resolve (no network). Then we never ask
    the hub: huggingface_hub would retry for ~25 s before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # behind a proxy only the proxy resolves names
    from huggingface_hub import constants
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return False
    except OSError:
        return True


def load_pretrained(cls, name, what, flag, **kwargs):
    """cls.from_pretrained(name) for a local directory or a hub name: the directory or the Hugging Face cache
    first, the hub only when reachable, so that offline a missing model is one line naming the fix, in seconds."""
    try:
        try:
            return cls.from_pretrained(name, local_files_only=True, **kwargs)
        except Exception:
            if os.path.isdir(name) or hub_offline():
                raise
            return cls.from_pretrained(name, **kwargs)
    except Exception:
        raise SystemExit(f"error: cannot load {what} '{name}' (offline?): "
                         f"pass {flag} /path/to/local/{flag.lstrip('-')}") from None


def encode_text(captions, clip_path, device="cpu", batch_size=256):
    """CLIP text features (pooler_output) for a list of strings: float32 (K, D)."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()
    tok = load_pretrained(CLIPTokenizer, clip_path, "CLIP text encoder", "--clip")
    model = load_pretrained(CLIPTextModel, clip_path, "CLIP text encoder", "--clip").to(device).eval()
    unique, inverse = np.unique(np.array(captions, dtype=object).astype(str), return_inverse=True)
    feats = []
    with torch.inference_mode():
        for i in range(0, len(unique), batch_size):
            batch = tok(list(unique[i:i + batch_size]), padding=True, truncation=True, max_length=77,
                        return_tensors="pt")
            feats.append(model(**batch.to(device)).pooler_output.float().cpu().numpy())
    feats = np.concatenate(feats) if feats else np.zeros((0, model.config.hidden_size), np.float32)
    return feats[inverse.reshape(-1)].astype(np.float32)

# -----------------------------------------------------------------------------
# writing

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


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found: run `python prepare_data.py` first")
    with open(path) as f:
        meta = json.load(f)
    local = os.path.join(data_dir, meta["text_encoder"])  # a text encoder shipped with the data
    if os.path.isdir(local):
        meta["text_encoder"] = os.path.abspath(local)
    return meta


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
# real data: CelebA-HQ and image folders -> SD-VAE latents of both flips + CLIP features

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# CelebA's 40 attributes as caption phrases, by the verb that goes with them. "Male" picks man/woman, a beard
# is "not No_Beard"; Blurry is not something to ask for
CELEBA_HAS = {"5_o_Clock_Shadow": "stubble", "Arched_Eyebrows": "arched eyebrows", "Bags_Under_Eyes": "bags under the eyes",
              "Bangs": "bangs", "Big_Lips": "big lips", "Big_Nose": "a big nose", "Black_Hair": "black hair",
              "Blond_Hair": "blond hair", "Brown_Hair": "brown hair", "Bushy_Eyebrows": "bushy eyebrows",
              "Double_Chin": "a double chin", "Goatee": "a goatee", "Gray_Hair": "gray hair",
              "High_Cheekbones": "high cheekbones", "Mouth_Slightly_Open": "a slightly open mouth", "Mustache": "a mustache",
              "Narrow_Eyes": "narrow eyes", "Oval_Face": "an oval face", "Pale_Skin": "pale skin",
              "Pointy_Nose": "a pointy nose", "Receding_Hairline": "a receding hairline", "Rosy_Cheeks": "rosy cheeks",
              "Sideburns": "sideburns", "Straight_Hair": "straight hair", "Wavy_Hair": "wavy hair", "Beard": "a beard"}
CELEBA_WEARS = {"Eyeglasses": "glasses", "Heavy_Makeup": "heavy makeup", "Wearing_Earrings": "earrings",
                "Wearing_Hat": "a hat", "Wearing_Lipstick": "lipstick", "Wearing_Necklace": "a necklace",
                "Wearing_Necktie": "a necktie"}
CELEBA_IS = {"Attractive": "attractive", "Bald": "bald", "Chubby": "chubby", "Smiling": "smiling", "Young": "young"}


def listing(words):
    """['a', 'b', 'c'] -> 'a, b and c'"""
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)


def celeba_captions(true, rng, n=4):
    """n captions from the set of an image's true CelebA attributes: the first names them all in MM-CelebA-HQ's
    style ("The man has black hair and a beard. He wears glasses. He is smiling."), then short ones ("a smiling
    man with glasses") and long ones naming random subsets take turns."""
    true = set(true) | ({"Beard"} if "No_Beard" not in true else set())
    noun, pronoun = ("man", "He") if "Male" in true else ("woman", "She")
    has, wears, is_ = ([p for a, p in table.items() if a in true] for table in (CELEBA_HAS, CELEBA_WEARS, CELEBA_IS))

    def some(phrases, most):  # a random subset of at most `most` phrases, in random order
        return [phrases[i] for i in rng.permutation(len(phrases))[:rng.integers(0, min(most, len(phrases)) + 1)]]

    captions = []
    for k in range(n):
        if k % 2 == 0:
            h, w, i = (p if k == 0 else some(p, len(p)) for p in (has, wears, is_))
            text = f"The {noun} has {listing(h)}." if h else f"A photo of a {noun}."
            text += f" {pronoun} wears {listing(w)}." if w else ""
            captions.append(text + (f" {pronoun} is {listing(i)}." if i else ""))
        else:
            words, extras = some(is_, 2) + [noun], some(has + wears, 2)
            text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
            captions.append(text + (f" with {listing(extras)}" if extras else ""))
    return captions


def natural_order(name):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]  # 2.jpg before 10.jpg


def list_images(folder):
    return sorted((f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS)), key=natural_order) \
        if os.path.isdir(folder) else []


def read_source(source, captions_per_image=4, seed=0):
    """Detect the layout of --source: (layout name, image paths, a list of captions per image).

    metadata.jsonl       any image folder: {"file_name": "...", "text": "..." or ["...", ...]} per line
    <captions>/<name>.txt  MM-CelebA-HQ: one caption per line; <captions> is text/celeba-caption, celeba-caption
                         or text; images in CelebA-HQ-img/, images/, image/images/ or the folder itself
    CelebAMask-HQ-attribute-anno.txt + CelebA-HQ-img/    CelebAMask-HQ: captions made from the 40 attributes
    """
    if not os.path.isdir(source):
        raise SystemExit(f"error: source folder {source} not found: pass --source DIR, the folder that holds the images")
    at = lambda *p: os.path.join(source, *p)
    items = []  # (image path, [captions])
    caption_dirs = [at(*d) for d in [("text", "celeba-caption"), ("celeba-caption",), ("text",)] if os.path.isdir(at(*d))]
    if os.path.isfile(at("metadata.jsonl")):
        layout = "metadata.jsonl"
        with open(at("metadata.jsonl")) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    text = [row["text"]] if isinstance(row["text"], str) else list(row["text"])
                    items.append((at(row["file_name"]), text))
                except (ValueError, KeyError, TypeError):
                    raise SystemExit(f"error: {at('metadata.jsonl')} line {line_no}: expected "
                                     '{"file_name": "...", "text": "..." or [...]}') from None
    elif caption_dirs:  # before the attributes: real captions beat template ones
        layout = "MM-CelebA-HQ"
        folder = next((d for d in (at("CelebA-HQ-img"), at("images"), at("image", "images")) if list_images(d)), source)
        for name in list_images(folder):
            txt = os.path.join(caption_dirs[0], os.path.splitext(name)[0] + ".txt")
            if os.path.isfile(txt):
                with open(txt) as f:
                    items.append((os.path.join(folder, name), [line.strip() for line in f if line.strip()]))
    elif os.path.isfile(at("CelebAMask-HQ-attribute-anno.txt")):
        layout = "CelebAMask-HQ"
        rng = np.random.default_rng(seed)
        with open(at("CelebAMask-HQ-attribute-anno.txt")) as f:
            lines = f.read().splitlines()  # a count, the 40 names, then "0.jpg -1 1 ..." per image
        names = lines[1].split()
        for line in filter(str.strip, lines[2:]):
            file, *values = line.split()
            true = {a for a, v in zip(names, values) if int(v) > 0}
            items.append((at("CelebA-HQ-img", file), celeba_captions(true, rng, captions_per_image)))
    else:
        raise SystemExit(f"error: no known layout in {source}: expected metadata.jsonl, celeba-caption/<name>.txt or "
                         "text/<name>.txt (MM-CelebA-HQ), or CelebA-HQ-img/ + CelebAMask-HQ-attribute-anno.txt")
    items = [(path, text) for path, text in items if text]  # an image without a caption teaches nothing
    if not items:
        raise SystemExit(f"error: no captioned images found in {source} ({layout} layout)")
    return layout, [path for path, _ in items], [text for _, text in items]


def load_images(paths, resolution):
    """DataLoader collate_fn (runs in the workers): read, center-crop and resize a batch of files. Returns
    uint8 (b, R, R, 3) of the readable ones, ok bool (len(paths),), {path: error} of the others."""
    from PIL import Image, ImageOps
    images, errors = [], {}
    for path in paths:
        try:
            with Image.open(path) as im:
                images.append(np.asarray(ImageOps.fit(im.convert("RGB"), (resolution, resolution), Image.BICUBIC)))
        except Exception as e:  # missing, truncated, not an image at all ...
            errors[path] = f"{type(e).__name__}: {e}"
    images = np.stack(images) if images else np.zeros((0, resolution, resolution, 3), np.uint8)
    return images, np.array([p not in errors for p in paths]), errors


def image_batches(paths, resolution, batch_size, workers):
    """Batches of load_images over paths, read by `workers` processes: (uint8 images, ok, errors) per batch."""
    import torch
    return torch.utils.data.DataLoader(paths, batch_size=batch_size, num_workers=workers,
                                       collate_fn=functools.partial(load_images, resolution=resolution))


def load_fid_inception(path, device):
    """fid.py's Inception network for the real-image FID statistics, or None (path None, or no weights: then one
    line says so; fid.py makes the statistics later from the source folder)."""
    if path is None:
        return None
    from fid import load_inception
    try:
        return load_inception(None if path == "auto" else path, device)
    except SystemExit as e:
        print(f"no real-image FID statistics now ({str(e).removeprefix('error: ')}); "
              "fid.py computes them from --source later")
        return None


@functools.lru_cache(maxsize=1)
def load_vae(name, device):
    """The frozen VAE of a latent data set (diffusers AutoencoderKL), by hub name or local directory."""
    import torch
    from diffusers import AutoencoderKL
    model = load_pretrained(AutoencoderKL, name, "VAE", "--vae", low_cpu_mem_usage=False)  # no `accelerate` needed
    return model.to(device, memory_format=torch.channels_last).eval()  # NHWC: what cuDNN's fastest convs want


def local_or_hub(name):
    return os.path.abspath(name) if os.path.isdir(name) else name  # so train/sample find it from any directory


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
    layout, paths, captions = read_source(source, captions_per_image, seed)  # before importing torch: fails fast
    import torch
    from tqdm import tqdm
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
        from fid import RunningStats, real_features
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
        from fid import inception_hash, save_stats
        save_stats(os.path.join(out, "fid_stats.npz"), *real.stats(), n=real.n, inception=inception_hash(fid_net),
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
                   help="FID Inception weights for the real-image statistics (auto: the torch hub cache or download)")
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
        from fid import load_stats
        info = load_stats(os.path.join(out, "fid_stats.npz"))[2]
        print(f"fid_stats.npz: Inception statistics of {info['n']} real images (weights {info['inception']})")
