"""
Prepare a text-to-image data set as flat arrays that train.py can memory-map.

The default data set, "toyfaces", is drawn procedurally: 32x32 cartoon faces whose
attributes (man/woman, hair colour, glasses, smiling, beard) are named by captions.
Because we drew them, a few pixel rules can read the attributes back from any image
(read_attributes), which gives an offline quality metric for generated samples.

    python prepare_data.py                                   # data/toyfaces, 20000 faces
    python prepare_data.py --n 2000 --out data/toyfaces_small
    python prepare_data.py --resolution 64 --out data/toyfaces64

The paper's data set, "celebahq", is a folder of captioned photos (CelebAMask-HQ, MM-CelebA-HQ or any folder
with a metadata.jsonl: read_source), encoded once by a frozen SD-VAE into 4x32x32 latents of each image and of
its mirror image (V = 2 views), the captions by a frozen CLIP text encoder (README: "Train on CelebA-HQ"):

    python prepare_data.py --dataset celebahq --source ~/CelebAMask-HQ       # data/celebahq, 256 px
    python prepare_data.py --dataset celebahq --source DIR --vae /path/to/sd-vae-ft-mse --clip /path/to/clip

Written to --out (meta.json last, so a half-written directory never looks complete):
    x1.npy              float16 (N, V, C, H, W), what the model sees (V views): pixels in [-1, 1] (toyfaces)
                        or VAE latents times the VAE's scaling_factor (celebahq)
    text_features.npy   float32 (K, D) text-encoder features, one row per caption
    caption_image.npy   int64 (K,) index into x1 of the image each caption describes
    captions.json       the K caption strings
    attributes.npy      int8 (N, 5) man, hair, glasses, smiling, beard (toyfaces only)
    clip/               a tiny random CLIP text encoder + tokenizer (toyfaces only)
    meta.json           shapes, names and "text_encoder": a directory inside --out
                        ("clip"; load_meta makes it an absolute path) or a hub name;
                        "vae" ("none", a hub name or a directory) and "latent_scale"

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

ATTRIBUTES = ["man", "hair", "glasses", "smiling", "beard"]
HAIR_COLOURS = ["black", "blond", "brown", "red"]

# palettes (RGB 0..255), chosen so every pair of colours that can touch is far apart
HAIR = np.array([[55, 50, 60], [235, 195, 80], [115, 65, 35], [200, 60, 35]], float)
BACKGROUNDS = np.array([[120, 170, 220], [110, 190, 160], [170, 150, 210], [90, 110, 160], [150, 200, 210]], float)
SKIN_LIGHT, SKIN_DARK = np.array([245, 212, 180.0]), np.array([180, 128, 96.0])
DARK, RED, WHITE = np.array([15, 15, 20.0]), np.array([160, 20, 70.0]), np.array([250, 250, 250.0])

# -----------------------------------------------------------------------------
# drawing

def sample_attributes(n, rng):
    man = rng.random(n) < 0.5
    hair = rng.integers(0, len(HAIR_COLOURS), n)
    glasses, smiling = rng.random(n) < 0.5, rng.random(n) < 0.5
    beard = man & (rng.random(n) < 0.4)  # only men have beards
    return np.stack([man, hair, glasses, smiling, beard], 1).astype(np.int8)


def face_coords(res, cx, cy, s):
    """Pixel-centre coordinates in 'face units': 32-pixel units relative to the face
    centre (cx, cy) and divided by the face scale s. Returns x, y of shape (B, res, res)."""
    g = (np.arange(res) + 0.5) * 32 / res
    x = (g[None, None, :] - cx[:, None, None]) / s[:, None, None]
    y = (g[None, :, None] - cy[:, None, None]) / s[:, None, None]
    return x, y


def draw_faces(attrs, rng, res=32):
    """Draw one face per attribute row; the nuisance is sampled from rng: skin tone, background colour and
    the exact hair shade. Returns uint8 (N, res, res, 3).

    Every face has the same place and size. Moving it costs the quickstart's 1.4M-parameter model most of its
    capacity: with shifts of up to 2 pixels and a +-10% size jitter the 11-minute CPU run never drew a face
    clean enough for read_attributes (0% at 1 and 128 steps), and even with shifts by whole 4-pixel patches it
    read 0% at 128 steps after 1,500 steps, where centred faces read 39%."""
    n = len(attrs)
    man, glasses, smiling, beard = (attrs[:, i].astype(bool) for i in (0, 2, 3, 4))
    cx, cy, s = np.full(n, 16.0), np.full(n, 17.0), np.ones(n)  # face centre and size, 32x32 units
    skin = SKIN_LIGHT + rng.random((n, 1)) * (SKIN_DARK - SKIN_LIGHT)
    bg = BACKGROUNDS[rng.integers(0, len(BACKGROUNDS), n)] + rng.uniform(-15, 15, (n, 3))
    haircol = HAIR[attrs[:, 1]] + rng.uniform(-8, 8, (n, 3))
    out = np.empty((n, res, res, 3), np.uint8)
    for i in range(0, n, 2048):  # chunks keep memory small at 64x64
        j = slice(i, i + 2048)
        x, y = face_coords(res, cx[j], cy[j], s[j])
        m = lambda a: a[j, None, None]  # per-image flag -> broadcastable over pixels
        img = np.broadcast_to(bg[j, None, None], (len(x), res, res, 3)).copy()

        def paint(mask, colour):  # colour: one RGB, or one per image
            img[:] = np.where(mask[..., None], colour[:, None, None] if colour.ndim == 2 else colour, img)

        face = (x / 7.5) ** 2 + (y / 9.5) ** 2 < 1
        hair_w = np.where(m(man), 8, 10.5)  # women's hair is wider ...
        top = ((x / hair_w) ** 2 + ((y + 1) / 10.5) ** 2 < 1) & ((y < -4.5) | ~m(man))
        long = ~m(man) & (np.abs(x) < 10.5) & (y > -1)  # ... and falls to the bottom edge
        paint(top | long, haircol[j])
        paint(face & (y >= -4.5), skin[j])
        paint(face & (y > 2) & m(beard), haircol[j])  # the beard covers the lower face
        ex, ey = np.abs(np.abs(x) - 3.2), np.abs(y + 1)  # distance to the nearest eye
        paint((ex < 1.2) & (ey < 1), DARK)
        ring = (ex < 3.2) & (ey < 2.6) & ~((ex < 2) & (ey < 1.5))  # the two rings touch: a bridge
        paint(ring & m(glasses), DARK)
        grin = ((x / 4) ** 2 + ((y - 3.5) / 3) ** 2 < 1) & (y > 3.5)  # open mouth, lower half ellipse
        paint(grin & m(smiling), RED)
        paint(grin & (y < 4.9) & m(smiling), WHITE)  # teeth
        paint((np.abs(x) < 2.5) & (np.abs(y - 4.5) < 0.6) & ~m(smiling), RED)  # neutral line
        out[j] = np.clip(img, 0, 255).round().astype(np.uint8)
    return out


def make_faces(n, seed=0, resolution=32):
    """n random faces: (uint8 (n, H, W, 3), attributes int8 (n, 5)). Deterministic in seed."""
    rng = np.random.default_rng(seed)
    attrs = sample_attributes(n, rng)
    return draw_faces(attrs, rng, resolution), attrs

# -----------------------------------------------------------------------------
# reading faces back: deterministic pixel rules, the offline quality metric

# pixel labels: 0..3 are the hair colours, then background, dark, red, white, skin, none
BG, LDARK, LRED, LWHITE, SKIN, NONE = 4, 5, 6, 7, 8, 9


def label_pixels(img, bg, tol=50.0):
    """Give each pixel the label of the nearest palette colour within tol, else NONE. The
    palette is the fixed colours plus this image's background and skin tone. Blurry or
    noisy images have many NONE pixels."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    looks_skin = (r > 150) & (r - g > 15) & (r - g < 80) & (g - b > 10) & (g - b < 60)
    skin = np.full((len(img), 3), -1e3)  # no skin found: a colour no pixel is near
    for i in np.flatnonzero(looks_skin.any((1, 2))):
        skin[i] = np.median(img[i][looks_skin[i]], 0)
    pal = np.concatenate([np.broadcast_to(HAIR, (len(img), 4, 3)), bg[:, None],  # label order
                          np.broadcast_to([DARK, RED, WHITE], (len(img), 3, 3)), skin[:, None]], 1)
    d = np.linalg.norm(img[:, :, :, None] - pal[:, None, None], axis=-1)  # (B, H, W, 9)
    return np.where(d.min(-1) < tol, d.argmin(-1), NONE)


def read_attributes(images):
    """images uint8 (B, H, W, 3) or (B, 3, H, W) -> list of {attribute: int} dicts, or None
    where the image is not a clean, sharp face. Areas below are in 32x32-pixel units."""
    img = np.asarray(images).astype(np.float64)
    if img.shape[1] == 3 and img.shape[-1] != 3:
        img = img.transpose(0, 2, 3, 1)
    B, res = len(img), img.shape[1]
    k = max(1, res // 16)  # border width: 2 pixels at 32x32
    # 1. a flat background along the top and both sides
    border = np.concatenate([img[:, :k].reshape(B, -1, 3), img[:, :, :k].reshape(B, -1, 3),
                             img[:, :, -k:].reshape(B, -1, 3)], 1)
    bg = np.median(border, 1)
    flat = (np.linalg.norm(border - bg[:, None], axis=-1) < 40).mean(1) > 0.9
    # 2. (almost) every pixel explained by the palette: rejects noise and most blur
    lab = label_pixels(img, bg)
    sharp = (lab == NONE).mean((1, 2)) < 0.04
    area = lambda mask: mask.sum((1, 2)) * (32 / res) ** 2
    count = lambda region, *labels: area(region & np.isin(lab, labels))
    # 3. locate the face. The drawing is symmetric about x = cx, so take cx from the whole
    #    figure; the scale s from the widest skin row (15 units); cy from the eyes and
    #    glasses, which are symmetric about y = -1 (face units, see draw_faces)
    sk, dk, fig = lab == SKIN, lab == LDARK, (lab != BG) & (lab != NONE)
    g = (np.arange(res) + 0.5) * 32 / res
    cx = (fig * g).sum((1, 2)) / np.maximum(fig.sum((1, 2)), 1)
    left = np.where(sk.any(2), sk.argmax(2), res)
    right = np.where(sk.any(2), res - 1 - sk[:, :, ::-1].argmax(2), -1)
    s = np.maximum((right - left + 1).max(1) * 32 / res / 15, 0.5)
    cy = (dk * g[:, None]).sum((1, 2)) / np.maximum(dk.sum((1, 2)), 1) + s
    x, y = face_coords(res, cx, cy, s)
    # 4. read each attribute from its own region
    eyes = (np.abs(y + 1) < 3.6) & (np.abs(x) < 7.5)
    n_dark = count(eyes, LDARK)
    glasses = n_dark >= 24 * s ** 2  # two eyes alone are ~10 units, with frames ~50
    mouth = (np.abs(x) < 5) & (y > 2.5) & (y < 7.5)
    smiling = count(mouth, LWHITE) >= 4 * s ** 2  # teeth
    chin = (np.abs(x) < 4.5) & (y > 2.5) & (y < 6.5)
    beard = count(chin, 0, 1, 2, 3) > count(chin, SKIN)
    scalp = (np.abs(x) < 5) & (y > -11) & (y < -5)
    hair_area = np.stack([count(scalp, h) for h in range(4)], 1)
    hair = hair_area.argmax(1)
    sides = [(x * sign > 8.2) & (x * sign < 9.6) & (y > 2) & (y < 8) for sign in (-1, 1)]
    side_hair = np.stack([count(r, 0, 1, 2, 3) / np.maximum(area(r), 1e-9) for r in sides], 1)
    side_bg = np.stack([count(r, BG) / np.maximum(area(r), 1e-9) for r in sides], 1)
    man, woman = (side_bg > 0.5).all(1), (side_hair > 0.5).all(1)  # long hair down both sides
    # 5. is it a face at all? All parts present, in proportion, sharp and symmetric
    inner = (np.abs(y + 1) < 2.4) & (np.abs(x) < 6.5)
    parts = ((count(eyes & (x < 0), LDARK) >= 2) & (count(eyes & (x > 0), LDARK) >= 2)  # two eyes
             & (n_dark < 90 * s ** 2) & (area(dk) - n_dark <= 2 * s ** 2)  # no dark outside the eyes
             & (count(inner, SKIN, LDARK) >= 0.97 * area(inner))  # the eye band is only skin and dark
             & (count(mouth, LRED) >= 2) & (hair_area.max(1) > 0.6 * area(scalp))
             & (area(sk) >= 12) & (s > 0.8) & (s < 1.2) & (man | woman))
    # mirror the labels about cx; the mirrored pixel centre falls between two columns
    col = np.floor((2 * cx[:, None] - g) * res / 32 - 0.5).astype(int)
    flip = lambda c: np.take_along_axis(lab, np.broadcast_to(np.clip(c, 0, res - 1)[:, None], lab.shape), 2)
    mirrored = (lab == flip(col)) | (lab == flip(col + 1))
    symmetric = (mirrored & fig).sum((1, 2)) > 0.9 * fig.sum((1, 2))
    ok = flat & sharp & parts & symmetric
    vals = np.stack([man, hair, glasses, smiling, beard], 1).astype(int)
    return [dict(zip(ATTRIBUTES, map(int, v))) if o else None for v, o in zip(vals, ok)]


PROMPT_WORDS = {"man": ("man", 1), "men": ("man", 1), "male": ("man", 1), "woman": ("man", 0),
                "women": ("man", 0), "female": ("man", 0), "blonde": ("hair", 1), "glasses": ("glasses", 1),
                "smiling": ("smiling", 1), "smile": ("smiling", 1), "beard": ("beard", 1), "bearded": ("beard", 1),
                **{c: ("hair", k) for k, c in enumerate(HAIR_COLOURS)}}


def parse_prompt(prompt):
    """The attributes a free-text prompt names, e.g. 'a man with glasses' -> {'man': 1, 'glasses': 1}."""
    return dict(PROMPT_WORDS[w] for w in re.findall(r"[a-z]+", prompt.lower()) if w in PROMPT_WORDS)


def shows(read, prompt):
    """Whether one reading of read_attributes is a face with every attribute the prompt names."""
    return read is not None and all(read[k] == v for k, v in parse_prompt(prompt).items())


def prompt_accuracy(images, prompt):
    """Fraction of images that are faces and show every attribute the prompt names."""
    return float(np.mean([shows(r, prompt) for r in read_attributes(images)]))

# -----------------------------------------------------------------------------
# captions

def caption(a, rng, full=False):
    """A true caption for attribute row a that names a random subset (or all) of its attributes."""
    man, hair, glasses, smiling, beard = (int(v) for v in a)
    say = lambda: full or rng.random() < 0.5
    adjectives, extras = [], []
    subject = ("man" if man else "woman") if say() else "person"
    if smiling and say():
        adjectives.append("smiling")
    if say():
        extras.append(f"{HAIR_COLOURS[hair]} hair")
    if glasses and say():
        extras.append("glasses")
    if beard and say():
        adjectives.append("bearded") if rng.random() < 0.5 else extras.append("a beard")
    rng.shuffle(extras)
    text = " ".join(["a"] + adjectives + [subject])
    if extras:
        text += " with " + (", ".join(extras[:-1]) + " and " if len(extras) > 1 else "") + extras[-1]
    return text

# -----------------------------------------------------------------------------
# text encoder: a real transformers CLIP text model, loaded with from_pretrained

def bpe_vocab(words):
    """vocab + merges of a byte-level BPE where each given word is one token: every byte
    (alone and word-final) is in the vocab, so any text still tokenizes, char by char."""
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = sorted(ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges, rank = [], {}
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:  # replay BPE; when it gets stuck add a merge (ranked last)
            pairs = list(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: rank.get(p, len(rank)))
            if best not in rank:
                best = pairs[0]
                rank[best] = len(merges)
                merges.append(best)
                vocab.append(best[0] + best[1])
            i = 0
            while i < len(parts) - 1:  # merge every occurrence, like the real BPE
                if (parts[i], parts[i + 1]) == best:
                    parts[i:i + 2] = [parts[i] + parts[i + 1]]
                i += 1
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(vocab))}, merges


def make_tiny_clip(path, words, seed=0):
    """Save a small, seeded, randomly initialised CLIP text encoder + tokenizer to path."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()
    os.makedirs(path, exist_ok=True)
    vocab, merges = bpe_vocab(words)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer.from_pretrained(path, model_max_length=77)
    tok.save_pretrained(path)
    # pooler_output is the hidden state at the first eos token, so the ids must agree
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=64,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    CLIPTextModel(config).save_pretrained(path)


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
    """Make out and remove its meta.json: until write_dataset ends, the directory does not look complete."""
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "meta.json")):
        os.remove(os.path.join(out, "meta.json"))


def write_dataset(out, x1, captions, caption_image, text_features, meta, extra_arrays=()):
    """Write the flat arrays, then meta.json last (its presence means 'complete'). x1 is an array, or the
    memmap of out/x1.npy that the latents were already streamed into."""
    begin_dataset(out)
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


def prepare_toyfaces(out, n=20000, seed=0, resolution=32, captions_per_image=4):
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
                   n=None, captions_per_image=4, batch_size=16, workers=4, seed=0):
    """Encode a folder of captioned images (layouts: read_source) into a latent data set. Returns its meta.

    x1[i, 0] = scaling_factor * the VAE posterior mean of image i, x1[i, 1] the same of its mirror image. The mean,
    not a sample: a cached sample would freeze one draw of the posterior noise into the data for every epoch
    (DiT, encoding on the fly, draws afresh each step); the mean is deterministic and reproducible.
    """
    layout, paths, captions = read_source(source, captions_per_image, seed)  # before importing torch: fails fast
    import torch
    from tqdm import tqdm
    paths, captions = paths[:n], captions[:n]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # both frozen models first: a missing one fails now, not after hours of encoding
    autoencoder = load_vae(vae, device)
    features = encode_text([c for text in captions for c in text], clip, device)   # (K, D), every caption
    f = 2 ** (len(autoencoder.config.block_out_channels) - 1)                      # 8 for SD-VAE
    if resolution % f:
        raise SystemExit(f"error: --resolution {resolution} is not a multiple of the VAE's downsampling {f}")
    scale = autoencoder.config.scaling_factor

    # stream the latents into a memmap: memory stays bounded by one batch, whatever N is
    begin_dataset(out)
    partial = os.path.join(out, "x1.partial.npy")
    x1 = np.lib.format.open_memmap(partial, "w+", np.float16,
                                   (len(paths), 2, autoencoder.config.latent_channels, resolution // f, resolution // f))
    loader = torch.utils.data.DataLoader(paths, batch_size=batch_size, num_workers=workers,
                                         collate_fn=functools.partial(load_images, resolution=resolution))
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
    args = p.parse_args()
    out = args.out or os.path.join("data", args.dataset)
    if args.dataset == "toyfaces":
        meta = prepare_toyfaces(out, args.n or 20000, args.seed, args.resolution or 32, args.captions_per_image)
    elif args.source is None:
        raise SystemExit("error: --dataset celebahq needs --source DIR, the folder that holds the images")
    else:
        meta = prepare_images(out, args.source, args.vae, args.clip, args.resolution or 256, args.n,
                              args.captions_per_image, args.batch_size, args.workers, args.seed)
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
