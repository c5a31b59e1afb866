"""Evaluation during training (train.py --eval-every N): sample quality and alignment curves against steps.

At each evaluation step (and at the end of training), with the EMA weights:

* every process generates its share of `--eval-samples` K samples exactly as sample_ddp.py does (labels and
  noise of sample i from (seed, i) alone, fixed global batches, batch b on process b % world), so the set does
  not depend on the number of processes; a judge turns them into features where they were made; the main
  process gathers the features in sample order and reduces them to metrics:
    - `inception` (default): ADM's Inception, FID, sFID, IS, precision and recall against `--eval-reference`
      (an ADM batch or its statistics; the reference's statistics are computed once and cached, as by
      evaluations/evaluate.py), equal to sample_ddp.py + evaluations.evaluate on the same samples;
    - `demo`: the demo domain's own judge (demo/nets: FD on its features against held-out real images, and
      the fraction of samples it classifies as their label);
* the alignment of the aligned block with the encoder on a fixed batch of training images (CKNNA and mutual
  k-NN, evaluations/alignment.py, t = 0.5) and a linear probe's accuracy on that block when labels exist.
  The encoder's side is computed once, at start-up.

It never changes training: samples and alignment noise come from their own seeded generators, nothing draws
from the global random streams, and the EMA model stays in eval mode. A run with evaluation therefore has the
same weights, bit for bit, as one without, and resumes exactly across an evaluation step.
"""

import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from evaluations.alignment import cknna, encoder_features, extract_features, linear_probe, mutual_knn, split_indices
from evaluations.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from evaluations.protocol import generate, load_decoder, sample_labels

# Modes of the online sampler: the sample_ddp.py modes, and Heun's ODE (the default: 25 steps = 49 NFE).
EVAL_MODES = ("ode-heun", "ode", "sde", "ddpm", "ddim")
ALIGNMENT_T = 0.5  # the noise level of the alignment measurements (analysis/alignment.py's default)
ALIGNMENT_SEED = 0x0A11  # the alignment batch's noise and the probe's split: fixed, never the training streams


def random_inception(device):
    """An Inception network with random weights (fixed seed), for pipeline checks only: said loudly."""
    from evaluations.inception import InceptionV3

    warnings.warn(
        "RANDOM INCEPTION WEIGHTS (--eval-weights random): online FID, sFID, IS, precision and recall measure "
        "nothing; they check the pipeline only and are marked as such in stats.jsonl.",
        stacklevel=3,
    )
    generator = torch.Generator().manual_seed(0)
    model = InceptionV3()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif not name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    model.weights_path, model.weights_sha256, model.official_weights = None, None, False
    return model.to(device)


class InceptionJudge:
    """ADM's metrics, on Inception features computed where the samples are made."""

    kind = "inception"

    def __init__(self, weights: str, reference: str, device, is_main: bool):
        from evaluations.evaluate import check_pipelines, reference_summary
        from evaluations.inception import load_inception

        if not reference:
            raise ValueError("--eval-every with the Inception judge needs --eval-reference FILE (an ADM batch)")
        self.model = (
            random_inception(device)
            if weights == "random"
            else load_inception(None if weights == "pretrained" else weights, device=device, allow_download=False)
        )
        self.weights = weights if weights == "random" else "pretrained"
        self.reference = reference
        self.ref = None
        if is_main:  # the reference side, once (cached beside the file when the weights are the release's)
            from pathlib import Path

            path = Path(reference)
            if not path.is_file():
                raise FileNotFoundError(f"--eval-reference {reference}: no such file")
            check_pipelines(path, path, allow_mix=False)
            summary = reference_summary(self.model, path, 100, torch.device(device), use_cache=weights != "random")
            from evaluations.evaluate import _statistics

            self.ref_stats, _ = _statistics(path, summary)
            self.ref = summary

    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(images).to(self.model.fc.weight.device).permute(0, 3, 1, 2)
        out = self.model(x)
        return {name: getattr(out, name).cpu().numpy() for name in ("pool", "logits", "spatial")}

    def score(self, feats: dict[str, np.ndarray], labels) -> dict:
        mu, sigma = feature_statistics(feats["pool"])
        mu_s, sigma_s = feature_statistics(feats["spatial"])
        ref = self.ref_stats
        precision = recall = None
        if self.ref is not None:
            precision, recall = precision_recall(self.ref["pool"], feats["pool"], device=self.model.fc.weight.device)
        return {
            "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
            "sfid": None if ref["mu_s"] is None else frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"]),
            "inception_score": inception_score(feats["logits"]),
            "precision": precision,
            "recall": recall,
        }


class DemoJudge:
    """The demo domain's judge (demo/nets): FD on its features against held-out real images, label accuracy."""

    kind = "demo"

    def __init__(self, nets: str, resolution: int, device, is_main: bool, num_real: int):
        from pathlib import Path

        from demo.domain import evaluator_outputs, load_evaluator, load_images, make_splits

        self.evaluator = load_evaluator(Path(nets) / "evaluator.pt")  # a small CNN: on the CPU, where it was made
        self.outputs = evaluator_outputs
        self.real = None
        if is_main:  # held-out real images of the demo domain, as many as samples (10 classes)
            heldout = make_splits(Path(nets), resolution, {"heldout": max(-(-num_real // 10), 2)})["heldout"]
            real, _ = load_images(heldout)
            self.real = evaluator_outputs(self.evaluator, real)[0]

    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        feats, predicted = self.outputs(self.evaluator, torch.from_numpy(images).permute(0, 3, 1, 2))
        return {"feats": feats, "predicted": predicted.numpy()}

    def score(self, feats: dict[str, np.ndarray], labels) -> dict:
        fd = frechet_distance(*feature_statistics(feats["feats"]), *feature_statistics(self.real))
        return {"fd": fd, "label_accuracy": float(np.mean(feats["predicted"] == labels))}


class OnlineEvaluation:
    """The evaluation of one run (train.py builds it once; `__call__(ema, step)` on every process)."""

    def __init__(self, cfg, *, device, rank: int, world: int, dataset, encoders, log, is_main: bool):
        if cfg.eval_mode not in EVAL_MODES:
            raise ValueError(f"--eval-mode {cfg.eval_mode}: choose one of {EVAL_MODES}")
        self.cfg, self.device, self.rank, self.world, self.log = cfg, device, rank, world, log
        self.num_samples, self.batch_size = cfg.eval_samples, cfg.eval_batch_size
        self.mode = "ode" if cfg.eval_mode == "ode-heun" else cfg.eval_mode
        self.sampler_kwargs = dict(num_steps=cfg.eval_steps, cfg_scale=cfg.eval_cfg_scale)
        if self.mode in ("ode", "sde"):
            self.sampler_kwargs["path_type"] = cfg.path_type
        if self.mode == "ode":
            self.sampler_kwargs["heun"] = cfg.eval_mode == "ode-heun"
        self.labels = sample_labels(self.num_samples, cfg.num_classes, cfg.eval_seed)
        self.decode = load_decoder(
            dict(pixel_space=cfg.pixel_space, vae=cfg.vae, latent_scale=cfg.latent_scale, latent_bias=cfg.latent_bias),
            device,
        )
        if cfg.eval_judge == "inception":
            self.judge = InceptionJudge(cfg.eval_weights, cfg.eval_reference, device, is_main)
        elif cfg.eval_judge == "demo":
            self.judge = DemoJudge(cfg.eval_nets, cfg.resolution, device, is_main, self.num_samples)
        else:
            raise ValueError(f"--eval-judge {cfg.eval_judge}: choose inception or demo")
        self.alignment = self._alignment_batch(dataset, encoders)
        log(f"online evaluation every {cfg.eval_every} steps: {self.describe()}")

    def describe(self) -> str:
        sampler = f"{self.cfg.eval_mode} {self.cfg.eval_steps} steps" + (
            f", CFG {self.cfg.eval_cfg_scale}" if self.cfg.eval_cfg_scale != 1 else ", no CFG"
        )
        judge = self.judge.kind + (" (RANDOM weights)" if getattr(self.judge, "weights", "") == "random" else "")
        align = f"alignment on {len(self.alignment['indices'])} training images" if self.alignment else "no alignment"
        return f"{self.num_samples} EMA samples ({sampler}), judged by {judge}; {align}"

    def _alignment_batch(self, dataset, encoders):
        """A fixed batch of training images and the encoder's pooled features of them (once)."""
        n = min(self.cfg.eval_align_images, len(dataset))
        if not encoders or n < 4:
            return None
        order = np.random.default_rng(ALIGNMENT_SEED).permutation(len(dataset))[:n]
        items = [dataset[int(i)] for i in order]
        images = torch.stack([torch.as_tensor(item[0]) for item in items])
        x = torch.stack([torch.as_tensor(item[1]) for item in items])
        labels = torch.as_tensor(np.array([int(item[2]) for item in items]))
        feats = torch.cat([encoder_features(encoders[0], images[i : i + 64]) for i in range(0, n, 64)])
        return {"indices": order.tolist(), "x": x, "labels": labels, "encoder": feats}

    def due(self, step: int, total_steps: int) -> bool:
        return self.cfg.eval_every > 0 and (step % self.cfg.eval_every == 0 or step == total_steps)

    def _gather(self, local: dict[int, dict]) -> dict[int, dict] | None:
        if self.world == 1:
            return local
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(local, parts, dst=0)
        return {k: v for part in parts for k, v in part.items()} if self.rank == 0 else None

    @torch.no_grad()
    def __call__(self, ema, step: int) -> dict | None:
        """Metrics (on the main process; None elsewhere). Every process must call it."""
        start = time.time()
        n, bs = self.num_samples, self.batch_size
        batches = [range(b * bs, min((b + 1) * bs, n)) for b in range(-(-n // bs))]
        local, grid = {}, None
        for b, indices in enumerate(batches):
            if b % self.world != self.rank:
                continue
            y = torch.from_numpy(self.labels[indices.start : indices.stop]).to(self.device)
            images = generate(
                ema, indices, y, seed=self.cfg.eval_seed, mode=self.mode, sampler_kwargs=self.sampler_kwargs,
                decode=self.decode,
            )  # fmt: skip
            feats = self.judge.features(images)
            for j, i in enumerate(indices):
                local[i] = {name: value[j] for name, value in feats.items()}
            if b == 0:
                grid = images[:16]
        gathered = self._gather(local)
        if self.rank != 0:
            return None
        feats = {name: np.stack([gathered[i][name] for i in range(n)]) for name in gathered[0]}
        metrics = {"step": step, **self.judge.score(feats, self.labels)}
        if self.alignment is not None:
            metrics.update(self._alignment_metrics(ema))
        if getattr(self.judge, "weights", "") == "random":
            metrics["weights"] = "random"
        metrics["num_samples"] = n
        metrics["seconds"] = time.time() - start
        metrics["_grid"] = grid
        return metrics

    def _alignment_metrics(self, ema) -> dict:
        a, cfg = self.alignment, self.cfg
        settings = dict(
            pixel_space=cfg.pixel_space, latent_scale=cfg.latent_scale, latent_bias=cfg.latent_bias,
            path_type=cfg.path_type,
        )  # fmt: skip
        labels = None if cfg.cfg_prob > 0 else a["labels"]  # the null class where the model has one (REPA's protocol)
        layer = cfg.encoder_depth
        feats = []
        for i in range(0, len(a["indices"]), 64):
            out = extract_features(
                ema, settings, a["x"][i : i + 64], None if labels is None else labels[i : i + 64], [layer],
                t=ALIGNMENT_T, seed=ALIGNMENT_SEED, indices=a["indices"][i : i + 64],
            )  # fmt: skip
            feats.append(out[layer])
        model_feats = torch.cat(feats)
        train, test = split_indices(len(model_feats), seed=ALIGNMENT_SEED)
        probe = linear_probe(model_feats[train], a["labels"][train], model_feats[test], a["labels"][test])
        return {
            "cknna": cknna(model_feats, a["encoder"]),
            "mutual_knn": mutual_knn(model_feats, a["encoder"]),
            "probe_accuracy": probe,
            "alignment_layer": layer,
        }


def save_eval_plots(rows: list[dict], run_dir) -> None:
    """fid_vs_step.png (FID, or the demo judge's FD and label accuracy) and alignment_vs_step.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    steps = [r["step"] for r in rows]
    quality = "fid" if "fid" in rows[0] else "fd"
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [r[quality] for r in rows], marker="o", label=quality.upper())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(quality.upper() + (" (random Inception)" if rows[0].get("weights") == "random" else ""))
    if "label_accuracy" in rows[0]:
        twin = ax.twinx()
        twin.plot(steps, [r["label_accuracy"] for r in rows], color="C1", marker="s", label="label accuracy")
        twin.set_ylabel("label accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "fid_vs_step.png")
    plt.close(fig)
    if "cknna" in rows[0]:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for key in ("cknna", "mutual_knn", "probe_accuracy"):
            ax.plot(steps, [r[key] for r in rows], marker="o", label=key)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"block {rows[0]['alignment_layer']} vs the encoder, t = {ALIGNMENT_T}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / "alignment_vs_step.png")
        plt.close(fig)
