"""The ADM evaluator's metrics on feature arrays: Fréchet distance, Inception Score, precision and recall.

Semantics follow openai/guided-diffusion `evaluations/evaluator.py` (the evaluator behind the FID, sFID,
IS, precision and recall of ADM, DiT, SiT and REPA); the code is this project's own. Nothing here needs
Inception: every function takes plain arrays, so each can be tested against closed forms.
"""

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------
# Fréchet distance (FID on pool_3 features, sFID on mixed_6/conv features)
# ----------------------------------------------------------------------------------------------------


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) in float64 of features (N, D), as ADM's np.mean/np.cov."""
    x = torch.as_tensor(np.asarray(features)).double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature_statistics needs features of shape (N >= 2, D), got {tuple(x.shape)}")
    # ADM's mu is np.mean of float32 (a float32 result); float64 here differs by ~1e-7 relative.
    mu = x.mean(dim=0)
    centered = x - mu  # (N, D)
    return mu.numpy(), (centered.T @ centered / (x.shape[0] - 1)).numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2. With S1 = W W^T
    (W = V diag(sqrt(w)) from S1's eigendecomposition), S1 S2 = W (W^T S2) has the nonzero eigenvalues of
    the symmetric PSD matrix W^T S2 W. Two symmetric eigendecompositions thus replace ADM's
    scipy.linalg.sqrtm(S1 @ S2): the same number (to ~1e-12 relative on 2048-d statistics), several
    times faster, and never complex. Negative eigenvalues from rounding count as zero, which is what
    taking sqrtm's real part does.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"frechet_distance: mean vectors must be (D,) of equal length, got {mu1.shape}, {mu2.shape}")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance: covariances must be ({dim}, {dim}) to match the means, "
            f"got {sigma1.shape}, {sigma2.shape}"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("frechet_distance: statistics contain NaN or inf")
    # torch's LAPACK (MKL in the x86 wheels) rather than numpy's OpenBLAS, whose spinning threads made
    # these 2048-d eigendecompositions ~10x slower on a busy CPU. Statistics are symmetric only up to
    # rounding and eigh reads one triangle, so symmetrise explicitly.
    s1, s2 = torch.from_numpy(sigma1), torch.from_numpy(sigma2)
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    eig1, vectors1 = torch.linalg.eigh(s1)
    # Rounding can leave tiny negative eigenvalues on a PSD matrix; they are zero in exact arithmetic.
    w = vectors1 * eig1.clamp(min=0).sqrt()  # (D, D), S1 = W W^T
    product = w.T @ s2 @ w  # (D, D) symmetric PSD, eigenvalues those of S1 S2
    eigenvalues = torch.linalg.eigvalsh((product + product.T) / 2)
    tr_covmean = eigenvalues.clamp(min=0).sqrt().sum().item()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace().item() + s2.trace().item() - 2.0 * tr_covmean)


# ----------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------


def inception_score(logits, split_size: int = 5000) -> float:
    """ADM's Inception Score: mean over consecutive splits of exp(E_x KL(p(y|x) || p(y))).

    logits: (N, C) pre-softmax scores; for ADM numbers, Inception's 1008 outputs of pool_3 @ W (no bias).
    Splits are taken in order, without shuffling, `split_size` rows each (the last one may be shorter, as
    in ADM); ADM reports the mean over splits only, so no standard deviation is returned. Computed in
    float64 from log-softmax, where ADM takes np.log of a float32 softmax: equal up to float32 rounding.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"inception_score needs logits of shape (N >= 1, C), got {logits.shape}")
    if split_size < 1:
        raise ValueError(f"inception_score: split_size must be >= 1, got {split_size}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # (N, C) log p(y|x)
    scores = []
    for start in range(0, len(log_p), split_size):  # a handful of splits, not a loop over samples
        part_log_p = log_p[start : start + split_size]  # (S, C)
        part_p = np.exp(part_log_p)
        log_marginal = np.log(part_p.mean(axis=0, keepdims=True))  # (1, C) log p(y) within the split
        # p log(p / p_y), with 0 log 0 = 0 (a class no sample of the split can reach has p = p_y = 0).
        terms = np.where(part_p > 0, part_p * (part_log_p - log_marginal), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------------
# Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's ManifoldEstimator computes it
# ----------------------------------------------------------------------------------------------------


def squared_distances(u: torch.Tensor, v: torch.Tensor, half: bool = True) -> torch.Tensor:
    """Pairwise squared Euclidean distances (R, D) x (C, D) -> (R, C) float32, as ADM's DistanceBlock.

    ADM evaluates ||u||^2 - 2 u.v + ||v||^2 (clamped at 0) on float16 casts of the features and falls back
    to float32 only when a float16 distance is not finite. `half=True` reproduces that: features rounded
    to float16, every square, dot product and sum rounded to float16 as TensorFlow's half kernels do on the
    GPU (products accumulated in float32). `half=False` gives plain float32 distances.
    """
    if half:
        u16, v16 = u.half(), v.half()
        norm_u = (u16 * u16).float().sum(1).half()  # (R,) tf.square in half, reduce_sum accumulated in fp32
        norm_v = (v16 * v16).float().sum(1).half()  # (C,)
        dot = (u16.float() @ v16.float().T).half()  # (R, C) half GEMM: fp32 accumulation, fp16 output
        dist = torch.clamp(norm_u[:, None] - 2 * dot + norm_v[None, :], min=0)  # each op rounds to fp16
        if torch.isfinite(dist).all():
            return dist.float()
    u, v = u.float(), v.float()
    dist = (u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :]
    return torch.clamp(dist, min=0)


def manifold_radii(features: torch.Tensor, k: int = 3, block_size: int = 10000, half: bool = True) -> torch.Tensor:
    """(N,) squared distance from each feature to its k-th nearest neighbour in the same set.

    The point itself is at distance 0 and sorts first, so the k-th neighbour is column k of the sorted
    row, as in ADM. Memory is bounded by blocks: a running (R, k+1) top-k replaces ADM's full (R, N) rows.
    """
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors per set, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, block_size):
        rows = features[r0 : r0 + block_size]
        nearest = None  # (R, <= k+1) smallest distances seen so far, ascending
        for c0 in range(0, n, block_size):
            dist = squared_distances(rows, features[c0 : c0 + block_size], half)  # (R, Cb)
            candidates = dist if nearest is None else torch.cat([nearest, dist], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + block_size] = nearest[:, k]
    return radii


def precision_recall(
    real_features,
    fake_features,
    k: int = 3,
    block_size: int = 10000,
    half: bool = True,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """ADM's improved precision and recall of fake (generated) features against real (reference) ones.

    Each set's manifold is the union of balls around its points, of radius the distance to the point's
    k-th nearest neighbour within the set. Precision: fraction of fake points inside the real manifold
    (distance <= radius of some real point). Recall: fraction of real points inside the fake manifold.
    Distances are computed in (block_size x block_size) blocks on `device` (default: the features'
    device for tensors, else CPU); with `half=True` (default) rounded to float16 as ADM does, `half=False`
    exact in float32. The two differed by ~2e-3 on synthetic Inception-like features (3000 per set, norms
    ~20): enough to matter at the third decimal, hence ADM's rounding by default.
    """
    real = torch.as_tensor(real_features, device=device).float()  # (Nr, D)
    fake = torch.as_tensor(fake_features, device=device).float()  # (Nf, D)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"precision_recall needs (N, D) feature arrays of equal D, got {tuple(real.shape)}, {tuple(fake.shape)}"
        )
    real_radii = manifold_radii(real, k, block_size, half)  # (Nr,)
    fake_radii = manifold_radii(fake, k, block_size, half)  # (Nf,)
    real_inside = torch.zeros(len(real), dtype=torch.bool, device=real.device)  # real in the fake manifold
    fake_inside = torch.zeros(len(fake), dtype=torch.bool, device=real.device)  # fake in the real manifold
    for r0 in range(0, len(real), block_size):
        r1 = r0 + block_size
        for f0 in range(0, len(fake), block_size):
            f1 = f0 + block_size
            dist = squared_distances(real[r0:r1], fake[f0:f1], half)  # (R, F)
            real_inside[r0:r1] |= (dist <= fake_radii[None, f0:f1]).any(dim=1)
            fake_inside[f0:f1] |= (dist <= real_radii[r0:r1, None]).any(dim=0)
    return fake_inside.double().mean().item(), real_inside.double().mean().item()
