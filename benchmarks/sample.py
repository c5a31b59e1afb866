"""Sampling throughput: images/s of the ODE/SDE (SiT) or DDPM/DDIM (DiT) samplers at given steps, CFG and
precision, with an untrained model of the chosen size (the cost does not depend on the weights).

    python benchmarks/sample.py --model SiT-XL/2 --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7 \
        --batch-size 64 --precision bf16

The guidance interval matters: with [0, 0.7] the noisiest 30% of steps run the model once instead of
twice. SiT models are built with a REPA projector (DINOv2-B's 768-d targets, as the paper's), which sampling
skips (`model.project = False`, as sample_ddp.py); the official code runs it at every model call.

--official PATH (a checkout of github.com/sihyun-yu/REPA; SiT, --mode ode or sde) times the official sampler
(its samplers.py euler_sampler / euler_maruyama_sampler on its models/sit.py SiT, loaded with the same weights)
and ours alternately, --repeats times each after one warm-up, the order alternating; it checks that both make
the same number of model evaluations (equal NFE) and the same samples, and prints the ratio official / ours
(> 1: ours is faster) by wall time and by process CPU time, min / median / max. --compile true compiles the model call (as sample_ddp.py --compile true); the first (warm-up) batch
then includes the compilation, reported apart. VAE decoding is excluded (about 1-2% of a 250-step SDE sample on a GPU); for the evaluator's
images/s run benchmarks/evaluate.py.
"""

import argparse
import statistics
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
OFFICIAL_SAMPLERS = {"ode": "euler_sampler", "sde": "euler_maruyama_sampler"}  # in the official samplers.py


def count_calls(model, run):
    """Model evaluations per sample made by run() (one batched call of 2N counts as 2 per sample)."""
    calls = []
    hook = model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    try:
        out = run()
    finally:
        hook.remove()
    return sum(calls), out


def timed(run, sync):
    """(wall seconds, process CPU seconds) of run()."""
    start, cpu_start = time.perf_counter(), time.process_time()
    run()
    sync()
    return time.perf_counter() - start, time.process_time() - cpu_start


def official_comparison(args, model, net, x, y, kwargs, autocast, sync):
    """The official sampler on the official SiT (same weights) against ours: equal NFE, same samples, ratios."""
    from benchmarks.harness import import_official

    official_sit, official_samplers = import_official(Path(args.official), ("models.sit", "samplers"))
    official = official_sit.SiT_models[args.model](
        input_size=model.input_size, num_classes=1000, use_cfg=True, z_dims=model.z_dims,
        encoder_depth=model.encoder_depth, fused_attn=True, qk_norm=False,
    ).to(x.device)  # fmt: skip
    official.load_state_dict(model.state_dict(), strict=True)  # the same keys: the same network
    official.eval()
    official_sampler = getattr(official_samplers, OFFICIAL_SAMPLERS[args.mode])
    runs = {
        "official": lambda n: official_sampler(official, x[:n], y[:n], **kwargs),
        "ours": lambda n: SAMPLERS[args.mode](net, x[:n], y[:n], **kwargs),
    }
    nfe, samples = {}, {}
    with torch.no_grad(), autocast:
        for name, run in runs.items():
            torch.manual_seed(0)  # both samplers draw their SDE noise from the global generator, in the same order
            nfe[name], samples[name] = count_calls(official if name == "official" else model, lambda r=run: r(1))
    difference = (samples["official"].float() - samples["ours"].float()).abs().max().item()
    print(f"model evaluations per sample: official {nfe['official']}, ours {nfe['ours']}; "
          f"max |official - ours| of one sample: {difference:.2e}")  # fmt: skip
    if nfe["official"] != nfe["ours"]:
        raise RuntimeError("the samplers make different numbers of model evaluations: not the same work")
    n = x.shape[0]
    wall, cpu = [], []
    with torch.no_grad(), autocast:
        for run in runs.values():
            run(n)  # warm-up (and compilation, for ours with --compile true)
        sync()
        for rep in range(args.repeats):
            order = ("official", "ours") if rep % 2 == 0 else ("ours", "official")
            t = {name: timed(lambda r=runs[name]: r(n), sync) for name in order}
            wall.append(t["official"][0] / t["ours"][0])
            cpu.append(t["official"][1] / t["ours"][1])
            print(f"rep {rep}: official {t['official'][0]:.2f} s (CPU {t['official'][1]:.2f}), ours {t['ours'][0]:.2f} s "
                  f"(CPU {t['ours'][1]:.2f}), ratio {wall[-1]:.3f} (CPU {cpu[-1]:.3f})", flush=True)  # fmt: skip
    for name, ratios in (("wall time", wall), ("CPU time", cpu)):
        print(f"ratio official/ours, {name}: min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  "
              f"max {max(ratios):.3f}")  # fmt: skip


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
    p.add_argument("--official", default=None, help="checkout of github.com/sihyun-yu/REPA: compare with its sampler")
    args = p.parse_args()

    device = torch.device(args.device)
    is_dit = args.model.startswith("DiT")
    if is_dit != (args.mode in ("ddpm", "ddim")):
        p.error(f"--mode {args.mode} does not apply to {args.model}")
    if args.official and (is_dit or args.mode not in OFFICIAL_SAMPLERS):
        p.error("--official compares the SiT samplers: --mode ode or sde with a SiT model")
    latent = args.resolution // 8
    torch.manual_seed(0)
    model = MODELS[args.model](input_size=latent, num_classes=1000, z_dims=[] if is_dit else [768]).to(device).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # a non-zero field, as after training
    model.project = False  # as sample_ddp.py: sampling never reads the projector outputs
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

    with torch.no_grad(), autocast:
        evals, _ = count_calls(model, lambda: SAMPLERS[args.mode](model, x[:1], y[:1], **kwargs))
    net = torch.compile(model) if args.compile else model
    if args.official:
        official_comparison(args, model, net, x, y, kwargs, autocast, sync)
        return
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
