"""Tests of evaluations/: the ADM metrics against closed forms, the Inception port, the evaluate CLI.

Inception runs on a handful of images with random weights saved in torch-fidelity's release format
(the real file cannot be downloaded here); its outputs are compared with torch-fidelity's own network.
"""

import ctypes
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import scipy.linalg
import torch

from evaluations import evaluate as evaluate_cli
from evaluations.inception import (
    LOGITS_DIM,
    POOL_DIM,
    SPATIAL_DIM,
    WEIGHTS_FILENAME,
    find_inception_weights,
    load_inception,
)
from evaluations.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
    squared_distances,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Tiny ops on a shared 2-core CPU run fastest on one thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------


def test_frechet_distance_diagonal_covariances_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    var1, var2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    # Diagonal Gaussians: ||mu1 - mu2||^2 + sum_i (sqrt(v1_i) - sqrt(v2_i))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_commuting_covariances_closed_form():
    # Covariances sharing eigenvectors Q (dense, non-diagonal): the distance only sees eigenvalues.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    eig1, eig2 = rng.uniform(0.1, 4.0, 64), rng.uniform(0.1, 4.0, 64)
    mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
    for zeros in (0, 5):
        # Singular covariances work too, to sqrt(machine eps): rounding leaves ~1e-16 where an
        # eigenvalue is 0, and its square root ~1e-8 (scipy's sqrtm has the same limit).
        eig1[:zeros] = 0.0
        sigma1, sigma2 = (q * eig1) @ q.T, (q * eig2) @ q.T
        expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(eig1) - np.sqrt(eig2)) ** 2)
        rel = 1e-12 if zeros == 0 else 1e-8
        assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=rel)
        assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(expected, rel=rel)  # symmetric


def test_frechet_distance_of_identical_rank_deficient_statistics_is_zero():
    # 20 samples in 256-d: rank-19 covariance, like a small batch of Inception features.
    features = np.random.default_rng(2).normal(size=(20, 256)).astype(np.float32)
    mu, sigma = feature_statistics(features)
    # ADM's statistics: np.mean and np.cov (unbiased, float64 output).
    np.testing.assert_allclose(mu, features.mean(0), atol=1e-6)  # ADM: a float32 mean
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-12, atol=1e-14)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


@contextmanager
def single_threaded_openblas():
    """numpy's and scipy's OpenBLAS copies on one thread: their spinning threads slow sqrtm ~10x on a
    busy, small CPU (this test machine). Best effort: a build without these symbols is left as it is."""
    restore = []
    with open("/proc/self/maps") as maps:
        libraries = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
    for path in libraries:
        lib = ctypes.CDLL(path)
        for suffix in ("64_", ""):
            setter = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
            getter = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
            if setter is not None and getter is not None:
                restore.append((setter, getter()))
                setter(1)
                break
    try:
        yield
    finally:
        for setter, threads in restore:
            setter(threads)


def test_frechet_distance_matches_scipy_sqrtm_on_2048_dims():
    # ADM's formula (scipy sqrtm of sigma1 @ sigma2) on full-rank 2048-d statistics, to 1e-8 relative.
    rng = np.random.default_rng(3)
    a = rng.normal(size=(2600, 2048))
    b = 0.5 * a + rng.normal(size=(2600, 2048)) * rng.uniform(0.5, 1.5, 2048) + 0.1
    mu1, sigma1 = feature_statistics(a)
    mu2, sigma2 = feature_statistics(b)
    with single_threaded_openblas():
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    expected = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="covariances must be"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="mean vectors"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(4))


# ----------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------


def one_hot_logits(classes, num_classes=1008, gap=60.0):
    logits = np.zeros((len(classes), num_classes))
    logits[np.arange(len(classes)), classes] = gap  # p(other class) ~ e^-60: one-hot to 1e-20
    return logits


def test_inception_score_uniform_predictions_is_one():
    assert inception_score(np.full((40, 1008), 3.0)) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_balanced_one_hot_is_class_count():
    classes = np.repeat(np.arange(10), 7)
    assert inception_score(one_hot_logits(classes)) == pytest.approx(10.0, rel=1e-12)


def test_inception_score_two_class_closed_form():
    # p(y|x) = (a, 1-a) for half the samples and (1-a, a) for the rest: p(y) uniform, so
    # KL = log 2 - H(a) for every sample and IS = 2 exp(-H(a)).
    a = 0.8
    row = np.log([a, 1 - a])
    logits = np.concatenate([np.tile(row, (6, 1)), np.tile(row[::-1], (6, 1))])
    entropy = -(a * np.log(a) + (1 - a) * np.log(1 - a))
    assert inception_score(logits) == pytest.approx(2 * np.exp(-entropy), rel=1e-12)


def test_inception_score_splits_in_order_and_keeps_the_short_last_split():
    # Splits of 5: [class 0 x5] -> 1, [classes 0..4] -> 5, [classes 0, 1] -> 2; ADM reports the mean 8/3.
    classes = [0] * 5 + [0, 1, 2, 3, 4] + [0, 1]
    assert inception_score(one_hot_logits(classes), split_size=5) == pytest.approx(8 / 3, rel=1e-12)
    # One split over everything (ADM's 5000 on 12 samples) sees the pooled marginal instead.
    p_y = np.bincount(classes, minlength=5) / 12
    expected_single = np.exp(np.mean(-np.log(p_y[classes])))
    assert inception_score(one_hot_logits(classes)) == pytest.approx(expected_single, rel=1e-12)


def test_inception_score_matches_direct_softmax_formula():
    logits = np.random.default_rng(4).normal(scale=3.0, size=(30, 1008))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in (p[0:7], p[7:14], p[14:21], p[21:28], p[28:30]):
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    assert inception_score(logits, split_size=7) == pytest.approx(np.mean(scores), rel=1e-10)


# ----------------------------------------------------------------------------------------------------
# Precision and recall
# ----------------------------------------------------------------------------------------------------


def constructed_sets():
    # Integer coordinates (exact in float16, so both distance modes agree). Real: x = 0, 2, ..., 18 on
    # a line; fake: x = 8..11 on that line and the same four points 20 units off it.
    real = np.zeros((10, 8), np.float32)
    real[:, 0] = np.arange(0, 20, 2)
    fake = np.zeros((8, 8), np.float32)
    fake[:, 0] = [8, 9, 10, 11, 8, 9, 10, 11]
    fake[4:, 1] = 20
    return real, fake


@pytest.mark.parametrize("half", [True, False])
@pytest.mark.parametrize("block_size", [10000, 3])
def test_precision_recall_constructed_sets(half, block_size):
    real, fake = constructed_sets()
    # k=3: real radii 4 (6 at the two ends); fake radii 3, 2, 2, 3. The four on-line fakes lie inside the
    # real manifold, the off-line ones do not: precision 1/2. The fake balls cover [5, 14], holding
    # real x = 6, 8, 10, 12 and 14 (14 exactly on the radius of 11: "<=" counts it): recall 5/10.
    assert precision_recall(real, fake, k=3, half=half, block_size=block_size) == (0.5, 0.5)
    # k=1: all real radii 2, fake radii 1; fake balls cover [7, 12]: real 8, 10, 12 -> recall 3/10.
    assert precision_recall(real, fake, k=1, half=half, block_size=block_size) == (0.5, 0.3)


@pytest.mark.parametrize("half", [True, False])
def test_precision_recall_matches_brute_force(half):
    rng = np.random.default_rng(5)
    real = rng.normal(size=(60, 32)).astype(np.float32)
    fake = (rng.normal(size=(45, 32)) + 0.6).astype(np.float32)
    k = 3

    def distances(a, b):
        return squared_distances(torch.from_numpy(a), torch.from_numpy(b), half=half).numpy()

    # The whole (N, N) matrices at once, sorted rows, ADM's column k (column 0 is the point itself).
    d_real, d_fake, d_cross = distances(real, real), distances(fake, fake), distances(real, fake)
    r_real, r_fake = np.sort(d_real, 1)[:, k], np.sort(d_fake, 1)[:, k]
    precision = (d_cross <= r_real[:, None]).any(0).mean()
    recall = (d_cross <= r_fake[None, :]).any(1).mean()
    assert 0.1 < precision < 0.9 and 0.1 < recall < 0.9  # a non-trivial case
    for block_size in (7, 1000):
        assert precision_recall(real, fake, k=k, block_size=block_size, half=half) == (precision, recall)


def test_half_distances_round_like_adm_float16_graph():
    # Multiples of 1/16 in [-4, 4] with D=64: float32 sums are exact in any order, so the float16
    # rounding points are fixed and numpy's float16 arithmetic is an independent reference.
    rng = np.random.default_rng(6)
    u = (rng.integers(-64, 64, size=(9, 64)) / 16).astype(np.float32)
    v = (rng.integers(-64, 64, size=(11, 64)) / 16).astype(np.float32)
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    norm_u = (u16 * u16).astype(np.float32).sum(1).astype(np.float16)
    norm_v = (v16 * v16).astype(np.float32).sum(1).astype(np.float16)
    dot = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    expected = np.maximum(norm_u[:, None] - np.float16(2) * dot + norm_v[None, :], np.float16(0))
    half = squared_distances(torch.from_numpy(u), torch.from_numpy(v), half=True).numpy()
    exact = squared_distances(torch.from_numpy(u), torch.from_numpy(v), half=False).numpy()
    np.testing.assert_array_equal(half, expected.astype(np.float32))
    assert not np.array_equal(half, exact)  # float16 rounding really happens
    np.testing.assert_allclose(exact, ((u[:, None] - v[None]) ** 2).sum(-1), rtol=1e-6)
    # Norms beyond float16's range (65504) fall back to float32, as ADM's tf.cond does.
    big = torch.full((2, 64), 40.0)
    big[1] += 1.0
    assert squared_distances(big[:1], big[1:], half=True).item() == pytest.approx(64.0, rel=1e-6)


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="k=3 needs more than 3"):
        precision_recall(np.zeros((3, 4)), np.ones((10, 4)))


# ----------------------------------------------------------------------------------------------------
# Inception port and its weights
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception(random_inception_weights):
    with pytest.warns(UserWarning, match="NOT torch-fidelity's release file"):
        return load_inception(random_inception_weights)


def test_inception_returns_every_feature_like_torch_fidelity(inception, random_inception_weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    tapped = {}
    hook = inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: tapped.update(out=o))
    try:
        features = inception(images)
    finally:
        hook.remove()
    assert features.pool.shape == (2, POOL_DIM) and features.logits.shape == (2, LOGITS_DIM)
    assert features.spatial.shape == (2, SPATIAL_DIM) == (2, 7 * 17 * 17)
    # sFID: TF's mixed_6/conv (Mixed_6d's 1x1 branch, 192 x 17 x 17), first 7 channels, NHWC order.
    assert tapped["out"].shape == (2, 192, 17, 17)
    nhwc = features.spatial.reshape(2, 17, 17, 7)
    torch.testing.assert_close(nhwc, tapped["out"][:, :7].permute(0, 2, 3, 1), rtol=0, atol=0)
    assert features.pool.abs().sum() > 0 and features.spatial.abs().sum() > 0
    # pool_3 and the bias-free logits equal torch-fidelity's "2048" and "logits_unbiased" outputs.
    reference = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(random_inception_weights)
    )
    pool, logits = reference(images)
    torch.testing.assert_close(features.pool, pool, rtol=0, atol=0)
    torch.testing.assert_close(features.logits, logits, rtol=0, atol=0)
    assert not torch.allclose(features.logits, features.pool @ inception.fc.weight.T + inception.fc.bias)
    with pytest.raises(ValueError, match="uint8 images"):
        inception(images.float())


def test_missing_weights_error_names_file_and_flag(tmp_path, monkeypatch):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(FileNotFoundError, match=WEIGHTS_FILENAME) as err:
            find_inception_weights(None, allow_download=False)
        assert "--inception-weights" in str(err.value) and str(tmp_path / "hub") in str(err.value)

        def offline(destination):
            raise OSError("network unreachable")

        monkeypatch.setattr("evaluations.inception._download_weights", offline)
        with pytest.raises(FileNotFoundError, match="download failed: network unreachable"):
            load_inception(None, allow_download=True)
    finally:
        torch.hub.set_dir(previous)
    with pytest.raises(FileNotFoundError, match="--inception-weights .*nowhere.pth: no such file"):
        load_inception(tmp_path / "nowhere.pth")


def test_weights_with_wrong_keys_are_refused(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(LOGITS_DIM, POOL_DIM)}, path)
    with pytest.raises(RuntimeError, match="not an Inception state_dict"):
        load_inception(path)


# ----------------------------------------------------------------------------------------------------
# Reading ADM batches and the evaluate CLI
# ----------------------------------------------------------------------------------------------------


def test_open_images_streams_plain_compressed_and_fortran_arrays(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", arr_0=images)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    np.savez(tmp_path / "fortran.npz", arr_0=np.asfortranarray(images))
    for name in ("plain", "compressed", "fortran"):
        with evaluate_cli.open_images(tmp_path / f"{name}.npz") as reader:
            batches = list(reader.batches(3))
        assert [len(b) for b in batches] == [3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(batches), images)
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8 images"):
        with evaluate_cli.open_images(tmp_path / "float.npz"):
            pass


@pytest.fixture(scope="module")
def batches(tmp_path_factory, inception):
    """Tiny reference and sample batches (4 images each, the fewest k=3 allows) and their features."""
    folder = tmp_path_factory.mktemp("batches")
    rng = np.random.default_rng(8)
    ref_images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    # Samples: brighter images, so that their statistics differ from the reference's.
    sample_images = np.clip(rng.integers(0, 256, (4, 32, 32, 3)) + 60, 0, 255).astype(np.uint8)
    np.savez(folder / "ref.npz", arr_0=ref_images)
    np.savez(folder / "samples.npz", arr_0=sample_images, arr_1=np.arange(4))
    features = {
        name: inception(torch.from_numpy(images).permute(0, 3, 1, 2))
        for name, images in (("ref", ref_images), ("samples", sample_images))
    }
    return folder, features


def test_evaluate_cli_end_to_end(batches, inception, random_inception_weights, capsys, monkeypatch):
    folder, features = batches
    ref, samples = features["ref"], features["samples"]
    argv = [str(folder / "ref.npz"), str(folder / "samples.npz"), "--json", str(folder / "metrics.json")]
    argv += [
        "--inception-weights",
        str(random_inception_weights),
        "--no-download",
        "--device",
        "cpu",
        "--batch-size",
        "3",
    ]
    calls = []  # (statistics, distance) of each Fréchet distance the CLI computes

    def recorded_frechet_distance(*stats):
        calls.append((stats, frechet_distance(*stats)))
        return calls[-1][1]

    monkeypatch.setattr(evaluate_cli, "frechet_distance", recorded_frechet_distance)
    with pytest.warns(UserWarning, match="NOT torch-fidelity's release file"):
        evaluate_cli.main(argv)
    output = capsys.readouterr().out
    results = json.loads((folder / "metrics.json").read_text())
    # The JSON holds what the metric functions give on the network's features directly: FID and sFID
    # of the statistics of the samples' and the reference's features (pool_3, then mixed_6/conv).
    (fid_stats, fid), (sfid_stats, sfid) = calls
    expected = [
        *feature_statistics(samples.pool.numpy()),
        *feature_statistics(ref.pool.numpy()),
        *feature_statistics(samples.spatial.numpy()),
        *feature_statistics(ref.spatial.numpy()),
    ]
    for got, want in zip(fid_stats + sfid_stats, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    precision, recall = precision_recall(ref.pool.numpy(), samples.pool.numpy())
    assert results["fid"] == fid > 0 and results["sfid"] == sfid > 0
    assert results["inception_score"] == pytest.approx(inception_score(samples.logits.numpy()), rel=1e-6)
    assert (results["precision"], results["recall"]) == (precision, recall)
    assert results["official_inception_weights"] is False and results["num_samples"] == 4
    # ADM's printed lines, in its order, then the loud note about the weights.
    lines = [line for line in output.splitlines() if ":" in line]
    labels = ["Inception Score", "FID", "sFID", "Precision", "Recall", "Sampling protocol", "WARNING"]
    assert [line.split(":")[0] for line in lines[-7:]] == labels
    assert "Sampling protocol: unknown" in output  # a batch not made by sample_ddp.py: said, not guessed
    assert f"FID: {results['fid']}" in output
    # The reference statistics were cached next to the reference and are read back on the next run.
    cache = evaluate_cli.reference_cache_path(folder / "ref.npz", inception.weights_sha256)
    assert cache.is_file()
    cached = evaluate_cli.reference_summary(inception, folder / "ref.npz", 3, torch.device("cpu"))
    assert "read reference statistics from cache" in capsys.readouterr().out
    np.testing.assert_array_equal(cached["pool"], ref.pool.numpy())
    np.testing.assert_allclose(cached["sigma_s"], feature_statistics(ref.spatial.numpy())[1], rtol=1e-6)
    # A cache of other weights is a different file; a changed reference file makes it stale.
    assert evaluate_cli.reference_cache_path(folder / "ref.npz", "0" * 64) != cache
    os.utime(folder / "ref.npz", ns=(0, 0))
    assert evaluate_cli._read_cache(cache, folder / "ref.npz", inception.weights_sha256) is None


def test_precomputed_reference_statistics_take_precedence(batches, inception, monkeypatch):
    folder, features = batches
    mu, sigma = feature_statistics(features["samples"].pool.numpy())
    mu_s, sigma_s = feature_statistics(features["samples"].spatial.numpy())
    ref_mu, ref_sigma, ref_mu_s, ref_sigma_s = mu + 1.0, sigma * 2.0, mu_s - 1.0, sigma_s * 3.0
    # Which statistics reach the Fréchet distance is the question here: record them (the distance
    # itself is tested above and end to end), skipping four 2048-d eigendecompositions.
    calls = []
    monkeypatch.setattr(evaluate_cli, "frechet_distance", lambda *stats: calls.append(stats) or 0.0)

    def assert_compared(reference_fid, reference_sfid):
        (s_mu, s_sigma, r_mu, r_sigma), (s_mu_s, s_sigma_s, r_mu_s, r_sigma_s) = calls[-2:]
        np.testing.assert_allclose(s_mu, mu, rtol=1e-6)  # samples first, as ADM
        np.testing.assert_allclose(s_sigma_s, sigma_s, rtol=1e-6)
        np.testing.assert_array_equal(r_mu, reference_fid[0])
        np.testing.assert_array_equal(r_sigma, reference_fid[1])
        np.testing.assert_array_equal(r_mu_s, reference_sfid[0])
        np.testing.assert_array_equal(r_sigma_s, reference_sfid[1])

    # Images and statistics: ADM uses the stored statistics for FID/sFID and the images for P/R.
    with np.load(folder / "ref.npz") as npz:
        ref_images = npz["arr_0"]
    np.savez(folder / "both.npz", arr_0=ref_images, mu=ref_mu, sigma=ref_sigma, mu_s=ref_mu_s, sigma_s=ref_sigma_s)
    both = evaluate_cli.evaluate(folder / "both.npz", folder / "samples.npz", inception, use_cache=False)
    assert_compared((ref_mu, ref_sigma), (ref_mu_s, ref_sigma_s))
    assert both["precision"] is not None and both["reference_statistics"].startswith("FID stats from file")
    # Images only: statistics of the images (here the fixture's reference features).
    evaluate_cli.evaluate(folder / "ref.npz", folder / "samples.npz", inception, use_cache=False)
    ref_stats = feature_statistics(features["ref"].pool.numpy())
    np.testing.assert_allclose(calls[-2][2], ref_stats[0], rtol=1e-6)
    # Statistics only: FID and sFID, no precision/recall.
    np.savez(folder / "stats.npz", mu=ref_mu, sigma=ref_sigma, mu_s=ref_mu_s, sigma_s=ref_sigma_s)
    with pytest.warns(UserWarning, match="precision and recall are not computed"):
        stats_only = evaluate_cli.evaluate(folder / "stats.npz", folder / "samples.npz", inception)
    assert_compared((ref_mu, ref_sigma), (ref_mu_s, ref_sigma_s))
    assert stats_only["precision"] is None and "n/a" in evaluate_cli.format_metrics(stats_only)


def test_unreadable_batches_are_named(batches, inception, tmp_path):
    folder, _ = batches
    ref, samples = folder / "ref.npz", folder / "samples.npz"
    np.savez(tmp_path / "object_stats.npz", mu=np.array([None] * 3, dtype=object), sigma=np.eye(3))
    np.savez(tmp_path / "object_images.npz", arr_0=np.array([None] * 4, dtype=object))
    (tmp_path / "not_a_zip.npz").write_bytes(b"\x93NUMPY garbage")
    (tmp_path / "truncated.npz").write_bytes(samples.read_bytes()[:-300])
    cases = {  # (reference, samples) -> the file the error must name
        (tmp_path / "object_stats.npz", samples): tmp_path / "object_stats.npz",
        (tmp_path / "not_a_zip.npz", samples): tmp_path / "not_a_zip.npz",
        (ref, tmp_path / "object_images.npz"): tmp_path / "object_images.npz",
        (ref, tmp_path / "truncated.npz"): tmp_path / "truncated.npz",
    }
    for (ref_path, sample_path), culprit in cases.items():
        with pytest.raises(ValueError, match=re.escape(str(culprit))):
            evaluate_cli.evaluate(ref_path, sample_path, inception, use_cache=False)


def test_cli_without_weights_exits_with_a_clear_error(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "evaluations.evaluate", str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz")]
    result = subprocess.run(command + ["--no-download"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert WEIGHTS_FILENAME in result.stderr and "--inception-weights PATH" in result.stderr


def test_pytorch_fid_statistics_are_refused_unless_the_mix_is_asked_for(batches, inception, monkeypatch, tmp_path):
    # U-ViT's / pytorch-fid's statistics (mu, sigma only) come from another Inception port than the ADM one that
    # computes the samples' side: a FID across the two belongs to neither pipeline.
    folder, features = batches
    mu, sigma = feature_statistics(features["ref"].pool.numpy())
    np.savez(tmp_path / "fid_stats.npz", mu=mu, sigma=sigma)
    monkeypatch.setattr(evaluate_cli, "frechet_distance", lambda *stats: 1.0)
    with pytest.raises(
        ValueError, match=re.escape(f"{tmp_path / 'fid_stats.npz'} holds only 'mu' and 'sigma'")
    ) as info:
        evaluate_cli.evaluate(tmp_path / "fid_stats.npz", folder / "samples.npz", inception)
    assert "--allow-pipeline-mix" in str(info.value) and "coco-reference" in str(info.value)
    with pytest.warns(UserWarning, match="mixed pipeline"):
        mixed = evaluate_cli.evaluate(
            tmp_path / "fid_stats.npz", folder / "samples.npz", inception, allow_pipeline_mix=True
        )
    assert mixed["pipeline"].startswith("mixed: ") and "Pipeline: mixed" in evaluate_cli.format_metrics(mixed)
    assert evaluate_cli.statistics_pipeline(folder / "ref.npz") is None  # images: computed here, ADM's pipeline
    results = evaluate_cli.evaluate(folder / "ref.npz", folder / "samples.npz", inception, use_cache=False)
    assert results["pipeline"] == "adm" and "Pipeline" not in evaluate_cli.format_metrics(results)
    # The CLI: refused before any Inception pass, with the file named; the flag passes it through.
    argv = [str(tmp_path / "fid_stats.npz"), str(folder / "samples.npz"), "--inception-weights", "unused.pth"]
    monkeypatch.setattr(evaluate_cli, "load_inception", lambda *args, **kwargs: inception)
    with pytest.raises(ValueError, match="fid_stats.npz holds only"):
        evaluate_cli.main(argv)
    with pytest.warns(UserWarning, match="mixed pipeline"):
        assert evaluate_cli.main([*argv, "--allow-pipeline-mix"])["pipeline"].startswith("mixed")
