"""Evaluator throughput: images/s through Inception (npz streaming included) and the metrics' cost.

    python benchmarks/evaluate.py                                  # GPU if present, else a short CPU run
    python benchmarks/evaluate.py --device cpu --num-images 16 --batch-size 8 --num-features 2000

A 50K-sample evaluation spends its time in three places: Inception on every image (this script's
images/s; the 10K reference images are cached after the first run), two Fréchet distances (2048-d and
2023-d eigendecompositions, independent of N), and precision/recall (O(N_ref * N_samples * 2048) distance
work, timed here on --num-features random features per set). Uses the release Inception weights if
found (see evaluations/inception.py), else random ones: the cost is the same, the features meaningless.
"""

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluations.evaluate import compute_activations  # noqa: E402
from evaluations.inception import InceptionV3, load_inception  # noqa: E402
from evaluations.metrics import feature_statistics, frechet_distance, precision_recall  # noqa: E402


def inception_for_benchmark(weights_path, device):
    try:
        return load_inception(weights_path, device=device, allow_download=False), "release weights"
    except FileNotFoundError:
        return InceptionV3().to(device), "random weights (release file not found; same cost)"


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--num-images", type=int, default=2000 if cuda else 16, help="images in the timed batch file")
    p.add_argument("--batch-size", type=int, default=200 if cuda else 8)
    p.add_argument("--resolution", type=int, default=256, help="stored image size (Inception resizes to 299)")
    p.add_argument("--num-features", type=int, default=10000 if cuda else 2000, help="per set, for precision/recall")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # on a shared CPU, fewer threads can be much faster

    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False  # as evaluations/evaluate.py runs it
    torch.backends.cuda.matmul.allow_tf32 = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a non-release weights file only changes the features
        model, weights = inception_for_benchmark(args.inception_weights, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; Inception with {weights}; batch {args.batch_size}, {args.resolution}px images")

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "batch.npz"
        shape = (args.num_images, args.resolution, args.resolution, 3)
        np.savez(path, arr_0=rng.integers(0, 256, shape, dtype=np.uint8))
        warmup = torch.zeros(min(args.batch_size, 2), 3, args.resolution, args.resolution, dtype=torch.uint8)
        model(warmup.to(device))  # cuDNN autotuning and allocator warm-up stay out of the timing
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        compute_activations(model, path, args.batch_size, device, "benchmark")
        sync()
        seconds = time.perf_counter() - start
    rate = args.num_images / seconds
    print(f"Inception features: {rate:.1f} images/s ({args.num_images} images in {seconds:.2f} s)")
    print(f"  -> 50K samples: {50000 / rate / 60:.1f} min; 10K reference images (once, then cached): "
          f"{10000 / rate / 60:.1f} min")  # fmt: skip

    # Fréchet distance: statistics of the real dimensions (cost depends on D only).
    feats = rng.normal(size=(3000, 2048)).astype(np.float32)
    stats, other = feature_statistics(feats), feature_statistics(feats[::-1] * 1.1)
    start = time.perf_counter()
    frechet_distance(*stats, *other)
    print(f"Fréchet distance, 2048-d (FID; sFID's 2023-d is the same): {time.perf_counter() - start:.2f} s")

    n = args.num_features
    real, fake = rng.normal(size=(n, 2048)).astype(np.float32), rng.normal(size=(n, 2048)).astype(np.float32)
    sync()
    start = time.perf_counter()
    precision_recall(real, fake, device=device)
    sync()
    seconds = time.perf_counter() - start
    # Three N x N distance passes (two radii, one cross): scale by (N_ref * N_samples) / n^2 for real sizes.
    print(f"precision/recall, {n} vs {n} features: {seconds:.2f} s (10K ref x 50K samples ~ "
          f"{seconds * (10000**2 + 50000**2 + 10000 * 50000) / (3 * n * n) / 60:.1f} min)")  # fmt: skip


if __name__ == "__main__":
    main()
