"""Frozen-encoder cost per training step: ms/batch, img/s and achieved TFLOP/s of `encode()`.

    python benchmarks/encoders.py --enc-type dinov2-vit-b,clip-vit-L --batch-size 256 --precision bf16
    python benchmarks/encoders.py --enc-type dinov2-vit-s --batch-size 2 --steps 2 --device cpu

This is the time a training step spends on targets (REPA runs the encoder on every batch); compare it with
benchmarks/train_step.py to see what precomputing the features once per dataset would save. Random
weights by default (same cost as pretrained ones); random uint8 images stand in for data.
"""

import argparse
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.encoders import load_encoders  # noqa: E402


def time_encode(encoder, images, steps, warmup, precision):
    """Seconds per batch after `warmup` batches, under the training autocast like train.py."""
    device = images.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with autocast:
        for _ in range(warmup):
            encoder.encode(images)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            encoder.encode(images)
        sync()
    return (time.perf_counter() - start) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--enc-type", default="dinov2-vit-b")
    p.add_argument("--enc-weights", default="random", choices=["pretrained", "random"])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    device = torch.device(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are the point here
        encoders = load_encoders(args.enc_type, device, args.resolution, enc_weights=args.enc_weights)
    images = torch.randint(0, 256, (args.batch_size, 3, args.resolution, args.resolution), dtype=torch.uint8)
    images = images.to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; batch {args.batch_size}, {args.resolution}px, {args.precision}")
    for encoder in encoders:
        seconds = time_encode(encoder, images, args.steps, args.warmup, args.precision)
        flops = 2e9 * encoder.gmacs_per_image() * args.batch_size
        print(
            f"{encoder.spec.name:>20}: {1000 * seconds:8.1f} ms/batch  {args.batch_size / seconds:8.1f} img/s  "
            f"{flops / seconds / 1e12:7.2f} TFLOP/s  ({encoder.gmacs_per_image():.1f} GMACs/img, "
            f"{encoder.grid}x{encoder.grid} tokens x {encoder.embed_dim})"
        )


if __name__ == "__main__":
    main()
