"""Networks of the embedded demo domain, trained here on generated data: the REPA target and the judge.

    python -m demo nets --out demo/nets      # what made the committed networks
    python -m demo evaluate --ckpt demo_out/demo/checkpoints/0003000.pt --cfg-scale 4

Pretrained encoders cannot be downloaded for the demo domain (10 classes of generated shapes and textures,
demo/data.py), so the demo and the miniature (demo/miniature.py) train their
own, each from its own generated set (`SPLIT_SEEDS`), disjoint from what the diffusion model trains on:
- **the REPA target encoder**: a small timm ViT with the SiT's token grid, trained with labels (its final
  patch tokens, averaged, feed a linear classifier) and saved with models.encoders.save_timm_encoder, so a
  run aligns to it through `--enc-type timm:vit_tiny_patch16_224 --enc-ckpt FILE`, the registry path any
  user takes;
- **the evaluator**: a small CNN (another architecture, seed and training set). Its penultimate features
  give a Frechet distance (FD) between generated and held-out real images, and its classifier says whether
  a sample shows the shape of its conditioning label.

`evaluate` samples a checkpoint's EMA weights with balanced labels and prints the evaluator's verdict: the
fraction of samples classified as their label (overall and per class), the FD to held-out real images and
the real-vs-real floor of that FD, plus a PNG grid (one row per class).
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import ImageLatentDataset
from demo.data import CLASS_NAMES, make_demo_data
from evaluations.metrics import feature_statistics, frechet_distance
from models.encoders import encoder_resolution, save_timm_encoder

# Each set is a demo folder generated from its own seed: `diffusion` is what the SiTs train on (the demo's
# data/demo uses seed 0, a fifth set), `encoder` what the REPA target trains on, `evaluator` what the
# evaluator trains on, `heldout` the real images that only evaluation sees.
SPLIT_SEEDS = {"diffusion": 101, "encoder": 102, "evaluator": 103, "heldout": 104}
# The recipe of the committed demo/nets (nets.json): training images per class and epochs of each net;
# the defaults of `train` here and of demo/miniature.py.
TRAIN_PER_CLASS = 1000
ENCODER_EPOCHS, EVALUATOR_EPOCHS = 24, 20
ENCODER_NAME = "vit_tiny_patch16_224"  # a timm ViT, narrowed by ENCODER_WIDTH / ENCODER_DEPTH
ENCODER_MEAN, ENCODER_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


#################################################################################
#                                     Data                                      #
#################################################################################


def make_splits(out: Path, resolution: int, per_class: dict, splits=None) -> dict:
    """The disjoint sets (each a demo folder from its own seed) named in `per_class`; reused if there."""
    folders = {}
    for split in splits or per_class:
        seed = SPLIT_SEEDS[split]
        folder = Path(out) / "data" / split
        meta = folder / "images" / "dataset.json"
        want = {"seed": seed, "per_class": per_class[split], "num_classes": 10, "resolution": resolution}
        if not (meta.exists() and json.loads(meta.read_text()).get("demo") == want):
            make_demo_data(str(folder), per_class=per_class[split], resolution=resolution, seed=seed)
        folders[split] = folder
    return folders


def load_images(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) uint8 images and (N,) labels of a demo folder."""
    data = ImageLatentDataset(str(folder), latents=False)
    items = [data[i] for i in range(len(data))]
    return torch.stack([item[0] for item in items]), torch.stack([item[2] for item in items])


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 px (reflect padding): float images in [0, 1]."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w]


def fit_classifier(model, forward, images, labels, epochs, lr, seed, batch_size=128) -> None:
    """AdamW with a one-cycle schedule on cross-entropy over augmented images; `forward(model, x)` -> logits."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            x = augment(images[idx].float() / 255, generator)
            loss = F.cross_entropy(forward(model, x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


@torch.no_grad()
def accuracy(model, forward, images, labels) -> float:
    logits = torch.cat([forward(model, images[i : i + 256].float() / 255) for i in range(0, len(images), 256)])
    return (logits.argmax(1) == labels).float().mean().item()


#################################################################################
#                        The REPA target encoder (timm ViT)                     #
#################################################################################


def encoder_kwargs(resolution: int, grid: int, width: int = 128, depth: int = 4) -> dict:
    kwargs = dict(img_size=resolution, patch_size=resolution // grid, embed_dim=width, depth=depth, num_heads=4)
    return kwargs | dict(global_pool="avg", fc_norm=False)  # the final-norm patch tokens, averaged, are classified


def train_encoder(images, labels, kwargs: dict, path: Path, epochs: int, seed: int = 0) -> None:
    """A small timm ViT trained with labels, saved for `--enc-type timm:vit_tiny_patch16_224 --enc-ckpt path`."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(ENCODER_NAME, pretrained=False, num_classes=10, **kwargs)
    fit_classifier(model, encoder_forward, images, labels, epochs=epochs, lr=2e-3, seed=seed + 1)
    save_timm_encoder(model, ENCODER_NAME, kwargs, path, ENCODER_MEAN, ENCODER_STD)
    return model


def encoder_forward(model, x):
    mean, std = torch.tensor(ENCODER_MEAN).view(1, 3, 1, 1), torch.tensor(ENCODER_STD).view(1, 3, 1, 1)
    return model((x - mean) / std)


#################################################################################
#                    The independent evaluator (a small CNN)                    #
#################################################################################


class Evaluator(nn.Module):
    """Three conv stages and a linear classifier; `features` are the 128-d penultimate activations."""

    def __init__(self, num_classes=10, width=32):
        super().__init__()

        def stage(c_in, c_out):
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
            )  # fmt: skip

        self.body = nn.Sequential(stage(3, width), nn.MaxPool2d(2), stage(width, 2 * width), nn.MaxPool2d(2))
        self.body.append(stage(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x):  # x: (N, 3, H, W) in [0, 1]
        return self.body(x * 2 - 1).mean(dim=(2, 3))  # (N, 128)

    def forward(self, x):
        return self.head(self.features(x))


def train_evaluator(images, labels, path: Path, epochs: int, seed: int = 12345) -> Evaluator:
    torch.manual_seed(seed)  # another seed than everything else
    model = Evaluator()
    fit_classifier(model, lambda m, x: m(x), images, labels, epochs=epochs, lr=3e-3, seed=2)
    torch.save(model.state_dict(), path)
    return model


def load_evaluator(path: Path) -> Evaluator:
    model = Evaluator()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def evaluator_outputs(evaluator, images: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(features (N, 128) float64, predicted labels (N,)) of uint8 images."""
    feats = torch.cat([evaluator.features(images[i : i + 256].float() / 255) for i in range(0, len(images), 256)])
    return feats.double().numpy(), evaluator.head(feats).argmax(1)


def fd(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(feats_a), *feature_statistics(feats_b))


#################################################################################
#                          Both networks, in one folder                         #
#################################################################################


def encoder_probe_accuracy(encoder, images, labels) -> float:
    """A linear probe of the encoder's averaged target tokens: fitted on the even items, scored on the odd."""
    from evaluations.alignment import encoder_features, linear_probe

    feats = encoder_features(encoder, images)
    return linear_probe(feats[0::2], labels[0::2], feats[1::2], labels[1::2])


def train_nets(
    out: Path, resolution: int, grid: int, encoder_epochs: int, evaluator_epochs: int,
    per_class: int = TRAIN_PER_CLASS, evaluator_per_class: int = TRAIN_PER_CLASS, encoder_width: int = 128,
    encoder_depth: int = 4, heldout_per_class: int = 100,
) -> dict:  # fmt: skip
    """encoder.pt and evaluator.pt in `out` (each trained unless already there) and nets.json: how they were
    made and their accuracy on the held-out set (measured every time). Returns that record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"encoder": per_class, "evaluator": evaluator_per_class, "heldout": heldout_per_class}
    record_path = out / "nets.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    kwargs = encoder_kwargs(resolution, grid, encoder_width, encoder_depth)
    folders = make_splits(out, resolution, {"heldout": heldout_per_class})
    for net, epochs in (("encoder", encoder_epochs), ("evaluator", evaluator_epochs)):
        if (out / f"{net}.pt").exists():  # reused; a file without a record says only that much
            record.setdefault(net, dict(file=f"{net}.pt", made_by="found in the folder, not recorded"))
            continue
        folders |= make_splits(out, resolution, {net: sizes[net]})
        images, labels = load_images(folders[net])
        start = time.time()
        if net == "encoder":
            train_encoder(images, labels, kwargs, out / "encoder.pt", epochs)
        else:
            train_evaluator(images, labels, out / "evaluator.pt", epochs)
        record[net] = dict(
            file=f"{net}.pt", epochs=epochs, train_images=len(images), seconds=round(time.time() - start)
        )
    val_images, val_labels = load_images(folders["heldout"])
    from models.encoders import load_encoders

    (enc,) = load_encoders(f"timm:{ENCODER_NAME}", "cpu", encoder_resolution(grid), ckpt_path=str(out / "encoder.pt"))
    record["encoder"] |= dict(enc_type=f"timm:{ENCODER_NAME}", timm_kwargs=kwargs)
    record["encoder"]["heldout_linear_probe_accuracy"] = encoder_probe_accuracy(enc, val_images, val_labels)
    evaluator = load_evaluator(out / "evaluator.pt")
    record["evaluator"]["heldout_accuracy"] = accuracy(evaluator, lambda m, x: m(x), val_images, val_labels)
    record |= dict(resolution=resolution, grid=grid, split_seeds=SPLIT_SEEDS, heldout_images=len(val_images))
    record_path.write_text(json.dumps(record, indent=2))
    return record


#################################################################################
#                       Sampling a checkpoint and judging it                    #
#################################################################################


@torch.no_grad()
def generate(
    model, num_samples: int, num_steps: int, seed: int, cfg_scale: float = 1.0, batch_size: int = 250,
    cls_cfg_scale: float = 1.0,
):  # fmt: skip
    """Class-balanced EMA samples as uint8 (N, 3, H, W) and their labels, from noise fixed by `seed`.
    Heun's probability-flow ODE; pixel-space models (images in [-1, 1]).

    REG models (built with cls_token_dim) are sampled as REG samples them: the encoder's class token is
    integrated jointly with the image (samplers.euler_sampler's cls_latents, guided with cls_cfg_scale). Its
    initial noise is drawn after the image noise, so every model given the same seed starts from the same
    image noise, REG or not.
    """
    from samplers import euler_sampler

    labels = torch.arange(num_samples) % model.num_classes
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_samples, model.in_channels, model.input_size, model.input_size), generator=generator)
    cls_dim = getattr(model, "cls_token_dim", None)
    cls_noise = torch.randn((num_samples, cls_dim), generator=generator) if cls_dim else None
    out = []
    for i in range(0, num_samples, batch_size):
        reg = {} if cls_noise is None else dict(cls_latents=cls_noise[i : i + batch_size], cls_cfg_scale=cls_cfg_scale)
        x = euler_sampler(
            model, noise[i : i + batch_size], labels[i : i + batch_size], num_steps=num_steps, heun=True,
            cfg_scale=cfg_scale, **reg,
        )  # fmt: skip
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out), labels


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, per_class: int = 10, scale: int = 2) -> None:
    """One row per class, `per_class` samples each."""
    from PIL import Image

    rows = []
    for c in range(int(labels.max()) + 1):
        row = images[labels == c][:per_class].permute(0, 2, 3, 1).numpy()  # (k, H, W, 3)
        rows.append(np.concatenate(list(row), axis=1))
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def judge(ckpt: Path, nets: Path, num_samples: int, num_steps: int, cfg_scale: float, seed: int) -> dict:
    """Sample `ckpt` (EMA) and score the samples with the evaluator in `nets`."""
    from checkpoints import load_model

    record = json.loads((Path(nets) / "nets.json").read_text())
    evaluator = load_evaluator(Path(nets) / "evaluator.pt")
    model, settings = load_model(ckpt)
    if model.input_size != record["resolution"] or not settings.get("pixel_space", True):
        raise ValueError(
            f"{ckpt}: a {model.input_size} px model, but the evaluator in {nets} judges {record['resolution']} px "
            "pixel-space images"
        )
    samples, labels = generate(model, num_samples, num_steps, seed, cfg_scale)
    feats, predicted = evaluator_outputs(evaluator, samples)
    heldout = make_splits(nets, record["resolution"], {"heldout": num_samples // 10 * 2})["heldout"]
    real, _ = load_images(heldout)
    real_feats = evaluator_outputs(evaluator, real[:num_samples])[0]
    correct = predicted == labels
    return {
        "checkpoint": str(ckpt),
        "step": settings.get("steps"),
        "num_samples": num_samples,
        "sampler": f"Heun ODE, {num_steps} steps, CFG {cfg_scale}",
        "label_accuracy": correct.float().mean().item(),
        "per_class_accuracy": {name: correct[labels == c].float().mean().item() for c, name in enumerate(CLASS_NAMES)},
        "fd": fd(feats, real_feats),
        "real_vs_real_fd": fd(real_feats, evaluator_outputs(evaluator, real[num_samples : 2 * num_samples])[0]),
        "evaluator_heldout_accuracy": record["evaluator"]["heldout_accuracy"],
        "_samples": (samples, labels),
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("nets", help="train the encoder and the evaluator (each skipped if its file exists)")
    t.add_argument("--out", default="demo/nets")
    t.add_argument("--resolution", type=int, default=16)
    t.add_argument("--grid", type=int, default=4, help="token grid of the encoder (= the SiT's)")
    t.add_argument("--per-class", type=int, default=TRAIN_PER_CLASS, help="training images per class of the encoder")
    t.add_argument(
        "--evaluator-per-class", type=int, default=TRAIN_PER_CLASS, help="training images per class of the evaluator"
    )
    t.add_argument("--encoder-epochs", type=int, default=ENCODER_EPOCHS)
    t.add_argument("--evaluator-epochs", type=int, default=EVALUATOR_EPOCHS)
    e = sub.add_parser("evaluate", help="sample a checkpoint and print the evaluator's verdict")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--nets", default="demo/nets", help="folder of nets.json, evaluator.pt")
    e.add_argument("--num-samples", type=int, default=500)
    e.add_argument("--num-steps", type=int, default=20, help="Heun ODE steps")
    e.add_argument("--cfg-scale", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default=None, help="JSON and a grid PNG go here (default: beside the checkpoint)")
    args = p.parse_args(argv)
    if args.command == "nets":
        record = train_nets(
            Path(args.out),
            args.resolution,
            args.grid,
            args.encoder_epochs,
            args.evaluator_epochs,
            args.per_class,
            args.evaluator_per_class,
        )
        print(json.dumps(record, indent=2))
        return
    result = judge(Path(args.ckpt), Path(args.nets), args.num_samples, args.num_steps, args.cfg_scale, args.seed)
    samples, labels = result.pop("_samples")
    out = Path(args.out) if args.out else Path(args.ckpt).parent.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(result, indent=2))
    save_grid(samples, labels, out / "evaluation_samples.png")
    per_class = ", ".join(f"{k} {v:.0%}" for k, v in result["per_class_accuracy"].items())
    print(f"per class: {per_class}")
    print(
        f"{result['label_accuracy']:.1%} of {args.num_samples} samples are classified as their label by the "
        f"independent evaluator ({result['evaluator_heldout_accuracy']:.1%} on held-out real images); "
        f"FD {result['fd']:.2f} (real vs real {result['real_vs_real_fd']:.2f}); {result['sampler']}; "
        f"grid {out / 'evaluation_samples.png'}"
    )
