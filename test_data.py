"""Tests for prepare_data.py (CPU, offline, a few seconds): python -m pytest -q test_data.py"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.ndimage

import data as dt
import prepare_data as pd
import toyfaces

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toyfaces"))
    pd.prepare_toyfaces(out, n=512, seed=0)
    return out


@pytest.fixture(scope="module")
def fresh():
    return toyfaces.make_faces(512, seed=123)  # a different seed from the data set


def accuracy(images, prompt):  # the fraction of faces that show every attribute the prompt names
    return float(np.mean([toyfaces.shows(r, prompt) for r in toyfaces.read_attributes(images)]))


def exact(read, attrs):
    return np.mean([r is not None and [r[k] for k in toyfaces.ATTRIBUTES] == list(map(int, a)) for r, a in zip(read, attrs)])


def none_rate(images):
    return np.mean([r is None for r in toyfaces.read_attributes(images)])

# ---------------------------------------------------------------------------- layout


def test_layout(data):
    meta = dt.load_meta(data)
    N, K = 512, 4 * 512
    x1 = np.load(os.path.join(data, "x1.npy"))
    assert x1.dtype == np.float16 and x1.shape == (N, 1, 3, 32, 32)
    assert x1.min() >= -1 and x1.max() <= 1 and x1.astype(np.float32).std() > 0.2
    feats = np.load(os.path.join(data, "text_features.npy"))
    assert feats.dtype == np.float32 and feats.shape == (K, 64) and np.isfinite(feats).all()
    ci = np.load(os.path.join(data, "caption_image.npy"))
    assert ci.dtype == np.int64 and ci.shape == (K,) and ci.min() == 0 and ci.max() == N - 1
    captions = json.load(open(os.path.join(data, "captions.json")))
    assert len(captions) == K and all(isinstance(c, str) and c for c in captions)
    attrs = np.load(os.path.join(data, "attributes.npy"))
    assert attrs.dtype == np.int8 and attrs.shape == (N, 5)
    assert meta["dataset"] == "toyfaces" and meta["shape"] == [3, 32, 32] and meta["views"] == 1
    assert meta["num_images"] == N and meta["num_captions"] == K and meta["feature_dim"] == 64
    assert meta["vae"] == "none" and meta["latent_scale"] == 1.0 and meta["resolution"] == 32
    assert meta["attributes"] == toyfaces.ATTRIBUTES and meta["hair_colours"] == toyfaces.HAIR_COLOURS
    assert meta["text_encoder"] == os.path.abspath(os.path.join(data, "clip")) and os.path.isdir(meta["text_encoder"])
    # meta.json is written last
    mtimes = {f: os.path.getmtime(os.path.join(data, f)) for f in os.listdir(data) if f.endswith((".npy", ".json"))}
    assert mtimes["meta.json"] == max(mtimes.values())
    # the images are what the reader reads, and the attributes are the truth
    images = ((x1[:, 0].astype(np.float32) + 1) * 127.5).round().astype(np.uint8)
    assert exact(toyfaces.read_attributes(images), attrs) >= 0.99
    # attribute frequencies roughly as designed
    assert 0.4 < attrs[:, 0].mean() < 0.6 and 0.4 < attrs[:, 2].mean() < 0.6 and 0.4 < attrs[:, 3].mean() < 0.6
    assert attrs[attrs[:, 0] == 0, 4].sum() == 0 and set(attrs[:, 1]) == {0, 1, 2, 3}


def test_load_meta_missing(tmp_path):
    with pytest.raises(SystemExit, match="meta.json not found: run `python prepare_data.py` first"):
        dt.load_meta(str(tmp_path))


def test_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    pd.prepare_toyfaces(a, n=64, seed=3)
    pd.prepare_toyfaces(b, n=64, seed=3)
    for f in ["x1.npy", "text_features.npy", "caption_image.npy", "attributes.npy"]:
        assert np.array_equal(np.load(os.path.join(a, f)), np.load(os.path.join(b, f))), f
    assert json.load(open(os.path.join(a, "captions.json"))) == json.load(open(os.path.join(b, "captions.json")))
    other, _ = toyfaces.make_faces(64, seed=4)
    assert not np.array_equal(other, toyfaces.make_faces(64, seed=3)[0])


def test_captions_are_true(data):
    captions = json.load(open(os.path.join(data, "captions.json")))
    ci = np.load(os.path.join(data, "caption_image.npy"))
    attrs = np.load(os.path.join(data, "attributes.npy"))
    for c, i in zip(captions, ci):
        named = toyfaces.parse_prompt(c)
        assert all(attrs[i, toyfaces.ATTRIBUTES.index(k)] == v for k, v in named.items()), (c, attrs[i])
    assert len(set(captions)) > 100  # varied, including partial ones
    assert "a person" in captions and any(len(toyfaces.parse_prompt(c)) == 5 for c in captions)
    full = captions[0::4]  # the first caption of each image names everything that is true
    assert all(toyfaces.parse_prompt(c)["man"] == a[0] and toyfaces.parse_prompt(c)["hair"] == a[1] for c, a in zip(full, attrs))

# ---------------------------------------------------------------------------- reader


def test_reader_fresh_faces(fresh):
    images, attrs = fresh
    assert exact(toyfaces.read_attributes(images), attrs) >= 0.99
    assert exact(toyfaces.read_attributes(images.transpose(0, 3, 1, 2)), attrs) >= 0.99  # (B, 3, H, W) too


def test_reader_64px():
    images, attrs = toyfaces.make_faces(128, seed=5, resolution=64)
    assert images.shape == (128, 64, 64, 3)
    assert exact(toyfaces.read_attributes(images), attrs) >= 0.99


def test_reader_robust_to_noise_and_light_blur(fresh):
    images, attrs = fresh
    rng = np.random.default_rng(0)
    noisy = np.clip(images + rng.normal(0, 0.03 * 255, images.shape), 0, 255).round().astype(np.uint8)
    assert exact(toyfaces.read_attributes(noisy), attrs) >= 0.95
    blurred = scipy.ndimage.gaussian_filter(images.astype(float), (0, 0.4, 0.4, 0)).round().astype(np.uint8)
    assert exact(toyfaces.read_attributes(blurred), attrs) >= 0.95


def test_reader_rejects_noise():
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 256, (512, 32, 32, 3)).astype(np.uint8)
    gauss = np.clip(rng.normal(127.5, 64, (512, 32, 32, 3)), 0, 255).astype(np.uint8)
    assert none_rate(uniform) >= 0.99 and none_rate(gauss) >= 0.99


@pytest.mark.parametrize("prompt", ["a man with glasses", "a smiling woman with red hair", "a woman with blond hair",
                                    "a bearded man", "a person with brown hair and glasses", "a smiling man", "a person"])
def test_reader_rejects_blurry_means(prompt):
    # what a 1-step flow-matching model outputs: the mean of all the faces that fit the prompt, in which the
    # attributes the prompt leaves open (hair colour, glasses, smile, beard ...) blur together
    rng = np.random.default_rng(0)
    attrs = toyfaces.sample_attributes(4096, rng)
    named = toyfaces.parse_prompt(prompt)
    fits = attrs[[all(a[toyfaces.ATTRIBUTES.index(k)] == v for k, v in named.items()) for a in attrs]]
    mean = toyfaces.draw_faces(fits[:256], rng).mean(0, keepdims=True)
    assert none_rate(np.round(mean).astype(np.uint8)) == 1.0


@pytest.mark.parametrize("column, rejected", [(toyfaces.ATTRIBUTES.index("smiling"), 0.95),
                                              (toyfaces.ATTRIBUTES.index("glasses"), 1.0)])
def test_reader_rejects_undecided_faces(column, rejected):
    # the same faces drawn both ways and blended half and half: a face that has not decided whether it smiles
    # (or wears glasses) is not a face. This is what rejects a flow-matching model's 1-step mean; a smile
    # drawn to share the closed mouth's red line passed it (README: "Tried ... and not kept")
    attrs = toyfaces.sample_attributes(512, np.random.default_rng(0))
    both = []
    for value in (0, 1):
        attrs[:, column] = value
        both.append(toyfaces.draw_faces(attrs, np.random.default_rng(1)).astype(float))  # same nuisance both times
    assert none_rate(np.round((both[0] + both[1]) / 2).astype(np.uint8)) >= rejected


def test_reader_rejects_broken_faces(fresh):
    images, _ = fresh
    rng = np.random.default_rng(0)
    for fill in ["background", "black", "grey"]:
        broken = images.copy()
        for im in broken:
            y0, x0 = rng.integers(9, 15, 2)  # a 10x10 hole over the middle of the face
            im[y0:y0 + 10, x0:x0 + 10] = {"background": im[0, 0], "black": 0, "grey": 128}[fill]
        assert none_rate(broken) >= 0.95, fill

# ---------------------------------------------------------------------------- prompts


def test_parse_prompt():
    assert toyfaces.parse_prompt("a man with glasses") == {"man": 1, "glasses": 1}
    assert toyfaces.parse_prompt("A smiling WOMAN with red hair") == {"smiling": 1, "man": 0, "hair": 3}
    assert toyfaces.parse_prompt("a person with blonde hair and glasses") == {"hair": 1, "glasses": 1}
    assert toyfaces.parse_prompt("a bearded man with black hair") == {"beard": 1, "man": 1, "hair": 0}
    assert toyfaces.parse_prompt("brown-haired female, big smile, beard") == {"hair": 2, "man": 0, "smiling": 1, "beard": 1}
    assert toyfaces.parse_prompt("a zebra in Paris") == {} and toyfaces.parse_prompt("") == {}


def test_prompt_accuracy(fresh):
    images, attrs = fresh
    man_glasses = (attrs[:, 0] == 1) & (attrs[:, 2] == 1)
    assert accuracy(images, "a man with glasses") == pytest.approx(man_glasses.mean(), abs=0.01)
    assert accuracy(images[man_glasses], "a man with glasses") >= 0.99
    assert accuracy(images[~man_glasses], "a man with glasses") <= 0.01
    assert accuracy(images, "a person") >= 0.99  # names nothing: any face counts
    noise = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype(np.uint8)
    assert accuracy(noise, "a person") == 0.0

# ---------------------------------------------------------------------------- text encoder


def test_tokenizer_any_prompt(data):
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(os.path.join(data, "clip"))
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for prompt in ["a zebra 🦓 in Paris", "", "   ", "Ünïcödé, 数字 123!", "x" * 500]:
        ids = tok(prompt, truncation=True, max_length=77)["input_ids"]
        assert ids[0] == bos and ids[-1] == eos and eos not in ids[1:-1] and len(ids) <= 77, prompt
    assert tok("")["input_ids"] == [bos, eos]
    for word in set(toyfaces.PROMPT_WORDS) | {"a", "with", "and", "person", "hair"}:
        assert len(tok(word)["input_ids"]) == 3, word  # every caption word is one token


def test_clip_loads_and_pools_eos(data):
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer
    path = os.path.join(data, "clip")
    tok, model = CLIPTokenizer.from_pretrained(path), CLIPTextModel.from_pretrained(path)
    assert model.config.eos_token_id == tok.eos_token_id and model.config.bos_token_id == tok.bos_token_id
    assert model.config.pad_token_id == tok.pad_token_id and model.config.vocab_size == len(tok)
    prompts = ["a man", "a smiling woman with red hair and glasses"]
    batch = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    last = [len(tok(p)["input_ids"]) - 1 for p in prompts]  # eos position, before the padding
    assert torch.allclose(out.pooler_output, out.last_hidden_state[torch.arange(2), last])
    feats = dt.encode_text(prompts + ["a zebra 🦓 in Paris", "", prompts[0]], path)
    assert feats.shape == (5, 64) and feats.dtype == np.float32
    assert np.allclose(feats[:2], out.pooler_output.numpy(), atol=1e-5) and np.array_equal(feats[0], feats[4])


def test_text_features_are_usable(data):
    captions = json.load(open(os.path.join(data, "captions.json")))
    feats = np.load(os.path.join(data, "text_features.npy"))
    uniq, idx = np.unique(captions, return_index=True)
    d = np.linalg.norm(feats[idx][:, None] - feats[idx][None], axis=-1) + np.eye(len(idx)) * 1e9
    assert d.min() > 1e-3  # distinct captions, distinct features
    parsed = [toyfaces.parse_prompt(c) for c in captions]
    X = np.c_[feats, np.ones(len(feats))]
    probe = lambda rows, y: (np.sign(X[rows] @ np.linalg.lstsq(X[rows], y, rcond=None)[0]) == y).mean()
    for k in toyfaces.ATTRIBUTES:  # a linear probe sees which attributes a caption names ...
        named = np.array([k in p for p in parsed])
        assert probe(slice(None), np.where(named, 1.0, -1.0)) >= 0.95, k
    for k, v in [("man", 1), ("hair", 0), ("hair", 1), ("hair", 2), ("hair", 3)]:  # ... and their values
        val = np.array([p.get(k, -1) for p in parsed])
        assert probe(val >= 0, np.where(val[val >= 0] == v, 1.0, -1.0)) >= 0.95, (k, v)


def test_offline_hub_name_fails_fast(monkeypatch):
    from huggingface_hub import try_to_load_from_cache
    name = "openai/clip-vit-base-patch32"
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        pytest.skip(f"{name} is in the local Hugging Face cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(SystemExit) as e:
        dt.encode_text(["a man"], name)
    assert time.time() - t < 10
    msg = str(e.value.code)
    assert msg == f"error: cannot load CLIP text encoder '{name}' (offline?): pass --clip /path/to/local/clip"


def test_cli(tmp_path):
    out = str(tmp_path / "cli")
    r = subprocess.run([sys.executable, os.path.join(HERE, "prepare_data.py"), "--n", "32", "--out", out],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "x1 (32, 1, 3, 32, 32)" in r.stdout
    assert dt.load_meta(out)["num_images"] == 32


def test_diversity_is_zero_for_the_data_and_sees_a_dropped_mode(data):
    """The training images captioned "a person with glasses", read back, vary their open attributes exactly as
    data_distribution says (TV 0); faces of the same prompt that all have brown hair are TV 1 - p(brown) away."""
    prompt = "a person with glasses"
    with open(os.path.join(data, "captions.json")) as f:
        rows = np.load(os.path.join(data, "caption_image.npy"))[np.array(json.load(f)) == prompt]
    x1 = np.load(os.path.join(data, "x1.npy"))[rows, 0]                       # (M, 3, H, W) in [-1, 1]
    images = ((x1.astype(np.float32) + 1) * 127.5).round().astype(np.uint8)
    dist = toyfaces.data_distribution(data, [prompt])
    reads = toyfaces.read_attributes(images)
    tv = toyfaces.open_attribute_tv(reads, [prompt] * len(reads), dist)
    assert len(rows) >= 20 and set(tv) == {"man", "hair", "smiling", "beard"}  # glasses: named
    assert max(tv.values()) < 1e-9, tv

    attrs = toyfaces.sample_attributes(256, np.random.default_rng(0))
    attrs[:, 1], attrs[:, 2] = 2, 1                                          # brown hair, glasses
    brown = toyfaces.read_attributes(toyfaces.draw_faces(attrs, np.random.default_rng(1)))
    tv = toyfaces.open_attribute_tv(brown, [prompt] * len(brown), dist)
    assert tv["hair"] == pytest.approx(1 - dist[prompt][1][2])
    # a prompt that is no caption: the images that show what it names (here: every woman)
    assert toyfaces.data_distribution(data, ["female"])["female"][0][1] == 0
