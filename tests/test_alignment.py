"""evaluations/alignment.py and analysis/alignment.py: CKNNA against a loop-by-loop restatement of its definition,
mutual k-NN on constructed neighbourhoods, the linear probe, feature extraction against a hand-run forward,
and the CLI end to end on tiny checkpoints and demo data."""

import json
import math

import pytest
import torch

from analysis import alignment
from checkpoints import save_checkpoint
from evaluations import alignment as measures
from evaluations.alignment import cknna, extract_features, linear_probe, mutual_knn, split_indices
from loss import Interpolant
from models.dit import DiT_models
from models.sit import SiT_models

# Tiny ops on a shared 2-core CPU run fastest on one thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


#################################################################################
#            CKNNA restated from its definition, with plain Python loops        #
#################################################################################


def cknna_by_loops(feats_a, feats_b, topk):
    """Huh et al.'s CKNNA straight from the definition: no tensors, no vectorisation, no shared helpers."""
    A, B = feats_a.tolist(), feats_b.tolist()
    n = len(A)

    def unit(rows):
        return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]

    def kernel(rows):
        return [[sum(x * y for x, y in zip(rows[i], rows[j])) for j in range(n)] for i in range(n)]

    def neighbours(K, i):  # the topk j != i with the largest K[i][j]
        return set(sorted((j for j in range(n) if j != i), key=lambda j: -K[i][j])[:topk])

    def hsic(K, L):  # Song et al. 2012, Eq. 5, diagonals set to zero
        Kt = [[0.0 if i == j else K[i][j] for j in range(n)] for i in range(n)]
        Lt = [[0.0 if i == j else L[i][j] for j in range(n)] for i in range(n)]
        trace = sum(Kt[i][j] * Lt[j][i] for i in range(n) for j in range(n))
        sum_k = sum(sum(row) for row in Kt)
        sum_l = sum(sum(row) for row in Lt)
        one_kl_one = sum(Kt[i][j] * Lt[j][l] for i in range(n) for j in range(n) for l in range(n))
        return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 * one_kl_one / (n - 2)) / (n * (n - 3))

    def masked(K, keep):
        return [[K[i][j] if keep(i, j) else 0.0 for j in range(n)] for i in range(n)]

    K, L = kernel(unit(A)), kernel(unit(B))
    nn_k = [neighbours(K, i) for i in range(n)]
    nn_l = [neighbours(L, i) for i in range(n)]
    both = lambda i, j: j in nn_k[i] and j in nn_l[i]
    hsic_kl = hsic(masked(K, both), masked(L, both))
    hsic_kk = hsic(masked(K, lambda i, j: j in nn_k[i]), masked(K, lambda i, j: j in nn_k[i]))
    hsic_ll = hsic(masked(L, lambda i, j: j in nn_l[i]), masked(L, lambda i, j: j in nn_l[i]))
    return hsic_kl / math.sqrt(hsic_kk * hsic_ll)


@pytest.mark.parametrize("noise, topk", [(0.3, 5), (1.0, 8), (None, 4)])
def test_cknna_matches_the_definition_written_as_loops(noise, topk):
    a = randn(30, 7, seed=1)
    # Correlated pairs share many neighbours; independent ones (noise None) only a few.
    b = randn(30, 5, seed=2) if noise is None else a[:, :5] * 2 + noise * randn(30, 5, seed=3)
    assert cknna(a, b, topk) == pytest.approx(cknna_by_loops(a, b, topk), abs=1e-6)


def test_neighbours_in_chunks_are_the_brute_force_ones():
    unit = torch.nn.functional.normalize(randn(30, 6, seed=17), dim=1)
    kernel = (unit @ unit.T).fill_diagonal_(-2.0)
    expected = kernel.argsort(dim=1, descending=True)[:, :4]
    for chunk in (7, 30, 1000):  # several chunks, one exact chunk, one larger than N
        indices, values = measures.nearest_neighbours(unit, 4, chunk=chunk)
        assert torch.equal(indices, expected)
        torch.testing.assert_close(values, kernel.gather(1, expected))


def test_cknna_closed_form_cases():
    a, b = randn(200, 32, seed=4), randn(200, 16, seed=5)
    correlated = a[:, :16] + 0.7 * b
    assert cknna(a, a) == pytest.approx(1.0, abs=1e-12)
    # Invariant to rotations of either space and to any positive scale of each row (rows are normalised).
    rotation, _ = torch.linalg.qr(randn(32, 32, seed=6))
    row_scales = randn(200, 1, seed=7).abs() + 0.1
    reference = cknna(a, correlated)
    assert 0.2 < reference < 0.9
    assert cknna(a @ rotation, correlated) == pytest.approx(reference, abs=1e-9)
    assert cknna(5.0 * row_scales * a, 0.01 * correlated) == pytest.approx(reference, abs=1e-9)
    assert cknna(a @ rotation, a) == pytest.approx(1.0, abs=1e-9)
    # Independent features: near 0 (the chance level falls like k / N).
    assert abs(cknna(randn(500, 64, seed=8), randn(500, 48, seed=9))) < 0.05
    # float32 inputs on the way in give the same number (computed in float64).
    assert cknna(a.float(), correlated.float()) == pytest.approx(reference, abs=1e-5)


def test_cknna_and_mutual_knn_refuse_bad_shapes_and_k():
    a = randn(10, 3)
    with pytest.raises(ValueError, match="topk must lie in 1..N-1 = 9"):
        cknna(a, a, topk=10)
    with pytest.raises(ValueError, match="paired rows, got 10 and 9"):
        cknna(a, randn(9, 3))
    with pytest.raises(ValueError, match=r"\(N, D\) features"):
        mutual_knn(a[None], a[None])


def test_outlier_clamp_is_the_mean_per_row_quantile():
    rows = torch.arange(1.0, 21.0).repeat(2, 1)
    rows[1, -1] = 1000.0  # one massive activation
    clamped = measures.clamp_outliers(rows, quantile=0.95)  # rank 19 of 20 in each row: 19 and 19
    assert clamped.max() == 19.0 and torch.equal(clamped[:, :19], rows[:, :19])


def two_clusters(members):
    """8 unit-ish vectors: items in members[0] near e1, the others near e2, each at its own small offset."""
    feats = torch.zeros(8, 10, dtype=torch.float64)
    for cluster, items in enumerate(members):
        for rank, item in enumerate(items):
            feats[item, cluster] = 1.0
            feats[item, 2 + item] = 0.05 * (rank + 1)  # distinct, small: neighbours stay inside the cluster
    return feats


def test_mutual_knn_on_constructed_neighbourhoods():
    a = two_clusters([(0, 1, 2, 3), (4, 5, 6, 7)])
    # With k = 3 every item's neighbours are exactly the rest of its cluster.
    assert mutual_knn(a, a, topk=3) == 1.0
    assert mutual_knn(a, two_clusters([(4, 5, 6, 7), (0, 1, 2, 3)]), topk=3) == 1.0  # same partition, relabelled
    # Clusters {0,1,4,5} / {2,3,6,7}: item 0 keeps 1 of its 3 neighbours ({1,2,3} vs {1,4,5}), as does every item.
    assert mutual_knn(a, two_clusters([(0, 1, 4, 5), (2, 3, 6, 7)]), topk=3) == pytest.approx(1 / 3)
    # Rotation and scale do not move neighbours.
    rotation, _ = torch.linalg.qr(randn(10, 10, seed=10))
    assert mutual_knn(a, 3.0 * a @ rotation, topk=3) == 1.0


#################################################################################
#                                 Linear probe                                  #
#################################################################################


def test_probe_separates_a_separable_problem_and_is_at_chance_on_random_labels():
    train, test = split_indices(400, test_fraction=0.25, seed=0)
    assert len(test) == 100 and not set(train) & set(test)
    labels = torch.arange(400) % 4
    centres = 4.0 * randn(4, 20, seed=11)
    feats = centres[labels] + randn(400, 20, seed=12)
    accuracy = linear_probe(feats[train], labels[train], feats[test], labels[test])
    assert accuracy == 1.0
    random_labels = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(13))
    noise = randn(400, 50, seed=14)
    chance = linear_probe(noise[train], random_labels[train], noise[test], random_labels[test])
    assert 0.1 < chance < 0.4  # chance is 0.25
    # Deterministic: the same inputs give the same accuracy.
    assert linear_probe(noise[train], random_labels[train], noise[test], random_labels[test]) == chance


#################################################################################
#                              Feature extraction                               #
#################################################################################


def tiny_model(kind):
    """A tiny SiT or DiT with every weight random (zero-initialised adaLN would make each block the identity)."""
    torch.manual_seed(0)
    in_channels = 4 if kind == "sit-latent" else 3
    registry, name = (DiT_models, "DiT-S/8") if kind == "dit" else (SiT_models, "SiT-S/8")
    model = registry[name](
        input_size=16, in_channels=in_channels, num_classes=5, depth=3, hidden_size=32, num_heads=2, z_dims=[]
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


SETTINGS = {
    "sit-pixel": {"pixel_space": True, "path_type": "linear"},
    "sit-latent": {"pixel_space": False, "path_type": "cosine", "latent_scale": 0.5, "latent_bias": 0.1},
    "dit": {"pixel_space": True},
}


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_features_are_the_pooled_hidden_state_after_each_block(kind):
    model, settings = tiny_model(kind), SETTINGS[kind]
    channels = 8 if kind == "sit-latent" else 3  # latent runs: posterior mean || std
    x = randn(4, channels, 16, 16, seed=15).float()
    if kind == "sit-latent":
        x[:, 4:] = x[:, 4:].abs()  # std > 0
    indices, t = [3, 17, 4, 9], 0.7
    feats = extract_features(model, settings, x, layers=[2, 1], t=t, seed=5, indices=indices)
    assert sorted(feats) == [1, 2] and feats[1].shape == (4, 32)

    # The same by hand: item i's noise from (seed, i); the model input as training makes it; null label.
    eps = [torch.randn((2, model.in_channels, 16, 16), generator=torch.Generator().manual_seed(5 * 1_000_003 + i)) for i in indices]  # fmt: skip
    posterior_eps, noise = torch.stack(eps, dim=1)
    if kind == "sit-latent":
        x0 = (x[:, :4] + x[:, 4:] * posterior_eps) * 0.5 + 0.1
    else:
        x0 = x
    if kind == "dit":
        step = torch.full((4,), 700)  # round(1000 t)
        abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[700]
        x_t, time = (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).float(), step
    else:
        x_t = Interpolant(settings["path_type"]).interpolate(x0, noise, torch.tensor(t))[0]
        time = torch.full((4,), t)
    with torch.no_grad():
        h = model.x_embedder(x_t) + model.pos_embed
        c = model.t_embedder(time) + model.y_embedder(torch.full((4,), 5), False)  # 5 = the null class
        for layer, block in enumerate(model.blocks[:2], start=1):
            h = block(h, c)
            torch.testing.assert_close(feats[layer], h.mean(dim=1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(feats[1], feats[2])  # the blocks do something: the test can see a wrong layer


def test_features_do_not_depend_on_the_batch_and_differ_with_t_and_labels():
    model, settings = tiny_model("sit-pixel"), SETTINGS["sit-pixel"]
    x = randn(6, 3, 16, 16, seed=16).float()
    whole = extract_features(model, settings, x, t=0.5, seed=1)
    assert sorted(whole) == [1, 2, 3]
    halves = [extract_features(model, settings, x[s], t=0.5, seed=1, indices=range(6)[s]) for s in (slice(0, 2), slice(2, 6))]  # fmt: skip
    torch.testing.assert_close(torch.cat([h[3] for h in halves]), whole[3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(extract_features(model, settings, x, t=0.9, seed=1)[3], whole[3])
    conditional = extract_features(model, settings, x, labels=torch.arange(6) % 5, t=0.5, seed=1)
    assert not torch.allclose(conditional[3], whole[3])
    with pytest.raises(ValueError, match="layers must lie in 1..3"):
        extract_features(model, settings, x, layers=[4])
    with pytest.raises(ValueError, match="model expects"):
        extract_features(model, settings, randn(2, 3, 8, 8).float())


def test_reg_features_noise_the_class_token_and_pool_the_patches_alone():
    torch.manual_seed(0)
    model = SiT_models["SiT-S/8"](
        input_size=16, in_channels=3, num_classes=5, depth=2, hidden_size=32, num_heads=2, z_dims=[], cls_token_dim=6
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.eval()
    settings, x, t = SETTINGS["sit-pixel"], randn(3, 3, 16, 16, seed=17).float(), 0.6
    cls = randn(3, 6, seed=18).float()
    feats = extract_features(model, settings, x, layers=[2], t=t, seed=2, cls_token=cls)

    # By hand: the image as for any SiT; the class token noised to t with noise from (seed + 1, item).
    noise = torch.stack([torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(2 * 1_000_003 + i)) for i in range(3)], 1)[1]  # fmt: skip
    cls_noise = torch.stack([torch.randn(6, generator=torch.Generator().manual_seed(3 * 1_000_003 + i)) for i in range(3)])  # fmt: skip
    interpolant = Interpolant("linear")
    x_t, cls_t = interpolant.interpolate(x, noise, torch.tensor(t))[0], interpolant.interpolate(cls, cls_noise, torch.tensor(t))[0]  # fmt: skip
    with torch.no_grad():
        h = (
            torch.cat([model.wg_norm(model.cls_projectors2(cls_t)).unsqueeze(1), model.x_embedder(x_t)], 1)
            + model.pos_embed
        )
        c = model.t_embedder(torch.full((3,), t)) + model.y_embedder(torch.full((3,), 5), False)
        for block in model.blocks:
            h = block(h, c)
    torch.testing.assert_close(feats[2], h[:, 1:].mean(dim=1), atol=1e-5, rtol=1e-5)  # patches only
    with pytest.raises(ValueError, match="pass cls_token of shape"):
        extract_features(model, settings, x, layers=[2])
    with pytest.raises(ValueError, match="for REG models"):
        extract_features(tiny_model("sit-pixel"), settings, x, layers=[1], cls_token=cls)


#################################################################################
#                               CLI end to end                                  #
#################################################################################


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from demo import data as make_demo_data

    out = tmp_path_factory.mktemp("data") / "demo"
    make_demo_data.main(["--out", str(out), "--per-class", "6", "--num-classes", "4", "--resolution", "32"])
    return out


def tiny_run_checkpoint(path, step, seed, **reg):
    """A checkpoint as train.py writes it (pixel space, 32 px, SiT-S/8 with 3 blocks), random weights.
    reg: cls_token_dim=D for a REG model."""
    kwargs = dict(depth=3, hidden_size=32, num_heads=2, input_size=32, in_channels=3, num_classes=4)
    kwargs |= dict(class_dropout_prob=0.1, z_dims=[384], encoder_depth=2, projector_dim=32, **reg)
    torch.manual_seed(seed)
    model = SiT_models["SiT-S/8"](**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    config = {"model": "SiT-S/8", "pixel_space": True, "path_type": "linear", "enc_type": "dinov2-vit-s"}
    state = model.state_dict()
    save_checkpoint({"model": state, "ema": state, "steps": step, "config": config, "model_kwargs": kwargs}, path)


def test_cli_writes_results_and_plots(demo_data, tmp_path):
    ckpts = [tmp_path / "0000200.pt", tmp_path / "0000100.pt"]
    tiny_run_checkpoint(ckpts[0], 200, seed=1)
    tiny_run_checkpoint(ckpts[1], 100, seed=2)
    out = tmp_path / "analysis"
    argv = ["--ckpt", *map(str, ckpts), "--data-dir", str(demo_data), "--enc-weights", "random", "--out", str(out)]
    argv += ["--t", "0.25", "0.75", "--num-images", "20", "--topk", "4", "--batch-size", "8", "--num-workers", "0"]
    argv += ["--layers", "3", "1", "2", "--outlier-quantile", "0.95"]
    with pytest.warns(UserWarning, match="RANDOM ENCODER WEIGHTS"):
        alignment.main(argv)

    report = json.loads((out / "results.json").read_text())
    protocol = report["protocol"]
    assert protocol["enc_type"] == "dinov2-vit-s" and protocol["enc_resolution"] == 64  # 16 x the 4x4 token grid
    assert protocol["outlier_quantile"] == 0.95 and protocol["labels"] == "null"
    assert protocol["num_images"] == 20 and protocol["probe"] == {
        "train_images": 16, "test_images": 4, "weight_decay": 1e-4, "max_iter": 100,
    }  # fmt: skip
    assert 0 <= report["encoder"]["probe_accuracy"] <= 1
    assert [c["step"] for c in report["checkpoints"]] == [100, 200]  # sorted by step
    for ckpt in report["checkpoints"]:
        assert ckpt["layers"] == [1, 2, 3] and ckpt["encoder_depth"] == 2 and ckpt["weights"] == "ema"
        assert sorted(ckpt["by_t"]) == ["0.25", "0.75"]
        for values in ckpt["by_t"].values():
            assert all(-1 <= v <= 1 for v in values["cknna"]) and len(values["cknna"]) == 3
            assert all(0 <= v <= 1 for v in values["mutual_knn"] + values["probe_accuracy"])
    assert report["checkpoints"][0]["by_t"]["0.25"] != report["checkpoints"][1]["by_t"]["0.25"]
    for plot in ("alignment_vs_layer.png", "alignment_vs_step.png"):
        assert (out / plot).stat().st_size > 0


def test_cli_gives_reg_checkpoints_the_encoders_class_tokens(demo_data, tmp_path, monkeypatch):
    # A REG model denoises the encoder's class token with the image: the CLI passes the class tokens of the
    # same clean images (the encoder's normalised token 0) beside their patch-token features.
    ckpt = tmp_path / "0000100.pt"
    tiny_run_checkpoint(ckpt, 100, seed=3, cls_token_dim=384)
    encoded, passed = [], []
    original_encoder_features, original_extract = measures.encoder_features, measures.extract_features

    def spy_encoder_features(encoder, images, class_token=False):
        tokens = encoder.encode(images, class_token=True).float()
        result = original_encoder_features(encoder, images, class_token)
        torch.testing.assert_close(result[0], tokens[:, 1:].mean(1))  # the patches alone, pooled
        encoded.append(result[1])
        return result

    def spy_extract(*args, **kwargs):
        passed.append(kwargs["cls_token"])
        return original_extract(*args, **kwargs)

    monkeypatch.setattr(alignment, "encoder_features", spy_encoder_features)
    monkeypatch.setattr(alignment, "extract_features", spy_extract)
    argv = ["--ckpt", str(ckpt), "--data-dir", str(demo_data), "--enc-weights", "random", "--out", str(tmp_path / "a")]
    argv += ["--num-images", "12", "--topk", "3", "--batch-size", "8", "--num-workers", "0", "--t", "0.5"]
    with pytest.warns(UserWarning, match="RANDOM ENCODER WEIGHTS"):
        alignment.main(argv)
    assert torch.equal(torch.cat(passed), torch.cat(encoded)) and torch.cat(passed).shape == (12, 384)
    report = json.loads((tmp_path / "a" / "results.json").read_text())
    assert len(report["checkpoints"][0]["by_t"]["0.5"]["cknna"]) == 3
