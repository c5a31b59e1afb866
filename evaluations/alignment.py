"""Measuring the alignment of a SiT/DiT's hidden states with a frozen encoder: CKNNA, mutual k-NN, linear probes,
and the features they compare (pooled hidden states at a noise level; the encoder's pooled targets). Used by
analysis/alignment.py (the command-line report over checkpoints) and the miniature benchmark.

Protocol, and where it comes from
---------------------------------
Sources: REPA (Yu et al., ICLR 2025, Sec. 2-3, Fig. 2-3); the REPA
authors' answer on how Fig. 2 was measured (github.com/sihyun-yu/REPA issue #24); Huh et al. 2024, "The
Platonic Representation Hypothesis", and its code (github.com/minyoungg/platonic-rep, metrics.py and
measure_alignment.py), from which the facts below are taken, not the code.

* CKNNA (Huh et al.): for N paired features, L2-normalise each row, form the kernels K = A A^T and
  L = B B^T, keep entry (i, j) only where j is among the k nearest neighbours of i (largest kernel values,
  i itself excluded) in K *and* in L, and normalise the unbiased HSIC (Song et al. 2012, Eq. 5) of the
  two masked kernels: CKNNA = HSIC(K~, L~) / sqrt(HSIC(K^, K^) HSIC(L^, L^)), where K^ keeps only K's own
  neighbours (the mask of K with itself) and likewise L^. k = 10 as in REPA and Huh et al.
  Mutual k-NN: the mean over i of |kNN_A(i) & kNN_B(i)| / k on the same normalised features.
  Both are computed in float64 from the k-neighbour lists (kernel rows formed in chunks), so memory grows
  like N k, not N^2: N = 50,000 fits on a GPU or in CPU memory.
* Diffusion features (REPA issue #24): the hidden state after block l (1-based, the same count as
  `encoder_depth`), averaged over the patch tokens, computed with the null class label (no class
  information). The input is the clean image (pixel runs) or its VAE latent (a posterior sample scaled by
  the run's latent_scale / latent_bias, as in training), noised to x_t with the run's own interpolant
  (loss.Interpolant; t = 0 data, t = 1 noise). DiTs see the DDPM x_t at timestep round(1000 t).
  The noise of image i depends on (seed, dataset index of i) only: every checkpoint, t and batch size
  sees the same noise.
* Encoder features: the REPA targets of the clean image (final-norm patch tokens, models/encoders.py,
  at the token grid training uses: 16 x the SiT's grid), averaged over the patch tokens like the SiT side.
  The paper's Fig. 2 compares SiT-XL/2 with DINOv2-g (`--enc-type dinov2-vit-g`).
* Images: a random subset of --num-images of the data folder, drawn with --seed (ImageNet folders are
  class-ordered, so the first N would cover few classes).

Where this differs from the paper, or could not be checked:
* The noise level(s) and number of images behind the paper's curves are not stated in the sources we
  could read (the authors point to the t values printed in the paper's figures). Defaults here: t = 0.5
  and N = 10,000; pass --t with several values to sweep.
* Huh et al.'s code adds 1e-6 to the CKNNA denominator; we do not, so identical features give exactly 1
  (their value is lower by about 1e-6 / HSIC, ~0.2% at N = 10,000, k = 10). Their measure_alignment
  clamps features at the 0.95 quantile of |x| before normalising (--outlier-quantile 0.95 does the same;
  off by default, since REPA does not mention it) and reports the best score over all layer pairs; we
  report every block against the encoder's last layer.
* Linear probe: REPA follows MAE's protocol (train on ImageNet train, report val top-1). Ours is a cheap
  proxy: multinomial logistic regression on standardised pooled features (full-batch L-BFGS, weight decay
  1e-4), trained on a seeded 80% of the N images and tested on the other 20%. Its numbers compare layers,
  t and checkpoints of this project with each other, not with the paper's accuracies (ImageNet needs
  N of 50,000 or more for the probe to see enough images per class).
"""

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diffusion import GaussianDiffusion
from loss import Interpolant
from models.dit import DiT
from samplers import randn_like

DIT_TIMESTEPS = 1000  # the DDPM process DiT trains on (diffusion.DiffusionLoss)

#################################################################################
#                   Alignment metrics on paired (N, D) features                 #
#################################################################################


def _unit_rows(feats: torch.Tensor, name: str) -> torch.Tensor:
    """(N, D) features -> float64 rows of unit L2 norm."""
    if feats.ndim != 2:
        raise ValueError(f"{name} must be (N, D) features, got shape {tuple(feats.shape)}")
    return F.normalize(feats.to(torch.float64), dim=1)


def _paired_unit_rows(feats_a, feats_b, topk: int, min_rows: int = 2):
    a, b = _unit_rows(feats_a, "feats_a"), _unit_rows(feats_b, "feats_b").to(feats_a.device)
    n = a.shape[0]
    if b.shape[0] != n or n < min_rows:
        raise ValueError(f"needs N >= {min_rows} paired rows, got {n} and {b.shape[0]}")
    if not 1 <= topk <= n - 1:
        raise ValueError(f"topk must lie in 1..N-1 = {n - 1} (self is never a neighbour), got {topk}")
    return a, b


def nearest_neighbours(unit: torch.Tensor, topk: int, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, topk) indices j != i of the largest kernel values unit_i . unit_j, and those values.

    Kernel rows are formed `chunk` at a time, so memory stays O(chunk x N) rather than N x N.
    """
    indices, values = [], []
    for start in range(0, unit.shape[0], chunk):
        rows = unit[start : start + chunk] @ unit.T  # (B, N)
        own = torch.arange(start, start + rows.shape[0], device=unit.device)
        rows[own - start, own] = float("-inf")  # i is not its own neighbour
        top = rows.topk(topk, dim=1)
        indices.append(top.indices)
        values.append(top.values)
    return torch.cat(indices), torch.cat(values)


def _shared(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """(N, k, k) bool: entry [i, r, s] says neighbour r of i in A is neighbour s of i in B."""
    return idx_a[:, :, None] == idx_b[:, None, :]


def sparse_unbiased_hsic(n: int, rows: torch.Tensor, cols: torch.Tensor, k_vals, l_vals) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012, Eq. 5) of two n x n kernels zero outside the entries (rows, cols).

    With K~, L~ the kernels with zeroed diagonals (the support here never holds i == j):
        HSIC = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n-3)).
    The masked kernels of CKNNA are not symmetric, so tr(K~ L~) = sum_ij K~_ij L~_ji pairs entry (i, j)
    of K~ with entry (j, i) of L~, found by a sorted-key lookup; 1'K~L~1 is (column sums of K~) . (row
    sums of L~). All (E,) flat tensors over the E support entries: O(E log E), no n x n matrix.
    """
    keys = rows * n + cols
    order = keys.argsort()
    sorted_keys = keys[order]
    transposed = cols * n + rows
    position = torch.searchsorted(sorted_keys, transposed).clamp(max=len(keys) - 1)
    l_transposed = torch.where(sorted_keys[position] == transposed, l_vals[order][position], 0.0)  # L~_ji
    trace = (k_vals * l_transposed).sum()
    col_sums_k = torch.zeros(n, dtype=k_vals.dtype, device=k_vals.device).index_add_(0, cols, k_vals)
    row_sums_l = torch.zeros(n, dtype=l_vals.dtype, device=l_vals.device).index_add_(0, rows, l_vals)
    cross = col_sums_k @ row_sums_l
    return (trace + k_vals.sum() * l_vals.sum() / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


def cknna(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int = 10) -> float:
    """CKNNA (Huh et al. 2024) of paired features (N, D_a) and (N, D_b); rows are L2-normalised here.

    K = A A^T and L = B B^T on unit rows; K~, L~ keep entry (i, j) only where j is among the topk
    neighbours of i in both K and L; K^ keeps K's own neighbours (L^ likewise). Then
        CKNNA = HSIC(K~, L~) / sqrt(HSIC(K^, K^) HSIC(L^, L^))     (unbiased HSIC).
    1 for identical neighbourhood structure, near 0 for independent features; invariant to rotations and
    to any positive scale of each row. NaN (with a warning) when a self-similarity term is not positive,
    which only degenerate features (e.g. all rows equal) give. Float64 on the inputs' device, O(N k) memory
    besides kernel rows formed in chunks.
    """
    a, b = _paired_unit_rows(feats_a, feats_b, topk, min_rows=4)
    n = a.shape[0]
    idx_k, val_k = nearest_neighbours(a, topk)  # (N, k) each
    idx_l, val_l = nearest_neighbours(b, topk)
    rows = torch.arange(n, device=a.device).repeat_interleave(topk)  # support of K's neighbours, flat
    cols = idx_k.reshape(-1)
    shared = _shared(idx_k, idx_l)  # (N, k, k)
    keep = shared.any(dim=2)  # (N, k): K's neighbour r of i is also an L-neighbour of i
    l_at_k = (shared * val_l[:, None, :]).sum(dim=2)  # (N, k): L_ij at those entries (0 elsewhere)
    hsic_kl = sparse_unbiased_hsic(n, rows, cols, (val_k * keep).reshape(-1), (l_at_k * keep).reshape(-1))
    hsic_kk = sparse_unbiased_hsic(n, rows, cols, val_k.reshape(-1), val_k.reshape(-1))
    hsic_ll = sparse_unbiased_hsic(n, rows, idx_l.reshape(-1), val_l.reshape(-1), val_l.reshape(-1))
    if hsic_kk <= 0 or hsic_ll <= 0:
        warnings.warn(f"cknna: degenerate features (HSIC(K,K)={hsic_kk:.3g}, HSIC(L,L)={hsic_ll:.3g})", stacklevel=2)
        return float("nan")
    return (hsic_kl / (hsic_kk * hsic_ll).sqrt()).item()


def mutual_knn(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int = 10) -> float:
    """Mean over i of the fraction of i's topk cosine neighbours shared by both feature sets (Huh et al.)."""
    a, b = _paired_unit_rows(feats_a, feats_b, topk)
    idx_a, _ = nearest_neighbours(a, topk)
    idx_b, _ = nearest_neighbours(b, topk)
    return (_shared(idx_a, idx_b).any(dim=2).sum(dim=1) / topk).mean().item()


def clamp_outliers(feats: torch.Tensor, quantile: float = 0.95) -> torch.Tensor:
    """Huh et al.'s preprocessing: clamp |x| at the per-row `quantile` of |x| (nearest rank), averaged over rows."""
    rank = min(feats.shape[1], max(1, round(quantile * feats.shape[1])))
    bound = feats.abs().float().kthvalue(rank, dim=1).values.mean()
    return feats.clamp(-bound, bound)


#################################################################################
#                                 Linear probe                                  #
#################################################################################


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions of a seeded random split of range(n); each sorted, test ~ test_fraction of n."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    order = np.random.default_rng([seed, 0x5B117]).permutation(n)
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decay: float = 1e-4,  # on the weights (not the bias), times 1/2 ||W||^2, next to the mean cross-entropy
    max_iter: int = 100,  # L-BFGS iterations (full batch)
) -> float:
    """Held-out top-1 accuracy of a multinomial logistic regression on standardised features.

    Features are standardised with the training split's mean and std; weights start at zero and are fitted
    by full-batch L-BFGS with a strong-Wolfe line search, so the result is a deterministic function of the
    inputs. Classes are 0..max label; a test class absent from training simply counts as an error.
    """
    device = train_feats.device
    x_train, x_test = train_feats.float(), test_feats.to(device).float()
    y_train, y_test = train_labels.to(device).long(), test_labels.to(device).long()
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(
            f"probe features must be (N, D) with the same D, got {tuple(x_train.shape)}, {tuple(x_test.shape)}"
        )
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp(min=1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    weight = torch.zeros(x_train.shape[1], num_classes, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-8, tolerance_change=1e-12,
    )  # fmt: skip

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, y_train) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predicted = (x_test @ weight + bias).argmax(dim=1)
    return (predicted == y_test).float().mean().item()


#################################################################################
#                        Features of the model and the encoder                  #
#################################################################################


class _StopForward(Exception):
    """Raised by the hook of the deepest requested block: the blocks after it are not needed."""


def item_noise(indices: Sequence[int], shape: Sequence[int], seed: int, draws: int = 1) -> torch.Tensor:
    """(draws, B, *shape) standard normal noise on the CPU; that of item i depends on (seed, i) alone."""
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]
    return randn_like(torch.empty(len(generators), draws, *shape), generators).transpose(0, 1)


def clean_model_input(x: torch.Tensor, settings: dict, posterior_noise: torch.Tensor) -> torch.Tensor:
    """Dataset `x` -> the clean model input, as training makes it (training.sample_latents).

    Latent runs: x is the VAE posterior mean || std (N, 2C, h, w); the input is the sample
    (mean + std * noise) * latent_scale + latent_bias. Pixel runs: x already is the image in [-1, 1].
    """
    if settings.get("pixel_space", False):
        return x
    mean, std = x.chunk(2, dim=1)
    scale, bias = float(settings.get("latent_scale", 0.18215)), float(settings.get("latent_bias", 0.0))
    return (mean + std * posterior_noise) * scale + bias


def noised_input(model, settings: dict, x0: torch.Tensor, noise: torch.Tensor, t: float):
    """(x_t, the model's time input) for clean inputs x0 at noise level t in [0, 1] (t = 0 data, t = 1 noise).

    SiT: the run's interpolant at time t. DiT: the DDPM forward process at timestep round(1000 t) (clamped
    to 999), the discrete time that diffusion.py maps to the same normalised t.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1] (0 = data, 1 = noise), got {t}")
    n = x0.shape[0]
    if isinstance(model, DiT):
        step = torch.full((n,), min(round(t * DIT_TIMESTEPS), DIT_TIMESTEPS - 1), device=x0.device, dtype=torch.long)
        return GaussianDiffusion.linear(DIT_TIMESTEPS).q_sample(x0, step, noise), step
    x_t, _ = Interpolant(settings.get("path_type", "linear")).interpolate(x0, noise, torch.tensor(t, dtype=x0.dtype))
    return x_t, torch.full((n,), t, device=x0.device, dtype=x0.dtype)


def null_labels(model, n: int, device) -> torch.Tensor:
    """(n,) of the null class (REPA measures alignment without class information); refuses a model without one."""
    if model.y_embedder.embedding_table.num_embeddings <= model.num_classes:
        raise ValueError("the model has no null-class row (trained without label dropout): pass the true labels")
    return torch.full((n,), model.num_classes, device=device, dtype=torch.long)


@torch.no_grad()
def extract_features(
    model,
    settings: dict,
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    t: float = 0.5,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    cls_token: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """{block l: (N, D) hidden state after block l, averaged over tokens} for one batch, on the CPU (float32).

    model, settings: as checkpoints.load_model returns them. x: (N, ...) dataset `x` of the batch (latent
    moments or pixels). labels: None for the null class (REPA's protocol), else (N,) class labels.
    layers: 1-based block numbers (default: all). indices: the items' dataset indices, which fix their
    noise (default 0..N-1). The forward stops after the deepest requested block.
    cls_token: REG models only (built with cls_token_dim), which denoise the encoder's class token with the
    image: the (N, cls_token_dim) class tokens of the clean images, noised to the same t as in training
    (noise fixed by (seed + 1, item)). Their hidden states are averaged over the patch tokens alone, so
    they compare with those of other models.
    """
    device = next(model.parameters()).device
    depth = len(model.blocks)
    layers = sorted(set(layers)) if layers else list(range(1, depth + 1))
    if layers[0] < 1 or layers[-1] > depth:
        raise ValueError(f"layers must lie in 1..{depth} (blocks of this model), got {layers}")
    n = x.shape[0]
    indices = range(n) if indices is None else indices
    shape = (model.in_channels, model.input_size, model.input_size)
    posterior_noise, noise = item_noise(indices, shape, seed, draws=2).to(device)
    x0 = clean_model_input(x.to(device), settings, posterior_noise)
    if tuple(x0.shape[1:]) != shape:
        raise ValueError(f"the data gives model inputs of shape {tuple(x0.shape[1:])}, the model expects {shape}")
    x_t, time_input = noised_input(model, settings, x0, noise, t)
    y = null_labels(model, n, device) if labels is None else labels.to(device)
    reg = {}
    cls_dim = getattr(model, "cls_token_dim", None)
    if cls_dim:  # REG: the class token rides along at sequence position 0, noised like the image
        if cls_token is None or tuple(cls_token.shape) != (n, cls_dim):
            got = None if cls_token is None else tuple(cls_token.shape)
            raise ValueError(
                f"this REG model denoises a class token: pass cls_token of shape ({n}, {cls_dim}), got {got}"
            )
        (cls_noise,) = item_noise(indices, (cls_dim,), seed + 1).to(device)
        interpolant = Interpolant(settings.get("path_type", "linear"))
        reg["cls_token"], _ = interpolant.interpolate(
            cls_token.to(device, x0.dtype), cls_noise, torch.tensor(t, dtype=x0.dtype)
        )
    elif cls_token is not None:
        raise ValueError("cls_token is for REG models (built with cls_token_dim); this model has no class token")
    skip = 1 if cls_dim else 0  # REG's class token is not a patch

    pooled = {}

    def hook(layer):
        def store(module, inputs, output):
            pooled[layer] = output[:, skip:].float().mean(dim=1).cpu()  # (N, T, D) -> (N, D)
            if layer == layers[-1]:
                raise _StopForward

        return store

    handles = [model.blocks[layer - 1].register_forward_hook(hook(layer)) for layer in layers]
    try:
        model(x_t, time_input, y, **reg)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return pooled


@torch.no_grad()
def encoder_features(encoder, images: torch.Tensor, class_token: bool = False):
    """(N, D) float32 on the CPU: the encoder's REPA target tokens of the clean uint8 images, averaged over patches.
    With `class_token`, also its (N, D) class tokens, which REG models denoise with the image: (feats, cls)."""
    device = next(encoder.parameters()).device
    tokens = encoder.encode(images.to(device), class_token=class_token).float().cpu()
    feats = tokens[:, int(class_token) :].mean(dim=1)
    return (feats, tokens[:, 0]) if class_token else feats
