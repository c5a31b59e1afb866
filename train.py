"""Train a SiT with REPA: `accelerate launch train.py --config configs/sit-xl-2_dinov2-b.yaml [--flag value ...]`.

Text-to-image: `--model MMDiT-d24/2` (configs/t2i/) trains the MMDiT on a folder in the MS-COCO feature layout
(dataset.CaptionedDataset); captions are dropped to the empty caption's tokens at cfg_prob for guidance.

Also runs under `torchrun --nproc_per_node N train.py ...` (the Accelerator picks the processes up) and as a
plain `python train.py ...` on one device. Every option is a field of config.TrainConfig; the official
REPA flags (--model, --enc-type, --proj-coeff, --encoder-depth, ...) keep their meaning.

Determinism and exact resume (EDM2-style): all randomness of a step (timesteps, noise, latent sampling,
label dropout) is drawn after reseeding from (seed, rank, data position), and the data stream depends
only on (seed, position) (dataset.ResumableSampler). A checkpoint therefore needs no RNG state: model, EMA,
optimizer (and fp16 loss scaler) plus the step restore the run exactly, on any number of processes for
the data order and bit for bit on the same setup.
"""

import argparse
import copy
import dataclasses
import fcntl
import importlib.util
import json
import math
import os
import re
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoints import load_checkpoint, save_checkpoint
from config import TrainConfig, parse_config
from dataset import CaptionedDataset, ImageLatentDataset, ResumableSampler
from diffusion import ddim_sampler
from evaluations.online import OnlineEvaluation, save_eval_plots
from models import T2I_MODELS, build_model, model_family
from models.mmdit import mmdit_flops
from models.sit import sit_flops
from models.vae import VAENotFoundError, latent_decoder, load_vae
from preprocessing.layout import CAPTIONS_JSON, is_coco_layout
from preprocessing.target_cache import open_target_cache
from samplers import euler_sampler
from training import (
    TrainStep,
    alignment_encoders,
    alignment_on,
    build_loss,
    compile_step,
    make_optimizer,
    peak_memory_gib,
)

CHECKPOINT_PATTERN = re.compile(r"^(\d{7})\.pt$")
clock = time.perf_counter  # the loop's timer for img/s (tests replace it with a controlled one)

# Config keys a resume may change without --allow-config-change: none of them changes a single update of the
# run. Where and how often the run writes (folder, logging, checkpoints, previews and their decoder, trackers),
# how long it runs and which checkpoint it continues from, its stop rule for non-finite steps, the evaluation
# recipes (sample_ddp.py's business), and speed options that compute the same steps: DataLoader workers (the data
# stream depends on (seed, position) only), torch.compile and the fused attention kernel (same math, other
# kernels), and where the same encoder tokens come from (--cache-targets keeps them in memory; --target-cache
# is checked against the run's encoders, weights, resolution, flips and data by open_target_cache). Every other
# key (model and sizes, encoders, loss, optimiser, batch, schedule, data, seed, precision incl. allow_tf32)
# changes what the resumed steps compute: refused unless --allow-config-change, then recorded in stats.jsonl.
RESUME_FREE_KEYS = frozenset(
    {
        "output_dir", "exp_name", "report_to", "log_every", "checkpointing_steps", "keep_last", "resume",
        "resume_step", "sampling_steps", "preview_num_steps", "preview_cfg_scale", "vae", "max_train_steps",
        "epochs", "max_nonfinite_steps", "num_workers", "compile", "compile_cpu", "fused_attn", "cache_targets",
        "target_cache", "eval", "allow_config_change",
    }
    # online evaluation never changes training (evaluations/online.py): its settings may change on resume
    | {f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith("eval_")}
)  # fmt: skip

#################################################################################
#                                    Helpers                                    #
#################################################################################


class IndexedDataset(torch.utils.data.Dataset):
    """(index, *item[, *tokens]): the index keys the in-memory TargetCache; with `targets` (--target-cache,
    a preprocessing.target_cache.DiskTargetCache) the item's cached tokens per encoder follow, read by the
    DataLoader workers."""

    def __init__(self, dataset, targets=None):
        self.dataset, self.targets = dataset, targets

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        # A (index, position) pair (text-to-image: the position picks the caption) is keyed by its index.
        key = index[0] if isinstance(index, tuple) else index
        item = (key, *self.dataset[index])
        return item if self.targets is None else (*item, *self.targets[key])


def encode_targets(encoder, images, class_token=False):
    """An encoder's alignment targets: its patch tokens, with its class token in front for REG."""
    return encoder.encode(images, class_token=True) if class_token else encoder.encode(images)


class TargetCache:
    """Encoder tokens per dataset item, computed the first time the item is drawn (--cache-targets).

    Frozen encoders are deterministic, so this changes nothing but speed; it costs items x T x D floats of
    memory (the demo: 4000 x 64 x 384 x 4 B = 0.4 GB; ImageNet would need ~1 TB, use it only on small sets).
    A resumed run refills the cache in other batch compositions, so it is exact only to float rounding.
    For large sets, and for bit-exact resumes, write the tokens once with `dataset_tools.py encode-targets`
    and train with --target-cache DIR (preprocessing/target_cache.py): read from disk, never recomputed.
    """

    def __init__(self, encoders, class_token=False):
        self.encoders, self.store, self.class_token = encoders, {}, class_token

    def __call__(self, indices, images):
        keys = indices.tolist()
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            fresh = [encode_targets(enc, images[missing], self.class_token) for enc in self.encoders]  # (M, T, D)
            for j, i in enumerate(missing):
                self.store[keys[i]] = [tokens[j] for tokens in fresh]
        return [torch.stack([self.store[k][e] for k in keys]) for e in range(len(self.encoders))]


class RunFolderLocked(RuntimeError):
    """Another training holds the run folder's lock."""


class RunLock:
    """One training per run folder: an exclusive flock on `run_dir/.lock`, taken by the main process at start.

    Two trainings in one folder would both append to stats.jsonl and write, prune and resume from each other's
    checkpoints; the second is refused at start-up, naming the holder (pid and host, written into the file while
    the lock is held). The kernel drops the lock when its holder exits, however it ends (kill -9 included): no
    stale lock to remove by hand. The file itself stays (removing it would race with the next run's open).
    flock is per host on local file systems; on NFS, Linux maps it to a byte-range lock the server arbitrates.
    """

    def __init__(self, run_dir: Path):
        self.run_dir, self.path, self.file = Path(run_dir), Path(run_dir) / ".lock", None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        file = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = file.read().strip()
            file.close()
            try:
                who = json.loads(holder)
                who = f"pid {who['pid']} on host {who['host']}"
            except (ValueError, KeyError, TypeError):
                who = "a process that has not written its pid yet"
            raise RunFolderLocked(
                f"run folder {self.run_dir} is in use by another training ({who}; lock file {self.path}). Two "
                "trainings in one folder would write the same stats.jsonl and checkpoints. Wait for it to end or stop "
                "it, or train into another folder (--exp-name / --output-dir)."
            ) from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        file.flush()
        self.file = file
        return self

    def release(self):
        if self.file is not None:
            self.file.truncate(0)  # no holder named once released
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def config_changes(saved: dict | None, cfg: TrainConfig) -> dict:
    """{key: (old, new)} for every config key whose value differs from the checkpoint's saved config. A key the
    checkpoint does not record (written before the key existed) had its default then; keys it records that no
    longer exist are ignored. No saved config (an official checkpoint): nothing to compare, {}."""
    if saved is None:
        return {}
    defaults, current = TrainConfig().to_dict(), cfg.to_dict()
    return {
        key: (saved.get(key, defaults[key]), value)
        for key, value in current.items()
        if saved.get(key, defaults[key]) != value
    }


def describe_changes(changes: dict) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints named like the official ones (0050000.pt), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name))


def find_resume_checkpoint(cfg: TrainConfig, log) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from: --resume PATH, the official --resume-step, or the latest valid one."""
    ckpt_dir = cfg.run_dir / "checkpoints"
    if cfg.resume_step > 0:
        path = ckpt_dir / f"{cfg.resume_step:07d}.pt"
        return path, load_checkpoint(path)
    if cfg.resume not in ("auto", "none"):
        return Path(cfg.resume), load_checkpoint(cfg.resume)
    if cfg.resume == "none":
        return None, None
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            ckpt = load_checkpoint(path)
            if not {"model", "ema", "opt", "steps"} <= set(ckpt):
                raise KeyError(f"missing entries {sorted({'model', 'ema', 'opt', 'steps'} - set(ckpt))}")
            return path, ckpt
        except (RuntimeError, KeyError) as e:  # a partial or corrupt file: say so and fall back to the previous one
            log(f"skipping unusable checkpoint {path}: {e}")
    return None, None


def prune_checkpoints(ckpt_dir: Path, keep_last: int):
    if keep_last > 0:
        for path in list_checkpoints(ckpt_dir)[:-keep_last]:
            path.unlink(missing_ok=True)


def load_preview_decoder(cfg: TrainConfig, device, log):
    """Latents -> images in [0, 1] for previews: the identity map in pixel space, else the SD-VAE decoder.

    A VAE that is not on this machine (offline, empty cache) must not stop training: previews are skipped
    with a warning. A VAE that is there but broken is an error.
    """
    if cfg.pixel_space:
        return lambda x: (x + 1) / 2
    try:
        decode = latent_decoder(load_vae(cfg.vae, device), cfg.latent_scale, cfg.latent_bias)
    except VAENotFoundError as e:
        warnings.warn(f"previews are off: {e}", stacklevel=2)
        return None
    return lambda z: (decode(z) + 1) / 2


def clean_run_folder(run_dir: Path, start_step: int, log) -> None:
    """Undo what a killed or rewound run left behind: temporary checkpoint files of an interrupted write, and
    stats.jsonl lines past the step this run starts from (they would be logged again: one line per step), and
    config-change records at that step (this start records its own, resume_state's `config_change`)."""
    for tmp in (run_dir / "checkpoints").glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)
        log(f"removed {tmp}, left by a checkpoint write that was interrupted")
    stats_path = run_dir / "stats.jsonl"
    if stats_path.exists():
        lines = stats_path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and stats_line_kept(json.loads(line), start_step)]
        if len(kept) != len(lines):
            tmp = stats_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, stats_path)


def stats_line_kept(row: dict, start_step: int) -> bool:
    return row["step"] < start_step or row["step"] == start_step and "config_change" not in row


def save_loss_plot(stats_path: Path, png_path: Path):
    """loss and proj_loss against steps from stats.jsonl (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in stats_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]  # not the evaluation lines or the config-change records
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], label="flow-matching loss")
    ax.plot(steps, [r["proj_loss"] for r in rows], label="alignment loss (-cos)")
    ax.set_xlabel("optimizer step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def start_run(cfg: TrainConfig):
    """The processes and the run folder: (accelerator, log, lock). `log` prints on the main process only; `lock`
    (RunLock) is the run folder's, held by the main process until train() releases it. config.yaml is written
    once the resume is checked (write_run_config)."""
    launched_world = int(os.environ.get("WORLD_SIZE", 1))
    accelerator = Accelerator(
        # Without CUDA, accelerate joins torchrun's processes only when told the run is on the CPU (gloo);
        # otherwise each process would train alone on the full batch, all writing the same run folder.
        cpu=launched_world > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(cfg.run_dir),
    )
    device, world = accelerator.device, accelerator.num_processes
    if launched_world > 1 and world != launched_world:
        raise RuntimeError(
            f"the launcher started {launched_world} processes (WORLD_SIZE) but accelerate joined {world}; each "
            "would train alone. Launch with `accelerate launch` or `torchrun` on a supported backend."
        )

    def log(message):
        if accelerator.is_main_process:
            tqdm.write(message)

    if device.type == "cpu" and cfg.mixed_precision == "fp16":
        # accelerate runs fp16 on the CPU as plain fp32 (no autocast, no loss scaler); say so, not silently.
        warnings.warn(
            "--mixed-precision fp16 has no effect on the CPU: this run trains in fp32. Use bf16 or no.", stacklevel=3
        )
    if device.type == "cuda" and cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # --batch-size keeps the official meaning: images per micro-step over all processes.
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    # One training per run folder: the main process locks it; every rank hears whether it could.
    lock, refusal = RunLock(cfg.run_dir), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
            (cfg.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        except RunFolderLocked as e:
            refusal = str(e)
        except BaseException:
            lock.release()
            raise
    if world > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        lock.release()
        raise RunFolderLocked(refusal)
    return accelerator, log, lock


def write_run_config(cfg: TrainConfig, stats_path: Path, step: int, config_change: dict):
    """config.yaml (this run's config) and, after a resume with --allow-config-change, the change as a stats.jsonl
    record {"step": N, "config_change": {key: [old, new]}} at the step the changed config starts from."""
    (cfg.run_dir / "config.yaml").write_text(cfg.to_yaml())
    if config_change:
        record = {"step": step, "config_change": {key: [old, new] for key, (old, new) in config_change.items()}}
        with stats_path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def load_data(cfg: TrainConfig, device):
    """The training set, checked against the config: (dataset, the empty caption's tokens or None).

    Class-conditional: images (for the encoders) with latent moments or pixels (dataset.ImageLatentDataset).
    Text-to-image (an MMDiT): the MS-COCO feature layout, one caption per draw from (seed, stream position).
    """
    is_t2i = model_family(cfg.model) == "mmdit"
    if is_t2i != is_coco_layout(cfg.data_dir):
        raise ValueError(
            f"--model {cfg.model} is a {'text-to-image' if is_t2i else 'class-conditional'} model but {cfg.data_dir} "
            f"{'is not' if is_t2i else 'is'} in the MS-COCO feature layout (train/, empty_context.npy): "
            + ("preprocess with `dataset_tools.py coco`" if is_t2i else f"use an MMDiT ({', '.join(T2I_MODELS)})")
        )
    if is_t2i:
        dataset = CaptionedDataset(cfg.data_dir, "train", latents=not cfg.pixel_space, seed=cfg.seed)
        empty_context = torch.from_numpy(dataset.empty_context).to(device)  # (L, D): the null condition
    else:
        dataset, empty_context = ImageLatentDataset(cfg.data_dir, latents=not cfg.pixel_space, flip=cfg.hflip), None
    image_side = dataset.image_shape[-1]
    if image_side != cfg.resolution:
        raise ValueError(f"--resolution {cfg.resolution} but {cfg.data_dir} holds {image_side} px images")
    if not is_t2i and (dataset.num_classes > cfg.num_classes or dataset.labels.max() >= cfg.num_classes):
        # Label num_classes is the null class of classifier-free guidance; a larger one has no embedding row.
        item = int(dataset.labels.argmax())
        raise ValueError(
            f"{cfg.data_dir} has {dataset.num_classes} classes (label {int(dataset.labels[item])} at item {item}) "
            f"but --num-classes is {cfg.num_classes}: labels must lie in 0..{cfg.num_classes - 1}"
        )
    return dataset, empty_context


def make_targets(cfg: TrainConfig, encoders, encode, disk_targets, attn_pairs):
    """What feeds TrainStep.targets(indices, images): None when the tokens come with each batch (--target-cache)
    or nothing is aligned; HASTE: (tokens, {"attn_target": maps}); --cache-targets: the in-memory cache; else the
    (possibly compiled) encoders, REG's class token in front of the patch tokens."""
    use_reg = cfg.cls > 0
    if disk_targets is not None or not encoders:
        return None
    if cfg.attn_coeff > 0:  # HASTE: the first encoder also gives its attention maps, as an extra loss input

        def targets(indices, images):
            first, attn = encoders[0].encode_with_attention(images, [e for _, e in attn_pairs], use_reg)
            return [first] + [encode_targets(enc, images, use_reg) for enc in encoders[1:]], {"attn_target": attn}

        return targets
    if cfg.cache_targets:
        return TargetCache(encoders, class_token=use_reg)
    token_kwargs = {"class_token": True} if use_reg else {}
    return lambda indices, images: [fn(images, **token_kwargs) for fn in encode]


class Previews:
    """Preview grids from the EMA weights: the same noise and conditions every time (ODE, Heun; DDIM for DiT).

    Text-to-image: caption 0 of the first 16 training items, listed in samples/captions.txt."""

    def __init__(self, cfg: TrainConfig, dataset, shape, cls_token_dim, empty_context, device, is_main, log):
        self.cfg, self.n = cfg, 16
        self.decode = load_preview_decoder(cfg, device, log) if is_main and cfg.sampling_steps > 0 else None
        gen = torch.Generator().manual_seed(cfg.seed)
        self.noise = torch.randn((self.n, *shape), generator=gen).to(device)
        self.conditions = (torch.arange(self.n) % cfg.num_classes).to(device)
        self.kwargs = {}
        if cls_token_dim:  # REG: the class token's initial noise, fixed like the image's
            self.kwargs["cls_latents"] = torch.randn((self.n, cls_token_dim), generator=gen).to(device)
        if empty_context is not None:
            items = [k % len(dataset) for k in range(self.n)]
            self.conditions = torch.stack([dataset[k][2] for k in items]).to(device)  # (16, L, D)
            self.kwargs["null_condition"] = empty_context
            captions_path = Path(cfg.data_dir) / "train" / CAPTIONS_JSON
            if is_main and captions_path.is_file():
                captions = json.loads(captions_path.read_text())["captions"]
                listing = [captions[int(dataset.indices[k])][0] for k in items]
                (cfg.run_dir / "samples" / "captions.txt").write_text("\n".join(listing) + "\n")

    def due(self, step: int, total_steps: int) -> bool:
        return self.cfg.sampling_steps > 0 and (step % self.cfg.sampling_steps == 0 or step == total_steps)

    def save(self, ema, step: int, autocast):
        if self.decode is None:
            return
        from torchvision.utils import save_image

        cfg = self.cfg
        with autocast():
            common = dict(num_steps=cfg.preview_num_steps, cfg_scale=cfg.preview_cfg_scale)
            if model_family(cfg.model) == "dit":
                z = ddim_sampler(ema, self.noise, self.conditions, **common)
            else:
                z = euler_sampler(ema, self.noise, self.conditions, heun=True, path_type=cfg.path_type, **common, **self.kwargs)  # fmt: skip
            images = self.decode(z.float()).clamp(0, 1)
        save_image(images.float(), cfg.run_dir / "samples" / f"{step:07d}.png", nrow=int(math.sqrt(self.n)))


def resume_state(cfg: TrainConfig, model, ema, optimizer, effective_batch: int, log) -> dict:
    """Load the checkpoint to resume from (if any) into model, EMA and optimizer, before they are wrapped, so
    every rank loads the same state: {step, nonfinite_steps, position (items drawn, all ranks), scaler,
    config_change}.

    The checkpoint's saved config is compared with this run's: a change of a key outside RESUME_FREE_KEYS is
    refused, naming the keys, unless --allow-config-change; then it is returned as `config_change`
    ({key: (old, new)}) for the run to record. Changes of free keys are only logged."""
    state = {"step": 0, "nonfinite_steps": 0, "position": 0, "scaler": None, "config_change": {}}
    resume_path, ckpt = find_resume_checkpoint(cfg, log)
    if ckpt is None:
        return state
    changes = config_changes(ckpt.get("config"), cfg)
    training_changes = {key: change for key, change in changes.items() if key not in RESUME_FREE_KEYS}
    try:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
    except RuntimeError as e:
        differs = f" It was trained with {describe_changes(training_changes)}." if training_changes else ""
        raise RuntimeError(
            f"{resume_path} does not fit --model {cfg.model} with this config (encoders, encoder_depth, "
            f"size overrides).{differs} Resume with the run's own config.yaml or pass --resume none.\n{e}"
        ) from e
    if training_changes and not cfg.allow_config_change:
        raise ValueError(
            f"resuming from {resume_path} with another config than it was trained with: "
            f"{describe_changes(training_changes)} (checkpoint -> this run). Resumed steps would train another "
            "experiment than config.yaml and the checkpoints say. Resume with the run's own settings (its "
            "config.yaml), pass --allow-config-change true to continue with the change (recorded in stats.jsonl, "
            "config.yaml rewritten), or --resume none to start over."
        )
    if changes.keys() - training_changes.keys():
        free = {key: change for key, change in changes.items() if key not in training_changes}
        log(f"resuming with changed settings that do not change training: {describe_changes(free)}")
    if training_changes:
        log(f"--allow-config-change: resuming with {describe_changes(training_changes)}")
        state["config_change"] = training_changes
    if ckpt.get("config") is None:
        log(f"{resume_path} records no config of this project (an official checkpoint?): the config is not compared")
    optimizer.load_state_dict(ckpt["opt"])
    step = int(ckpt["steps"])
    state.update(step=step, nonfinite_steps=int(ckpt.get("nonfinite_steps", 0)), scaler=ckpt.get("scaler"))
    state["position"] = int(ckpt.get("data_position", step * effective_batch))  # differs from step x batch after skips
    log(f"resumed from {resume_path} at step {step}")
    return state


def checkpoint_state(cfg, step, raw_model, ema, optimizer, scaler, model_kwargs, train_step, position, dataset):
    """A checkpoint: the official keys (model, ema, opt, args, steps) plus what exact resume and sampling need."""
    state = {
        "model": raw_model.state_dict(),
        "ema": ema.state_dict(),
        "opt": optimizer.state_dict(),
        "args": argparse.Namespace(**cfg.to_dict()),  # official field: readable by REPA's scripts
        "steps": step,
        "config": cfg.to_dict(),
        "model_kwargs": model_kwargs,
        "nonfinite_steps": int(train_step.nonfinite_steps),
        "data_position": position,
    }
    if train_step.null_condition is not None:  # text-to-image: the null condition and the text encoder
        state["empty_context"] = train_step.null_condition.cpu()
        state["text_encoder"] = dataset.text_encoder
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def record_evaluation(metrics: dict, stats_path: Path, run_dir: Path, log) -> None:
    """An evaluation's line in stats.jsonl ({"step", "eval": metrics}), its sample grid and the curves."""
    from torchvision.utils import save_image

    grid = metrics.pop("_grid")
    step = metrics.pop("step")
    with stats_path.open("a") as f:
        f.write(json.dumps({"step": step, "eval": metrics}) + "\n")
    if grid is not None:
        images = torch.from_numpy(grid).permute(0, 3, 1, 2).float() / 255
        save_image(images, run_dir / "samples" / f"eval_{step:07d}.png", nrow=int(math.sqrt(len(images))) or 1)
    rows = [json.loads(line) for line in stats_path.read_text().splitlines() if line.strip()]
    save_eval_plots([{"step": r["step"], **r["eval"]} for r in rows if "eval" in r], run_dir)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    log(f"eval at step {step}: {shown}")


def stats_line(cfg, step, window, window_steps, optimizer, timed_images, elapsed, position, device, compile_s) -> dict:
    """One stats.jsonl line: the window's means (TrainStep.read_stats) over its `window_steps` optimizer steps,
    and the run's counters. Windows end at multiples of log_every (and the last step); the first one after a
    start or resume holds only the steps this process ran, window_steps says how many. img/s: the images of the
    timed steps over their wall time (timed from the window's first step: start-up and compilation excluded)."""
    nonfinite_steps = window.pop("nonfinite_steps")
    return {
        "step": step,
        **window,
        "window_steps": window_steps,
        "lr": optimizer.param_groups[0]["lr"],
        "img_per_s": timed_images / max(elapsed, 1e-9),
        "images_seen": position,
        "peak_mem_gib": peak_memory_gib(device),
        "nonfinite_steps": nonfinite_steps,
        "compile_s": compile_s,
    }


#################################################################################
#                                 Training loop                                 #
#################################################################################


def train(cfg: TrainConfig):
    """Train as configured: (raw model, EMA). The run folder stays locked (RunLock) until it returns or raises."""
    accelerator, log, lock = start_run(cfg)
    try:
        return run_training(cfg, accelerator, log)
    finally:
        lock.release()


def run_training(cfg: TrainConfig, accelerator, log):
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main, run_dir = accelerator.is_main_process, cfg.run_dir
    micro_global = cfg.batch_size  # an optimizer step averages gradient_accumulation_steps micro-steps
    effective_batch = cfg.batch_size * cfg.gradient_accumulation_steps
    set_seed(cfg.seed)  # model init is identical on every rank (DDP also broadcasts it)

    # ---- data ----
    dataset, empty_context = load_data(cfg, device)
    in_channels, input_side = dataset.x_shape[0] // (1 if cfg.pixel_space else 2), dataset.x_shape[-1]

    # ---- model, encoders and what feeds the alignment ----
    encoders = alignment_encoders(cfg, device, input_side)
    # --target-cache: the encoders' tokens come from disk with each item; checked against this run first.
    disk_targets = None
    if cfg.target_cache:  # the image content is hashed by the main process only (every image file is read)
        disk_targets = open_target_cache(cfg.target_cache, encoders, dataset, cfg.hflip, verify_pixels=is_main)
    if disk_targets is not None:
        log(f"encoder targets read from {disk_targets.describe()}; the encoders are not run")
    cls_token_dim = encoders[0].embed_dim if cfg.cls > 0 else None  # REG: the first encoder's class token
    context_dim = None if empty_context is None else empty_context.shape[-1]
    model, model_kwargs = build_model(
        cfg, [enc.embed_dim for enc in encoders], input_side, in_channels, cls_token_dim, context_dim
    )
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    attn_pairs = cfg.attention_layer_pairs if cfg.attn_coeff > 0 else []  # HASTE: (SiT block, encoder block)
    if attn_pairs:
        model.record_attention([sit for sit, _ in attn_pairs])  # those blocks compute explicit, kept logits
    optimizer = make_optimizer(cfg, model.parameters(), device)
    for enc in encoders:
        log(
            f"encoder {enc.spec.name} ({enc.weights_source}): {enc.num_params / 1e6:.1f}M parameters, "
            f"{2 * enc.gmacs_per_image():.2f} GFLOPs per image, {enc.grid}x{enc.grid} tokens of {enc.embed_dim}"
        )
    flops = sit_flops(model) if empty_context is None else mmdit_flops(model, empty_context.shape[0])
    log(f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {flops / 1e9:.2f} GFLOPs per image forward")  # fmt: skip
    # The official loop runs `epochs` passes over the data (drop_last) unless max_train_steps comes first.
    steps_per_epoch = len(dataset) // micro_global // cfg.gradient_accumulation_steps
    total_steps = min(cfg.max_train_steps, cfg.epochs * steps_per_epoch)
    log(
        f"batch: {cfg.batch_size} per micro-step x {cfg.gradient_accumulation_steps} accumulation = {effective_batch} "
        f"images per optimizer step on {world} process(es); {total_steps} steps "
        f"(max_train_steps {cfg.max_train_steps}, epochs {cfg.epochs} x {steps_per_epoch})"
    )
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data_dir} has {len(dataset)} items, fewer than one effective batch ({effective_batch})")

    # ---- checkpoint state: resume before wrapping, so every rank loads the same state ----
    resumed = resume_state(cfg, model, ema, optimizer, effective_batch, log)
    step, position = resumed["step"], resumed["position"]
    stats_path = run_dir / "stats.jsonl"
    if is_main:
        clean_run_folder(run_dir, step, log)
        write_run_config(cfg, stats_path, step, resumed["config_change"])
    model, optimizer = accelerator.prepare(model, optimizer)
    if resumed["scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(resumed["scaler"])
    raw_model = accelerator.unwrap_model(model)  # before compiling: checkpoint keys stay the official ones
    model, encode, use_compile, compile_note = compile_step(model, encoders, cfg.compile, device, cpu=cfg.compile_cpu)
    if cfg.compile and not use_compile:
        log(f"torch.compile: {compile_note}; the step runs eagerly")
    sampler = ResumableSampler(
        len(dataset), micro_global, cfg.seed, rank, world, start_index=position, with_position=empty_context is not None
    )
    loader = DataLoader(
        IndexedDataset(dataset, disk_targets), batch_size=sampler.local_batch_size, sampler=sampler,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=cfg.num_workers > 0,
    )  # fmt: skip
    targets = make_targets(cfg, encoders, encode, disk_targets, attn_pairs)
    train_step = TrainStep(
        cfg, accelerator, model, raw_model, ema, optimizer, build_loss(cfg), targets, resumed["nonfinite_steps"],
        null_condition=empty_context,
    )  # fmt: skip
    previews = Previews(cfg, dataset, (in_channels, input_side, input_side), cls_token_dim, empty_context, device, is_main, log)  # fmt: skip
    online = None
    if cfg.eval_every > 0:  # built before the loop: a missing reference or Inception file stops the run now
        online = OnlineEvaluation(cfg, device=device, rank=rank, world=world, dataset=dataset, encoders=encoders, log=log, is_main=is_main)  # fmt: skip

    # ---- the loop ----
    if accelerator.trackers:
        accelerator.init_trackers(cfg.exp_name, config=cfg.to_dict())
    # The logging window: the steps since the last line (window_steps, whose means the line holds) and, for img/s,
    # the steps timed (timed_steps) since window_start, which is set when the window's first step begins.
    window_start, window_steps, timed_steps = None, 0, 0
    compile_s = None  # the first step's wall time when compiling (compilation dominates it)
    data_iter = iter(loader)
    progress = tqdm(total=total_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    model.train()
    alignment_stopped = False
    while step < total_steps:
        if window_start is None:
            window_start = clock()
        # HASTE's one-shot termination (alignment_on): free the encoder once, when the step reaches the stop.
        if not alignment_on(cfg, step) and encoders and not alignment_stopped:
            alignment_stopped = True
            if attn_pairs:
                raw_model.record_attention(())  # every block back on the fused kernel
            for enc in encoders:
                enc.to("cpu")  # it never runs again in this run: free its accelerator memory
            log(f"step {step}: --early-stop-point {cfg.early_stop_point} reached, alignment off, encoder stopped")
        # One optimizer step over gradient_accumulation_steps micro-batches.
        micro_batches = []
        for _ in range(cfg.gradient_accumulation_steps):
            micro_batches.append((position, *(t.to(device, non_blocking=True) for t in next(data_iter))))
            position += micro_global
        first = compile_s is None and use_compile
        train_step(micro_batches, step)
        if accelerator.optimizer_step_was_skipped:
            continue  # fp16 loss-scale overflow: the scaler lowered its scale; not a training step
        step += 1
        window_steps += 1
        timed_steps += 1
        progress.update(1)
        if first:  # compilation happened in this step: report it apart, keep it out of img/s
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compile_s = clock() - window_start
            log(f"torch.compile ({compile_note}): first step took {compile_s:.1f}s")
            window_start, timed_steps = clock(), 0

        # Logging: means over the window, all ranks (the one sync of the loop).
        if step % cfg.log_every == 0 or step == total_steps:
            window = train_step.read_stats()
            elapsed = clock() - window_start
            stats = stats_line(cfg, step, window, window_steps, optimizer, timed_steps * effective_batch, elapsed, position, device, compile_s)  # fmt: skip
            if is_main:
                with stats_path.open("a") as f:
                    f.write(json.dumps(stats) + "\n")
                progress.set_postfix(loss=f"{stats['loss']:.4f}", proj=f"{stats['proj_loss']:.4f}", grad=f"{stats['grad_norm']:.3f}", img_s=f"{stats['img_per_s']:.1f}")  # fmt: skip
            accelerator.log({k: v for k, v in stats.items() if k != "step" and v is not None}, step=step)
            if stats["nonfinite_steps"] and stats["nonfinite_steps"] >= cfg.max_nonfinite_steps:
                raise RuntimeError(
                    f"{stats['nonfinite_steps']} optimizer steps had a non-finite loss and were skipped; stopping. "
                    "Lower --learning-rate, use --mixed-precision bf16, or resume from an earlier checkpoint."
                )
            window_start, window_steps, timed_steps = clock(), 0, 0

        if online is not None and online.due(step, total_steps):
            metrics = online(ema, step)  # every process samples its share; the main process gets the metrics
            if is_main:
                record_evaluation(metrics, stats_path, run_dir, log)
                accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
            accelerator.wait_for_everyone()

        if previews.due(step, total_steps):  # from the EMA model
            if is_main:
                previews.save(ema, step, accelerator.autocast)
            accelerator.wait_for_everyone()

        if step % cfg.checkpointing_steps == 0 or step == total_steps:
            if is_main:
                state = checkpoint_state(cfg, step, raw_model, ema, optimizer, accelerator.scaler, model_kwargs, train_step, position, dataset)  # fmt: skip
                save_checkpoint(state, run_dir / "checkpoints" / f"{step:07d}.pt")
                prune_checkpoints(run_dir / "checkpoints", cfg.keep_last)
                if stats_path.exists():
                    save_loss_plot(stats_path, run_dir / "loss.png")
            accelerator.wait_for_everyone()

    progress.close()
    accelerator.end_training()
    log(f"done: {step} steps; run folder {run_dir}")
    return raw_model, ema


def main(argv=None):
    cfg = parse_config(argv)
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        # accelerate would drop an unavailable tracker with a warning; a run that logs nowhere is worse.
        raise ModuleNotFoundError(f"--report-to {cfg.report_to} needs the package: pip install {cfg.report_to}")
    if cfg.report_to == "wandb" and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")  # no login needed; `wandb sync` uploads later
    if cfg.enc_weights == "random" and cfg.encoder_names and cfg.proj_coeff > 0:
        warnings.warn(
            "RANDOM ENCODER WEIGHTS (--enc-weights random): the alignment targets are features of an untrained "
            "network. This checks the pipeline; it does not reproduce REPA.",
            stacklevel=1,
        )
    train(cfg)


if __name__ == "__main__":
    sys.exit(main())
