"""Tests for fid.py (CPU, no downloads):  python -m pytest -q test_fid.py"""

import urllib.error

import numpy as np
import pytest
import torch
import torchvision

import inception as fidnet
from conftest import run_script

pytestmark = pytest.mark.usefixtures("cpu_only")  # the CPU path on purpose, on a GPU machine too (conftest.py)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Inception at 299 px on a small shared CPU: one intra-op thread is several times faster than two spinning
    # against other processes (and the LAPACK threads of the 2048-d eigensolves). Restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d + 3))
    return a @ a.T / a.shape[1]


def direct_frechet(mu1, s1, mu2, s2):
    # Independent reference: eigenvalues of s1 s2 are real and >= 0 for covariances; sum their square roots.
    ev = np.linalg.eigvals(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


@pytest.mark.parametrize("rank", [None, 5])  # full rank and a singular (rank-deficient) sigma1
@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_matches_direct(rank, method):
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_cov(rng, d, rank), random_cov(rng, d)
    got = fidnet.frechet_distance(mu1, s1, mu2, s2, method=method)
    assert got == pytest.approx(direct_frechet(mu1, s1, mu2, s2), rel=1e-6)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # sqrtm warns on singular input, still exact here
def test_frechet_distance_diagonal_closed_form():
    # Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2, zeros (singular) included.
    a, b = np.array([0.0, 1.0, 4.0, 9.0]), np.array([1.0, 0.0, 1.0, 16.0])
    mu1, mu2 = np.array([1.0, 2, 3, 4]), np.array([1.0, 2, 3, 6])
    want = 4.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for method in ["eigh", "sqrtm"]:
        assert fidnet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(want)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_identical_stats_give_zero(method):
    mu, sigma = fidnet.compute_stats(np.random.default_rng(1).standard_normal((200, 64)) * 3 + 1)
    assert abs(fidnet.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-6


def test_non_finite_trace_retries_with_eps_on_the_diagonal(monkeypatch):
    calls, real = [], fidnet._trace_sqrt_product
    def flaky(s1, s2, method):  # as if sqrtm had failed on a singular product the first time
        calls.append(s1.copy())
        return np.nan if len(calls) == 1 else real(s1, s2, method)
    monkeypatch.setattr(fidnet, "_trace_sqrt_product", flaky)
    s = np.diag([1.0, 0.0])
    assert fidnet.frechet_distance(np.zeros(2), s, np.zeros(2), s, eps=1e-6) == pytest.approx(0, abs=1e-5)
    np.testing.assert_allclose(calls[1] - calls[0], 1e-6 * np.eye(2))


@pytest.mark.parametrize("n", [100, 1000])  # fewer samples than dimensions (singular sigmas) and more
def test_sqrtm_and_eigh_agree(n):
    rng = np.random.default_rng(2)
    mu1, s1 = fidnet.compute_stats(rng.standard_normal((n, 256)))
    mu2, s2 = fidnet.compute_stats(rng.standard_normal((n, 256)) * 1.5 + 0.1)
    fast, slow = (fidnet.frechet_distance(mu1, s1, mu2, s2, method=m) for m in ["eigh", "sqrtm"])
    assert fast == pytest.approx(slow, rel=1e-6)


def test_running_stats_equal_compute_stats_and_roundtrip(tmp_path):
    feats = np.random.default_rng(3).standard_normal((300, 16)).astype(np.float32) * 5 + 2
    running = fidnet.RunningStats(dim=16)
    for chunk in np.array_split(feats, 7):
        running.update(chunk)
    (mu, sigma), (mu2, sigma2) = fidnet.compute_stats(feats), running.stats()
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (16, 16)
    np.testing.assert_allclose(mu2, mu, rtol=1e-10)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-8, atol=1e-10)
    fidnet.save_stats(tmp_path / "stats.npz", mu, sigma, n=300, inception="0123abcd", reference="test features")
    mu3, sigma3, info = fidnet.load_stats(tmp_path / "stats.npz")
    np.testing.assert_array_equal(mu3, mu)
    np.testing.assert_array_equal(sigma3, sigma)
    assert info == {"n": 300, "inception": "0123abcd", "reference": "test features"}


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return fidnet.FIDInceptionV3().eval()


def test_features_shape_and_any_input_size(inception):
    with torch.no_grad():
        for batch, size in [(2, 32), (1, 75)]:
            out = inception(torch.rand(batch, 3, size, size))
            assert out.shape == (batch, 2048) and torch.isfinite(out).all()


def test_inception_stats_streams_batches(inception):
    batches = (torch.rand(b, 3, 32, 32) for b in [2, 1])
    mu, sigma = fidnet.inception_stats(batches, inception, total=2)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)


def test_state_dict_file_loads_strictly_with_standard_keys(inception, tmp_path, monkeypatch):
    # pytorch-fid's fid_inception_v3 is torchvision's inception_v3 with blocks swapped for ones with the same
    # parameters, so its keys (those of the standard weight file) are torchvision's.
    arch = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    shapes = {k: tuple(v.shape) for k, v in inception.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in arch.state_dict().items()}
    known = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_1a_3x3.bn.running_var": (32,),
             "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_6e.branch7x7dbl_5.conv.weight":
             (192, 192, 1, 7), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
             "fc.weight": (1008, 2048), "fc.bias": (1008,)}
    assert all(shapes[k] == v for k, v in known.items())

    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in inception.state_dict().items()}
    torch.save(state, tmp_path / "weights.pth")
    loaded = fidnet.load_inception(tmp_path / "weights.pth")
    assert not loaded.training
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())

    # path=None finds the same file in the hub cache without touching the network
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("downloaded"))
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / fidnet.FID_WEIGHTS_URL.rsplit("/", 1)[1])
    assert torch.equal(fidnet.load_inception().fc.weight, state["fc.weight"])


def test_offline_without_weights_is_one_clear_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit) as e:
        fidnet.load_inception()
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "checkpoints") in msg and "--inception" in msg
    assert fidnet.FID_WEIGHTS_URL in msg


# ---------------------------------------------------------------------------- the CLI end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 32-face toyfaces set (prepare_data.py), an untrained DiT-T/4 checkpoint as train.py writes it, and a
    random-weight Inception file: enough to run every line of the CLI in seconds (the numbers mean nothing)."""
    from model import DiT, DiT_models
    from prepare_data import prepare_toyfaces
    root = tmp_path_factory.mktemp("fid")
    meta = prepare_toyfaces(str(root / "data"), n=8)  # the real-image reference is all of them
    torch.manual_seed(0)
    model = DiT(**DiT_models["DiT-T/4"], input_size=meta["shape"][1], in_channels=meta["shape"][0],
                feature_dim=meta["feature_dim"])
    args = {"model": "DiT-T/4", "data_dir": str(root / "data"), "bootstrap_every": 8}
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "step": 0, "args": args, "meta": meta},
               root / "ckpt.pt")
    torch.save(fidnet.FIDInceptionV3().state_dict(), root / "inception.pth")
    return root


def test_cli_table_csv_plot_and_cached_reference(tiny_run, capsys):
    # one step count only: each FID is a 2048-d eigensolve (a few seconds here)
    run_script("fid.py", "--ckpt", tiny_run / "ckpt.pt", "--steps", 2, "--n", 3, "--batch", 2,
            "--inception", tiny_run / "inception.pth", "--out", tiny_run / "res")
    out = capsys.readouterr().out
    assert "N = 3 samples per row" in out and "FID" in out and "accuracy" in out and "(ema weights)" in out
    # pixel data: the real images are x1.npy itself, all 8 of them, cached with the Inception weights' hash
    assert f"reference: the data's images, N = 8 ({tiny_run / 'data' / 'fid_stats.npz'})" in out
    rows = (tiny_run / "res" / "fid.csv").read_text().split()
    assert rows[0] == "steps,n,fid,prompt_accuracy,open_attribute_tv,weights,reference,reference_n"
    assert rows[1].startswith("2,3,") and rows[1].endswith(",ema,real,8")
    assert np.isfinite(float(rows[1].split(",")[2])) and 0 <= float(rows[1].split(",")[3]) <= 1
    info = fidnet.load_stats(tiny_run / "data" / "fid_stats.npz")[2]
    assert info["n"] == 8 and info["inception"] == fidnet.inception_hash(fidnet.load_inception(tiny_run / "inception.pth"))
    from PIL import Image
    assert Image.open(tiny_run / "res" / "fid.png").size == (760, 3 * 320)  # three panels: FID, accuracy, TV


def test_cli_without_inception_weights_still_gives_accuracy(tiny_run, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tiny_run / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    run_script("fid.py", "--ckpt", tiny_run / "ckpt.pt", "--steps", 1, 4, "--n", 3, "--batch", 3,
            "--out", tiny_run / "res2")
    out = capsys.readouterr().out
    assert sum("FID skipped" in line for line in out.splitlines()) == 1 and "--inception" in out
    lines = out.splitlines()
    header = lines.index("steps  accuracy  open-attribute TV")
    assert [line.split()[0] for line in lines[header + 1:header + 3]] == ["1", "4"]
    assert all(line.split()[1].endswith("%") for line in lines[header + 1:header + 3])
    assert [r[:5] for r in (tiny_run / "res2" / "fid.csv").read_text().split()[1:]] == ["1,3,,", "4,3,,"]


def test_unconditional_train_sample_fid(tiny_run, capsys):
    """The paper's CelebA-HQ setting on toyfaces: train.py --unconditional -> sample.py without a prompt -> fid.py with
    the null caption and the online weights."""
    ckpt = tiny_run / "uncond" / "ckpt.pt"
    for script, *argv in [("train.py", "--data-dir", tiny_run / "data", "--out", tiny_run / "uncond", "--model",
                           "DiT-T/4", "--batch", 4, "--long-jump-rows", 1, "--max-steps", 3, "--sample-every", 3, "--unconditional"),
                          ("sample.py", "--ckpt", ckpt, "--steps", 1, 2, "--n", 2, "--out", tiny_run / "uncond")]:
        run_script(script, *argv)
    saved = torch.load(ckpt, weights_only=True)
    # adaLN-Zero: c gets a gradient from the third step on; the learned null caption is then all the text there is
    assert saved["args"]["unconditional"] and not torch.equal(saved["model"]["y_embedder.null"],
                                                              torch.zeros_like(saved["model"]["y_embedder.null"]))
    out = capsys.readouterr().out
    assert "wrote " + str(tiny_run / "uncond" / "unconditional_steps1-2_seed0.png") in out
    assert "'unconditional'   1 step : attribute reader finds a clean face in" in out

    with pytest.raises(SystemExit, match="is unconditional .* takes no --prompt"):
        run_script("sample.py", "--ckpt", ckpt, "--prompt", "a man")

    run_script("fid.py", "--ckpt", ckpt, "--steps", 1, "--n", 3, "--batch", 3, "--weights", "online",
            "--inception", tiny_run / "inception.pth", "--out", tiny_run / "res3")
    out = capsys.readouterr().out
    assert "N = 3 samples per row, unconditional" in out and "(online weights)" in out
    assert "steps       FID  is a face  open-attribute TV" in out
    assert (tiny_run / "res3" / "fid.csv").read_text().split()[1].endswith(",online,real,8")


def test_inception_runs_in_true_fp32_and_restores_tf32():
    """Inception's features are fp32 without TF32 whatever train.py switched on (a GPU's statistics then match a
    CPU's), and the flags come back after; statistics files say where they were made."""
    seen = []

    class Probe(torch.nn.Module):  # records the flags and the dtype its forward runs with
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                         torch.is_autocast_enabled("cpu")))
            return x.flatten(1) * self.w

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = fidnet.inception_features(torch.rand(2, 3, 4, 4), Probe())
    assert seen == [(False, False, False)] and feats.dtype == np.float64
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored (conftest resets)
    assert fidnet.made_on(Probe()) == {"device": "cpu", "precision": "fp32"}
