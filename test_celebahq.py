"""Tests for real data: prepare_data.py --dataset celebahq -> train.py -> sample.py (CPU, offline, seconds).
A tiny random AutoencoderKL (8x downsampling, 4 latent channels) and a tiny CLIP text encoder stand in for
SD-VAE and CLIP (conftest.py); 64x64 images give 8x8 latents.    python -m pytest -q test_celebahq.py
"""
import json
import os
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data as dt
import prepare_data as pd
from conftest import run_script

pytestmark = pytest.mark.usefixtures("cpu_only")  # the CPU path on purpose, on a GPU machine too (conftest.py)

HERE = os.path.dirname(os.path.abspath(__file__))
CELEBA_NAMES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
                "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
                "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
                "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
                "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
N = 10


def faces(seed=0):
    """N distinct 64x64 test images: smooth colour ramps plus noise, so a mirror image differs."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 64)[None, :, None] * rng.uniform(50, 200, (N, 1, 1, 3))
    return np.clip(ramp + rng.normal(0, 30, (N, 64, 64, 3)), 0, 255).astype(np.uint8)


def make_source(root, layout):
    """A 10-image folder in one of the three layouts. Returns (folder, captions of each image or None)."""
    images, src = faces(), root / layout
    if layout == "CelebAMask-HQ":  # JPEGs and the attribute file; captions come from the attributes
        (src / "CelebA-HQ-img").mkdir(parents=True)
        rows = ["30000", " ".join(CELEBA_NAMES)]
        for i, im in enumerate(images):
            Image.fromarray(im).save(src / "CelebA-HQ-img" / f"{i}.jpg", quality=95)
            rows.append(f"{i}.jpg  " + " ".join("1" if (i + k) % 3 == 0 else "-1" for k in range(40)))
        (src / "CelebAMask-HQ-attribute-anno.txt").write_text("\n".join(rows) + "\n")
        return src, None
    if layout == "MM-CelebA-HQ":  # 64 wide, 128 tall: the centre crop is the test image
        (src / "images").mkdir(parents=True)
        (src / "text").mkdir()
        texts = [[f"the person number {i}", f"face {i} in a photo"][: 1 + i % 2] for i in range(N)]
        for i, im in enumerate(images):
            junk = np.full((32, 64, 3), 255, np.uint8)
            Image.fromarray(np.concatenate([junk, im, junk])).save(src / "images" / f"{i}.png")
            (src / "text" / f"{i}.txt").write_text("\n".join(texts[i]) + "\n\n")
        return src, texts
    (src / "imgs").mkdir(parents=True)  # metadata.jsonl, "text" a string or a list
    texts = [[f"image {i}"] if i % 2 else [f"image {i}", f"picture {i}", f"photo {i}"] for i in range(N)]
    with open(src / "metadata.jsonl", "w") as f:
        for i, im in enumerate(images):
            Image.fromarray(im).save(src / "imgs" / f"{i}.png")
            f.write(json.dumps({"file_name": f"imgs/{i}.png", "text": texts[i][0] if i % 2 else texts[i]}) + "\n")
    return src, texts


def prepare(models, root, layout, workers=0):
    src, texts = make_source(root, layout)
    with pytest.MonkeyPatch.context() as mp:  # the CPU path: its latents and features are compared at 1e-5
        mp.setattr(torch.cuda, "is_available", lambda: False)
        meta = pd.prepare_images(str(root / "out"), str(src), *models, resolution=64, workers=workers)
    return layout, str(src), str(root / "out"), meta, texts


@pytest.fixture(scope="module", params=["CelebAMask-HQ", "MM-CelebA-HQ", "metadata.jsonl"])
def prepared(request, models, tmp_path_factory):
    workers = 2 if request.param == "CelebAMask-HQ" else 0  # the DataLoader worker path once
    return prepare(models, tmp_path_factory.mktemp("data"), request.param, workers)


def expected_latents(vae_dir, images):
    """scaling_factor x posterior mean of each image and of its mirror: (n, 2, 4, 8, 8)."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(vae_dir)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = [vae.encode(v).latent_dist.mean * vae.config.scaling_factor for v in (x, x.flip(3))]
    return torch.stack(z, 1).numpy()


def test_prepare_layouts(prepared, models):
    layout, src, out, meta, texts = prepared
    vae, clip = models
    x1 = np.load(os.path.join(out, "x1.npy"))
    assert x1.dtype == np.float16 and x1.shape == (N, 2, 4, 8, 8) and np.isfinite(x1).all()
    assert meta == dt.load_meta(out)
    assert meta["dataset"] == "celebahq" and meta["layout"] == layout and meta["shape"] == [4, 8, 8]
    assert meta["views"] == 2 and meta["num_images"] == N and meta["resolution"] == 64 and meta["skipped"] == 0
    assert meta["vae"] == vae and meta["text_encoder"] == clip and meta["latent_scale"] == 0.18215
    files = sorted(os.listdir(out))
    assert files == ["caption_image.npy", "captions.json", "meta.json", "text_features.npy", "x1.npy"]
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in files}
    assert mtimes["meta.json"] == max(mtimes.values())  # written last

    # view 0 is the image, view 1 its mirror, each scale x the posterior mean (JPEG: compare to the decoded file)
    if layout == "CelebAMask-HQ":
        images = np.stack([np.asarray(Image.open(os.path.join(src, "CelebA-HQ-img", f"{i}.jpg"))) for i in range(N)])
    else:
        images = faces()
    assert np.allclose(x1, expected_latents(vae, images), atol=2e-3, rtol=1e-2)
    assert np.abs(x1[:, 0] - x1[:, 1]).mean() > 0.1 * np.abs(x1).mean()

    # captions, their images and their features line up
    captions = json.load(open(os.path.join(out, "captions.json")))
    ci = np.load(os.path.join(out, "caption_image.npy"))
    feats = np.load(os.path.join(out, "text_features.npy"))
    assert ci.dtype == np.int64 and feats.dtype == np.float32 and feats.shape == (len(captions), 64)
    assert meta["num_captions"] == len(captions) == len(ci) and meta["feature_dim"] == 64
    if texts is None:  # 4 attribute captions per image
        assert len(captions) == 4 * N and list(ci) == list(np.repeat(np.arange(N), 4))
    else:
        assert [(c, i) for c, i in zip(captions, ci)] == [(c, i) for i in range(N) for c in texts[i]]
    assert np.allclose(feats, dt.encode_text(captions, clip), atol=1e-5)


def test_celeba_captions_are_true():
    rng = np.random.default_rng(0)
    phrases = {**dt.CELEBA_HAS, **dt.CELEBA_WEARS, **dt.CELEBA_IS}
    for _ in range(200):
        true = {a for a in CELEBA_NAMES if rng.random() < 0.3}
        named = {a for a in phrases if a in true} | ({"Beard"} if "No_Beard" not in true else set())
        captions = dt.celeba_captions(true, rng, 4)
        assert len(captions) == 4 and len(set(captions)) >= 2
        noun, other = ("man", "woman") if "Male" in true else ("woman", "man")
        assert all(re.search(rf"\b{noun}\b", c) and not re.search(rf"\b{other}\b", c) for c in captions)
        assert captions[0].startswith(f"The {noun}") or captions[0].startswith(f"A photo of a {noun}")
        for a, phrase in phrases.items():  # the first caption names all that is true, none names anything false
            if a in named:
                assert phrase in captions[0], (phrase, captions[0])
            else:
                assert all(phrase not in c for c in captions), (phrase, captions)
        assert sum(p in captions[1] for p in phrases.values()) <= 4  # short: 2 adjectives and 2 "with" at most
    assert dt.celeba_captions({"Male", "Eyeglasses", "No_Beard"}, rng, 1) == ["A photo of a man. He wears glasses."]


def test_corrupt_images_skipped_with_warning(models, tmp_path, capsys):
    src, texts = make_source(tmp_path, "metadata.jsonl")
    (src / "imgs" / "3.png").write_bytes(b"not an image at all")
    data = (src / "imgs" / "7.png").read_bytes()
    (src / "imgs" / "7.png").write_bytes(data[: len(data) // 2])  # truncated
    vae, clip = models
    meta = pd.prepare_images(str(tmp_path / "out"), str(src), vae, clip, resolution=64, workers=0)
    err = capsys.readouterr().err
    assert err.count("warning: skipping unreadable image") == 2 and "3.png" in err and "7.png" in err
    assert meta["skipped"] == 2 and meta["num_images"] == N - 2
    kept = [i for i in range(N) if i not in (3, 7)]
    x1 = np.load(tmp_path / "out" / "x1.npy")
    assert x1.shape == (N - 2, 2, 4, 8, 8) and not (tmp_path / "out" / "x1.partial.npy").exists()
    assert np.allclose(x1, expected_latents(vae, faces()[kept]), atol=2e-3, rtol=1e-2)
    captions = json.load(open(tmp_path / "out" / "captions.json"))
    ci = np.load(tmp_path / "out" / "caption_image.npy")
    assert [(c, i) for c, i in zip(captions, ci)] == [(c, k) for k, i in enumerate(kept) for c in texts[i]]


def test_layout_detection(tmp_path):
    src, _ = make_source(tmp_path, "CelebAMask-HQ")
    assert dt.read_source(str(src))[0] == "CelebAMask-HQ"
    (src / "celeba-caption").mkdir()  # MM-CelebA-HQ's captions moved into the CelebAMask-HQ folder: they win
    for i in range(N):
        (src / "celeba-caption" / f"{i}.txt").write_text(f"caption {i}\n")
    layout, paths, captions = dt.read_source(str(src))
    assert layout == "MM-CelebA-HQ" and captions == [[f"caption {i}"] for i in range(N)]
    assert paths == [str(src / "CelebA-HQ-img" / f"{i}.jpg") for i in range(N)]
    assert sorted(["10.jpg", "2.jpg", "1.jpg"], key=dt.natural_order) == ["1.jpg", "2.jpg", "10.jpg"]


def test_missing_source_and_no_layout_are_one_clear_line(tmp_path):
    cli = ["--dataset", "celebahq", "--out", str(tmp_path / "o")]
    (tmp_path / "empty").mkdir()
    for extra, msg in [(["--source", str(tmp_path / "missing")], "error: source folder"),
                       (["--source", str(tmp_path / "empty")], "error: no known layout in"),
                       ([], "error: --dataset celebahq needs --source DIR")]:
        with pytest.raises(SystemExit) as e:  # before any model loads; Python prints the message as the one line
            run_script("prepare_data.py", *cli, *extra)
        assert str(e.value.code).startswith(msg) and len(str(e.value.code).splitlines()) == 1, e.value.code
    (tmp_path / "empty" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": []}\n')
    with pytest.raises(SystemExit, match="no captioned images found"):
        dt.read_source(str(tmp_path / "empty"))
    (tmp_path / "empty" / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(SystemExit, match="metadata.jsonl line 1: expected"):
        dt.read_source(str(tmp_path / "empty"))


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no DNS"])
def test_unreachable_hub_name_fails_fast(models, tmp_path, monkeypatch, offline):
    from huggingface_hub import try_to_load_from_cache
    name = "stabilityai/sd-vae-ft-mse"
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        pytest.skip(f"{name} is in the local Hugging Face cache")
    for k in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # no network at all: the host name does not resolve

        def no_dns(*args, **kwargs):
            raise OSError("Name or service not known")
        monkeypatch.setattr(dt.socket, "getaddrinfo", no_dns)
    src, _ = make_source(tmp_path, "metadata.jsonl")
    t = time.time()
    with pytest.raises(SystemExit) as e:
        pd.prepare_images(str(tmp_path / "out"), str(src), name, models[1], resolution=64, workers=0)
    assert str(e.value.code) == f"error: cannot load VAE '{name}' (offline?): pass --vae /path/to/local/vae"
    assert time.time() - t < 10
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_train_and_sample_decode_latents(models, tmp_path, monkeypatch, capsys):
    _, _, data, meta, _ = prepare(models, tmp_path, "metadata.jsonl")
    out = str(tmp_path / "run")
    run_script("train.py", "--data-dir", data, "--out", out, "--model", "DiT-T/4", "--batch", "4",
               "--max-steps", "2", "--log-every", "1", "--sample-every", "2")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 2 and ckpt["meta"]["shape"] == [4, 8, 8] and ckpt["meta"]["vae"] == meta["vae"]
    # 6 prompts x 4 step counts of 64 px decoded images (8 x the 8 x 8 latent), enlarged x2 to 128 px
    assert Image.open(os.path.join(out, "grid_000002.png")).size == (4 * (130 + 6), 18 + 6 * (18 + 130))

    capsys.readouterr()
    run_script("sample.py", "--ckpt", os.path.join(out, "ckpt.pt"), "--prompt", "a man with glasses",
               "--steps", "1", "--n", "2", "--out", str(tmp_path / "samples"))
    path = capsys.readouterr().out.split("wrote ")[1].split()[0]
    image = np.asarray(Image.open(path))
    assert image.shape == (18 + 18 + 130, 2 * 130 + 6, 3)  # two 64 px samples (8 x the 8 x 8 latent), x2
    assert image[36:164, :128].std() > 1  # decoded, not blank

    # sampling offline with a VAE only the hub has: the same one clear line, before any sampling
    ckpt["meta"]["vae"] = "stabilityai/sd-vae-ft-mse"
    torch.save(ckpt, tmp_path / "hub.pt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        run_script("sample.py", "--ckpt", str(tmp_path / "hub.pt"), "--out", str(tmp_path / "samples"))
    assert "cannot load VAE 'stabilityai/sd-vae-ft-mse' (offline?): pass --vae" in str(e.value.code)


def test_real_image_stats_of_prepare_equal_fid_from_the_files(models, inception_file, tmp_path, monkeypatch, capsys):
    import fid
    import inception as fidnet
    src, _ = make_source(tmp_path, "metadata.jsonl")
    (src / "imgs" / "3.png").write_bytes(b"not an image at all")  # skipped by both sides alike
    out = str(tmp_path / "out")
    meta = pd.prepare_images(out, str(src), *models, resolution=64, workers=0, inception=inception_file)
    mu, sigma, info = fidnet.load_stats(os.path.join(out, "fid_stats.npz"))
    inception = fidnet.load_inception(inception_file)
    assert info["n"] == meta["num_images"] == N - 1 and info["inception"] == fidnet.inception_hash(inception)
    assert (info["device"], info["precision"]) == ("cpu", "fp32")  # where and how the reference was made
    assert os.path.getmtime(os.path.join(out, "meta.json")) >= os.path.getmtime(os.path.join(out, "fid_stats.npz"))

    # fid.py, when the file is missing, reads the same files the same way (the source folder in meta.json)
    os.remove(os.path.join(out, "fid_stats.npz"))
    mu2, sigma2, info2, path = fid.reference_stats(out, meta, "real", inception, batch=4)
    assert path == os.path.join(out, "fid_stats.npz") and info2["n"] == N - 1
    np.testing.assert_allclose(mu2, mu, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-5, atol=1e-8)
    # the VAE's reconstructions are another reference, cached apart: their gap to the real images is the VAE's
    mu3, _, info3, path3 = fid.reference_stats(out, meta, "vae", inception, batch=4)
    assert path3.endswith("fid_stats_vae.npz") and info3["n"] == N - 1 and not np.allclose(mu3, mu)

    # no Inception weights (offline, nothing cached): one line says so, the data set is complete without them
    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    capsys.readouterr()
    pd.prepare_images(out, str(src), *models, resolution=64, workers=0, inception="auto")
    lines = [line for line in capsys.readouterr().out.splitlines() if "FID" in line]
    assert len(lines) == 1 and lines[0].startswith("no real-image FID statistics now") and "--inception" in lines[0]
    assert not any(f.startswith("fid_stats") for f in os.listdir(out))  # the old statistics described other data


def test_chunked_vae_decode_equals_unchunked(models):
    from data import to_images
    meta = {"vae": models[0], "latent_scale": 0.18215}
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole, chunked = to_images(z, meta, chunk=len(z)), to_images(z, meta, chunk=2)
    assert whole.shape == (5, 3, 64, 64)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
