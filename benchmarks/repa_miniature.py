"""REPA vs vanilla in miniature, on the CPU: does aligning to a real representation speed up training?

    python benchmarks/repa_miniature.py --out miniature_out              # 3 seeds, the README's figures
    python benchmarks/repa_miniature.py --out /tmp/mini --seeds 0 --steps 400 --eval-every 200   # a smoke run

What it does, end to end, with nothing downloaded (every network here is trained by this script):
1. Data: four disjoint sets of the embedded demo domain (preprocessing/make_demo_data.py, 10 classes of
   shapes and textures), each from its own seed: `diffusion` (what the SiTs train on), `encoder` (what the
   REPA target encoder trains on), `evaluator` (what the independent evaluator trains on) and `heldout`
   (real images that only the evaluation sees).
2. The REPA target: a small timm ViT trained with labels on the `encoder` set (supervised; its patch
   tokens, averaged, feed a linear classifier) and saved with models.encoders.save_timm_encoder, so the
   SiT aligns to it through `--enc-type timm:vit_tiny_patch16_224 --enc-ckpt FILE`, the registry path any
   user takes.
3. The evaluator: a small CNN (another architecture, another seed, other data) trained with labels on the
   `evaluator` set. Its penultimate features give a Frechet distance (FD) between generated and held-out
   real images, and its classifier says whether a sample shows its conditioning label.
4. For each seed, a vanilla SiT (`--proj-coeff 0 --enc-type none`) and a REPA SiT train through train.py
   with identical seed, data order, model, optimiser and budget, as two processes side by side (one thread
   each, so neither gets more CPU). Only the alignment term differs.
5. Every --eval-every steps: --num-samples EMA samples (class-balanced labels, the same noise for both
   methods, Heun ODE), their FD to --num-samples held-out real images, their label accuracy, and the CKNNA
   of the aligned block against the encoder (analysis/alignment.py) on the held-out images.
6. results.json, fd_vs_steps.png (mean and spread over seeds), cknna_vs_steps.png, accuracy_vs_steps.png and
   samples_final.png (vanilla | REPA, one row per class), and the speed-up: the first step at which REPA
   reaches vanilla's final FD, relative to vanilla's budget (linear interpolation between evaluations).

The real-vs-real floor (FD between two disjoint sets of real images of the same size) is printed with the
figures: FDs at that level mean "as good as this evaluator can tell".
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.alignment import cknna, encoder_features, extract_features  # noqa: E402
from dataset import ImageLatentDataset  # noqa: E402
from evaluations.metrics import feature_statistics, frechet_distance  # noqa: E402
from models.encoders import load_encoders, save_timm_encoder  # noqa: E402
from preprocessing.make_demo_data import CLASS_NAMES, make_demo_data  # noqa: E402
from sample_ddp import load_model  # noqa: E402
from samplers import euler_sampler  # noqa: E402

SPLIT_SEEDS = {"diffusion": 101, "encoder": 102, "evaluator": 103, "heldout": 104}
ENCODER_NAME = "vit_tiny_patch16_224"  # a timm ViT, narrowed below


#################################################################################
#                                     Data                                      #
#################################################################################


def make_splits(out: Path, resolution: int, per_class: dict) -> dict:
    """The four disjoint sets (each a demo folder from its own seed); reused if already there."""
    folders = {}
    for split, seed in SPLIT_SEEDS.items():
        folder = out / "data" / split
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
    """Adam with cosine decay on cross-entropy over augmented images; `forward(model, x)` gives logits."""
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

ENCODER_MEAN, ENCODER_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def train_encoder(folders, resolution, grid, out: Path, epochs: int) -> dict:
    """A small ViT with `grid` x `grid` patch tokens, trained with labels; saved for --enc-type timm:..."""
    import timm

    path = out / "encoder.pt"
    kwargs = dict(img_size=resolution, patch_size=resolution // grid, embed_dim=128, depth=4, num_heads=4)
    kwargs |= dict(global_pool="avg", fc_norm=False)  # the final-norm patch tokens, averaged, are classified
    if path.exists():
        return {"path": str(path), "kwargs": kwargs, "cached": True}
    val_images, val_labels = load_images(folders["heldout"])
    torch.manual_seed(0)
    model = timm.create_model(ENCODER_NAME, pretrained=False, num_classes=10, **kwargs)
    mean, std = torch.tensor(ENCODER_MEAN).view(1, 3, 1, 1), torch.tensor(ENCODER_STD).view(1, 3, 1, 1)

    def forward(m, x):
        return m((x - mean) / std)

    images, labels = load_images(folders["encoder"])
    start = time.time()
    fit_classifier(model, forward, images, labels, epochs=epochs, lr=2e-3, seed=1)
    acc = accuracy(model, forward, val_images, val_labels)
    save_timm_encoder(model, ENCODER_NAME, kwargs, path, ENCODER_MEAN, ENCODER_STD)
    return {"path": str(path), "kwargs": kwargs, "heldout_accuracy": acc, "seconds": time.time() - start}


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


def train_evaluator(folders, out: Path, epochs: int) -> tuple[Evaluator, dict]:
    path = out / "evaluator.pt"
    val_images, val_labels = load_images(folders["heldout"])
    torch.manual_seed(12345)  # another seed than everything else
    model = Evaluator()
    info = {"cached": path.exists()}
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
    else:
        images, labels = load_images(folders["evaluator"])
        start = time.time()
        fit_classifier(model, lambda m, x: m(x), images, labels, epochs=epochs, lr=3e-3, seed=2)
        torch.save(model.state_dict(), path)
        info["seconds"] = time.time() - start
    info["heldout_accuracy"] = accuracy(model, lambda m, x: m(x), val_images, val_labels)
    return model, info


@torch.no_grad()
def evaluator_outputs(evaluator, images: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(features (N, 128) float64, predicted labels (N,)) of uint8 images."""
    feats = torch.cat([evaluator.features(images[i : i + 256].float() / 255) for i in range(0, len(images), 256)])
    return feats.double().numpy(), evaluator.head(feats).argmax(1)


def fd(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(feats_a), *feature_statistics(feats_b))


#################################################################################
#                              Training (train.py)                              #
#################################################################################


def train_argv(args, folders, out: Path, method: str, seed: int, encoder_path: str) -> list[str]:
    argv = [
        sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "miniature.yaml"),
        "--data-dir", str(folders["diffusion"]), "--output-dir", str(out / "runs"), "--exp-name", f"{method}-seed{seed}",
        "--seed", str(seed), "--max-train-steps", str(args.steps), "--checkpointing-steps", str(args.eval_every),
        "--resolution", str(args.resolution), "--model", f"SiT-S/{args.resolution // args.grid}",
    ]  # fmt: skip
    if method == "vanilla":
        argv += ["--enc-type", "none", "--proj-coeff", "0"]
    else:
        argv += ["--enc-type", f"timm:{ENCODER_NAME}", "--enc-ckpt", encoder_path, "--proj-coeff", str(args.proj_coeff)]
        argv += ["--encoder-depth", str(args.encoder_depth)]
    return argv + args.train_args


def train_pair(args, folders, out: Path, seed: int, encoder_path: str) -> dict:
    """Vanilla and REPA side by side, one thread each; returns wall seconds per method."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs, logs, start = {}, {}, time.time()
    for method in ("vanilla", "repa"):
        log_path = out / "runs" / f"{method}-seed{seed}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        logs[method] = log_path.open("w")
        cmd = train_argv(args, folders, out, method, seed, encoder_path)
        procs[method] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[method], stderr=subprocess.STDOUT)
    seconds = {}
    for method, proc in procs.items():
        if proc.wait():
            raise RuntimeError(f"train.py ({method}, seed {seed}) failed; see {logs[method].name}")
        seconds[method] = time.time() - start
        logs[method].close()
    return seconds


#################################################################################
#                                  Evaluation                                   #
#################################################################################


@torch.no_grad()
def generate(
    model, num_samples: int, num_steps: int, seed: int, batch_size: int = 250
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced EMA samples as uint8 (N, 3, H, W), from noise fixed by `seed` (equal for both methods)."""
    labels = torch.arange(num_samples) % model.num_classes
    noise = torch.randn(
        (num_samples, model.in_channels, model.input_size, model.input_size),
        generator=torch.Generator().manual_seed(seed),
    )
    out = []
    for i in range(0, num_samples, batch_size):
        x = euler_sampler(model, noise[i : i + batch_size], labels[i : i + batch_size], num_steps=num_steps, heun=True)
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))  # pixel space: images in [-1, 1]
    return torch.cat(out), labels


def evaluate_run(run_dir: Path, evaluator, real_feats, heldout_images, enc_feats, args) -> list[dict]:
    """One row per checkpoint: step, FD, label accuracy, CKNNA of the aligned block vs the encoder."""
    rows = []
    for ckpt in sorted((run_dir / "checkpoints").glob("*.pt")):
        model, settings = load_model(ckpt)
        samples, labels = generate(model, args.num_samples, args.sample_steps, seed=args.sample_seed)
        feats, predicted = evaluator_outputs(evaluator, samples)
        x = heldout_images.float() / 127.5 - 1  # pixel space: the model's input is the image in [-1, 1]
        hidden = extract_features(model, settings, x, layers=[args.encoder_depth], t=args.cknna_t, seed=0)
        rows.append(
            {
                "step": int(ckpt.stem),
                "fd": fd(feats, real_feats),
                "label_accuracy": (predicted == labels).float().mean().item(),
                "cknna": cknna(hidden[args.encoder_depth], enc_feats),
            }
        )
        np.save(run_dir / f"samples_{int(ckpt.stem):07d}.npy", samples[: 10 * 8].numpy())  # for the grids
    return rows


def steps_to_reach(rows: list[dict], target: float) -> float | None:
    """First step at which FD <= target, linearly interpolated between evaluations; None if never."""
    for prev, row in zip([None] + rows[:-1], rows):
        if row["fd"] <= target:
            if prev is None:
                return float(row["step"])
            frac = (prev["fd"] - target) / max(prev["fd"] - row["fd"], 1e-12)
            return prev["step"] + frac * (row["step"] - prev["step"])
    return None


#################################################################################
#                                  Report                                       #
#################################################################################


def save_plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"vanilla": "tab:gray", "repa": "tab:red"}
    for key, ylabel, name in (
        ("fd", "FD to held-out real (evaluator features)", "fd_vs_steps.png"),
        ("cknna", "CKNNA, aligned block vs encoder", "cknna_vs_steps.png"),
        ("label_accuracy", "samples classified as their label", "accuracy_vs_steps.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
        for method, colour in colours.items():
            runs = [results["runs"][s][method] for s in sorted(results["runs"])]
            steps = [r["step"] for r in runs[0]]
            values = np.array([[r[key] for r in run] for run in runs])
            mean = values.mean(0)
            ax.plot(steps, mean, "-o", color=colour, label=f"{method} ({len(runs)} seeds)", ms=3)
            if len(runs) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.2)
        if key == "fd":
            ax.axhline(results["real_vs_real_fd"], color="k", ls=":", lw=1, label="real vs real")
            ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)


def save_final_grid(out: Path, seed: int, step: int) -> None:
    """vanilla | REPA, 8 samples per class and method, one row per class."""
    from PIL import Image

    halves = []
    for method in ("vanilla", "repa"):
        samples = np.load(out / "runs" / f"{method}-seed{seed}" / f"samples_{step:07d}.npy")  # (80, 3, H, W)
        samples = samples.reshape(8, 10, *samples.shape[1:]).transpose(1, 0, 3, 4, 2)  # class, k, H, W, 3
        rows = [np.concatenate(list(row), axis=1) for row in samples]
        halves.append(np.concatenate(rows, axis=0))
    gap = np.full((halves[0].shape[0], 8, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([halves[0], gap, halves[1]], axis=1)).resize(
        (2 * (halves[0].shape[1] + 4), 2 * halves[0].shape[0]), Image.NEAREST
    ).save(out / "samples_final.png")


def summarise(results: dict) -> dict:
    speedups, finals = [], {"vanilla": [], "repa": []}
    for runs in results["runs"].values():
        target = runs["vanilla"][-1]["fd"]
        reached = steps_to_reach(runs["repa"], target)
        budget = runs["vanilla"][-1]["step"]
        speedups.append(None if reached is None else budget / reached)
        for method in finals:
            finals[method].append(runs[method][-1])
    summary = {"speedup_to_vanilla_final_fd": speedups}
    for method, rows in finals.items():
        for key in ("fd", "label_accuracy", "cknna"):
            values = np.array([r[key] for r in rows])
            summary[f"{method}_final_{key}"] = {"mean": values.mean(), "min": values.min(), "max": values.max()}
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="miniature_out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (both methods)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--grid", type=int, default=8, help="token grid of the SiT and the encoder")
    p.add_argument("--proj-coeff", type=float, default=0.5)
    p.add_argument("--encoder-depth", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=500, help="samples (and held-out real images) per FD")
    p.add_argument("--sample-steps", type=int, default=15, help="Heun ODE steps of the evaluation samples")
    p.add_argument("--sample-seed", type=int, default=7)
    p.add_argument("--cknna-t", type=float, default=0.5)
    p.add_argument("--encoder-epochs", type=int, default=8)
    p.add_argument("--evaluator-epochs", type=int, default=6)
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="more train.py flags (last)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    start = time.time()

    per_class = {"diffusion": 400, "encoder": 400, "evaluator": 300, "heldout": 2 * args.num_samples // 10}
    folders = make_splits(out, args.resolution, per_class)
    encoder = train_encoder(folders, args.resolution, args.grid, out, args.encoder_epochs)
    evaluator, evaluator_info = train_evaluator(folders, out, args.evaluator_epochs)
    print(f"encoder: {encoder}\nevaluator: {evaluator_info}", flush=True)

    heldout_images, _ = load_images(folders["heldout"])
    real_a, real_b = heldout_images[: args.num_samples], heldout_images[args.num_samples :]
    real_feats, _ = evaluator_outputs(evaluator, real_a)
    floor = fd(real_feats, evaluator_outputs(evaluator, real_b)[0])
    (enc,) = load_encoders(f"timm:{ENCODER_NAME}", "cpu", 16 * args.grid, ckpt_path=encoder["path"])
    enc_feats = encoder_features(enc, real_a)
    print(f"real vs real FD floor ({args.num_samples} vs {args.num_samples}): {floor:.3f}", flush=True)

    results = {"settings": vars(args), "encoder": encoder, "evaluator": evaluator_info, "real_vs_real_fd": floor}
    results["runs"], results["train_seconds"] = {}, {}
    for seed in args.seeds:
        results["train_seconds"][seed] = train_pair(args, folders, out, seed, encoder["path"])
        results["runs"][seed] = {
            method: evaluate_run(out / "runs" / f"{method}-seed{seed}", evaluator, real_feats, real_a, enc_feats, args)
            for method in ("vanilla", "repa")
        }
        for method, rows in results["runs"][seed].items():
            line = " ".join(f"{r['step']}:{r['fd']:.2f}/{r['label_accuracy']:.2f}/{r['cknna']:.2f}" for r in rows)
            print(f"seed {seed} {method:7s} step:FD/acc/CKNNA  {line}", flush=True)
    results["summary"] = summarise(results)
    results["seconds"] = time.time() - start
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    save_plots(results, out)
    save_final_grid(out, args.seeds[0], args.steps)
    print(json.dumps(results["summary"], indent=2, default=float))
    print(f"wrote {out}/results.json and plots in {results['seconds'] / 60:.1f} min; classes: {CLASS_NAMES}")


if __name__ == "__main__":
    main()
