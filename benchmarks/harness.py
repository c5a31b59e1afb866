"""What the benchmark scripts share (not a script): the timed training step at a config's settings (train.py's
own TrainStep, model and loss), the device peaks for MFU, and importing modules of an official checkout beside
this project's modules of the same names."""

import copy
import importlib
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from config import TrainConfig, config_from_dict, load_yaml_config
from models import build_model
from models.sit import sit_flops
from training import TrainStep, alignment_encoders, build_loss, compile_step, make_optimizer

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
    side, channels = (cfg.resolution, 3) if cfg.pixel_space else (cfg.resolution // 8, 4)
    # As train.py: the encoders at the setting whose token grid is the SiT's, and the model of the config.
    encoders = alignment_encoders(cfg, device, side)
    model, _ = build_model(cfg, [e.embed_dim for e in encoders], side, channels)
    model = model.to(device)
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
    loss_fn = build_loss(cfg)
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


def import_official(path: Path, names=("models.sit", "loss")):
    """These modules of the official checkout, without clashing with this project's modules of the same names."""
    missing = [name for name in names if not (path / (name.replace(".", "/") + ".py")).is_file()]
    if missing:
        raise FileNotFoundError(f"--official {path}: expected a REPA checkout with {', '.join(missing)}")
    tops = {name.split(".")[0] for name in names}
    clashes = lambda: [n for n in sys.modules if n.split(".")[0] in tops]  # noqa: E731
    saved = {name: sys.modules.pop(name) for name in clashes()}
    sys.path.insert(0, str(path))
    try:
        modules = [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(str(path))
        for name in clashes():
            del sys.modules[name]
        sys.modules.update(saved)
    return modules
