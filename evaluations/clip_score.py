"""CLIP score of text-to-image samples: how well each image matches the caption it was sampled from.

    python -m evaluations.clip_score SAMPLES.npz [--captions FILE] [--json clip.json]

SAMPLES.npz is an ADM batch (`arr_0`: uint8 N x H x W x 3); the captions default to SAMPLES.captions.txt
beside it, one caption per line in sample order, which is what sample_ddp.py writes for text-to-image
checkpoints. Prints the CLIP score and, with --json, writes it with the settings that produced it.

What the official code computes
-------------------------------
The official REPA text-to-image sampler (generate_t2i.py of sihyun-yu/REPA) reports a CLIP similarity beside
FID: every batch of decoded samples, as floats in [0, 1] (the uint8 images divided by 255), goes with its
raw COCO captions to a `ClipSimilarity(device=...)` imported from `utils`; the per-sample similarities are
summed over all ranks and divided by the number of samples, i.e. averaged. That class is not in the REPA
repository. Its name, the [0, 1] input and the per-sample output match metrics/clip_similarity.py of
timothybrooks/instruct-pix2pix, which we follow for the pieces REPA leaves out (that class takes no device
and compares two image batches with two caption lists, so REPA's is at least a modified copy of it):
  * model: OpenAI CLIP ViT-L/14, instruct-pix2pix's default (REPA names none), here its transformers port
    `openai/clip-vit-large-patch14`;
  * images: resized straight to the vision tower's input size (224 for ViT-L/14; no crop, no aspect-ratio
    handling) with `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`, without
    antialiasing and without clamping, then normalised with OpenAI's CLIP mean and std;
  * captions: CLIP's BPE tokenizer, truncated to the 77-token context; the text embedding is read at the
    end-of-text token (no attention mask is needed: CLIP's text transformer is causal);
  * both embeddings L2-normalised; the per-sample value is their cosine similarity.
What neither file fixes is a scale: instruct-pix2pix returns the bare cosine, and how REPA's copy scaled it is
unknown. So `clip_score` is the standard CLIP score, as torchmetrics documents it: 100 * max(cos, 0) per
sample, averaged over the samples. (torchmetrics' code clamps the mean instead of each sample; with real CLIP
weights and matching captions the cosines are positive and the two agree.) The unscaled, unclamped mean
cosine, the number the instruct-pix2pix class would average to, is reported as `clip_cosine`. Note that
torchmetrics itself preprocesses differently (CLIPProcessor: shortest side to 224 with PIL, centre crop),
so its numbers can differ slightly from these.

Weights are looked for as for the text encoder (models/text_encoder.py): a local folder holding the
transformers files of a CLIPModel and its CLIPTokenizer, else the Hugging Face cache or hub under the hub name
(HF_HUB_OFFLINE=1 is honoured); offline with nothing cached, ClipNotFoundError names what to fetch.
`weights="random"` builds a small randomly initialised CLIP with the word-hash tokenizer of
models.text_encoder, for pipeline checks only: it warns loudly and its scores mean nothing.
"""

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

CLIP_L14 = "openai/clip-vit-large-patch14"  # OpenAI CLIP ViT-L/14, the official CLIP similarity's model
# OpenAI CLIP's normalisation (transformers.image_utils.OPENAI_CLIP_MEAN / _STD, instruct-pix2pix's buffers).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SCALE = 100.0  # the standard CLIP score: SCALE * max(cos, 0)
# The random stand-in: a tiny CLIP whose vision tower still takes 224 px, so the resize is the real one.
RANDOM_SEED = 0
RANDOM_WIDTH = 32
RANDOM_IMAGE_SIZE = 224
RANDOM_PATCH = 32


class ClipNotFoundError(OSError):
    """The CLIP model's files are not here: offline with an empty cache, or a missing or incomplete local folder."""


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """A frozen CLIPModel and its tokenizer: (images, captions) -> per-sample CLIP scores."""

    def __init__(self, model, tokenize, name: str, weights_source: str, mean=CLIP_MEAN, std=CLIP_STD):
        self.model, self.tokenize = model.float().eval().requires_grad_(False), tokenize
        self.name, self.weights_source = name, weights_source
        self.image_size = int(model.config.vision_config.image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixel_values(self, images_uint8_nhwc: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> the vision tower's float32 (N, 3, S, S) input on the model's device."""
        x = torch.from_numpy(np.ascontiguousarray(images_uint8_nhwc)).to(self.device)
        x = x.permute(0, 3, 1, 2).float() / 255.0
        size = (self.image_size, self.image_size)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def image_embeddings(self, images_uint8_nhwc: np.ndarray) -> torch.Tensor:
        """L2-normalised image embeddings (N, projection_dim)."""
        features = _features(self.model.get_image_features(pixel_values=self.pixel_values(images_uint8_nhwc)))
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        """L2-normalised caption embeddings (N, projection_dim)."""
        ids = self.tokenize(list(captions)).to(self.device)
        return F.normalize(_features(self.model.get_text_features(input_ids=ids)).float(), dim=-1)

    def cosine(self, images_uint8_nhwc: np.ndarray, captions: list[str], batch_size: int = 64) -> np.ndarray:
        """Per-sample cosine similarity of image and caption embeddings, float64 (N,)."""
        images = _check_images(images_uint8_nhwc)
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, one per image, not one string")
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions: one caption per image")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = []
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            image = self.image_embeddings(images[start:stop])
            text = self.text_embeddings(captions[start:stop])
            out.append((image * text).sum(dim=-1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def score(self, images_uint8_nhwc: np.ndarray, captions: list[str], batch_size: int = 64) -> np.ndarray:
        """Per-sample CLIP scores, 100 * max(cos, 0), float64 (N,)."""
        return scale(self.cosine(images_uint8_nhwc, captions, batch_size))

    def describe(self) -> dict:
        return {"clip_model": self.name, "clip_weights": self.weights_source, "clip_image_size": self.image_size}


def scale(cosines: np.ndarray) -> np.ndarray:
    """Cosines -> CLIP scores: 100 * max(cos, 0)."""
    return SCALE * np.maximum(cosines, 0.0)


def _check_images(images) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"images must be a uint8 numpy array (N, H, W, 3), got dtype {dtype} and shape {shape}")
    return images


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def _clip_tokenizer(tokenizer, max_length: int):
    def tokenize(captions):
        batch = tokenizer(captions, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        return batch["input_ids"]

    return tokenize


def random_clip(device="cpu", stacklevel: int = 2) -> ClipScorer:
    """A tiny randomly initialised CLIP (224 px vision tower, hash-tokenized text), fixed seed; warns loudly."""
    from transformers import CLIPConfig, CLIPModel

    from models.text_encoder import MAX_LENGTH, RANDOM_VOCAB, HashTokenizer

    warnings.warn(
        "RANDOM CLIP WEIGHTS: the CLIP score comes from an untrained 2-layer CLIP with a word-hash tokenizer. "
        "It checks the pipeline; the numbers mean nothing and compare to no published CLIP score.",
        stacklevel=stacklevel,
    )
    common = dict(hidden_size=RANDOM_WIDTH, intermediate_size=2 * RANDOM_WIDTH, num_hidden_layers=2)
    common.update(num_attention_heads=2)
    text = dict(common, vocab_size=RANDOM_VOCAB, max_position_embeddings=MAX_LENGTH)
    text.update(bos_token_id=RANDOM_VOCAB - 2, eos_token_id=RANDOM_VOCAB - 1, pad_token_id=RANDOM_VOCAB - 1)
    vision = dict(common, image_size=RANDOM_IMAGE_SIZE, patch_size=RANDOM_PATCH)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = CLIPModel(config)
    return ClipScorer(model.to(device), HashTokenizer(RANDOM_VOCAB, MAX_LENGTH), "random-clip", "random")


def load_clip(name_or_path: str = CLIP_L14, weights: str = "pretrained", device="cpu") -> ClipScorer:
    """The CLIP model that scores samples: `name_or_path` a hub name or a local folder holding a CLIPModel and
    its CLIPTokenizer (transformers files); weights="random" for pipeline checks (then the name is ignored)."""
    if weights == "random":
        return random_clip(device, stacklevel=3)  # the warning points at load_clip's caller
    if weights != "pretrained":
        raise ValueError(f"CLIP weights must be 'pretrained' or 'random', got {weights!r}")
    from transformers import CLIPModel, CLIPTokenizer

    name = str(name_or_path)
    local = os.path.isabs(name) or name.startswith(".") or os.path.exists(name)
    if local and not os.path.isdir(name):
        raise ClipNotFoundError(f"--clip-model {name}: no such folder")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name)
        model = CLIPModel.from_pretrained(name)
    except OSError as e:  # huggingface_hub's "not in the local cache" / "cannot connect", or missing files
        if local:
            raise ClipNotFoundError(
                f"--clip-model {name}: the folder does not hold a CLIPModel and its CLIPTokenizer ({e})"
            ) from e
        raise ClipNotFoundError(
            f"cannot find the CLIP model {name!r} ({e}). With network access, fetch it once into the Hugging Face "
            f'cache: `hf download {name}` (older huggingface_hub: `huggingface-cli download {name}`), or `python -c "'
            f"from transformers import CLIPModel, CLIPTokenizer; CLIPTokenizer.from_pretrained('{name}'); "
            f"CLIPModel.from_pretrained('{name}')\"`; or pass --clip-model /local/folder holding both "
            "(with HF_HUB_OFFLINE=1 set, nothing is downloaded)"
        ) from e
    max_length = int(model.config.text_config.max_position_embeddings)
    return ClipScorer(model.to(device), _clip_tokenizer(tokenizer, max_length), name, "pretrained")


# ----------------------------------------------------------------------------------------------------
# Sample batches
# ----------------------------------------------------------------------------------------------------


def captions_path_for(npz_path) -> Path:
    """Where sample_ddp.py writes the captions of SAMPLES.npz: SAMPLES.captions.txt."""
    return Path(npz_path).with_suffix(".captions.txt")


def read_captions(path) -> list[str]:
    """One caption per line (a final newline ends the last line; empty lines are empty captions)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such captions file (one caption per line, in sample order; sample_ddp.py writes "
            "SAMPLES.captions.txt beside text-to-image samples, or pass --captions FILE)"
        )
    with open(path, encoding="utf-8", newline="") as f:  # newline="": a stray "\r" inside a caption stays put
        text = f.read()
    if text.endswith("\n"):
        text = text[:-1]
    return [line.removesuffix("\r") for line in text.split("\n")] if text else []


def clip_score(
    npz_path,
    captions_path=None,
    name_or_path: str = CLIP_L14,
    weights: str = "pretrained",
    device=None,
    batch_size: int = 64,
    scorer: ClipScorer | None = None,
) -> dict:
    """The CLIP score of the samples in `npz_path` (arr_0) against their captions (default: SAMPLES.captions.txt).

    `scorer` reuses a loaded ClipScorer (then `name_or_path`, `weights` and `device` are ignored). Returns the
    mean and (population) standard deviation of the per-sample scores, the mean raw cosine, and the settings.
    """
    from evaluations.evaluate import open_images

    npz_path = Path(npz_path)
    if not npz_path.is_file():
        raise FileNotFoundError(f"no such sample batch: {npz_path}")
    captions_path = captions_path_for(npz_path) if captions_path is None else Path(captions_path)
    captions = read_captions(captions_path)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with open_images(npz_path) as images:
        if len(captions) != len(images):
            raise ValueError(
                f"{captions_path}: {len(captions)} captions for the {len(images)} images of {npz_path} "
                "(one caption per line, in sample order)"
            )
        if len(images) == 0:
            raise ValueError(f"{npz_path}: holds no images")
        if scorer is None:  # after the checks: loading ViT-L/14 takes a while
            device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
            scorer = load_clip(name_or_path, weights=weights, device=device)
        cosines, start = [], 0
        with tqdm(total=len(images), desc="CLIP score", unit="img") as progress:
            for batch in images.batches(batch_size):
                cosines.append(scorer.cosine(batch, captions[start : start + len(batch)], batch_size))
                start += len(batch)
                progress.update(len(batch))
    cosines = np.concatenate(cosines)
    scores = scale(cosines)
    return {
        "clip_score": float(scores.mean()),
        "clip_score_std": float(scores.std()),
        "clip_cosine": float(cosines.mean()),
        "num_samples": int(len(scores)),
        "clip_model": scorer.name,
        "clip_weights": scorer.weights_source,
        "clip_image_size": scorer.image_size,
        "formula": "mean over samples of 100 * max(cos(CLIP image, CLIP caption), 0)",
        "sample_batch": str(npz_path),
        "captions": str(captions_path),
    }


def format_result(result: dict) -> str:
    lines = [
        f"CLIP score: {result['clip_score']:.4f} (std {result['clip_score_std']:.4f}, mean cosine "
        f"{result['clip_cosine']:.6f}, N={result['num_samples']}, {result['clip_model']})"
    ]
    if result["clip_weights"] != "pretrained":
        lines.append("WARNING: RANDOM CLIP weights: this number means nothing")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0: uint8 N x H x W x 3)")
    parser.add_argument("--captions", default=None, help="captions, one per line (default: SAMPLES.captions.txt)")
    parser.add_argument("--clip-model", default=CLIP_L14, help=f"hub name or local folder (default {CLIP_L14})")
    parser.add_argument("--clip-weights", choices=["pretrained", "random"], default="pretrained")
    parser.add_argument("--batch-size", type=int, default=64, help="images per CLIP forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the score and settings to this JSON file")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")

    # Full float32 matmuls, as the evaluator runs Inception (no TF32 on Ampere+).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    result = clip_score(
        args.sample_batch,
        args.captions,
        name_or_path=args.clip_model,
        weights=args.clip_weights,
        device=args.device,
        batch_size=args.batch_size,
    )
    print(format_result(result))
    if args.json is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, KeyError) as err:
        sys.exit(f"error: {err}")
