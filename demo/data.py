"""A small synthetic labelled image set in the official layout, for the demo run and tests; no download.

    python -m demo data --out data/demo            # 4000 images, 10 classes, 32 px
    python -m demo data --out data/demo --vae DIR  # also vae-sd/ (via `encode`)

Ten classes of coloured shapes and textures (disk, square, triangle, ring, cross, horizontal, vertical
and diagonal stripes, checkerboard, dots). Colours, position, size, rotation, period and phase are
random within each class, so the class is the geometry alone. The set is a pure function of the seed
and the options. Written as DIR/images/ (00000/img00000000.png ..., dataset.json with labels and
class names), exactly what `dataset_tools.py convert` writes, so dataset.py reads it in pixel space;
an SD-VAE turns 32 px into 4 x 4 latents, so `--vae` exists to exercise the latent path, not to train.

    python -m demo data --out data/demo_t2i --captions   # the text-to-image demo set

`--captions` writes the captioned variant in the MS-COCO feature layout instead (train/ and val/ with
{i}.png and {i}_{k}.npy, empty_context.npy; see preprocessing/layout.py), pixel space (no {i}.npy moments).
Colours come from a named palette, and every image gets two captions that name them and the shape, e.g.
"a red disk on a blue background". The tokens come from a RANDOMLY INITIALISED text encoder
(models/text_encoder.py, width --text-width): the demo checks the pipeline, not text understanding.
"""

import argparse
import json
import os
import shutil
import time

import numpy as np
from tqdm import tqdm

from preprocessing import layout

CLASS_NAMES = [
    "disk",
    "square",
    "triangle",
    "ring",
    "cross",
    "horizontal-stripes",
    "vertical-stripes",
    "diagonal-stripes",
    "checkerboard",
    "dots",
]
# Shape names as captions say them (the class names are folder-style).
CAPTION_NAMES = [n.replace("-", " ") for n in CLASS_NAMES]
COLOURS = {  # the captioned set's palette: name -> RGB in [0, 1]
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.65, 0.2),
    "blue": (0.15, 0.25, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "purple": (0.55, 0.15, 0.7),
    "orange": (1.0, 0.55, 0.05),
}
SUPERSAMPLE = 4  # shapes are drawn on a 4x finer grid and box-averaged: anti-aliased edges


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of class `name` on the coordinate grids u (x) and v (y), both in [0, 1)."""
    cx, cy = rng.uniform(0.35, 0.65, size=2)
    radius = rng.uniform(0.2, 0.32)
    angle = rng.uniform(0, 2 * np.pi)
    # Coordinates relative to the centre, rotated by a random angle (shapes) or used as is (textures).
    x, y = u - cx, v - cy
    xr, yr = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
    period = rng.uniform(0.16, 0.3)
    phase = rng.uniform(0, 1)
    if name == "disk":
        return x**2 + y**2 < radius**2
    if name == "square":
        return np.maximum(abs(xr), abs(yr)) < radius * 0.8
    if name == "triangle":
        # Inside all three half-planes whose normals point 120 degrees apart.
        normals = [angle + k * 2 * np.pi / 3 for k in range(3)]
        return np.all([x * np.cos(a) + y * np.sin(a) < radius * 0.5 for a in normals], axis=0)
    if name == "ring":
        distance = np.sqrt(x**2 + y**2)
        return (distance < radius) & (distance > radius * 0.55)
    if name == "cross":
        arm = radius * 0.3
        return ((abs(xr) < arm) & (abs(yr) < radius)) | ((abs(yr) < arm) & (abs(xr) < radius))
    if name == "horizontal-stripes":
        return (v / period + phase) % 1 < 0.5
    if name == "vertical-stripes":
        return (u / period + phase) % 1 < 0.5
    if name == "diagonal-stripes":
        sign = rng.choice([-1, 1])
        return ((u + sign * v) / (period * np.sqrt(2)) + phase) % 1 < 0.5
    if name == "checkerboard":
        return ((np.floor(u / period + phase) + np.floor(v / period + phase)) % 2) == 0
    if name == "dots":
        du, dv = (u / period + phase) % 1 - 0.5, (v / period + phase) % 1 - 0.5
        return du**2 + dv**2 < 0.3**2
    raise ValueError(f"unknown demo class {name!r}")


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB in [0, 1], at least 0.5 apart so every shape stays visible."""
    while True:
        fg, bg = rng.uniform(0, 1, size=(2, 3))
        if np.linalg.norm(fg - bg) > 0.5:
            return fg, bg


def render(label: int, resolution: int, rng: np.random.Generator, colours=None) -> np.ndarray:
    """One (resolution, resolution, 3) uint8 image of class `label` (in the given (fg, bg) RGB, else random)."""
    n = resolution * SUPERSAMPLE
    grid = (np.arange(n) + 0.5) / n
    u, v = np.meshgrid(grid, grid)  # (n, n) each; u runs along x (columns)
    mask = _shape_mask(CLASS_NAMES[label], u, v, rng).astype(np.float32)
    coverage = mask.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))
    fg, bg = _colours(rng) if colours is None else map(np.asarray, colours)
    image = coverage[..., None] * fg + (1 - coverage[..., None]) * bg  # (R, R, 3)
    image += rng.normal(0, 0.02, size=image.shape)  # mild sensor-like noise
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def make_demo_data(out: str, *, per_class: int = 400, num_classes: int = 10, resolution: int = 32, seed: int = 0):
    """Write out/images/ (PNGs + dataset.json); returns the number of images. A set made with the same
    settings is kept as it is (the set is a pure function of them), one with other settings replaced."""
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in [1, {len(CLASS_NAMES)}], got {num_classes}")
    images_dir = os.path.join(out, "images")
    settings = {"seed": seed, "per_class": per_class, "num_classes": num_classes, "resolution": resolution}
    if os.path.exists(images_dir):
        meta = layout.read_dataset_json(layout.FileStore(images_dir))
        if meta is None or "demo" not in meta:
            raise FileExistsError(f"{images_dir} exists and is not a demo set; refusing to overwrite it")
        if meta["demo"] == settings and len(meta.get("labels") or []) == per_class * num_classes:
            return len(meta["labels"])  # the same set (a pure function of the settings): keep it
        shutil.rmtree(images_dir)  # a previous demo set with other options: start clean

    rng = np.random.default_rng(seed)
    # Classes interleaved in a seeded order, so any prefix (--max-items) holds every class.
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    entries = []
    for index, label in enumerate(tqdm(labels, desc="demo images", unit="img")):
        name = layout.image_name(index)
        layout.atomic_write(os.path.join(images_dir, name), layout.png_bytes(render(int(label), resolution, rng)))
        entries.append([name, int(label)])
    meta = {"class_names": CLASS_NAMES[:num_classes], "demo": settings}
    layout.atomic_write(os.path.join(images_dir, layout.DATASET_JSON), layout.dataset_json_bytes(entries, **meta))
    return len(entries)


def captions_for(label: int, fg: str, bg: str) -> list[str]:
    """The two captions of a captioned demo image."""
    shape = CAPTION_NAMES[label]
    article = "" if shape.endswith(("stripes", "dots")) else "a "
    return [f"{article}{fg} {shape} on a {bg} background", f"{shape} in {fg} over {bg}"]


def make_captioned_demo_data(
    out: str,
    *,
    per_class: int = 100,
    val_per_class: int = 10,
    num_classes: int = 10,
    resolution: int = 32,
    seed: int = 0,
    text_width: int = 64,
):
    """Write out/train/, out/val/ and out/empty_context.npy in the MS-COCO feature layout; returns the counts."""
    from models.text_encoder import load_text_encoder
    from preprocessing.dataset_tools import _npy_bytes

    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in [1, {len(CLASS_NAMES)}], got {num_classes}")
    settings = {"seed": seed, "per_class": per_class, "val_per_class": val_per_class, "num_classes": num_classes,
                "resolution": resolution, "text_width": text_width}  # fmt: skip
    marker = os.path.join(out, "demo.json")
    if os.path.exists(out) and os.listdir(out):
        if not os.path.isfile(marker):
            raise FileExistsError(f"{out} exists and is not a captioned demo set; refusing to overwrite it")
        shutil.rmtree(out)  # a previous demo set, maybe with other options: start clean
    encoder = load_text_encoder(weights="random", width=text_width)
    layout.atomic_write(os.path.join(out, layout.EMPTY_CONTEXT), _npy_bytes(encoder.encode([""])[0].numpy()))
    layout.atomic_write(os.path.join(out, layout.TEXT_ENCODER_JSON), json.dumps(encoder.describe()).encode())
    names = list(COLOURS)
    counts = {}
    for split, count, split_seed in (("train", per_class, seed), ("val", val_per_class, seed + 1)):
        rng = np.random.default_rng(split_seed)
        labels = rng.permutation(np.repeat(np.arange(num_classes), count))
        folder = os.path.join(out, split)
        listing = {"labels": [], "captions": []}
        for index, label in enumerate(tqdm(labels, desc=f"demo {split}", unit="img")):
            fg, bg = rng.choice(len(names), size=2, replace=False)
            image = render(int(label), resolution, rng, (COLOURS[names[fg]], COLOURS[names[bg]]))
            layout.atomic_write(os.path.join(folder, layout.coco_image_name(index)), layout.png_bytes(image))
            captions = captions_for(int(label), names[fg], names[bg])
            for k, tokens in enumerate(encoder.encode(captions)):
                layout.atomic_write(
                    os.path.join(folder, layout.coco_context_name(index, k)), _npy_bytes(tokens.numpy())
                )
            listing["labels"].append(int(label))
            listing["captions"].append(captions)
        layout.atomic_write(os.path.join(folder, layout.CAPTIONS_JSON), json.dumps(listing).encode())
        counts[split] = len(labels)
    layout.atomic_write(marker, json.dumps({"demo": settings}).encode())
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m demo data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="data/demo", help="data folder; images/ (and vae-sd/) go inside")
    parser.add_argument("--per-class", type=int, default=400, help="images per class")
    parser.add_argument("--num-classes", type=int, default=10, help=f"at most {len(CLASS_NAMES)}")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae", default=None, help="also encode to OUT/vae-sd with this VAE (name or folder)")
    parser.add_argument("--captions", action="store_true", help="the captioned text-to-image set (COCO layout)")
    parser.add_argument("--val-per-class", type=int, default=10, help="--captions: validation images per class")
    parser.add_argument("--text-width", type=int, default=64, help="--captions: token width of the random encoder")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.captions:
        if args.vae is not None:
            raise ValueError("--vae applies to the labelled set only; the captioned demo trains in pixel space")
        counts = make_captioned_demo_data(
            args.out, per_class=args.per_class, val_per_class=args.val_per_class, num_classes=args.num_classes,
            resolution=args.resolution, seed=args.seed, text_width=args.text_width,
        )  # fmt: skip
        print(f"wrote the captioned demo set to {args.out}: {counts} images in {time.perf_counter() - start:.1f} s")
        return
    count = make_demo_data(
        args.out, per_class=args.per_class, num_classes=args.num_classes, resolution=args.resolution, seed=args.seed
    )
    seconds = time.perf_counter() - start
    print(
        f"demo set: {count} images ({args.num_classes} classes, {args.resolution} px, seed {args.seed}) in "
        f"{args.out}/images ({seconds:.1f} s; kept as is when it already had these settings)"
    )
    if args.vae is not None:
        from preprocessing import dataset_tools

        vae_dir = os.path.join(args.out, "vae-sd")
        if os.path.exists(vae_dir):
            shutil.rmtree(vae_dir)  # the images were just regenerated: old latents are stale
        dataset_tools.main(
            ["encode", f"--source={args.out}/images", f"--dest={vae_dir}", f"--vae={args.vae}", "--workers=0"]
        )
