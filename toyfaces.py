"""
The toyfaces world: 32x32 cartoon faces drawn from five attributes, their captions, and the attribute reader that
is this repo's offline quality metric. The data set is defined here; prepare_data.py caches it for training.

    python toyfaces.py            # draws 64 faces to toyfaces_examples.png and reads them back (100% expected)

A face has five attributes: man or woman, hair colour (black, blond, brown, red), glasses, smiling, beard (men
only). Each image gets captions naming a random subset of them ("a man with glasses"). Because we drew them,
pixel rules can read the attributes back from any image (read_attributes). That gives two numbers for samples of
a prompt: accuracy (a clean face showing what the prompt names) and diversity (how far the attributes the prompt
leaves open are from the data's: open_attribute_tv).
"""
import json
import os
import re

import numpy as np

ATTRIBUTES = ["man", "hair", "glasses", "smiling", "beard"]
HAIR_COLOURS = ["black", "blond", "brown", "red"]
NUM_VALUES = [2, len(HAIR_COLOURS), 2, 2, 2]  # of each attribute

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
# the toy world's text encoder: a real transformers CLIP text model, small and random, whose tokenizer knows every
# caption word as one token (prepare_data.py saves it beside the data and encodes the captions with it)

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


# -----------------------------------------------------------------------------
# diversity: do the samples vary what the prompt leaves open as the data does?

def data_distribution(data_dir, prompts):
    """{prompt: [probabilities of each attribute's values]} over the training images captioned exactly so: what a
    perfect model draws for that prompt. (Captions name a random half of the attributes, so "a man with glasses"
    smiles less often than all men with glasses do.) A prompt that is no caption falls back to the images showing
    every attribute it names."""
    attrs = np.load(os.path.join(data_dir, "attributes.npy"))                   # (N, 5)
    caption_image = np.load(os.path.join(data_dir, "caption_image.npy"))        # (K,)
    with open(os.path.join(data_dir, "captions.json")) as f:
        captions = np.array(json.load(f))
    dist = {}
    for prompt in set(prompts):
        rows = caption_image[captions == prompt.lower().strip()]
        if len(rows) == 0:
            named = parse_prompt(prompt)
            rows = np.flatnonzero(np.all([attrs[:, ATTRIBUTES.index(a)] == v for a, v in named.items()]
                                         + [np.ones(len(attrs), bool)], 0))
        dist[prompt] = [np.bincount(attrs[rows, i], minlength=n) / max(len(rows), 1) for i, n in enumerate(NUM_VALUES)]
    return dist


def open_attribute_tv(reads, prompts, dist):
    """Total variation distance between the samples and the data, for each attribute some prompt leaves open:
    {attribute: tv}. Only samples that show their prompt count (accuracy measures the rest); each is compared with
    the data's distribution for its own prompt (dist: data_distribution), so mixed prompts compare with the mix."""
    tv = {}
    for i, (a, n) in enumerate(zip(ATTRIBUTES, NUM_VALUES)):
        rows = [(r, p) for r, p in zip(reads, prompts) if shows(r, p) and a not in parse_prompt(p)]
        if rows:
            ours = np.bincount([r[a] for r, _ in rows], minlength=n) / len(rows)
            theirs = np.mean([dist[p][i] for _, p in rows], 0)
            tv[a] = 0.5 * float(np.abs(ours - theirs).sum())
    return tv


def diversity_line(tv):
    """'hair 0.05, smiling 0.10, beard 0.02; max 0.10' (the max is the figure to watch)."""
    if not tv:
        return "no sample shows the prompt"
    return ", ".join(f"{a} {v:.2f}" for a, v in tv.items()) + f"; max {max(tv.values()):.2f}"


if __name__ == "__main__":
    from PIL import Image
    images, attrs = make_faces(64)
    grid = images.reshape(8, 8, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(256, 256, 3)  # 8 x 8 faces
    Image.fromarray(grid).resize((1024, 1024), Image.NEAREST).save("toyfaces_examples.png")
    reads = read_attributes(images)
    right = sum(r == dict(zip(ATTRIBUTES, map(int, a))) for r, a in zip(reads, attrs))
    print(f"wrote toyfaces_examples.png (64 faces, x4 nearest); the reader reads {right}/64 correctly")
