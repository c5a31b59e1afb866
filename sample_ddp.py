"""Generate a sample batch for FID with one or many processes, and optionally evaluate it.

    torchrun --nproc_per_node=8 sample_ddp.py --ckpt exps/run/checkpoints/4000000.pt \
        --num-fid-samples 50000 --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7 \
        [--ref-batch VIRTUAL_imagenet256_labeled.npz]

Loads checkpoints of this project and of the official REPA code (EMA weights by default). The model's
shape is read from the state dict itself (depth, width, patch, classes, projectors, qk_norm); only the
head count comes from the model name (--model, else the checkpoint's args/config).

Determinism: sample i gets its label and its initial noise from (global seed, i) alone, and samples are
generated in fixed global batches of --batch-size, batch b on rank b % world_size. The set of images is
therefore byte-identical whatever the number of processes, and a rerun after a crash regenerates only the
batches whose PNGs are missing. The .npz (arr_0: uint8 N x H x W x 3, arr_1: labels) is written at the
end from the PNGs, with the official quantisation clamp(127.5 x + 128, 0, 255) truncated to uint8.
"""

import argparse
import json
import math
import os
import re
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from checkpoints import load_checkpoint, model_state_dict
from diffusion import ddim_sampler, ddpm_sampler
from models import MODELS
from models.dit import DiT, DiT_models
from models.sit import SiT
from samplers import euler_maruyama_sampler, euler_sampler

# Sampling modes: flow-matching SiTs integrate the ODE or SDE; DDPM-trained DiTs run ancestral DDPM or DDIM.
SIT_MODES, DIT_MODES = ("ode", "sde"), ("ddpm", "ddim")
VAE_NAMES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}

#################################################################################
#                         Model from checkpoint                                 #
#################################################################################


def sit_kwargs_from_state_dict(state_dict: dict) -> dict:
    """SiT constructor keywords read off the weights (all but num_heads, which no tensor records)."""
    required = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise KeyError(f"not a SiT state dict: missing {missing}")
    hidden, channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    grid = math.isqrt(state_dict["pos_embed"].shape[1])
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    n_projectors = len({k.split(".")[1] for k in state_dict if k.startswith("projectors.")})
    z_dims = [state_dict[f"projectors.{i}.4.weight"].shape[0] for i in range(n_projectors)]
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    return dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=channels,
        hidden_size=hidden,
        depth=depth,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        # A null row exists iff the model was trained with label dropout; the exact rate does not matter here.
        num_classes=rows - 1,
        class_dropout_prob=0.1,
        z_dims=z_dims,
        projector_dim=state_dict["projectors.0.0.weight"].shape[0] if z_dims else 2048,
        qk_norm="blocks.0.attn.q_norm.weight" in state_dict,
    )


def load_model(ckpt_path, model_name=None, use_ema=True, encoder_depth=None):
    """(model in eval mode, settings from the checkpoint: model name, pixel_space, path_type, ...)."""
    ckpt = load_checkpoint(ckpt_path)
    settings = {}
    if isinstance(ckpt, dict) and "config" in ckpt:
        settings = dict(ckpt["config"])  # this project's checkpoints
    elif isinstance(ckpt, dict) and "args" in ckpt:
        settings = vars(ckpt["args"])  # official REPA checkpoints (argparse.Namespace)
    name = model_name or settings.get("model")
    if name not in MODELS:
        raise ValueError(f"{ckpt_path}: model {name!r} unknown or not recorded; pass --model (one of {list(MODELS)})")
    state_dict = model_state_dict(ckpt, use_ema=use_ema, path=ckpt_path)
    kwargs = sit_kwargs_from_state_dict(state_dict)
    num_heads = settings.get("num_heads") or MODELS[name].keywords["num_heads"]  # custom size, else the name
    if kwargs["z_dims"]:
        kwargs["encoder_depth"] = encoder_depth or settings.get("encoder_depth", 8)
    if kwargs["num_classes"] < 1:
        raise ValueError(f"{ckpt_path}: the label table has no null row, so the model cannot be guided")
    if name in DiT_models:
        # learned sigma doubles the output channels: [eps | variance interpolation]
        out = state_dict["final_layer.linear.weight"].shape[0] // kwargs["patch_size"] ** 2
        model = DiT(num_heads=num_heads, learn_sigma=out == 2 * kwargs["in_channels"], **kwargs)
    else:
        model = SiT(num_heads=num_heads, **kwargs)
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), {**settings, "model": name}


#################################################################################
#                                 Sampling                                      #
#################################################################################


def sample_labels(num_samples, num_classes, seed, balanced=True):
    """Labels of samples 0..N-1 from (seed, N) only. Balanced: each class N / C times, in seeded order."""
    rng = np.random.default_rng([seed, 0x1ABE1])
    if balanced:
        return rng.permutation(np.arange(num_samples) % num_classes)
    return rng.integers(0, num_classes, size=num_samples)


def sample_generator(seed, index, device):
    """The generator of sample `index`: its initial noise and SDE noise depend on (seed, index) only."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


def png_path(sample_dir: Path, index: int) -> Path:
    return sample_dir / f"{index:06d}.png"


def quantize(images):
    """[-1, 1] float images (N, 3, H, W) -> uint8 (N, H, W, 3), exactly as the official sampling script."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def write_png(array, path: Path):
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)  # a killed run leaves whole PNGs only


def save_npz(path: Path, **arrays):
    """np.savez, but byte-reproducible (fixed zip timestamps) and atomic."""
    tmp = path.with_suffix(".tmp.npz")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    os.replace(tmp, path)


def load_decoder(args, pixel_space, device):
    """Model output -> images in [-1, 1]: identity for pixel-space models, else the SD-VAE decoder."""
    if pixel_space:
        return lambda x: x
    from diffusers.models import AutoencoderKL

    name = VAE_NAMES.get(args.vae, args.vae)
    try:
        vae = AutoencoderKL.from_pretrained(name).to(device).eval()
    except Exception as e:
        raise RuntimeError(
            f"cannot load the VAE {name!r} ({type(e).__name__}: {e}). Download it once (e.g. with network access: "
            f"`python -c \"from diffusers.models import AutoencoderKL; AutoencoderKL.from_pretrained('{name}')\"`) "
            "or pass --vae /local/folder holding config.json and the weights"
        ) from e
    return lambda z: vae.decode((z - args.latent_bias) / args.latent_scale).sample


def check_official_flags(args, model, pixel_space):
    """Official command lines pass what the weights already say; a disagreement is a mistake worth a stop."""
    found = {
        "--projector-embed-dims": ",".join(map(str, model.z_dims)),
        "--resolution": model.input_size * (1 if pixel_space else 8),
        "--num-classes": model.num_classes,
        "--qk-norm": isinstance(model.blocks[0].attn.q_norm, torch.nn.LayerNorm),
    }
    given = {
        "--projector-embed-dims": args.projector_embed_dims,
        "--resolution": args.resolution,
        "--num-classes": args.num_classes,
        "--qk-norm": args.qk_norm,
    }
    for flag, value in given.items():
        if value is not None and (str(value) if flag == "--projector-embed-dims" else value) != found[flag]:
            raise ValueError(f"{flag} {value} disagrees with the checkpoint {args.ckpt}, which has {found[flag]}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of this project or of the official code")
    p.add_argument("--model", default=None, help="e.g. SiT-XL/2 (default: from the checkpoint)")
    p.add_argument("--use-ema", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--encoder-depth", type=int, default=None, help="only to build the projectors of old files")
    p.add_argument("--sample-dir", default="samples")
    p.add_argument("--num-fid-samples", type=int, default=50_000)
    p.add_argument("--batch-size", "--per-proc-batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--mode", choices=SIT_MODES + DIT_MODES, default=None, help="default: sde (SiT), ddpm (DiT)")
    p.add_argument("--num-steps", type=int, default=250)
    p.add_argument("--heun", action="store_true", help="Heun's method for the ODE")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--path-type", choices=("linear", "cosine"), default=None, help="default: from the checkpoint")
    p.add_argument("--labels", choices=("balanced", "random"), default="balanced", help="random = official script")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--vae", default="ema", help="ema | mse | hub name | local folder")
    p.add_argument("--latent-scale", type=float, default=0.18215)
    p.add_argument("--latent-bias", type=float, default=0.0)
    # Flags of the official generate.py. Here the weights determine these, so they are only checked.
    p.add_argument("--projector-embed-dims", default=None, help="official flag; checked against the weights")
    p.add_argument("--resolution", type=int, default=None, help="official flag; checked against the model")
    p.add_argument("--num-classes", type=int, default=None, help="official flag; checked against the weights")
    p.add_argument("--qk-norm", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True, default=None)
    p.add_argument("--fused-attn", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True)
    p.add_argument("--ref-batch", default=None, help="evaluate against this ADM reference batch at the end")
    p.add_argument("--inception-weights", default=None, help="local Inception weights for --ref-batch")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: reproducible samples across GPU types

    model, settings = load_model(args.ckpt, args.model, args.use_ema, args.encoder_depth)
    check_official_flags(args, model, bool(settings.get("pixel_space", False)))
    model = model.to(device)
    pixel_space = bool(settings.get("pixel_space", False))
    path_type = args.path_type or settings.get("path_type", "linear")
    decode = load_decoder(args, pixel_space, device)
    labels_all = sample_labels(args.num_fid_samples, model.num_classes, args.global_seed, args.labels == "balanced")
    sample_dir = Path(args.sample_dir)
    if rank == 0:
        sample_dir.mkdir(parents=True, exist_ok=True)
    if distributed:
        dist.barrier()

    # Fixed global batches; batch b goes to rank b % world. A batch is redone only if a PNG of it is missing.
    n, bs = args.num_fid_samples, args.batch_size
    batches = [range(b * bs, min((b + 1) * bs, n)) for b in range(math.ceil(n / bs))]
    mine = [r for b, r in enumerate(batches) if b % world == rank]
    todo = [r for r in mine if not all(png_path(sample_dir, i).exists() for i in r)]
    if rank == 0:
        print(
            f"{n} samples in {len(batches)} batches of {bs} on {world} process(es); {len(mine) - len(todo)} of rank 0's done"
        )
    shape = (model.in_channels, model.input_size, model.input_size)
    is_dit = isinstance(model, DiT)
    args.mode = args.mode or ("ddpm" if is_dit else "sde")
    if args.mode not in (DIT_MODES if is_dit else SIT_MODES):
        raise ValueError(
            f"--mode {args.mode} does not apply to {settings['model']}; use one of {DIT_MODES if is_dit else SIT_MODES}"
        )
    sampler = {"sde": euler_maruyama_sampler, "ode": euler_sampler, "ddpm": ddpm_sampler, "ddim": ddim_sampler}[
        args.mode
    ]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    start = time.time()
    for indices in tqdm(todo, disable=rank != 0, desc="sampling", dynamic_ncols=True):
        gens = [sample_generator(args.global_seed, i, device) for i in indices]
        noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
        y = torch.from_numpy(labels_all[indices.start : indices.stop]).to(device)
        kwargs = dict(
            num_steps=args.num_steps, cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
            guidance_high=args.guidance_high,
        )  # fmt: skip
        if not is_dit:
            kwargs |= dict(heun=args.heun, path_type=path_type)
        if args.mode in ("sde", "ddpm", "ddim"):
            kwargs["generator"] = gens
        with torch.no_grad(), autocast:
            z = sampler(model, noise, y, **kwargs)
            images = quantize(decode(z.float()).float())
        for i, array in zip(indices, images):
            write_png(array, png_path(sample_dir, i))
    elapsed = time.time() - start
    if distributed:
        dist.barrier()

    if rank == 0:
        npz_path = sample_dir.with_suffix(".npz") if sample_dir.name else Path("samples.npz")
        arrays = np.stack([np.asarray(Image.open(png_path(sample_dir, i)).convert("RGB")) for i in range(n)])
        save_npz(npz_path, arr_0=arrays, arr_1=labels_all.astype(np.int64))
        summary = {
            **vars(args),
            "model": settings["model"], "path_type": path_type, "pixel_space": pixel_space, "world_size": world,
            "npz": str(npz_path), "shape": list(arrays.shape), "seconds": elapsed,
            "images_per_second_rank0": sum(len(r) for r in todo) / max(elapsed, 1e-9),
        }  # fmt: skip
        print(f"wrote {npz_path} {arrays.shape}")
        if args.ref_batch:
            from evaluations.evaluate import main as evaluate_main

            eval_argv = [args.ref_batch, str(npz_path), "--json", str(npz_path.with_suffix(".metrics.json"))]
            if args.inception_weights:
                eval_argv += ["--inception-weights", args.inception_weights]
            summary["metrics"] = evaluate_main(eval_argv)
        npz_path.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
