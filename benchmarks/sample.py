"""Sampling throughput: images/s of the ODE/SDE (SiT) or DDPM/DDIM (DiT) samplers at given steps, CFG and
precision, with an untrained model of the chosen size (the cost does not depend on the weights).

    python benchmarks/sample.py --model SiT-XL/2 --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7 \
        --batch-size 64 --precision bf16

The guidance interval matters: with [0, 0.7] the noisiest 30% of steps run the model once instead of
twice. --compile true compiles the model call (as sample_ddp.py --compile true); the first (warm-up) batch
then includes the compilation, reported apart. VAE decoding is excluded (about 1-2% of a 250-step SDE sample on a GPU); for the evaluator's
images/s run benchmarks/evaluate.py.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import parse_bool  # noqa: E402
from diffusion import ddim_sampler, ddpm_sampler  # noqa: E402
from models import MODELS  # noqa: E402
from models.sit import sit_flops  # noqa: E402
from samplers import euler_maruyama_sampler, euler_sampler  # noqa: E402

SAMPLERS = {"ode": euler_sampler, "sde": euler_maruyama_sampler, "ddpm": ddpm_sampler, "ddim": ddim_sampler}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--mode", choices=tuple(SAMPLERS), default="sde")
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--heun", action="store_true")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--compile", type=parse_bool, default=False, help="torch.compile the model call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    device = torch.device(args.device)
    is_dit = args.model.startswith("DiT")
    if is_dit != (args.mode in ("ddpm", "ddim")):
        p.error(f"--mode {args.mode} does not apply to {args.model}")
    latent = args.resolution // 8
    model = MODELS[args.model](input_size=latent, num_classes=1000, z_dims=[]).to(device).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # a non-zero field, as after training
    x = torch.randn(args.batch_size, 4, latent, latent, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    kwargs = dict(
        num_steps=args.num_steps, cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
        guidance_high=args.guidance_high,
    )  # fmt: skip
    if args.mode == "ode":
        kwargs["heun"] = args.heun
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    calls = []
    hook = model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    with torch.no_grad(), autocast:
        SAMPLERS[args.mode](model, x[:1], y[:1], **kwargs)  # counts forward passes per sample
    hook.remove()
    net = torch.compile(model) if args.compile else model
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        SAMPLERS[args.mode](net, x, y, **kwargs)  # warm-up (and compilation) at the timed batch size
    sync()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        for _ in range(args.repeats):
            SAMPLERS[args.mode](net, x, y, **kwargs)
    sync()
    seconds = (time.perf_counter() - start) / args.repeats
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    evals = sum(calls)  # model evaluations per image (2 per guided step)
    print(
        f"device: {name}; {args.model} {args.resolution}px, {args.mode} {args.num_steps} steps, cfg {args.cfg_scale} "
    )
    print(
        f"  in [{args.guidance_low}, {args.guidance_high}], {args.precision}, batch {args.batch_size}, compile {args.compile}"
    )
    print(f"warm-up batch{' (with compilation)' if args.compile else ''}: {warmup_s:.1f} s")
    print(f"images/s: {args.batch_size / seconds:.2f}   s/batch: {seconds:.2f}   model evaluations per image: {evals}")
    print(f"TFLOP/s: {args.batch_size * evals * sit_flops(model) / seconds / 1e12:.3f}")
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
