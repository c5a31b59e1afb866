"""Training-step throughput of SiT + REPA: ms/step, img/s, peak memory, TFLOP/s and MFU of train.py's own step.

    python benchmarks/train_step.py --model SiT-B/2 --batch-size 32 --precision bf16 [--enc-type dinov2-vit-b]
    python benchmarks/train_step.py --model SiT-B/2 --batch-size 8 --precision fp32 --compile false --json
    python benchmarks/train_step.py --config configs/miniature.yaml --enc-type none   # a run's own settings

It times training.TrainStep, the object train.py's loop calls: per micro-batch the seeded latent sample, the
encoder targets (or --target-cache: precomputed tokens passed in instead of running the encoder), the loss
and backward; then the clip, fused AdamW and the EMA. Random latent moments and images stand in for data
(this measures the step, not I/O; benchmarks/dataset.py measures loading); encoders have random weights
unless --enc-weights pretrained (the cost does not depend on them). --config takes a train.py config file (its
model, size overrides, pixel space, batch, precision, encoders, compile); the flags given override it, and the
flags' own defaults apply only without --config.

compile_s is the wall time of the first step when compiling (compilation dominates it); ms_per_step is the
mean wall time of --steps steps after --warmup; cpu_ms_per_step the process CPU time of the same steps (all
threads): on a CPU shared with other jobs it is the steadier figure, since waiting for a core is not counted. FLOPs of a step: the SiT forward x 3 (forward + backward) plus the
frozen encoder's forward, counted analytically (2 x multiply-accumulates). MFU = achieved / peak FLOP/s,
null where the peak is unknown (CPUs: pass --peak-tflops).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import DEFAULTS, MIXED_PRECISION, build_step, peak_tflops, synchronize  # noqa: E402
from config import parse_bool  # noqa: E402
from training import peak_memory_gib  # noqa: E402


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a train.py config file: its settings instead of the defaults")
    p.add_argument("--model", default=None, help=f"default {DEFAULTS['model']}")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULTS['batch_size']}")
    p.add_argument("--resolution", type=int, default=None, help=f"default {DEFAULTS['resolution']}")
    p.add_argument("--enc-type", default=None, help=f"'none' for a vanilla SiT; default {DEFAULTS['enc_type']}")
    p.add_argument("--enc-weights", default=None, help=f"default {DEFAULTS['enc_weights']}")
    p.add_argument("--encoder-depth", type=int, default=None, help=f"default {DEFAULTS['encoder_depth']}")
    p.add_argument("--precision", choices=tuple(MIXED_PRECISION), default=None, help="default fp32")
    p.add_argument("--target-cache", type=parse_bool, default=False, help="precomputed targets, no encoder forward")
    p.add_argument(
        "--compile", type=parse_bool, default=None,
        help="true: torch.compile (CPU too); default: train.py's (compiled on CUDA, eager on a CPU)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU (needed on a CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    return p


def main():
    args = parser().parse_args()
    step, info = build_step(args)
    device, cfg = info["device"], info["cfg"]
    precision = {v: k for k, v in MIXED_PRECISION.items()}[cfg.mixed_precision]
    encoders = cfg.enc_type if cfg.encoder_names and cfg.proj_coeff > 0 else "none"
    start = time.perf_counter()
    step(0)
    info["train_step"].read_stats()  # waits for the device
    first_s = time.perf_counter() - start
    for k in range(1, args.warmup):
        step(k)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for k in range(args.warmup, args.warmup + args.steps):
        step(k)
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    cpu_seconds = (time.process_time() - cpu_start) / args.steps
    stats = info["train_step"].read_stats()

    tflops = info["flops_per_step"] / seconds / 1e12
    peak = peak_tflops(device, precision, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = {
        "ms_per_step": 1000 * seconds,
        "cpu_ms_per_step": 1000 * cpu_seconds,
        "img_per_s": cfg.batch_size / seconds,
        "peak_mem_gib": peak_memory_gib(device),
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "compile_s": first_s if info["compiled"] else None,
        "loss": stats["loss"],
        "settings": {
            "device": name, "model": cfg.model, "batch_size": cfg.batch_size, "resolution": cfg.resolution,
            "precision": precision, "enc_type": encoders, "target_cache": args.target_cache, "config": args.config,
            "compile": info["compiled"], "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__,
        },
    }  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return
    print(f"device: {name}; {cfg.model}, batch {cfg.batch_size}, {cfg.resolution}px, {precision}, "
          f"encoders: {encoders}{' (cached targets)' if args.target_cache else ''}, compile {info['compiled']}")  # fmt: skip
    print(
        f"ms/step: {result['ms_per_step']:.1f} (CPU {result['cpu_ms_per_step']:.1f})   img/s: {result['img_per_s']:.2f}   TFLOP/s: {tflops:.3f}"
    )
    print(f"peak memory: {result['peak_mem_gib']:.2f} GiB" + (" (process RSS)" if device.type != "cuda" else ""))
    if info["compiled"]:
        print(f"compile (first step): {first_s:.1f} s")
    print(f"MFU: {result['mfu']:.1%} of {peak} TFLOP/s" if peak else "MFU: unknown peak (pass --peak-tflops)")


if __name__ == "__main__":
    main()
