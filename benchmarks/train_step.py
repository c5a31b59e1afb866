"""Training-step throughput of SiT + REPA: ms/step, img/s, peak memory and MFU.

    python benchmarks/train_step.py --model SiT-B/2 --batch-size 32 --precision bf16 [--enc-type dinov2-vit-b]

Random latents and images stand in for data (this measures the model, encoder and optimizer, not I/O;
benchmarks/dataset.py measures loading). Encoders use random weights unless --enc-weights pretrained.
MFU = achieved FLOP/s / peak, where the FLOPs of a step are the SiT forward x 3 (forward + backward)
plus the frozen encoder's forward, both counted analytically (2 x multiply-accumulates).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loss import REPALoss  # noqa: E402
from models.encoders import load_encoders  # noqa: E402
from models.sit import SiT_models, sit_flops  # noqa: E402

# Dense peak TFLOP/s by device name fragment and precision (vendor datasheets, no sparsity).
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM; TF32 matmuls would be 494
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


def peak_tflops(device, precision, override):
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in PEAK_TFLOPS.items():
            if key in name:
                return table[precision]
    return None  # CPU: pass --peak-tflops to get an MFU


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--enc-type", default="dinov2-vit-b", help="'none' for a vanilla SiT")
    p.add_argument("--enc-weights", default="random")
    p.add_argument("--encoder-depth", type=int, default=4)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU (needed on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    latent = args.resolution // 8
    encoders = (
        []
        if args.enc_type == "none"
        else load_encoders(args.enc_type, device, args.resolution, enc_weights=args.enc_weights)
    )
    model = SiT_models[args.model](
        input_size=latent, num_classes=1000, z_dims=[e.embed_dim for e in encoders], encoder_depth=args.encoder_depth
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    scaler = torch.amp.GradScaler(enabled=args.precision == "fp16")
    step_model = torch.compile(model) if args.compile else model
    loss_fn = REPALoss(proj_coeff=0.5 if encoders else 0.0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.precision != "fp32")

    n = args.batch_size
    x = torch.randn(n, 4, latent, latent, device=device)
    y = torch.randint(0, 1000, (n,), device=device)
    images = torch.randint(0, 256, (n, 3, args.resolution, args.resolution), dtype=torch.uint8, device=device)

    def step():
        with torch.no_grad(), autocast:
            zs = [e.encode(images) for e in encoders]
        with autocast:
            terms = loss_fn(step_model, x, y, zs)
        scaler.scale(terms.total).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps

    flops = n * (3 * sit_flops(model) + sum(2e9 * e.gmacs_per_image() for e in encoders))
    peak = peak_tflops(device, args.precision, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {args.model}, batch {n}, {args.resolution}px, {args.precision}, encoders: {args.enc_type}")
    print(f"ms/step: {1000 * seconds:.1f}   img/s: {n / seconds:.1f}   TFLOP/s: {flops / seconds / 1e12:.3f}")
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    else:
        import resource

        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(f"MFU: {flops / seconds / 1e12 / peak:.1%} of {peak} TFLOP/s" if peak else "MFU: pass --peak-tflops")


if __name__ == "__main__":
    main()
