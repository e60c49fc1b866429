"""
The data a run reads and the pictures it writes, shared by the scripts above it (prepare_data.py, train.py,
sample.py, fid.py, bench.py): the frozen text encoder (CLIP), the prepared arrays, a folder of captioned photos,
the frozen VAE, model space -> RGB, and labelled grids and line plots drawn with Pillow.

    python -c "from data import load_data; print(load_data('data/toyfaces')[0])"   # a prepared data set's meta

Real models load with from_pretrained from a local directory or the Hugging Face hub; offline, a missing one is
one line naming the flag that points at a local copy (load_pretrained).
"""

import argparse
import functools
import json
import os
import re
import socket
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

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
# the prepared data set (prepare_data.py writes it)

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

# -----------------------------------------------------------------------------
# a folder of captioned photos: CelebA-HQ's layouts or any folder with a metadata.jsonl

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
    return torch.utils.data.DataLoader(paths, batch_size=batch_size, num_workers=workers,
                                       collate_fn=functools.partial(load_images, resolution=resolution))


# -----------------------------------------------------------------------------
# the frozen VAE, and model space -> pictures

@functools.lru_cache(maxsize=1)
def load_vae(name, device):
    """The frozen VAE of a latent data set (diffusers AutoencoderKL), by hub name or local directory."""
    from diffusers import AutoencoderKL
    model = load_pretrained(AutoencoderKL, name, "VAE", "--vae", low_cpu_mem_usage=False)  # no `accelerate` needed
    return model.to(device, memory_format=torch.channels_last).eval()  # NHWC: what cuDNN's fastest convs want


def local_or_hub(name):
    return os.path.abspath(name) if os.path.isdir(name) else name  # so train/sample find it from any directory


def to_images(x, meta, chunk=16):
    """Model space -> RGB in [0, 1], (B, 3, H, W): toyfaces are pixels in [-1, 1]; latents go through the VAE,
    `chunk` at a time: the SD-VAE decoder's activations at 256 px are ~100 MB per image, so a whole sampling batch
    of 250 at once would not fit a 24 GB card."""
    if meta["vae"] != "none":
        vae = load_vae(meta["vae"], str(x.device))
        x = torch.cat([vae.decode(z / meta["latent_scale"]).sample for z in x.split(chunk)])
    return ((x.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def steps_grid(sampler, y, steps_list, meta, n=1, seed=0):
    """n seeds per text feature at every step count, the same noise in every column. sampler(noise, y, steps)
    -> x in model space (sample.sample with its model bound). y: (P, D) -> images (P, n, S, 3, H, W) in [0, 1]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(n, *meta["shape"], generator=g).to(y.device).repeat(len(y), 1, 1, 1)   # (P*n, C, H, W)
    y = y.repeat_interleave(n, dim=0)                                                       # (P*n, D)
    cols = [to_images(sampler(noise, y, s), meta) for s in steps_list]
    return torch.stack(cols, dim=1).view(-1, n, len(steps_list), *cols[0].shape[1:])
    return torch.stack(cols, dim=1).view(-1, n, len(steps_list), *cols[0].shape[1:])


def save_grid(images, prompts, steps_list, path, cols=8):
    """images (P, n, S, 3, H, W) in [0, 1] -> a labelled PNG: one block of min(n, cols) columns per step count
    (headed "1 step", "2 steps" ...), one band of rows per prompt (headed by the prompt), enlarged with nearest
    neighbours so that a face is at least 128 px."""
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


def save_plot(path, x, panels, log_x=False, log_y=False, ticks=None):
    """Line plots stacked vertically, panels = {title: {label: ys}}, drawn with Pillow (which torchvision brings;
    matplotlib is not one of this repo's requirements). Points that are not finite (on a log axis: <= 0) are left
    out. ticks: the x values to label (default: every x, or the first and last of more than 16)."""
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
            ticks = ticks if ticks is not None else x if len(x) <= 16 else [x[0], x[-1]]
            for a, b in zip(fx(ticks), ticks):
                draw.text((px(a) - 6, top + H - pad + 6), f"{b:.4g}", fill="black", font=font)
            for v in (lo, hi):
                draw.text((4, py(v) - 6), f"{10 ** v if log_y else v:.3g}", fill="black", font=font)
    img.save(path)


# -----------------------------------------------------------------------------
# command lines

def power_of_two_steps(s):
    if not s.lstrip("-").isdigit() or int(s) not in [2 ** k for k in range(8)]:
        raise argparse.ArgumentTypeError(f"--steps must be a power of two from 1 to 128, got {s!r}")
    return int(s)


def one_line_errors(parser):
    """Make argparse report a bad value as one line, "error: ...", exit code 2, without the usage dump."""
    parser.error = lambda message: parser.exit(2, f"error: {message}\n")
