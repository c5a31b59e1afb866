"""How well the hidden states of a SiT/DiT align with a frozen encoder: CKNNA, mutual k-NN and linear probes.

    python -m analysis.alignment --ckpt exps/run/checkpoints/0100000.pt exps/run/checkpoints/0400000.pt \
        --data-dir data/imagenet256 --enc-type dinov2-vit-g --num-images 10000 --t 0.5 --out exps/run/alignment

For every checkpoint, noise level t and block l it measures CKNNA and mutual k-NN between the pooled hidden
state after block l and the frozen encoder's pooled features of the same clean images, and the held-out
top-1 accuracy of a linear probe on that hidden state. It writes results.json and plots against the layer
(and against the training step when several checkpoints are given). The measurements themselves are
library functions (evaluations/alignment.py: `cknna`, `mutual_knn`, `extract_features`, `encoder_features`,
`linear_probe`), where the protocol and its sources are written down.
"""

import argparse
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checkpoints import load_checkpoint, load_model
from dataset import ImageLatentDataset
from evaluations.alignment import (
    cknna,
    clamp_outliers,
    encoder_features,
    extract_features,
    linear_probe,
    mutual_knn,
    split_indices,
)
from models.encoders import WEIGHT_CHOICES, encoder_resolution, load_encoders

CHECKPOINT_NAME = re.compile(r"^(\d+)\.pt$")  # 0400000.pt: the step is in the name

#################################################################################
#                          One run over the checkpoints                         #
#################################################################################


def checkpoint_step(path: Path) -> int | None:
    """The training step of a checkpoint: from its name (0400000.pt), else its `steps` entry."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    if match:
        return int(match.group(1))
    steps = load_checkpoint(path).get("steps")
    return None if steps is None else int(steps)


def load_items(data_dir, pixel_space: bool, num_images: int, seed: int, batch_size: int, num_workers: int):
    """(dataset indices, uint8 images, x, labels) of a seeded random subset of the data folder, in memory."""
    dataset = ImageLatentDataset(data_dir, latents=not pixel_space)
    if num_images > len(dataset):
        warnings.warn(
            f"--num-images {num_images} > {len(dataset)} items in {data_dir}: using all of them", stacklevel=2
        )
        num_images = len(dataset)
    indices = np.sort(np.random.default_rng([seed, 0xDA7A]).choice(len(dataset), num_images, replace=False))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices.tolist()), batch_size=batch_size, num_workers=num_workers
    )
    batches = list(tqdm(loader, desc="load images", dynamic_ncols=True))
    images, x, labels = (torch.cat(parts) for parts in zip(*batches))
    return indices, images, x, labels


def layer_metrics(model_feats: torch.Tensor, enc_feats: torch.Tensor, labels, split, args) -> dict:
    """CKNNA, mutual k-NN and probe accuracy of one layer's (N, D) features (enc_feats: as CKNNA compares them)."""
    feats = model_feats.to(args.device)
    compared = clamp_outliers(feats, args.outlier_quantile) if args.outlier_quantile else feats
    train, test = split
    return {
        "cknna": cknna(compared, enc_feats, args.topk),
        "mutual_knn": mutual_knn(compared, enc_feats, args.topk),
        "probe_accuracy": linear_probe(
            feats[train], labels[train], feats[test], labels[test], args.probe_weight_decay, args.probe_max_iter
        ),
    }


def analyse_checkpoint(model, settings, path, items, enc_feats, split, args, cls_tokens=None) -> dict:
    """Every metric of one checkpoint (its model and settings from checkpoints.load_model) at every t and layer.
    cls_tokens: the encoder's (N, D) class tokens of the items, which REG models denoise with the image."""
    indices, _, x, labels = items
    model = model.to(args.device)
    is_reg = bool(getattr(model, "cls_token_dim", None))
    if is_reg and cls_tokens is None:
        raise ValueError(f"{path} is a REG model, but the encoder has no class token to give it")
    layers = sorted(set(args.layers)) if args.layers else list(range(1, len(model.blocks) + 1))
    result = {
        "path": str(path),
        "step": checkpoint_step(path),
        "model": settings["model"],
        "weights": args.weights,
        "weights_sha256": settings["weights_sha256"],
        "encoder_depth": model.encoder_depth if model.z_dims else None,
        "layers": layers,
        "by_t": {},
    }
    for t in args.t:
        parts = {layer: [] for layer in layers}
        for start in tqdm(range(0, len(indices), args.batch_size), desc=f"{Path(path).name} t={t}", dynamic_ncols=True):
            batch = slice(start, start + args.batch_size)
            batch_labels = labels[batch] if args.labels == "true" else None
            reg = {"cls_token": cls_tokens[batch]} if is_reg else {}
            feats = extract_features(
                model, settings, x[batch], batch_labels, layers, t, args.seed, indices[batch], **reg
            )
            for layer in layers:
                parts[layer].append(feats[layer])
        per_layer = [layer_metrics(torch.cat(parts[layer]), enc_feats, labels, split, args) for layer in layers]
        result["by_t"][str(t)] = {key: [m[key] for m in per_layer] for key in ("cknna", "mutual_knn", "probe_accuracy")}
    return result


def save_plots(report: dict, out: Path) -> None:
    """alignment_vs_layer.png (and alignment_vs_step.png for several checkpoints), headless."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ckpts, ts = report["checkpoints"], report["protocol"]["t"]
    metrics = (("cknna", "CKNNA with the encoder"), ("probe_accuracy", "linear probe top-1 (held out)"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for ax, (key, title) in zip(axes, metrics):
        for ckpt in ckpts:
            for t in ts:
                label = (
                    f"step {ckpt['step']}, t={t}" if ckpt["step"] is not None else f"{Path(ckpt['path']).name}, t={t}"
                )
                ax.plot(ckpt["layers"], ckpt["by_t"][str(t)][key], marker="o", ms=3, label=label)
        if key == "probe_accuracy":
            ax.axhline(report["encoder"]["probe_accuracy"], color="k", ls="--", lw=1, label=report["encoder"]["name"])
        depth = ckpts[0]["encoder_depth"]
        if depth:
            ax.axvline(depth, color="gray", ls=":", lw=1, label=f"encoder_depth {depth}")
        ax.set_xlabel("block (1-based)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "alignment_vs_layer.png")
    plt.close(fig)

    if len(ckpts) < 2 or any(c["step"] is None for c in ckpts):
        return
    fig, axes = plt.subplots(len(ts), 2, figsize=(11, 4 * len(ts)), dpi=100, squeeze=False)
    steps, layers = [c["step"] for c in ckpts], ckpts[0]["layers"]
    colours = plt.cm.viridis(np.linspace(0, 1, len(layers)))
    for row, t in zip(axes, ts):
        for ax, (key, title) in zip(row, metrics):
            for i, layer in enumerate(layers):
                values = [c["by_t"][str(t)][key][c["layers"].index(layer)] for c in ckpts]
                ax.plot(steps, values, marker="o", ms=3, color=colours[i], label=f"block {layer}")
            ax.set_xlabel("training step")
            ax.set_title(f"{title}, t={t}")
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "alignment_vs_step.png")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoints (ours or official), e.g. of one run")
    p.add_argument("--data-dir", required=True, help="data folder in the training layout (images/, vae-sd/)")
    p.add_argument("--enc-type", default=None, help="one encoder, e.g. dinov2-vit-g (default: the first checkpoint's)")
    p.add_argument("--enc-ckpt", default=None, help="local weights of the encoder")
    p.add_argument("--enc-weights", choices=WEIGHT_CHOICES, default="pretrained", help="random: for tests only")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="1-based blocks (default: all)")
    p.add_argument("--t", type=float, nargs="+", default=[0.5], help="noise levels, t=0 data, t=1 noise")
    p.add_argument("--num-images", type=int, default=10_000, help="random subset, held in memory (uint8 images)")
    p.add_argument("--topk", type=int, default=10, help="k of CKNNA and mutual k-NN (REPA: 10)")
    p.add_argument("--labels", choices=("null", "true"), default="null", help="class input (REPA: null)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of the checkpoint")
    p.add_argument("--outlier-quantile", type=float, default=None, help="clamp like Huh et al. (0.95); default off")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of the images for the probe")
    p.add_argument("--probe-weight-decay", type=float, default=1e-4)
    p.add_argument("--probe-max-iter", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="fixes the image subset, the noise and the probe split")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="folder for results.json and the plots")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in args.ckpt]
    # The first checkpoint fixes what the data must be: pixels or latents, and the encoder's token grid.
    first = load_model(paths[0], use_ema=args.weights == "ema")
    model, settings = first
    pixel_space = bool(settings.get("pixel_space", False))
    enc_type = args.enc_type or settings.get("enc_type")
    if not enc_type or enc_type == "none" or "," in enc_type:
        raise ValueError(f"--enc-type must name one encoder (the checkpoint records {settings.get('enc_type')!r})")
    enc_resolution = encoder_resolution(model.input_size // model.patch_size)  # as train.py: encoder grid = SiT grid
    del model, settings
    if args.enc_weights == "random":
        warnings.warn(
            "RANDOM ENCODER WEIGHTS (--enc-weights random): CKNNA against an untrained network measures nothing "
            "about REPA. This checks the pipeline only.",
            stacklevel=1,
        )

    items = load_items(args.data_dir, pixel_space, args.num_images, args.seed, args.batch_size, args.num_workers)
    indices, images, _, labels = items
    encoder = load_encoders(enc_type, args.device, enc_resolution, args.enc_ckpt, args.enc_weights)[0]
    # REG checkpoints denoise the encoder's class token with the image: keep it where the encoder has one.
    with_cls = encoder.has_class_token
    parts = [
        encoder_features(encoder, images[start : start + args.batch_size], class_token=with_cls)
        for start in tqdm(range(0, len(images), args.batch_size), desc=enc_type, dynamic_ncols=True)
    ]
    enc_feats = torch.cat([p[0] if with_cls else p for p in parts]).to(args.device)
    cls_tokens = torch.cat([p[1] for p in parts]) if with_cls else None
    del encoder
    # Huh et al. clamp both sides before the alignment metrics (not before the probe), when asked.
    enc_compared = clamp_outliers(enc_feats, args.outlier_quantile) if args.outlier_quantile else enc_feats
    split = split_indices(len(indices), args.test_fraction, args.seed)
    train, test = split
    report = {
        "protocol": {
            "data_dir": str(args.data_dir),
            "num_images": len(indices),
            "enc_type": enc_type,
            "enc_weights": args.enc_weights,
            "enc_resolution": enc_resolution,
            "pooling": "mean over patch tokens (model and encoder)",
            "labels": args.labels,
            "t": args.t,
            "topk": args.topk,
            "outlier_quantile": args.outlier_quantile,
            "seed": args.seed,
            "probe": {
                "train_images": len(train),
                "test_images": len(test),
                "weight_decay": args.probe_weight_decay,
                "max_iter": args.probe_max_iter,
            },
        },
        "encoder": {
            "name": enc_type,
            "probe_accuracy": linear_probe(
                enc_feats[train],
                labels[train],
                enc_feats[test],
                labels[test],
                args.probe_weight_decay,
                args.probe_max_iter,
            ),
        },
        "checkpoints": [],
    }
    for i, path in enumerate(paths):
        model, settings = first if i == 0 else load_model(path, use_ema=args.weights == "ema")
        first = None  # one model in memory at a time
        if bool(settings.get("pixel_space", False)) != pixel_space:
            raise ValueError(f"{path} and {paths[0]} differ in pixel_space: analyse them separately")
        report["checkpoints"].append(
            analyse_checkpoint(model, settings, path, items, enc_compared, split, args, cls_tokens)
        )
        del model
    report["checkpoints"].sort(key=lambda c: -1 if c["step"] is None else c["step"])
    (out / "results.json").write_text(json.dumps(report, indent=1))
    save_plots(report, out)
    for ckpt in report["checkpoints"]:
        for t, values in ckpt["by_t"].items():
            best = int(np.nanargmax(values["cknna"])) if not all(map(math.isnan, values["cknna"])) else 0
            print(
                f"{Path(ckpt['path']).name} (step {ckpt['step']}) t={t}: best CKNNA {values['cknna'][best]:.4f} at "
                f"block {ckpt['layers'][best]}, best probe {max(values['probe_accuracy']):.3f}"
            )
    print(f"wrote {out / 'results.json'}")
    return report


if __name__ == "__main__":
    main()
