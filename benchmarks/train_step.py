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
import copy
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import TrainConfig, config_from_dict, load_yaml_config, parse_bool  # noqa: E402
from loss import REPALoss  # noqa: E402
from models.encoders import load_encoders  # noqa: E402
from models.sit import SiT_models, sit_flops  # noqa: E402
from training import TrainStep, compile_step, make_optimizer, peak_memory_gib  # noqa: E402

# Dense peak TFLOP/s by device name fragment and precision (vendor datasheets, no sparsity).
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM; TF32 matmuls would be 494
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# The settings this benchmark uses without --config (with one, the file's values instead).
DEFAULTS = dict(
    model="SiT-B/2", batch_size=32, resolution=256, enc_type="dinov2-vit-b", enc_weights="random", encoder_depth=4,
    precision="fp32", compile=None,  # None: train.py's default (CUDA compiled, CPU eager); true: compiled anywhere
)  # fmt: skip


def peak_tflops(device, precision, override):
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in PEAK_TFLOPS.items():
            if key in name:
                return table[precision]
    return None


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


def step_config(args) -> TrainConfig:
    """The TrainConfig of the timed step: --config's file (or DEFAULTS), then the flags given."""
    given = {k: getattr(args, k, None) for k in DEFAULTS}
    config_file = getattr(args, "config", None)
    if config_file:
        base, flags = load_yaml_config(config_file), {k: v for k, v in given.items() if v is not None}
    else:
        base, flags = TrainConfig(), {k: DEFAULTS[k] if v is None else v for k, v in given.items()}
    if flags.get("compile") is None:
        flags.pop("compile", None)
    elif flags["compile"]:
        flags["compile_cpu"] = True  # asked for: compiled on a CPU too (train.py's --compile-cpu)
    if "precision" in flags:
        flags["mixed_precision"] = MIXED_PRECISION[flags.pop("precision")]
    if flags.get("enc_type") == "none":
        flags["proj_coeff"] = 0.0
    elif "enc_type" in flags and not config_file:
        flags["proj_coeff"] = 0.5
    return config_from_dict(flags, base, source="benchmark flags")


def build_step(args):
    """train.py's step on a fresh SiT (+ encoders) at these settings: (step(k) -> None, info dict)."""
    cfg = step_config(args)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    torch.manual_seed(0)
    patch = SiT_models[cfg.model].keywords["patch_size"]
    grid = (cfg.resolution if cfg.pixel_space else cfg.resolution // 8) // patch
    # As train.py: the encoders at the setting whose token grid is the SiT's (resolution / 16 per side).
    encoders = (
        []
        if not (cfg.encoder_names and cfg.proj_coeff > 0)
        else load_encoders(cfg.enc_type, device, 16 * grid, enc_weights=cfg.enc_weights)
    )
    side, channels = (cfg.resolution, 3) if cfg.pixel_space else (cfg.resolution // 8, 4)
    size_overrides = {k: v for k in ("depth", "hidden_size", "num_heads") if (v := getattr(cfg, k))}
    model = SiT_models[cfg.model](
        **size_overrides, input_size=side, in_channels=channels, num_classes=cfg.num_classes,
        class_dropout_prob=cfg.cfg_prob, z_dims=[e.embed_dim for e in encoders], encoder_depth=cfg.encoder_depth,
        projector_dim=cfg.projector_dim,
    ).to(device)  # fmt: skip
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = make_optimizer(cfg, model.parameters(), device)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    model, encode, compiled, note = compile_step(model, encoders, cfg.compile, device, cpu=cfg.compile_cpu)
    if cfg.compile and not compiled:
        print(f"torch.compile: {note}; the step runs eagerly", file=sys.stderr)
    n = cfg.batch_size
    if args.target_cache and encoders:
        # What a target cache holds: each item's tokens in half precision, read instead of running the encoder.
        cached = [torch.randn(n, e.grid**2, e.embed_dim, device=device).to(torch.bfloat16) for e in encoders]
        targets = lambda indices, images: [z.float() for z in cached]  # noqa: E731
    elif encoders:
        targets = lambda indices, images: [fn(images) for fn in encode]  # noqa: E731
    else:
        targets = None
    loss_fn = REPALoss(proj_coeff=cfg.proj_coeff)
    train_step = TrainStep(cfg, accelerator, model, raw_model, ema, optimizer, loss_fn, targets)
    model.train()

    indices = torch.arange(n, device=device)
    images = torch.randint(0, 256, (n, 3, cfg.resolution, cfg.resolution), dtype=torch.uint8, device=device)
    if cfg.pixel_space:  # the image itself in [-1, 1]
        moments = (images.float() / 127.5 - 1).to(device)
    else:
        moments = torch.cat([torch.randn(n, 4, side, side), torch.rand(n, 4, side, side)], dim=1).to(device)
    labels = torch.randint(0, cfg.num_classes, (n,), device=device)

    def step(k):
        train_step([(k * n, indices, images, moments, labels)], k)

    flops = n * (
        3 * sit_flops(raw_model) + (0 if args.target_cache else sum(2e9 * e.gmacs_per_image() for e in encoders))
    )
    info = dict(device=device, compiled=compiled, flops_per_step=flops, train_step=train_step, cfg=cfg)
    return step, info


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
