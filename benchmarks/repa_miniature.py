"""REPA vs vanilla in miniature, on the CPU: does aligning to a real representation speed up training?

    python benchmarks/repa_miniature.py --out miniature_out              # 3 seeds, the README's figures
    python benchmarks/repa_miniature.py --out /tmp/mini --seeds 0 --steps 400 --eval-every 200   # a smoke run

What it does, end to end, with nothing downloaded (every network here is trained by this project):
1. Data: disjoint sets of the embedded demo domain (preprocessing/make_demo_data.py, 10 classes of shapes
   and textures), each from its own seed (analysis/demo_domain.py, SPLIT_SEEDS): `diffusion` (what the
   SiTs train on), `encoder`, `evaluator` and `heldout` (real images that only the evaluation sees).
2. The REPA target: a small timm ViT trained with labels on the `encoder` set, used through
   `--enc-type timm:vit_tiny_patch16_224 --enc-ckpt FILE`, the registry path any user takes.
3. The evaluator: a small CNN (another architecture, another seed, other data). Its penultimate features
   give a Frechet distance (FD) between generated and held-out real images, and its classifier says whether
   a sample shows its conditioning label.
   Both networks come from analysis/demo_domain.py: trained into --out, or read from --nets (e.g. the
   committed analysis/demo_nets, which the demo uses too).
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
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.alignment import cknna, encoder_features, extract_features  # noqa: E402
from analysis.demo_domain import (  # noqa: E402
    ENCODER_NAME,
    evaluator_outputs,
    fd,
    generate,
    load_evaluator,
    load_images,
    make_splits,
    train_nets,
)
from models.encoders import load_encoders  # noqa: E402
from preprocessing.make_demo_data import CLASS_NAMES  # noqa: E402
from sample_ddp import load_model  # noqa: E402

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
    p.add_argument(
        "--nets",
        default=None,
        help="folder with the encoder and evaluator (analysis/demo_domain.py "
        "train; e.g. analysis/demo_nets); default: train them into --out",
    )
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="more train.py flags (last)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    start = time.time()

    nets = Path(args.nets) if args.nets else out
    record = train_nets(
        nets, args.resolution, args.grid, args.encoder_epochs, args.evaluator_epochs,
        heldout_per_class=2 * args.num_samples // 10,
    )  # fmt: skip
    if (record["resolution"], record["grid"]) != (args.resolution, args.grid):
        raise ValueError(f"{nets}/nets.json is for {record['resolution']} px / grid {record['grid']}, not this run's")
    folders = make_splits(out, args.resolution, {"diffusion": 400})
    folders |= make_splits(nets, args.resolution, {"heldout": 2 * args.num_samples // 10})
    encoder_path = str(nets / record["encoder"]["file"])
    evaluator = load_evaluator(nets / record["evaluator"]["file"])
    print(f"networks ({nets}): {json.dumps(record)}", flush=True)

    heldout_images, _ = load_images(folders["heldout"])
    real_a, real_b = heldout_images[: args.num_samples], heldout_images[args.num_samples :]
    real_feats, _ = evaluator_outputs(evaluator, real_a)
    floor = fd(real_feats, evaluator_outputs(evaluator, real_b)[0])
    (enc,) = load_encoders(f"timm:{ENCODER_NAME}", "cpu", 16 * args.grid, ckpt_path=encoder_path)
    enc_feats = encoder_features(enc, real_a)
    print(f"real vs real FD floor ({args.num_samples} vs {args.num_samples}): {floor:.3f}", flush=True)

    results = {"settings": vars(args), "networks": record, "real_vs_real_fd": floor}
    results["runs"], results["train_seconds"] = {}, {}
    for seed in args.seeds:
        results["train_seconds"][seed] = train_pair(args, folders, out, seed, encoder_path)
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
