"""Generate a sample batch for FID with one or many processes, and optionally evaluate it.

    torchrun --nproc_per_node=8 sample_ddp.py --ckpt exps/run/checkpoints/4000000.pt [--recipe cfg] \
        [--ref-batch DIR_OF_REFERENCE_BATCHES]

Recipes: the config saved in the checkpoint names how its paper numbers are measured (its `eval:` section,
config.EvalRecipe): sampler, steps, CFG scale and interval, class-token CFG, N, labels, EMA or raw weights,
quantisation and reference batch. The first recipe is the default, `--recipe NAME` picks another, and every
flag (--mode, --num-steps, --cfg-scale, ...) still overrides it. Checkpoints without recipes (official ones,
older runs) sample with their model family's protocol (REPA's for SiT), or with `--recipes-from CONFIG.yaml`.
The manifest and the summary record the recipe's name; `python -m evaluations.recipes` lists them all.

Loads checkpoints of this project and of the official REPA code (EMA weights by default). The run's
config saved in the checkpoint is the source of truth for everything that must match training: model
shape, path type, pixel space, latent scale and bias, the decoder. A flag that overrides one of these
says so with a warning.

The defaults are the paper's evaluation protocol (the official generate.py): labels drawn uniformly at
random, decoded images quantised as uint8(clamp(255 * (x + 1) / 2, 0, 255)) (truncation). `--labels
balanced` (50 per class, REPA-E's protocol, about 0.1 FID lower at FID ~1.4) and `--quantization dit`
(DiT's clamp(127.5 x + 128)) are options; the summary JSON names the protocol a number was made with.

Determinism: sample i gets its label and its initial noise from (global seed, i) alone, and samples are
generated in fixed global batches of --batch-size, batch b on rank b % world_size. The set of images is
therefore byte-identical whatever the number of processes, and a rerun after a crash regenerates only the
batches whose PNGs are missing. The sample folder's manifest.json records what made its PNGs (weights
digest, sampler settings, labels, N, VAE, precision, quantisation); a rerun resumes only when all of it
matches, and otherwise stops and names what differs (--overwrite starts afresh). The .npz (arr_0: uint8
N x H x W x 3, arr_1: the labels the images were generated with) is written at the end from the PNGs.

Text-to-image (MMDiT checkpoints) samples from captions instead of labels:
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt exps/mmdit/checkpoints/0150000.pt \
        --coco-dir data/coco256_features [--clip-score] [--ref-batch coco_val256.npz]
    python sample_ddp.py --ckpt ... --prompts prompts.txt         # one prompt per line, sample i: prompt i % P
`--coco-dir` is the official protocol of generate_t2i.py: 40,192 samples, sample i from val image i with one of
its captions drawn uniformly (here from (seed, i), so any number of processes draws the same), guidance
against the empty caption's tokens (recorded in the checkpoint, else DATA/empty_context.npy). Prompts are
encoded by the text encoder the training data was made with (recorded in the checkpoint; --text-encoder
overrides). arr_1 holds (image index, caption k) pairs, or prompt indices; the captions go to SAMPLES.captions.txt.
A prompts file is UTF-8 text whose lines end at "\n" (or "\r\n") only, so a form feed or U+2028 inside a line
stays in its prompt; --coco-dir checks DATA/val/captions.json against the token files before sampling.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from checkpoints import checkpoint_settings, load_checkpoint, load_model
from config import SAMPLING_MODES, EvalRecipe, eval_recipes, load_yaml_config, parse_bool
from dataset import CaptionedDataset, caption_choice, load_npy
from evaluations.clip_score import CLIP_L14, clip_score, load_clip
from evaluations.evaluate import check_pipelines, describe_protocol
from evaluations.evaluate import main as evaluate_main
from evaluations.protocol import (
    QUANTIZATIONS,
    SAMPLERS,
    generate,
    is_stochastic,
    load_decoder,
    sample_labels,
)
from models import model_family
from models.dit import DiT
from models.mmdit import MMDiT
from models.text_encoder import load_text_encoder
from models.vae import resolve_vae_name
from preprocessing import layout

MANIFEST = "manifest.json"


def resolve_training_settings(args, settings: dict) -> dict:
    """What must match training, from the checkpoint; a flag that disagrees overrides it with a warning.

    Official checkpoints record path_type but not the latent scale/bias or the decoder: those default to
    the SD-VAE's 0.18215 / 0 and sd-vae-ft-ema (the paper's decoder).
    """
    trained = {
        "path_type": settings.get("path_type", "linear"),
        "latent_scale": float(settings.get("latent_scale", 0.18215)),
        "latent_bias": float(settings.get("latent_bias", 0.0)),
        "vae": resolve_vae_name(settings.get("vae") or "ema"),
    }
    resolved = dict(trained)
    for key, value in trained.items():
        flag = getattr(args, key)
        if flag is None:
            continue
        flag = resolve_vae_name(flag) if key == "vae" else flag
        if flag != value:
            warnings.warn(
                f"--{key.replace('_', '-')} {flag} overrides the checkpoint's {key} {value!r}: samples will not match "
                "what the model was trained with unless you know better",
                stacklevel=2,
            )
        resolved[key] = flag
    resolved["pixel_space"] = bool(settings.get("pixel_space", False))
    if resolved["pixel_space"]:
        resolved["vae"] = None  # no decoder: the model outputs images in [-1, 1]
    return resolved


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


#################################################################################
#                         Sample files                                          #
#################################################################################


def png_path(sample_dir: Path, index: int) -> Path:
    return sample_dir / f"{index:06d}.png"


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


def read_prompts(path) -> tuple[bytes, list[str]]:
    """(the file's bytes, its prompts) of a --prompts file: UTF-8 text, one prompt per line.

    Lines end at "\n" (or "\r\n") only: a form feed, U+2028 or another separator that str.splitlines() would
    break at stays inside its prompt. Each line is stripped of surrounding whitespace; blank lines are skipped.
    A binary file (NUL bytes, or bytes that are not UTF-8) is refused, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file (a text file, one prompt per line)")
    data = path.read_bytes()
    what = f"--prompts {path} is not a text file"
    if b"\0" in data:
        nul = data.index(b"\0")
        raise ValueError(f"{what}: it holds NUL bytes (at byte {nul}); give UTF-8 text, one prompt per line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what} in UTF-8 (byte {e.start}: {data[e.start : e.start + 8]!r}); save it as UTF-8, one prompt per line"
        ) from e
    prompts = [line.removesuffix("\r").strip() for line in text.split("\n")]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts (one per line)")
    return data, prompts


class CaptionConditions:
    """The text condition of every sample of a text-to-image model, a function of (seed, index) only.

    --coco-dir: sample i takes val item i (the first N of the split, in order) with caption
    caption_choice(seed, i, its number of captions): one caption per image, drawn uniformly as the official
    generate_t2i.py draws it; captions.json must agree with the token files (CaptionedDataset.caption_texts).
    --prompts: sample i takes prompt i % P (read_prompts: lines end at "\n" only), encoded by the training
    data's encoder.
    """

    OFFICIAL_NUM_SAMPLES = 40_192  # generate_t2i.py: 314 batches of 128 of COCO val2014's 40,504 images

    def __init__(self, args, settings: dict, context_dim: int, device):
        if bool(args.coco_dir) == bool(args.prompts):
            raise ValueError(
                "a text-to-image checkpoint samples from captions: pass --coco-dir DATA (COCO val captions, the "
                "official protocol) or --prompts FILE (one prompt per line), not both"
            )
        self.device, self.seed, self.encoder, self.val, self.prompts, self.captions = (
            device,
            args.global_seed,
            None,
            None,
            None,
            None,
        )
        if args.coco_dir:
            self.val = CaptionedDataset(args.coco_dir, "val", latents=False, seed=args.global_seed)
            self.default_num_samples = self.OFFICIAL_NUM_SAMPLES
            self.source = {"source": "coco-val", "data": str(Path(args.coco_dir).resolve()), "items": len(self.val)}
            # Checked against the token files now: a stale folder stops here, not after the samples.
            self.captions = self.val.caption_texts()
            captions_path = Path(args.coco_dir) / "val" / layout.CAPTIONS_JSON
            if self.captions is not None:  # other captions, other tokens: other samples
                self.source["captions_sha256"] = hashlib.sha256(captions_path.read_bytes()).hexdigest()
            null_path = Path(args.coco_dir) / layout.EMPTY_CONTEXT
        else:
            data, self.prompts = read_prompts(args.prompts)
            self.default_num_samples = len(self.prompts)
            digest = hashlib.sha256(data).hexdigest()
            self.source = {"source": "prompts", "file": str(Path(args.prompts).resolve()), "sha256": digest}
            recorded = settings.get("text_encoder") or {}
            name = args.text_encoder or recorded.get("name") or "openai/clip-vit-large-patch14"
            weights = args.text_encoder_weights or recorded.get("weights", "pretrained")
            self.encoder = load_text_encoder(name, device, weights, recorded.get("width", context_dim))
            self.source["text_encoder"] = self.encoder.describe()
            null_path = None
        # The null condition: what training used (recorded in the checkpoint), else the data's, else encoded.
        if settings.get("empty_context") is not None:
            null = settings["empty_context"]
        elif null_path is not None:
            null = torch.from_numpy(load_npy(null_path.read_bytes()))
        else:
            null = self.encoder.encode([""])[0]
        self.null = null.float().to(device)
        if self.null.shape[-1] != context_dim:
            raise ValueError(
                f"the text tokens are {self.null.shape[-1]} wide but the model takes {context_dim}: the captions were "
                "encoded with another text encoder than the one the model was trained with"
            )

    def ids(self, n: int) -> np.ndarray:
        """arr_1: (N, 2) [val image index, caption k] for COCO, (N,) prompt indices for prompts."""
        if self.val is None:
            return np.arange(n, dtype=np.int64) % len(self.prompts)
        if n > len(self.val):
            raise ValueError(f"--num-fid-samples {n}: the val split has only {len(self.val)} images (one caption each)")
        ks = [caption_choice(self.seed, i, int(self.val.num_captions[i])) for i in range(n)]
        return np.stack([self.val.indices[:n], np.array(ks, dtype=np.int64)], axis=1)

    def tokens(self, ids: np.ndarray) -> torch.Tensor:
        """(B, L, D) tokens of the samples whose arr_1 rows are `ids`."""
        if self.val is None:
            return self.encoder.encode([self.prompts[int(i)] for i in ids]).to(self.device)
        position = {int(index): k for k, index in enumerate(self.val.indices)}
        rows = [self.val.caption_tokens(position[int(index)], int(k)) for index, k in ids]
        return torch.from_numpy(np.stack(rows)).to(self.device)

    def texts(self, ids: np.ndarray) -> list[str] | None:
        if self.val is None:
            return [self.prompts[int(i)] for i in ids]
        if self.captions is None:
            return None
        return [self.captions[int(index)][int(k)] for index, k in ids]


#################################################################################
#                     The sample folder and its manifest                        #
#################################################################################


def checkpoint_recipes(args, ckpt, settings: dict) -> tuple[dict[str, EvalRecipe], str]:
    """(recipes, where they come from): --recipes-from FILE.yaml, else the config saved in the checkpoint
    (train.py saves its `eval:` section), else the model family's protocol alone (official checkpoints)."""
    weights = ckpt.get("ema") or ckpt.get("model") or ckpt if isinstance(ckpt, dict) else {}
    is_t2i = any(str(k).startswith("joint_blocks.") for k in weights)
    model = "MMDiT" if is_t2i else args.model or settings.get("model") or "SiT"
    if args.recipes_from:
        config = load_yaml_config(args.recipes_from)
        if model_family(config.model) != model_family(model):
            raise ValueError(
                f"--recipes-from {args.recipes_from} is a config for {config.model}, but {args.ckpt} holds a "
                f"{model_family(model)} model: its recipes would sample another kind of model"
            )
        return config.recipes, str(args.recipes_from)
    recorded = settings.get("eval") if "config" in (ckpt if isinstance(ckpt, dict) else {}) else None
    return eval_recipes(model, recorded or None, source=f"{args.ckpt} (its config's eval recipes)"), str(args.ckpt)


def apply_recipe(args, recipes: dict[str, EvalRecipe], source: str) -> EvalRecipe:
    """Fill every sampling flag not given on the command line from the chosen recipe (the first by default)."""
    name = args.recipe or next(iter(recipes))
    if name not in recipes:
        raise ValueError(f"--recipe {name}: {source} has the recipes {', '.join(recipes)}")
    args.recipe, recipe = name, recipes[name]
    for key in EvalRecipe.SAMPLING_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, getattr(recipe, key))
    if args.ref_batch and Path(args.ref_batch).is_dir():  # a folder of reference batches: the recipe's file
        args.ref_batch = str(Path(args.ref_batch) / recipe.reference)
    return recipe


# Recorded in manifest.json for people; not compared (the weights digest identifies the model).
INFORMATIONAL = ("checkpoint", "recipe")  # recorded, but not what decides the pixels


def sampling_manifest(args, training: dict, settings: dict, num_classes: int) -> dict:
    """Everything that decides the pixels and labels of a sample folder."""
    return {
        "checkpoint": str(Path(args.ckpt).resolve()),
        "recipe": args.recipe,
        "weights_sha256": settings["weights_sha256"],
        "use_ema": args.use_ema,
        "model": settings["model"],
        "mode": args.mode,
        "heun": args.heun,
        "num_steps": args.num_steps,
        "ddim_eta": args.ddim_eta,
        "cfg_scale": args.cfg_scale,
        "guidance_low": args.guidance_low,
        "guidance_high": args.guidance_high,
        # REG models only: older manifests (no such key) stay resumable for plain SiTs.
        **({"cls_cfg_scale": args.cls_cfg_scale} if settings.get("cls_token_dim") else {}),
        "global_seed": args.global_seed,
        "labels": args.labels,
        "num_classes": num_classes,
        "num_fid_samples": args.num_fid_samples,
        "batch_size": args.batch_size,  # batch composition changes float rounding, so it is part of the recipe
        "precision": args.precision,
        "quantization": args.quantization,
        **({"compile": True} if args.compile else {}),  # compiled kernels round differently (absent: eager)
        **({"fused_attn": False} if not args.fused_attn else {}),  # explicit attention too (absent: SDPA)
        **training,
    }


def manifest_problem(sample_dir: Path, manifest: dict) -> str | None:
    """Why the PNGs already in sample_dir cannot be reused for this run, or None if they can."""
    existing = sorted(sample_dir.glob("[0-9]*.png"))
    path = sample_dir / MANIFEST
    if not path.exists():
        if not existing:
            return None
        return (
            f"{sample_dir} holds {len(existing)} PNGs but no {MANIFEST}, so what made them is unknown; pass "
            "--overwrite to delete them and start afresh, or choose another --sample-dir"
        )
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return f"{path} is not valid JSON ({e}); pass --overwrite to start afresh"
    differing = [
        f"  {key}: the folder's samples have {recorded.get(key)!r}, this run asks for {manifest.get(key)!r}"
        for key in sorted(set(recorded) | set(manifest))
        if key not in INFORMATIONAL and recorded.get(key) != manifest.get(key)
    ]
    if not differing:
        return None
    return (
        f"{sample_dir} holds samples made with other settings ({len(existing)} PNGs); resuming would mix them:\n"
        + "\n".join(differing)
        + "\nRerun with the folder's settings to resume it, pass --overwrite to delete its samples and start "
        "afresh, or choose another --sample-dir."
    )


def prepare_sample_dir(sample_dir: Path, manifest: dict, overwrite: bool, rank: int, distributed: bool):
    """Create or check the folder on every rank alike; rank 0 writes the manifest once all have checked."""

    def barrier():
        if distributed:
            dist.barrier()

    if rank == 0:
        sample_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for path in sample_dir.glob("[0-9]*.png"):
                path.unlink()
            (sample_dir / MANIFEST).unlink(missing_ok=True)
    barrier()
    problem = manifest_problem(sample_dir, manifest)  # every rank reads the same folder: the same verdict
    barrier()
    if problem:
        raise ValueError(problem)
    if rank == 0 and not (sample_dir / MANIFEST).exists():
        tmp = sample_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, sample_dir / MANIFEST)
    barrier()


class _CallCounter(torch.nn.Module):
    """A stand-in model that counts the rows it is called on: the sampler's NFE per image, at no cost."""

    def __init__(self, model):
        super().__init__()
        self.num_classes, self.out_channels, self.rows = getattr(model, "num_classes", 0), model.out_channels, 0

    def forward(self, x, t, y, cls_token=None):
        self.rows += x.shape[0]
        v = torch.zeros(x.shape[0], self.out_channels, *x.shape[2:], dtype=x.dtype)
        return (v, []) if cls_token is None else (v, [], torch.zeros_like(cls_token))


def count_nfe(sampler, model, shape, kwargs, stochastic, condition=None) -> int:
    """Network evaluations per image (a guided step counts twice) of `sampler` with these settings;
    `condition` is one sample's condition (default: a label)."""
    counter = _CallCounter(model)
    extra = {"generator": torch.Generator().manual_seed(0)} if stochastic else {}
    if getattr(model, "cls_token_dim", None):  # REG: the class token rides along in the same calls
        extra["cls_latents"] = torch.zeros(1, model.cls_token_dim)
    y = torch.zeros(1, dtype=torch.long) if condition is None else condition[:1].cpu()
    kwargs = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    sampler(counter, torch.zeros(1, *shape), y, **kwargs, **extra)
    return counter.rows


#################################################################################
#                                 Main                                          #
#################################################################################


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of this project or of the official code")
    p.add_argument("--model", default=None, help="e.g. SiT-XL/2 (default: from the checkpoint)")
    p.add_argument("--recipe", default=None, help="evaluation recipe of the checkpoint's config (default: its first)")
    p.add_argument("--recipes-from", default=None, help="a config YAML whose recipes apply (e.g. to official files)")
    p.add_argument("--use-ema", type=parse_bool, default=None, help="default: the recipe's (EMA but for MMDiT)")
    p.add_argument("--encoder-depth", type=int, default=None, help="only to build the projectors of old files")
    p.add_argument("--sample-dir", default="samples")
    p.add_argument("--overwrite", action="store_true", help="delete samples made with other settings, start afresh")
    p.add_argument("--num-fid-samples", type=positive_int, default=None, help="default: the recipe's (50,000)")
    p.add_argument("--batch-size", "--per-proc-batch-size", type=positive_int, default=64, help="images per batch")
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument(
        "--mode",
        choices=sorted({m for modes in SAMPLING_MODES.values() for m in modes}),
        default=None,
        help="default: sde (SiT), ddpm (DiT), ode (MMDiT)",
    )
    # Text-to-image (MMDiT) checkpoints: where the captions come from.
    p.add_argument("--coco-dir", default=None, help="COCO-layout data root: sample from its val captions (official)")
    p.add_argument(
        "--prompts", default=None,
        help='UTF-8 text file, one prompt per line (split at "\\n" or "\\r\\n" only): sample i uses prompt i %% P',
    )  # fmt: skip
    p.add_argument("--text-encoder", default=None, help="--prompts: hub name or folder (default: the training data's)")
    p.add_argument("--text-encoder-weights", choices=("pretrained", "random"), default=None)
    p.add_argument("--num-steps", type=positive_int, default=None, help="default: 250; text-to-image: 50")
    p.add_argument("--heun", action="store_true", default=None, help="Heun's method for --mode ode")
    p.add_argument("--ddim-eta", type=float, default=0.0, help="--mode ddim: 0 deterministic, 1 DDPM-like")
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the recipe's (1.0: no guidance)")
    p.add_argument("--guidance-low", type=float, default=None, help="default: the recipe's (0.0)")
    p.add_argument("--guidance-high", type=float, default=None, help="default: the recipe's (1.0)")
    p.add_argument(
        "--cls-cfg-scale", type=float, default=None,
        help="REG models: guidance scale of the class token inside the guidance interval (<= 0 or 1: none); "
        "default: the recipe's (REG's config: 2.3)",
    )  # fmt: skip
    p.add_argument("--labels", choices=("random", "balanced"), default=None, help="random: the paper's protocol")
    p.add_argument("--quantization", choices=tuple(QUANTIZATIONS), default=None, help="repa: the paper's protocol")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument(
        "--compile", type=parse_bool, default=False, help="torch.compile the model call (CUDA; CPU with g++)"
    )
    # What must match training comes from the checkpoint; these flags override it (with a warning).
    p.add_argument("--path-type", choices=("linear", "cosine"), default=None, help="default: the checkpoint's")
    p.add_argument("--vae", default=None, help="ema | mse | hub name | folder (default: the checkpoint's, else ema)")
    p.add_argument("--latent-scale", type=float, default=None, help="default: the checkpoint's, else 0.18215")
    p.add_argument("--latent-bias", type=float, default=None, help="default: the checkpoint's, else 0")
    # Flags of the official generate.py. Here the weights determine these, so they are only checked.
    p.add_argument("--projector-embed-dims", default=None, help="official flag; checked against the weights")
    p.add_argument("--resolution", type=int, default=None, help="official flag; checked against the model")
    p.add_argument("--num-classes", type=int, default=None, help="official flag; checked against the weights")
    p.add_argument("--qk-norm", type=parse_bool, nargs="?", const=True, default=None)
    p.add_argument("--fused-attn", type=parse_bool, nargs="?", const=True, default=True, help="SDPA attention")
    p.add_argument(
        "--ref-batch",
        default=None,
        help="evaluate against this ADM reference batch at the end (a folder: the recipe's)",
    )
    p.add_argument("--inception-weights", default=None, help="local Inception weights for --ref-batch")
    p.add_argument(
        "--clip-score", action="store_true", help="text-to-image: CLIP score of the samples (as generate_t2i.py)"
    )
    p.add_argument(
        "--clip-model", default=CLIP_L14, help=f"--clip-score: hub name or local folder (default {CLIP_L14})"
    )
    p.add_argument("--clip-weights", choices=("pretrained", "random"), default="pretrained", help="random: tests only")
    p.add_argument(
        "--allow-pipeline-mix",
        action="store_true",
        help="--ref-batch may hold pytorch-fid statistics (mu, sigma only, e.g. U-ViT's); recorded as a mixed pipeline",
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    ckpt = load_checkpoint(args.ckpt)
    recipes, recipe_source = checkpoint_recipes(args, ckpt, checkpoint_settings(ckpt))
    recipe = apply_recipe(args, recipes, recipe_source)
    if args.ref_batch:  # refused now, not after hours of sampling
        if not Path(args.ref_batch).is_file():
            raise FileNotFoundError(f"--ref-batch {args.ref_batch}: no such file")
        check_pipelines(Path(args.ref_batch), Path(args.ref_batch), args.allow_pipeline_mix)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if torch.cuda.is_available():
        # The node-local rank picks the GPU (several nodes: the global rank exceeds this node's device count).
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: reproducible samples across GPU types

    model, settings = load_model(args.ckpt, args.model, args.use_ema, args.encoder_depth, ckpt=ckpt)
    del ckpt
    model.project = False  # the samplers never read the projector outputs zs: skip them
    training = resolve_training_settings(args, settings)
    is_dit, is_t2i = isinstance(model, DiT), isinstance(model, MMDiT)
    if args.clip_score and not is_t2i:
        raise ValueError(f"--clip-score applies to text-to-image (MMDiT) checkpoints, not {settings['model']}")
    # CLIP is loaded before sampling, so missing weights stop the run now rather than after the samples.
    scorer = load_clip(args.clip_model, args.clip_weights, device) if args.clip_score and rank == 0 else None
    if is_t2i:
        conditions = CaptionConditions(args, settings, model.context_dim, device)
        args.num_fid_samples = args.num_fid_samples or conditions.default_num_samples  # recipe 0: the source's
    else:
        if args.coco_dir or args.prompts:
            raise ValueError(
                f"--coco-dir and --prompts apply to text-to-image (MMDiT) checkpoints, not {settings['model']}"
            )
        check_official_flags(args, model, training["pixel_space"])
        if not args.num_fid_samples:
            raise ValueError(f"recipe {args.recipe!r}: num_fid_samples 0 (all captions) applies to MMDiT only")
    modes = SAMPLING_MODES[model_family(settings["model"])]
    if args.mode not in modes:
        raise ValueError(f"--mode {args.mode} does not apply to {settings['model']}; use one of {modes}")
    if args.heun and args.mode != "ode":
        raise ValueError(f"--heun applies to --mode ode only, not --mode {args.mode}")
    if args.ddim_eta and args.mode != "ddim":
        raise ValueError(f"--ddim-eta applies to --mode ddim only, not --mode {args.mode}")
    cls_token_dim = getattr(model, "cls_token_dim", None)  # REG: the class token is sampled with the image
    if args.cls_cfg_scale != 1.0 and not cls_token_dim:
        raise ValueError(f"--cls-cfg-scale {args.cls_cfg_scale} applies to REG models only; {args.ckpt} is not one")
    for block in getattr(model, "blocks", []):  # the MMDiT always runs SDPA
        block.attn.fused_attn = args.fused_attn
    model = model.to(device)
    decode = load_decoder(training, device)
    if is_t2i:  # arr_1: (val image, caption k) pairs or prompt indices, from (seed, index) only
        labels_all, num_classes = conditions.ids(args.num_fid_samples), None
    else:
        labels_all, num_classes = None, model.num_classes
        labels_all = sample_labels(args.num_fid_samples, num_classes, args.global_seed, args.labels == "balanced")
    # What the recipe stands for, and whether this run is it: every sampling flag as the recipe has it.
    overridden = [k for k in EvalRecipe.SAMPLING_KEYS if getattr(args, k) != getattr(recipe, k)]
    if is_t2i and recipe.num_fid_samples == 0:
        overridden = [k for k in overridden if k != "num_fid_samples"]
    recipe_record = {
        "name": args.recipe, "source": recipe_source, "paper": recipe.paper, "at_step": recipe.at_step,
        "checkpoint_step": settings.get("steps"), "overridden": overridden,
    }  # fmt: skip
    if rank == 0:
        step_note = ""
        if recipe.at_step and settings.get("steps") not in (None, recipe.at_step):
            step_note = f"; the figure is for step {recipe.at_step}, this checkpoint is at {settings['steps']}"
        print(
            f"recipe {args.recipe!r} of {recipe_source}"
            + (f" (paper: {recipe.paper}{step_note})" if recipe.paper else "")
            + (f"; overridden by flags: {', '.join(overridden)}" if overridden else "")
        )
    sample_dir = Path(args.sample_dir)
    manifest = sampling_manifest(args, training, settings, num_classes)
    if is_t2i:
        manifest["labels"] = conditions.source
    prepare_sample_dir(sample_dir, manifest, args.overwrite, rank, distributed)

    sampler = SAMPLERS[args.mode]
    kwargs = dict(
        num_steps=args.num_steps, cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
        guidance_high=args.guidance_high,
    )  # fmt: skip
    if not is_dit:
        kwargs["path_type"] = training["path_type"]
    if is_t2i:
        kwargs["null_condition"] = conditions.null  # guidance against the empty caption's tokens
    if args.mode == "ode":
        kwargs["heun"] = args.heun
    if cls_token_dim:
        kwargs["cls_cfg_scale"] = args.cls_cfg_scale
    if args.mode == "ddim":
        kwargs["eta"] = args.ddim_eta
    stochastic = is_stochastic(args.mode, args.ddim_eta)
    shape = (model.in_channels, model.input_size, model.input_size)
    nfe = count_nfe(sampler, model, shape, kwargs, stochastic, conditions.null[None] if is_t2i else None)
    net = model
    if args.compile:
        from training import compile_available

        available, note = compile_available(device)
        if not available:
            raise RuntimeError(f"--compile true: torch.compile cannot run here ({note}); pass --compile false")
        # Compiled calls draw no random numbers (eval mode), so samples equal eager ones up to float rounding.
        net = torch.compile(model)

    # Fixed global batches; batch b goes to rank b % world. A batch is redone only if a PNG of it is missing.
    n, bs = args.num_fid_samples, args.batch_size
    batches = [range(b * bs, min((b + 1) * bs, n)) for b in range(math.ceil(n / bs))]
    mine = [r for b, r in enumerate(batches) if b % world == rank]
    todo = [r for r in mine if not all(png_path(sample_dir, i).exists() for i in r)]
    if rank == 0:
        print(
            f"{n} samples in {len(batches)} batches of {bs} on {world} process(es); {len(mine) - len(todo)} of rank 0's done"
        )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    start = time.time()
    for indices in tqdm(todo, disable=rank != 0, desc="sampling", dynamic_ncols=True):
        if is_t2i:
            y = conditions.tokens(labels_all[indices.start : indices.stop])  # (B, L, D)
        else:
            y = torch.from_numpy(labels_all[indices.start : indices.stop]).to(device)
        images = generate(
            net, indices, y, seed=args.global_seed, mode=args.mode, sampler_kwargs=kwargs, decode=decode,
            quantization=args.quantization, stochastic=stochastic, autocast=autocast,
        )  # fmt: skip
        for i, array in zip(indices, images):
            write_png(array, png_path(sample_dir, i))
    elapsed = time.time() - start
    if distributed:
        dist.barrier()

    if rank == 0:
        npz_path = sample_dir.with_suffix(".npz") if sample_dir.name else Path("samples.npz")
        arrays = np.stack([np.asarray(Image.open(png_path(sample_dir, i)).convert("RGB")) for i in range(n)])
        save_npz(npz_path, arr_0=arrays, arr_1=labels_all.astype(np.int64))
        protocol = {
            "sampler": args.mode + ("-heun" if args.heun else ""), "num_steps": args.num_steps, "nfe": nfe,
            "cfg_scale": args.cfg_scale, **({"cls_cfg_scale": args.cls_cfg_scale} if cls_token_dim else {}),
            "guidance_interval": [args.guidance_low, args.guidance_high],
            "labels": conditions.source["source"] + " captions" if is_t2i else args.labels,
            "quantization": args.quantization, "num_samples": n,
            "weights": "ema" if args.use_ema else "raw", "vae": training["vae"], "precision": args.precision,
        }  # fmt: skip
        summary = {
            "protocol": protocol, "recipe": recipe_record, "manifest": manifest, "args": vars(args), "world_size": world,
            "npz": str(npz_path), "npz_identity": [npz_path.stat().st_size, npz_path.stat().st_mtime_ns],
            "shape": list(arrays.shape), "seconds": elapsed,
            "images_per_second_rank0": sum(len(r) for r in todo) / max(elapsed, 1e-9),
        }  # fmt: skip
        print(f"wrote {npz_path} {arrays.shape}; protocol: {describe_protocol(protocol)}")
        texts = conditions.texts(labels_all) if is_t2i else None
        if texts is not None:  # the caption of every sample, in order (e.g. for CLIP scores)
            lines = (t.replace("\r\n", " ").replace("\r", " ").replace("\n", " ") for t in texts)  # one line each
            npz_path.with_suffix(".captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if scorer is not None:  # beside FID, as the official generate_t2i.py reports it
            summary["clip_score"] = clip_score(npz_path, scorer=scorer, batch_size=args.batch_size)
            print(f"CLIP score: {summary['clip_score']['clip_score']:.4f} ({summary['clip_score']['clip_model']})")
        npz_path.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))
        if args.ref_batch:
            eval_argv = [args.ref_batch, str(npz_path), "--json", str(npz_path.with_suffix(".metrics.json"))]
            if args.inception_weights:
                eval_argv += ["--inception-weights", args.inception_weights]
            if args.allow_pipeline_mix:
                eval_argv.append("--allow-pipeline-mix")
            summary["metrics"] = evaluate_main(eval_argv)
            npz_path.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
