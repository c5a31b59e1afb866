"""Data loading throughput: items/s of ImageLatentDataset through a DataLoader with ResumableSampler.

    python benchmarks/dataset.py                          # synthetic 256 px layout in a temp folder
    python benchmarks/dataset.py --data-dir DIR --num-workers 8 --batch-size 256
    python benchmarks/dataset.py --pixel-space --resolution 32

The synthetic layout matches ImageNet 256 after preprocessing (uncompressed 256x256 PNG + float32
(8, 32, 32) moments per item), so the number says whether loading can keep up with the training step.
"""

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from dataset import ImageLatentDataset, ResumableSampler  # noqa: E402
from preprocessing import layout  # noqa: E402


def write_synthetic_layout(root: str, items: int, resolution: int, seed: int = 0) -> None:
    """Random images and moments under root/images and root/vae-sd with their dataset.json files."""
    rng = np.random.default_rng(seed)
    image_labels, latent_labels = [], []
    for i in range(items):
        image = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        moments = rng.normal(size=(8, resolution // 8, resolution // 8)).astype(np.float32)
        layout.atomic_write(os.path.join(root, "images", layout.image_name(i)), layout.png_bytes(image))
        buffer = io.BytesIO()
        np.save(buffer, moments)
        layout.atomic_write(os.path.join(root, "vae-sd", layout.latent_name(i)), buffer.getvalue())
        label = int(rng.integers(1000))
        image_labels.append([layout.image_name(i), label])
        latent_labels.append([layout.latent_name(i), label])
    for folder, labels in (("images", image_labels), ("vae-sd", latent_labels)):
        layout.atomic_write(os.path.join(root, folder, layout.DATASET_JSON), layout.dataset_json_bytes(labels))


def measure(data, batch_size: int, num_workers: int, batches: int, warmup: int) -> float:
    """Items per second over `batches` batches after `warmup` batches (worker start-up excluded)."""
    sampler = ResumableSampler(len(data), batch_size, seed=0)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="a data folder; default: a synthetic one")
    parser.add_argument("--items", type=int, default=512, help="synthetic items to write")
    parser.add_argument("--resolution", type=int, default=256, help="synthetic image side")
    parser.add_argument("--pixel-space", action="store_true", help="no latents: x is the image in [-1, 1]")
    parser.add_argument("--batch-size", type=int, default=64, help="per-process batch, as train.py's")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers, as train.py's")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temp:
        data_dir = args.data_dir
        if data_dir is None:
            start = time.perf_counter()
            write_synthetic_layout(temp, args.items, args.resolution)
            print(f"wrote {args.items} synthetic items at {args.resolution} px in {time.perf_counter() - start:.1f} s")
            data_dir = temp
        start = time.perf_counter()
        data = ImageLatentDataset(data_dir, latents=not args.pixel_space)
        print(
            f"opened {len(data)} items (checks included) in {time.perf_counter() - start:.2f} s; "
            f"image {data.image_shape}, x {data.x_shape}"
        )
        rate = measure(data, args.batch_size, args.num_workers, args.batches, args.warmup)
        print(f"{rate:.0f} items/s  (batch {args.batch_size}, {args.num_workers} workers, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
