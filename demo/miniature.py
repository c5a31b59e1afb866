"""REPA and its variants vs vanilla in miniature, on the CPU: does aligning to a real representation speed up
training?

    python -m demo miniature --out miniature_out              # 3 seeds, vanilla and REPA (docs/miniature.md)
    python -m demo miniature --out miniature_out --methods vanilla repa irepa reg haste
    python -m demo miniature --out /tmp/mini --seeds 0 --steps 400 --eval-every 200   # a smoke run

What it does, end to end, with nothing downloaded (every network here is trained by this project):
1. Data: disjoint sets of the embedded demo domain (demo/data.py, 10 classes of shapes
   and textures), each from its own seed (demo/domain.py, SPLIT_SEEDS): `diffusion` (what the
   SiTs train on), `encoder`, `evaluator` and `heldout` (real images that only the evaluation sees).
2. The REPA target: a small timm ViT trained with labels on the `encoder` set, used through
   `--enc-type timm:vit_tiny_patch16_224 --enc-ckpt FILE`, the registry path any user takes.
3. The evaluator: a small CNN (another architecture, another seed, other data). Its penultimate features
   give a Frechet distance (FD) between generated and held-out real images, and its classifier says whether
   a sample shows its conditioning label.
   Both networks come from demo/domain.py: trained into --out, or read from --nets (e.g. the
   committed demo/nets, which the demo uses too).
4. For each seed, every method in --methods trains through train.py with the same config, seed, data order,
   model, optimiser, budget and encoder; a method is only the train.py flags of METHODS (below) added to
   them. The runs go through a queue of --jobs processes side by side (one thread each, so none gets more
   CPU than another; 2 on a 2-core machine).
5. Every --eval-every steps: --num-samples EMA samples (class-balanced labels, the same image noise for
   every method, Heun ODE; REG models integrate their class token jointly, as REG samples), their FD to
   --num-samples held-out real images, their label accuracy, and the CKNNA of the aligned block against the
   encoder (evaluations/alignment.py) on the held-out images.
6. results.json, table.md, fd_vs_steps.png (mean and spread over seeds), cknna_vs_steps.png,
   accuracy_vs_steps.png and samples_final.png (one panel per method, one row per class), and for each
   method the first step at which it reaches vanilla's final FD (linear interpolation between evaluations),
   mean and [min, max] over the seeds that reach it.

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

from checkpoints import load_model
from demo.data import CLASS_NAMES
from demo.domain import (
    ENCODER_EPOCHS,
    ENCODER_NAME,
    EVALUATOR_EPOCHS,
    evaluator_outputs,
    fd,
    generate,
    load_evaluator,
    load_images,
    make_splits,
    train_nets,
)
from evaluations.alignment import cknna, encoder_features, extract_features
from models.encoders import encoder_resolution, load_encoders

ROOT = Path(__file__).resolve().parents[1]

#################################################################################
#                              Training (train.py)                              #
#################################################################################


# Each method: the train.py flags it adds to what every run shares (config, data, seed, budget, model size).
# The variants keep REPA's alignment (encoder, depth, lambda) and add what their papers add, at their defaults:
# - irepa: a 3x3 conv projector and the spatial z-score of the targets with alpha 0.6 (iREPA's defaults);
# - reg: REG's class-token entanglement with weight 0.03, the encoder's class token as the denoised token;
# - haste: attention alignment (weight 0.5) with the pairing --haste-layers (HASTE pairs the SiT blocks up to
#   REPA's depth with the encoder's last blocks: SiT-XL/2 5-8 : DINOv2-B 9-12; here the 4-block SiT's 1-2 with
#   the 4-block encoder's 3-4), and both alignments stopped at --haste-stop (default: half the budget).
#   Attention maps are not cached, so HASTE runs the encoder each step until the stop.
METHODS = ("vanilla", "repa", "irepa", "reg", "haste")


def method_flags(args, method: str, encoder_path: str) -> list[str]:
    if method == "vanilla":
        return ["--enc-type", "none", "--proj-coeff", "0"]
    flags = ["--enc-type", f"timm:{ENCODER_NAME}", "--enc-ckpt", encoder_path, "--proj-coeff", str(args.proj_coeff)]
    flags += ["--encoder-depth", str(args.encoder_depth)]
    if method == "irepa":
        flags += ["--projection-layer-type", "conv", "--proj-kwargs-kernel-size", "3"]
        flags += ["--spnorm-method", "zscore", "--zscore-alpha", "0.6"]
    elif method == "reg":
        flags += ["--cls", str(args.reg_cls)]
    elif method == "haste":
        flags += ["--attn-coeff", str(args.attn_coeff), "--attn-align-layers", args.haste_layers]
        flags += ["--early-stop-point", str(args.haste_stop or args.steps // 2), "--cache-targets", "false"]
    return flags


def train_argv(args, folders, out: Path, method: str, seed: int, encoder_path: str) -> list[str]:
    argv = [
        sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "miniature.yaml"),
        "--data-dir", str(folders["diffusion"]), "--output-dir", str(out / "runs"), "--exp-name", f"{method}-seed{seed}",
        "--seed", str(seed), "--max-train-steps", str(args.steps), "--checkpointing-steps", str(args.eval_every),
        "--resolution", str(args.resolution), "--model", f"SiT-S/{args.resolution // args.grid}",
    ]  # fmt: skip
    return argv + method_flags(args, method, encoder_path) + args.train_args


def train_runs(args, folders, out: Path, encoder_path: str) -> dict:
    """Every (seed, method) run through train.py, --jobs at a time, one thread each, in order (seed, then
    method); returns each run's wall seconds, {seed: {method: s}}. A failed run stops the others."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    queue = [(seed, method) for seed in args.seeds for method in args.methods]
    running, seconds = {}, {seed: {} for seed in args.seeds}
    try:
        while queue or running:
            while queue and len(running) < args.jobs:
                seed, method = queue.pop(0)
                log_path = out / "runs" / f"{method}-seed{seed}.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = log_path.open("w")
                cmd = train_argv(args, folders, out, method, seed, encoder_path)
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                running[(seed, method)] = (proc, log, time.time())
            for (seed, method), (proc, log, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[(seed, method)]
                if proc.returncode:
                    raise RuntimeError(f"train.py ({method}, seed {seed}) failed; see {log.name}")
                seconds[seed][method] = time.time() - start
                print(f"trained {method} seed {seed} in {seconds[seed][method]:.0f}s", flush=True)
            time.sleep(0.2)
    finally:
        for proc, log, _ in running.values():  # only after a failure: stop the runs this function started
            proc.kill()
            proc.wait()
            log.close()
    return seconds


#################################################################################
#                                  Evaluation                                   #
#################################################################################


def evaluate_run(run_dir: Path, evaluator, real_feats, heldout_images, enc_feats, enc_cls, args) -> list[dict]:
    """One row per checkpoint: step, FD, label accuracy, CKNNA of the aligned block vs the encoder.
    enc_cls: the encoder's (N, D) class tokens of the held-out images, which REG models take as input."""
    rows = []
    x = heldout_images.float() / 127.5 - 1  # pixel space: the model's input is the image in [-1, 1]
    for ckpt in sorted((run_dir / "checkpoints").glob("*.pt")):
        model, settings = load_model(ckpt)
        samples, labels = generate(model, args.num_samples, args.sample_steps, seed=args.sample_seed)
        feats, predicted = evaluator_outputs(evaluator, samples)
        reg = {"cls_token": enc_cls} if getattr(model, "cls_token_dim", None) else {}
        hidden = extract_features(model, settings, x, layers=[args.encoder_depth], t=args.cknna_t, seed=0, **reg)
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


# The metrics that steps_to_reach compares, and whether a higher value is better.
HIGHER_IS_BETTER = {"fd": False, "label_accuracy": True}


def steps_to_reach(rows: list[dict], target: float, key: str = "fd") -> float | None:
    """First step at which rows[key] reaches target (FD: <=, label accuracy: >=), linearly interpolated
    between evaluations; None if never."""
    if key not in HIGHER_IS_BETTER:
        raise ValueError(f"steps_to_reach: no direction known for {key!r}; add it to HIGHER_IS_BETTER")
    sign = -1.0 if HIGHER_IS_BETTER[key] else 1.0
    for prev, row in zip([None] + rows[:-1], rows):
        if sign * row[key] <= sign * target:
            if prev is None:
                return float(row["step"])
            frac = (prev[key] - target) / (prev[key] - row[key]) if prev[key] != row[key] else 1.0
            return prev["step"] + frac * (row["step"] - prev["step"])
    return None


#################################################################################
#                                  Report                                       #
#################################################################################


COLOURS = {"vanilla": "tab:gray", "repa": "tab:red", "irepa": "tab:blue", "reg": "tab:green", "haste": "tab:orange"}


def save_plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["settings"]["methods"]
    for key, ylabel, name in (
        ("fd", "FD to held-out real (evaluator features)", "fd_vs_steps.png"),
        ("cknna", "CKNNA, aligned block vs encoder", "cknna_vs_steps.png"),
        ("label_accuracy", "samples classified as their label", "accuracy_vs_steps.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
        for method in methods:
            colour = COLOURS[method]
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
        if "haste" in methods:  # where HASTE's alignment stops
            stop = results["settings"]["haste_stop"] or results["settings"]["steps"] // 2
            ax.axvline(stop, color=COLOURS["haste"], ls="--", lw=0.8, label="HASTE stops aligning")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)


def save_final_grid(out: Path, methods, seed: int, step: int) -> None:
    """One panel per method (in --methods order), up to 8 samples per class, one row per class."""
    from PIL import Image, ImageDraw

    panels = []
    for method in methods:
        samples = np.load(out / "runs" / f"{method}-seed{seed}" / f"samples_{step:07d}.npy")  # (10 k, 3, H, W)
        per_class = len(samples) // 10  # labels cycle through the 10 classes
        samples = samples[: 10 * per_class].reshape(per_class, 10, *samples.shape[1:]).transpose(1, 0, 3, 4, 2)
        rows = [np.concatenate(list(row), axis=1) for row in samples]
        panels.append(np.concatenate(rows, axis=0))
    gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
    grid = np.concatenate([x for panel in panels for x in (panel, gap)][:-1], axis=1)
    grid = Image.fromarray(grid).resize((2 * grid.shape[1], 2 * grid.shape[0]), Image.NEAREST)
    labelled = Image.new("RGB", (grid.width, grid.height + 14), "white")  # the method's name above its panel
    labelled.paste(grid, (0, 14))
    draw = ImageDraw.Draw(labelled)
    for i, method in enumerate(methods):
        draw.text((2 * i * (panels[0].shape[1] + 8) + 2, 1), method, fill="black")
    labelled.save(out / "samples_final.png")


def spread(values) -> dict:
    """Mean and [min, max] of a list of numbers (None for all three if it is empty)."""
    values = np.array(values, dtype=float)
    if not len(values):
        return {"mean": None, "min": None, "max": None}
    return {"mean": values.mean(), "min": values.min(), "max": values.max()}


def summarise(results: dict) -> dict:
    """Per method: final FD, label accuracy and CKNNA (mean, min, max over seeds) and, against vanilla of the
    same seed, the steps to reach vanilla's final FD (per seed, None if never; spread over the seeds that
    reach it) and the speed-up (vanilla's budget / those steps)."""
    methods, runs = results["settings"]["methods"], results["runs"]
    summary = {"steps_to_vanilla_final_fd": {}, "speedup_to_vanilla_final_fd": {}}
    summary["steps_to_vanilla_final_label_accuracy"] = {}
    for method in methods:
        for key in ("fd", "label_accuracy", "cknna"):
            summary[f"{method}_final_{key}"] = spread([run[method][-1][key] for run in runs.values()])
        if method == "vanilla" or "vanilla" not in methods:
            continue
        for key in ("fd", "label_accuracy"):
            steps = [steps_to_reach(run[method], run["vanilla"][-1][key], key) for run in runs.values()]
            reached = [s for s in steps if s is not None]
            summary[f"steps_to_vanilla_final_{key}"][method] = {
                "per_seed": steps, "reached": len(reached), "seeds": len(steps), **spread(reached)
            }  # fmt: skip
            if key == "fd":
                budgets = [run["vanilla"][-1]["step"] for run in runs.values()]
                speedup = [None if s is None else b / s for s, b in zip(steps, budgets)]
                summary["speedup_to_vanilla_final_fd"][method] = speedup
    return summary


def table(results: dict) -> str:
    """The summary as a Markdown table, one row per method: mean [min, max] over seeds."""

    def cell(entry, digits):
        if entry["mean"] is None:
            return "—"
        return f"{entry['mean']:.{digits}f} [{entry['min']:.{digits}f}, {entry['max']:.{digits}f}]"

    summary, settings = results["summary"], results["settings"]
    lines = [
        f"| method | FD ↓ | label accuracy ↑ | CKNNA (block {settings['encoder_depth']}, t = {settings['cknna_t']}) "
        "| steps to vanilla's final FD ↓ | steps to vanilla's final label accuracy ↓ |",
        "|---|---|---|---|---|---|",
    ]
    for method in settings["methods"]:
        steps = []
        for key in ("fd", "label_accuracy"):
            reach = summary[f"steps_to_vanilla_final_{key}"].get(method)
            if reach is None:
                steps.append("— (the reference)" if method == "vanilla" else "— (no vanilla run)")
            else:
                steps.append(f"{cell(reach, 0)}, reached on {reach['reached']}/{reach['seeds']} seeds")
        row = [cell(summary[f"{method}_final_{key}"], d) for key, d in (("fd", 2), ("label_accuracy", 2), ("cknna", 3))]
        lines.append(f"| {method} | {' | '.join(row + steps)} |")
    return (
        "\n".join(lines) + f"\n\nAt step {settings['steps']}, seeds {settings['seeds']}; mean [min, max] over seeds.\n"
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m demo miniature", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="miniature_out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["vanilla", "repa"], choices=METHODS, help="methods compared")
    p.add_argument("--jobs", type=int, default=2, help="train.py runs side by side, one thread each")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (every method)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--grid", type=int, default=8, help="token grid of the SiT and the encoder")
    p.add_argument("--proj-coeff", type=float, default=0.5)
    p.add_argument("--encoder-depth", type=int, default=2)
    p.add_argument("--reg-cls", type=float, default=0.03, help="reg: weight of the class-token loss (REG's --cls)")
    p.add_argument("--attn-coeff", type=float, default=0.5, help="haste: weight of the attention alignment")
    p.add_argument("--haste-layers", default="1:3,2:4", help="haste: SIT_BLOCK:ENC_BLOCK pairs, 1-based")
    p.add_argument("--haste-stop", type=int, default=0, help="haste: step where alignment stops (0: --steps // 2)")
    p.add_argument("--diffusion-per-class", type=int, default=400, help="images per class the SiTs train on")
    p.add_argument("--num-samples", type=int, default=500, help="samples (and held-out real images) per FD")
    p.add_argument("--sample-steps", type=int, default=15, help="Heun ODE steps of the evaluation samples")
    p.add_argument("--sample-seed", type=int, default=7)
    p.add_argument("--cknna-t", type=float, default=0.5)
    p.add_argument("--encoder-epochs", type=int, default=ENCODER_EPOCHS)
    p.add_argument("--evaluator-epochs", type=int, default=EVALUATOR_EPOCHS)
    p.add_argument(
        "--nets",
        default=None,
        help="folder with the encoder and evaluator (demo/domain.py "
        "train; e.g. demo/nets); default: train them into --out",
    )
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="more train.py flags (last)")
    args = p.parse_args(argv)
    args.methods = list(dict.fromkeys(args.methods))  # each once, in the order given
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
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
    folders = make_splits(out, args.resolution, {"diffusion": args.diffusion_per_class})
    folders |= make_splits(nets, args.resolution, {"heldout": 2 * args.num_samples // 10})
    encoder_path = str(nets / record["encoder"]["file"])
    evaluator = load_evaluator(nets / record["evaluator"]["file"])
    print(f"networks ({nets}): {json.dumps(record)}", flush=True)

    heldout_images, _ = load_images(folders["heldout"])
    real_a, real_b = heldout_images[: args.num_samples], heldout_images[args.num_samples :]
    real_feats, _ = evaluator_outputs(evaluator, real_a)
    floor = fd(real_feats, evaluator_outputs(evaluator, real_b)[0])
    (enc,) = load_encoders(f"timm:{ENCODER_NAME}", "cpu", encoder_resolution(args.grid), ckpt_path=encoder_path)
    if "reg" in args.methods:  # REG's models also take the encoder's class tokens: one encoder pass gives both
        enc_feats, enc_cls = encoder_features(enc, real_a, class_token=True)
    else:
        enc_feats, enc_cls = encoder_features(enc, real_a), None
    print(f"real vs real FD floor ({args.num_samples} vs {args.num_samples}): {floor:.3f}", flush=True)

    results = {"settings": vars(args), "networks": record, "real_vs_real_fd": floor}
    results["train_seconds"] = train_runs(args, folders, out, encoder_path)
    results["runs"] = {}
    for seed in args.seeds:
        results["runs"][seed] = {
            method: evaluate_run(
                out / "runs" / f"{method}-seed{seed}", evaluator, real_feats, real_a, enc_feats, enc_cls, args
            )
            for method in args.methods
        }
        for method, rows in results["runs"][seed].items():
            line = " ".join(f"{r['step']}:{r['fd']:.2f}/{r['label_accuracy']:.2f}/{r['cknna']:.2f}" for r in rows)
            print(f"seed {seed} {method:7s} step:FD/acc/CKNNA  {line}", flush=True)
    results["summary"] = summarise(results)
    results["seconds"] = time.time() - start
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "table.md").write_text(table(results))
    save_plots(results, out)
    save_final_grid(out, args.methods, args.seeds[0], args.steps)
    print(json.dumps(results["summary"], indent=2, default=float))
    print(table(results))
    print(f"wrote {out}/results.json and plots in {results['seconds'] / 60:.1f} min; classes: {CLASS_NAMES}")
