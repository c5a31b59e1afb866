"""The official REPA training step and ours, alternately on the same device: ms/step and the ratio official / ours.

    python benchmarks/vs_official.py --official ~/src/REPA --dinov2 ~/src/dinov2 \
        --model SiT-B/2 --batch-size 8 --precision fp32 --reps 3 --steps 2 [--compile false] [--target-cache true]

--official is a checkout of github.com/sihyun-yu/REPA: its models/sit.py (SiT) and loss.py (SILoss) are
imported from there. --dinov2 is a checkout of github.com/facebookresearch/dinov2, loaded the way the official
utils.load_encoders loads it (torch.hub, here from the local folder, random weights: the cost does not depend
on them), with the position embedding resampled to 16x16 as there. The official step is the body of the
official train.py loop (not importable: it lives inside main()), repeated here line for line: latent sample,
label drop, DINOv2 forward_features under no_grad + autocast, SILoss, backward, clip, AdamW (torch defaults,
as the official), zero_grad, the official per-parameter EMA, and the three `.item()` it logs every step.
Ours is training.TrainStep through benchmarks/train_step.py (the step train.py runs).

Each rep times `--steps` steps of the official step and of ours, each after one untimed warm-up step, the
order alternating between reps (official first in even reps) so that a drift in machine load favours neither.
The ratio of a rep is official / ours (> 1: ours is faster), by wall time and by process CPU time (all
threads); on a CPU shared with other jobs the CPU-time ratio is the steadier one, since waiting for a core
is not counted. Printed: every rep, then min / median / max of both. --profile K then profiles one more step
of each and prints its top K operators by self CPU time (torch.profiler): what bounds the step.
"""

import argparse
import copy
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import build_step, import_official, synchronize  # noqa: E402
from config import parse_bool  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_official_step(args):
    """The official train.py loop body at these settings: step() -> None."""
    import timm

    sit, loss_module = import_official(Path(args.official))
    accelerator = Accelerator(mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[args.precision])
    device = accelerator.device
    torch.manual_seed(0)
    encoder = torch.hub.load(args.dinov2, "dinov2_vitb14", source="local", pretrained=False)
    del encoder.head
    encoder.pos_embed.data = timm.layers.pos_embed.resample_abs_pos_embed(encoder.pos_embed.data, [16, 16])
    encoder.head = torch.nn.Identity()
    encoder = encoder.to(device).eval()
    latent_size = args.resolution // 8
    model = sit.SiT_models[args.model](
        input_size=latent_size, num_classes=1000, use_cfg=True, z_dims=[encoder.embed_dim],
        encoder_depth=args.encoder_depth, fused_attn=True, qk_norm=False,
    ).to(device)  # fmt: skip
    ema = copy.deepcopy(model).to(device).requires_grad_(False)
    latents_scale = torch.tensor([0.18215] * 4).view(1, 4, 1, 1).to(device)
    latents_bias = torch.zeros(1, 4, 1, 1, device=device)
    loss_fn = loss_module.SILoss(prediction="v", path_type="linear", encoders=[encoder], accelerator=accelerator,
                                 latents_scale=latents_scale, latents_bias=latents_bias, weighting="uniform")  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    n = args.batch_size
    raw_image = torch.randint(0, 256, (n, 3, args.resolution, args.resolution), dtype=torch.uint8, device=device)
    moments = torch.cat([torch.randn(n, 4, latent_size, latent_size), torch.rand(n, 4, latent_size, latent_size)], 1)
    moments, y = moments.to(device), torch.randint(0, 1000, (n,), device=device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def update_ema(ema_model, model, decay=0.9999):  # official train.update_ema
        ema_params = OrderedDict(ema_model.named_parameters())
        for name, param in OrderedDict(model.named_parameters()).items():
            ema_params[name.replace("module.", "")].mul_(decay).add_(param.data, alpha=1 - decay)

    def step():
        drop_ids = torch.rand(y.shape[0], device=y.device) < 0.1
        labels = torch.where(drop_ids, 1000, y)
        with torch.no_grad():
            mean_, std_ = torch.chunk(moments, 2, dim=1)  # official sample_posterior
            x = (mean_ + std_ * torch.randn_like(mean_)) * latents_scale + latents_bias
            with accelerator.autocast():
                raw_image_ = (raw_image / 255.0 - mean) / std  # official preprocess_raw_image, dinov2 branch
                raw_image_ = torch.nn.functional.interpolate(raw_image_, 224, mode="bicubic")
                zs = [encoder.forward_features(raw_image_)["x_norm_patchtokens"]]
        with accelerator.accumulate(model):
            loss, proj_loss = loss_fn(model, x, dict(y=labels), zs=zs)
            loss_mean, proj_loss_mean = loss.mean(), proj_loss.mean()
            loss = loss_mean + proj_loss_mean * 0.5
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                update_ema(ema, model)
        # The official loop logs these every step (three host-device syncs).
        accelerator.gather(loss_mean).mean().detach().item()
        accelerator.gather(proj_loss_mean).mean().detach().item()
        accelerator.gather(grad_norm).mean().detach().item()

    return step, device


def time_steps(step, steps, device):
    """(wall seconds, process CPU seconds) per step, after one untimed warm-up step."""
    step()  # warm-up (and compilation, for ours with --compile true)
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps


def print_profile(name, step, device, rows):
    """One step under torch.profiler: its top `rows` operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    print(f"--- {name}: top {rows} operators of one step by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50))


def summary(ratios):
    return f"min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  max {max(ratios):.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="checkout of github.com/sihyun-yu/REPA")
    p.add_argument("--dinov2", required=True, help="checkout of github.com/facebookresearch/dinov2 (hubconf.py)")
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--encoder-depth", type=int, default=4)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--compile", type=parse_bool, default=False, help="ours compiled (the official is eager)")
    p.add_argument("--target-cache", type=parse_bool, default=False, help="ours with precomputed targets")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--profile", type=int, default=0, metavar="K", help="then print each step's top K operators")
    args = p.parse_args()

    official, device = build_official_step(args)
    ours_args = argparse.Namespace(
        model=args.model, batch_size=args.batch_size, resolution=args.resolution, enc_type="dinov2-vit-b",
        enc_weights="random", encoder_depth=args.encoder_depth, precision=args.precision,
        target_cache=args.target_cache, compile=args.compile,
    )  # fmt: skip
    ours_step, info = build_step(ours_args)
    counter = iter(range(10**9))
    ours = lambda: ours_step(next(counter))  # noqa: E731
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; {args.model}, batch {args.batch_size}, {args.resolution} px, {args.precision}, DINOv2-B; "
          f"ours: compile {info['compiled']}, target cache {args.target_cache}")  # fmt: skip
    wall, cpu = [], []
    for rep in range(args.reps):
        if rep % 2 == 0:
            t_official = time_steps(official, args.steps, device)
            t_ours = time_steps(ours, args.steps, device)
        else:
            t_ours = time_steps(ours, args.steps, device)
            t_official = time_steps(official, args.steps, device)
        wall.append(t_official[0] / t_ours[0])
        cpu.append(t_official[1] / t_ours[1])
        print(f"rep {rep}: official {1000 * t_official[0]:.0f} ms/step (CPU {1000 * t_official[1]:.0f}), "
              f"ours {1000 * t_ours[0]:.0f} ms/step (CPU {1000 * t_ours[1]:.0f}), "
              f"ratio {wall[-1]:.3f} (CPU {cpu[-1]:.3f})", flush=True)  # fmt: skip
    print(f"ratio official/ours, wall time: {summary(wall)}")
    print(f"ratio official/ours, CPU time:  {summary(cpu)}")
    if args.profile:
        print_profile("official", official, device, args.profile)
        print_profile("ours", ours, device, args.profile)


if __name__ == "__main__":
    main()
