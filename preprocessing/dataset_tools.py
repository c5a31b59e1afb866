"""ImageNet -> the official REPA layout: `convert` crops images to PNG, `encode` stores SD-VAE moments,
`encode-targets` stores the frozen encoders' tokens for train.py --target-cache (format: target_cache.py);
MS-COCO -> the text-to-image layout: `coco` stores crops, SD-VAE moments and CLIP caption tokens.

The official command lines work unchanged (new flags are optional):
    python preprocessing/dataset_tools.py convert --source=ILSVRC/Data/CLS-LOC/train \
        --dest=DIR/images --resolution=256x256 --transform=center-crop-dhariwal
    python preprocessing/dataset_tools.py encode --source=DIR/images --dest=DIR/vae-sd
    python preprocessing/dataset_tools.py encode-targets --source=DIR/images --dest=DIR/targets --flip
    python preprocessing/dataset_tools.py coco --source=COCO --dest=DIR/coco256_features   # text-to-image
Multi-process: launch the same command with `torchrun --nproc_per_node=N` or `accelerate launch`; each
rank takes the disjoint shard items[rank::world_size] (encode-targets: the shard files rank, rank +
world_size, ...) and rank 0 writes dataset.json (manifest.json) at the end. The
files are the same for any number of processes. A rerun of the same command skips outputs that exist
and pass a header check, so a killed run resumes; every file is written to a temp name and renamed.

Output index i is source image i in sorted order, whatever happens to the others: an image that cannot
be converted leaves a gap (listed in report.json with the reason) instead of shifting later images.
The layout itself is described in preprocessing/layout.py.
"""

import argparse
import io
import json
import os
import shutil
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
from tqdm import tqdm

if __package__ in (None, ""):
    # Run as `python preprocessing/dataset_tools.py` (the official command line): make the repo root
    # importable so the `preprocessing` package resolves.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import ImageLatentDataset  # noqa: E402
from models.encoders import load_encoders  # noqa: E402
from models.vae import VAE_NAMES, encode_mean_logvar, encode_moments, load_vae  # noqa: E402
from preprocessing import layout, target_cache  # noqa: E402

# We check sizes ourselves (--max-pixels) so that huge images are reported, not raised from PIL.
PIL.Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own DecompressionBombError threshold (2 x 89,478,485 px)
# The errors this module raises for bad input; the command line prints them as one line.
CLI_ERRORS = (FileNotFoundError, ValueError, RuntimeError, OSError)

# ---------------------------------------------------------------------------------------------------
# Processes: one per rank under torchrun / accelerate launch, else a single one.
# ---------------------------------------------------------------------------------------------------


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        ranks = cls(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
        if world_size > 1 and not dist.is_initialized():
            # gloo even on GPU machines: ranks only exchange small Python objects and barriers. The
            # timeout is long because ranks wait at the final barrier for the slowest shard.
            dist.init_process_group("gloo", timeout=timedelta(hours=12))
        return ranks

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """The list of every rank's `obj` (on every rank)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _claim_dest(work_dir: str, settings: dict, ranks: Ranks) -> None:
    """Rank 0 records the job settings in work_dir/.job.json (a rerun with others is refused) and
    removes temp files of a killed run; every rank waits for it and stops on its verdict."""
    problem = None
    if ranks.rank == 0:
        os.makedirs(work_dir, exist_ok=True)
        job_path = os.path.join(work_dir, ".job.json")
        if os.path.isfile(job_path):
            with open(job_path) as f:
                previous = json.load(f)
            if previous != settings:
                changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
                problem = f"{work_dir} holds a run with other settings (previous, now): {changed}; "
                problem += "use another --dest or delete it"
        else:
            layout.atomic_write(job_path, json.dumps(settings, indent=1).encode())
        removed = layout.remove_temp_files(work_dir) if problem is None else 0
        if removed:
            print(f"removed {removed} temp files left by an interrupted run in {work_dir}")
    problem = ranks.gather(problem)[0]  # doubles as the barrier
    if problem:
        raise ValueError(problem)


def _work_dir(dest: str) -> str:
    """Folder the ranks write into: dest itself, or dest.parts/ when dest is a .zip packed at the end."""
    return dest + ".parts" if layout.extension(dest) == ".zip" else dest


def _finish(dest: str, extra_files: dict[str, bytes]) -> None:
    """Write dataset.json (and friends) last; pack into the zip when dest is one (rank 0 only)."""
    work_dir = _work_dir(dest)
    for name, data in extra_files.items():
        layout.atomic_write(os.path.join(work_dir, name), data)
    if work_dir == dest:
        return
    temp = f"{dest}.tmp-{os.getpid()}"
    # Uncompressed like the official archives: PNGs and .npy barely compress, and reads stay cheap.
    with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in layout.FileStore(work_dir).names():
            if not name.startswith("."):
                archive.write(os.path.join(work_dir, name), name)
    os.replace(temp, dest)
    shutil.rmtree(work_dir)


def _zip_is_complete(dest: str, ranks: Ranks) -> bool:
    """A finished .zip dest: it exists and holds every file its dataset.json lists."""
    if not (layout.extension(dest) == ".zip" and os.path.isfile(dest)):
        return False
    store = layout.FileStore(dest)
    labels = layout.labels_by_name(layout.read_dataset_json(store), dest) or {}
    missing = set(labels) - set(store.names())
    if missing:
        raise RuntimeError(f"{dest} is incomplete ({len(missing)} files of dataset.json missing); delete it")
    if ranks.rank == 0:
        print(f"{dest} is already complete ({len(store.names())} files); nothing to do")
    return True


# ---------------------------------------------------------------------------------------------------
# Source images and their labels
# ---------------------------------------------------------------------------------------------------


def list_source(store: layout.FileStore, max_images: int | None):
    """Sorted image names of an ImageFolder tree or zip, their labels and the class names.

    Labels come from the source's dataset.json when it has one, else from the top-level folder: class
    index = position of the folder name in sorted order (ImageNet: n01440764 -> 0, ...). They are
    computed from names alone, before any image is decoded, so a bad image can never shift them.
    Returns (names, labels or None, class_names or None, number of non-image files ignored).
    """
    all_files = store.names()
    names = [n for n in all_files if layout.extension(n) in layout.IMAGE_EXTENSIONS]
    ignored = len(all_files) - len(names) - (layout.DATASET_JSON in all_files)
    if not names:
        raise FileNotFoundError(f"{store.path}: no image files found")
    names = names[:max_images] if max_images is not None else names

    meta = layout.read_dataset_json(store)
    given = layout.labels_by_name(meta, store.describe(layout.DATASET_JSON))
    if given is not None:
        unlabelled = [n for n in names if n not in given]
        if unlabelled:
            raise ValueError(f"{store.describe(layout.DATASET_JSON)} has no label for {unlabelled[:3]}")
        return names, [given[n] for n in names], meta.get("class_names"), ignored

    folders = [n.split("/")[0] if "/" in n else None for n in names]
    if all(f is None for f in folders):
        return names, None, None, ignored  # a flat folder: unlabelled, "labels": null as officially
    if any(f is None for f in folders):
        loose = [n for n, f in zip(names, folders) if f is None][:3]
        raise ValueError(f"{store.path}: images both in class folders and at the top level ({loose})")
    class_names = sorted(set(folders))
    class_index = {c: i for i, c in enumerate(class_names)}
    return names, [class_index[f] for f in folders], class_names, ignored


# ---------------------------------------------------------------------------------------------------
# Decoding and cropping
# ---------------------------------------------------------------------------------------------------


class BadImage(Exception):
    """An image that cannot be converted soundly; the message is the reason put in the report."""


def open_image(file, *, min_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> PIL.Image.Image:
    """Decode an image (path or binary file object) in its own mode, or raise BadImage: truncated or
    corrupt files, and sizes outside [--min-size, --max-pixels] (checked before decoding)."""
    try:
        image = PIL.Image.open(file)
    except (PIL.UnidentifiedImageError, OSError, ValueError) as e:
        raise BadImage(f"not a readable image: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(f"huge: {width}x{height} exceeds --max-pixels={max_pixels}")
    if min(width, height) < max(min_size, 1):
        raise BadImage(f"tiny: {width}x{height} is below --min-size={max(min_size, 1)}")
    try:
        image.load()  # JPEG/PNG data errors (truncated file, broken stream) surface here
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt or truncated: {e}") from None
    return image


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any decoded mode -> RGB. Grayscale, CMYK, palette and RGBA use PIL's convert("RGB") exactly as the
    official and ADM pipelines do (alpha is dropped, not composited; EXIF rotation is not applied)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # 16-bit grayscale: keep the top 8 bits (convert("RGB") would clip everything above 255).
        gray = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return PIL.Image.fromarray(gray, "L").convert("RGB")
    if image.mode in ("I", "F"):
        raise BadImage(f"unsupported {image.mode} mode (32-bit values have no sound 8-bit mapping)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Palette images with transparency ..." is expected here
        return image.convert("RGB")


def conversion_note(image: PIL.Image.Image, size: int) -> str | None:
    """What converting this image to size x size involves, for the report (None: nothing special).
    Reads only mode and size, so an opened but undecoded image will do."""
    notes = []
    if image.mode != "RGB":
        notes.append(f"converted from {image.mode}" + (" (16-bit gray)" if image.mode.startswith("I;16") else ""))
    if min(image.size) * 2 <= size:
        notes.append(f"tiny: {image.size[0]}x{image.size[1]} upscaled {size / min(image.size):.1f}x")
    return "; ".join(notes) or None


def adm_resize_plan(width: int, height: int, size: int):
    """Sizes the ADM center crop (openai/guided-diffusion) goes through for a width x height image.

    Halve with BOX while the short side is >= 2 * size, then BICUBIC so the short side is `size`
    (Python round(), as ADM), then crop the center. Returns (box_sizes, bicubic_size, (left, top)).
    """
    box_sizes = []
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
        box_sizes.append((width, height))
    scale = size / min(width, height)
    bicubic = (round(width * scale), round(height * scale))
    return box_sizes, bicubic, ((bicubic[0] - size) // 2, (bicubic[1] - size) // 2)


def center_crop_adm(image: PIL.Image.Image, size: int) -> np.ndarray:
    """RGB image -> (size, size, 3) uint8 with the ADM crop REPA's ImageNet data was made with."""
    box_sizes, bicubic, (left, top) = adm_resize_plan(*image.size, size)
    for box_size in box_sizes:
        image = image.resize(box_size, resample=PIL.Image.Resampling.BOX)
    image = image.resize(bicubic, resample=PIL.Image.Resampling.BICUBIC)
    return np.asarray(image)[top : top + size, left : left + size]


def center_crop_lanczos(image: PIL.Image.Image, size: int) -> np.ndarray:
    """EDM's `center-crop`: the largest centered square, then one LANCZOS resize to (size, size, 3)."""
    width, height = image.size
    crop = min(width, height)
    left, top = (width - crop) // 2, (height - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image.resize((size, size), resample=PIL.Image.Resampling.LANCZOS))


TRANSFORMS = {"center-crop-dhariwal": center_crop_adm, "center-crop": center_crop_lanczos}


def _png_is_valid(path: str, size: int) -> bool:
    """Header check of a finished output (atomic writes mean it is complete if it exists)."""
    try:
        with PIL.Image.open(path) as image:
            return image.format == "PNG" and image.size == (size, size) and image.mode == "RGB"
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------


@dataclass
class _ConvertShard(torch.utils.data.Dataset):
    """One rank's share of the conversion; item k does all the work for image indices[k] so that
    DataLoader workers run in parallel. Returns (index, status, note) with status in
    {"written", "skipped", "failed"} and note the conversion remark or failure reason."""

    store: layout.FileStore
    sources: list
    indices: list
    work_dir: str
    size: int
    transform: str
    min_size: int
    max_pixels: int

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        index = self.indices[k]
        path = os.path.join(self.work_dir, layout.image_name(index))
        with self.store.open(self.sources[index]) as file:
            if _png_is_valid(path, self.size):
                # Done by an earlier run; the source header (not its pixels) still gives the note.
                with PIL.Image.open(file) as header:
                    return index, "skipped", conversion_note(header, self.size)
            try:
                image = open_image(file, min_size=self.min_size, max_pixels=self.max_pixels)
                note = conversion_note(image, self.size)
                image = to_rgb(image)
            except BadImage as e:
                return index, "failed", str(e)
        layout.atomic_write(path, layout.png_bytes(TRANSFORMS[self.transform](image, self.size)))
        return index, "written", note


def convert(args) -> int:
    ranks = Ranks.from_env()
    width, height = args.resolution
    if width != height:
        raise ValueError(f"--resolution={width}x{height}: width and height must match for {args.transform}")
    # Refused before anything is written: `encode` would floor such a side (36 px -> 4x4 latents, not 4.5),
    # and the SD-VAE's 8x downsampling is what the layout and the paper's settings (256, 512) assume.
    # Pixel-space data at other sizes is not a paper setting; the demo set does not come through here.
    factor = layout.VAE_FACTOR
    if width % factor:
        nearest = sorted({max(width // factor, 1) * factor, (width // factor + 1) * factor})
        raise ValueError(
            f"--resolution={width}x{height}: {width} is not a multiple of {factor} (the SD-VAE downsamples by "
            f"{factor}, so latents would be floored); the nearest sizes that work are {nearest}"
        )
    if _zip_is_complete(args.dest, ranks):
        return 0
    store = layout.FileStore(args.source)
    sources, labels, class_names, ignored = list_source(store, args.max_images)
    work_dir = _work_dir(args.dest)
    settings = {
        "command": "convert",
        "source": os.path.abspath(args.source),
        "resolution": width,
        "transform": args.transform,
        "max_images": args.max_images,
        "min_size": args.min_size,
        "max_pixels": args.max_pixels,
    }
    _claim_dest(work_dir, settings, ranks)

    shard = _ConvertShard(
        store=store,
        sources=sources,
        indices=list(range(ranks.rank, len(sources), ranks.world_size)),  # this rank's disjoint share
        work_dir=work_dir,
        size=width,
        transform=args.transform,
        min_size=args.min_size,
        max_pixels=args.max_pixels,
    )
    loader = torch.utils.data.DataLoader(shard, batch_size=None, num_workers=args.workers)
    outcome = {"written": 0, "skipped": 0, "failed": [], "notes": []}
    for index, status, note in tqdm(loader, total=len(shard), desc="convert", unit="img", disable=ranks.rank != 0):
        if status == "failed":
            outcome["failed"].append({"index": index, "source": sources[index], "reason": note})
        else:
            outcome[status] += 1
            if note:
                outcome["notes"].append({"index": index, "source": sources[index], "note": note})

    everyone = ranks.gather(outcome)
    if ranks.rank == 0:
        failed = sorted((f for o in everyone for f in o["failed"]), key=lambda f: f["index"])
        notes = sorted((n for o in everyone for n in o["notes"]), key=lambda n: n["index"])
        failed_indices = {f["index"] for f in failed}
        kept = [i for i in range(len(sources)) if i not in failed_indices]
        names = [layout.image_name(i) for i in kept]
        label_list = [[n, labels[i]] for n, i in zip(names, kept)] if labels is not None else None
        report = {
            "source": os.path.abspath(args.source),
            "images": len(sources),
            "kept": len(kept),
            "written": sum(o["written"] for o in everyone),
            "skipped_existing": sum(o["skipped"] for o in everyone),
            "failed": failed,
            "notes": notes,
            "ignored_non_image_files": ignored,
        }
        meta = {"class_names": class_names} if class_names is not None else {}
        _finish(
            args.dest,
            {
                "report.json": json.dumps(report, indent=1).encode(),
                layout.DATASET_JSON: layout.dataset_json_bytes(label_list, **meta),
            },
        )
        print(
            f"convert: {len(sources)} images -> {args.dest}: {len(kept)} kept ({report['written']} written, "
            f"{report['skipped_existing']} already done), {len(failed)} failed, {len(notes)} converted with "
            f"a note, {ignored} non-image files ignored; details in report.json"
        )
        for f in failed[:10]:
            print(f"  failed #{f['index']} {f['source']}: {f['reason']}")
    ranks.barrier()
    return 0


# ---------------------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------------------


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npy_is_valid(path: str, shape: tuple) -> bool:
    try:
        array = np.load(path, mmap_mode="r")  # reads the header only
        return array.shape == shape and array.dtype == np.float32
    except (OSError, ValueError):
        return False


@dataclass
class _ImageReader(torch.utils.data.Dataset):
    """Decodes converted images in DataLoader workers: item k -> (k, (3, H, W) uint8)."""

    store: layout.FileStore
    names: list
    positions: list
    shape: tuple  # (H, W, 3) of the first image; every image must match it to be batched

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, k):
        name = self.names[self.positions[k]]
        with PIL.Image.open(io.BytesIO(self.store.read(name))) as image:
            array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        if array.shape != self.shape:
            raise ValueError(f"{self.store.describe(name)} is {array.shape}, the first image is {self.shape}")
        return k, torch.from_numpy(array.transpose(2, 0, 1).copy())


def _flip_dest(dest: str) -> str:
    """vae-sd -> vae-sd-flip, vae-sd.zip -> vae-sd-flip.zip: a sibling the official reader ignores."""
    stem, ext = (dest[:-4], ".zip") if layout.extension(dest) == ".zip" else (dest.rstrip("/"), "")
    return f"{stem}-flip{ext}"


def encode(args) -> int:
    ranks = Ranks.from_env()
    # (destination, holds mirrored-image moments); finished .zip destinations are left alone.
    dests = [(args.dest, False)] + ([(args.flip_dest or _flip_dest(args.dest), True)] if args.flip else [])
    dests = [(d, flipped) for d, flipped in dests if not _zip_is_complete(d, ranks)]
    if not dests:
        return 0
    store = layout.FileStore(args.source)
    names = store.names(layout.IMAGE_EXTENSIONS)[: args.max_images]
    if not names:
        raise FileNotFoundError(f"{args.source}: no images to encode")
    # Latent i belongs to image i: keep the image's own index (gaps left by convert stay gaps); fall
    # back to the sorted position, as the official tool does, for names that carry no unique index.
    indices = [layout.name_index(n) for n in names]
    if None in indices or len(set(indices)) != len(indices):
        indices = list(range(len(names)))
    meta = layout.read_dataset_json(store)
    labels = layout.labels_by_name(meta, store.describe(layout.DATASET_JSON))
    if labels is not None and any(n not in labels for n in names):
        raise ValueError(f"{store.describe(layout.DATASET_JSON)} has no label for some images")

    device = torch.device(args.device or (f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"))
    vae = load_vae(args.vae, device)
    with PIL.Image.open(io.BytesIO(store.read(names[0]))) as first:
        width, height = first.size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for the SD-VAE
    if width % factor or height % factor:
        # The VAE would floor the side (36 px -> 4x4 latents): refuse instead of storing misaligned latents.
        raise ValueError(
            f"{store.describe(names[0])} is {width}x{height} px, not a multiple of {factor}, the VAE's downsampling "
            f"factor; convert the images at a resolution divisible by {factor}"
        )
    shape = (2 * vae.config.latent_channels, height // factor, width // factor)
    settings = {
        "command": "encode",
        "source": os.path.abspath(args.source),
        "vae": args.vae,
        "max_images": args.max_images,
        "shape": list(shape),
    }
    for dest, flipped in dests:
        _claim_dest(_work_dir(dest), {**settings, "flipped": flipped}, ranks)

    def outputs(position):
        return [os.path.join(_work_dir(d), layout.latent_name(indices[position])) for d, _ in dests]

    shard = range(ranks.rank, len(names), ranks.world_size)
    pending = [p for p in shard if not all(_npy_is_valid(path, shape) for path in outputs(p))]
    reader = _ImageReader(store, names, pending, (height, width, 3))
    loader = torch.utils.data.DataLoader(reader, batch_size=args.batch_size, num_workers=args.workers)
    progress = tqdm(
        total=len(shard), initial=len(shard) - len(pending), desc="encode", unit="img", disable=ranks.rank != 0
    )
    for ks, images in loader:
        images = images.to(device)
        # Mirror along W (as DiT's random flip) for the flipped destination.
        moments = [encode_moments(vae, images.flip(-1) if flipped else images) for _, flipped in dests]
        for j, k in enumerate(ks.tolist()):
            for path, m in zip(outputs(pending[k]), moments):
                layout.atomic_write(path, _npy_bytes(m[j].cpu().numpy()))
        progress.update(len(ks))
    progress.close()

    written = sum(ranks.gather(len(pending)))
    if ranks.rank == 0:
        latent_names = [layout.latent_name(i) for i in indices]
        label_list = [[ln, labels[n]] for ln, n in zip(latent_names, names)] if labels is not None else None
        extra = {"class_names": meta["class_names"]} if meta and meta.get("class_names") is not None else {}
        for dest, flipped in dests:
            json_bytes = layout.dataset_json_bytes(label_list, vae=args.vae, flipped=flipped, **extra)
            _finish(dest, {layout.DATASET_JSON: json_bytes})
        print(
            f"encode: {len(names)} images -> {', '.join(d for d, _ in dests)}: moments {shape} float32 each, "
            f"{written} encoded now, {len(names) - written} already done"
        )
    ranks.barrier()
    return 0


# ---------------------------------------------------------------------------------------------------
# encode-targets: the frozen encoders' tokens, for train.py --target-cache (format: target_cache.py)
# ---------------------------------------------------------------------------------------------------


@dataclass
class _DatasetImages(torch.utils.data.Dataset):
    """Item k -> (item index, (3, H, W) uint8 image, "" or why it could not be read). The image is
    ImageLatentDataset's item, the very tensor train.py hands the encoder; an unreadable one yields zeros
    and the reason, so that one bad file is reported with the others instead of stopping the workers."""

    dataset: object  # ImageLatentDataset(latents=False)
    items: list

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        index = self.items[k]
        try:
            return index, self.dataset[index][0], ""
        except ValueError as err:  # ImageLatentDataset names the file and the item
            return index, torch.zeros(self.dataset.image_shape, dtype=torch.uint8), str(err)


def encode_targets(args) -> int:
    ranks = Ranks.from_env()
    if layout.extension(args.dest) == ".zip":
        raise ValueError(f"--dest={args.dest}: a target cache is a folder of memory-mapped shards, not a .zip")
    if args.shard_size <= 0 or args.batch_size <= 0:
        raise ValueError(f"--shard-size={args.shard_size} and --batch-size={args.batch_size} must be positive")
    # The images exactly as train.py reads them: ImageLatentDataset over the folder's parent (the --data-dir).
    data_dir, images_name = os.path.split(os.path.normpath(args.source))
    images_name = images_name[:-4] if layout.extension(images_name) == ".zip" else images_name
    dataset = ImageLatentDataset(data_dir or ".", latents=False, images_name=images_name)
    items = dataset.num_items
    resolution = args.enc_resolution or dataset.image_shape[-1]

    device = torch.device(args.device or (f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"))
    # train.py seeds before it builds the encoders: random weights (--enc-weights random) come out the same.
    torch.manual_seed(args.seed)
    encoders = load_encoders(
        args.enc_type, device, resolution, ckpt_path=args.enc_ckpt or None, enc_weights=args.enc_weights
    )
    digests = target_cache.image_digests(dataset.images, dataset.image_names.tolist())  # one per image
    manifest = {
        "format": target_cache.FORMAT,
        "version": target_cache.VERSION,
        "items": items,
        "flip": args.flip,
        "dtype": args.dtype,
        "shard_size": args.shard_size,
        "precision": args.precision,  # of the encoder forward; recorded, not checked by train.py
        **target_cache.run_identity(encoders, dataset, digests),  # "encoders", "dataset" (with the pixel hash)
    }
    # A finished cache's row checksums: a rerun keeps only the shards that still match them (and rewrites the
    # rest), so rerunning the same command repairs a corrupt shard. Read by every rank before rank 0 removes
    # the manifest (the cache is unfinished again until this run writes the new one).
    try:
        recorded = target_cache.read_manifest(args.dest)["shards"]
    except (FileNotFoundError, ValueError):  # none, or damaged / older: shards are checked as a killed run's
        recorded = {}
    # The job's settings leave the pixel hash out: images fixed or replaced after a killed run are checked per
    # shard instead (shard_pixels_path), so that finished shards of unchanged images are kept.
    job = {**manifest, "dataset": {k: v for k, v in manifest["dataset"].items() if k != "pixels_sha256"}}
    _claim_dest(args.dest, {"command": "encode-targets", "source": os.path.abspath(args.source), **job}, ranks)
    if ranks.rank == 0 and os.path.isfile(os.path.join(args.dest, target_cache.MANIFEST)):
        os.remove(os.path.join(args.dest, target_cache.MANIFEST))

    # Work unit: one shard (every encoder, plain and flipped); rank r takes shards r, r + world, ...
    shards = target_cache.shard_ranges(items, args.shard_size)
    views = (False, True) if args.flip else (False,)
    outputs = [(e, flipped) for e in range(len(encoders)) for flipped in views]

    def shard_shape(e, j):
        start, stop = shards[j]
        return stop - start, encoders[e].grid ** 2, encoders[e].embed_dim

    def kept_checksums(e, f, j):
        """The row checksums of an existing shard file worth keeping: whole, finite, and matching the previous
        manifest's checksums if there was one; else None (the shard is encoded again)."""
        path, name = target_cache.shard_path(args.dest, e, f, j), target_cache.shard_name(e, f, j)
        if not target_cache.shard_is_valid(path, shard_shape(e, j), args.dtype):
            return None
        array = np.load(path, mmap_mode="r")
        sums = target_cache.row_checksums(array)
        problem = None
        if name in recorded and sums != recorded[name]:
            problem = "fails the checksums of the previous manifest.json"
        elif target_cache.nonfinite_rows(array, args.dtype):
            problem = "holds non-finite values"
        del array
        if problem:
            print(f"encode-targets: {path} {problem}: encoding it again")
            return None
        return sums

    checksums = {}  # shard name -> row checksums, of the shards this rank keeps or writes

    def shard_pixels(j):
        return target_cache.pixels_sha256(digests[shards[j][0] : shards[j][1]])

    def shard_done(j):
        pixels = target_cache.shard_pixels_path(args.dest, j)
        if not os.path.isfile(pixels):
            return False
        with open(pixels, "rb") as handle:
            if handle.read() != shard_pixels(j).encode():
                print(f"encode-targets: the images of shard {j} (items {shards[j][0]}..{shards[j][1] - 1}) changed: "
                      "encoding it again")  # fmt: skip
                return False
        kept = {}
        for e, f in outputs:
            sums = kept_checksums(e, f, j)
            if sums is None:
                return False
            kept[target_cache.shard_name(e, f, j)] = sums
        checksums.update(kept)
        return True

    mine = list(range(ranks.rank, len(shards), ranks.world_size))
    pending = [j for j in mine if not shard_done(j)]
    todo = [k for j in pending for k in range(*shards[j])]
    loader = torch.utils.data.DataLoader(
        _DatasetImages(dataset, todo), batch_size=args.batch_size, num_workers=args.workers
    )
    precision = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    autocast = torch.autocast(device.type, dtype=precision, enabled=precision is not None)
    storage = np.dtype(target_cache.DTYPES[args.dtype][1])
    buffers, filled, broken, failures = {}, {}, set(), []
    mine_items = sum(shards[j][1] - shards[j][0] for j in mine)
    progress = tqdm(
        total=mine_items, initial=mine_items - len(todo), desc="encode-targets", unit="img", disable=ranks.rank != 0
    )
    start_time = time.perf_counter()
    for ks, images, errors in loader:
        images = images.to(device)
        with torch.inference_mode(), autocast:
            # The mirrored view is images.flip(-1), the same uint8 tensor ImageLatentDataset(flip=True) serves.
            tokens = {(e, f): encoders[e].encode(images.flip(-1) if f else images) for e, f in outputs}
        stored = {}
        for (e, f), t in tokens.items():
            files = sorted({target_cache.shard_path(args.dest, e, f, k // args.shard_size) for k in ks.tolist()})
            what = f"{encoders[e].spec.name}{' (mirrored images)' if f else ''} for {', '.join(files)}"
            stored[e, f] = target_cache.to_storage(t, args.dtype, what, items=ks.tolist())
        for i, k in enumerate(ks.tolist()):
            j = k // args.shard_size
            if errors[i]:
                broken.add(j)
                image = dataset.images.describe(str(dataset.image_names[k]))
                failures.append({"index": k, "image": image, "reason": errors[i]})
            if j not in buffers:
                buffers[j] = {(e, f): np.empty(shard_shape(e, j), storage) for e, f in outputs}
                filled[j] = 0
            for key, array in stored.items():
                buffers[j][key][k - shards[j][0]] = array[i]
            filled[j] += 1
            if filled[j] == shards[j][1] - shards[j][0]:  # complete: write it whole (a shard with a bad image: never)
                for (e, f), array in buffers.pop(j).items():
                    if j not in broken:
                        path = target_cache.shard_path(args.dest, e, f, j)
                        checksums[target_cache.shard_name(e, f, j)] = target_cache.write_shard(path, array)
                if j not in broken:  # after the shard's files: which images they were encoded from
                    layout.atomic_write(target_cache.shard_pixels_path(args.dest, j), shard_pixels(j).encode())
        progress.update(len(ks))
    progress.close()
    seconds = time.perf_counter() - start_time

    everyone = ranks.gather({"failures": failures, "encoded": len(todo), "checksums": checksums})
    failures = sorted((f for o in everyone for f in o["failures"]), key=lambda f: f["index"])
    encoded = sum(o["encoded"] for o in everyone)
    if ranks.rank == 0:
        report = {"items": items, "encoded_now": encoded, "failed": failures}
        layout.atomic_write(os.path.join(args.dest, "report.json"), json.dumps(report, indent=1).encode())
        if not failures:  # the manifest last: a cache without one is unfinished and train.py refuses it
            every = {name: sums for o in everyone for name, sums in o["checksums"].items()}
            manifest["shards"] = {name: every[name] for name in sorted(every)}
            layout.atomic_write(os.path.join(args.dest, target_cache.MANIFEST), json.dumps(manifest, indent=1).encode())
        rate = f" ({len(todo) / seconds:.1f} img/s on rank 0)" if todo else ""
        names = ",".join(enc.spec.name for enc in encoders)
        print(
            f"encode-targets: {items} items{' + flips' if args.flip else ''} -> {args.dest}: {names} tokens in "
            f"{args.dtype}, {encoded} encoded now{rate}, {items - encoded} already done, {len(failures)} failed"
        )
    ranks.barrier()
    if failures:
        listed = "; ".join(f"item {f['index']}: {f['reason']}" for f in failures[:3])
        raise ValueError(
            f"{len(failures)} image(s) could not be read, so their shards were not written (all in "
            f"{os.path.join(args.dest, 'report.json')}): {listed}. Replace them and rerun the same command; "
            "finished shards are kept"
        )
    return 0


# ---------------------------------------------------------------------------------------------------
# coco: MS-COCO 2014 -> the MS-COCO feature layout of text-to-image training (preprocessing/layout.py)
# ---------------------------------------------------------------------------------------------------

COCO_SPLITS = {"train": ("train2014", "captions_train2014.json"), "val": ("val2014", "captions_val2014.json")}


def _coco_json(annotations: str):
    """The parsed COCO annotations file; errors name the file and where it breaks."""
    if not os.path.isfile(annotations):
        raise FileNotFoundError(f"{annotations}: no such file (COCO's annotations/captions_*2014.json)")
    with open(annotations, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{annotations} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 8]!r}); COCO's annotation "
            "files are UTF-8 JSON: download captions_*2014.json again"
        ) from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # An unterminated string runs to the end of the file, as does an error past the last character.
        truncated = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        raise ValueError(
            f"{annotations} is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})"
            + ("; it ends early (truncated?)" if truncated else "")
            + "; download or unpack the annotations again"
        ) from e


def read_coco_captions(annotations: str) -> tuple[list[int], list[str], list[list[str]]]:
    """(image ids sorted, their file names, their captions in annotation order) of a COCO captions file.

    Item i of the layout is the i-th image in order of COCO image id, and caption k its k-th annotation in
    the file's order: what U-ViT's MSCOCODatabase (pycocotools' imgToAnns) yields, so indices agree with it.
    An image without captions keeps its index (with an empty caption list; `coco` leaves it as a gap). A
    malformed entry, a repeated image id or a caption of an unlisted image raises, naming the file and entry.
    """
    meta = _coco_json(annotations)
    if not isinstance(meta, dict) or "images" not in meta or "annotations" not in meta:
        raise ValueError(f"{annotations} is not a COCO captions file (needs 'images' and 'annotations')")
    for key in ("images", "annotations"):
        if not isinstance(meta[key], list):
            raise ValueError(f"{annotations}: '{key}' is a {type(meta[key]).__name__}, not a list of entries")
    files = {}
    for j, image in enumerate(meta["images"]):
        entry = f"{annotations}: images[{j}]"
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            missing = [k for k in ("id", "file_name") if not isinstance(image, dict) or k not in image]
            raise ValueError(f"{entry} has no {' or '.join(repr(k) for k in missing)} ({_short(image)})")
        image_id, name = image["id"], image["file_name"]
        if not isinstance(image_id, int) or isinstance(image_id, bool) or not isinstance(name, str) or not name:
            raise ValueError(f"{entry} needs an integer 'id' and a file name 'file_name' ({_short(image)})")
        if image_id in files:
            raise ValueError(
                f"{entry}: image id {image_id} is listed twice ({files[image_id]!r} and {name!r}); item numbers "
                "follow the image ids, so each must be unique: fix or download the annotations again"
            )
        files[image_id] = name
    captions = {image_id: [] for image_id in files}
    for j, ann in enumerate(meta["annotations"]):
        entry = f"{annotations}: annotations[{j}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            missing = [k for k in ("image_id", "caption") if not isinstance(ann, dict) or k not in ann]
            raise ValueError(f"{entry} has no {' or '.join(repr(k) for k in missing)} ({_short(ann)})")
        if not isinstance(ann["caption"], str):
            raise ValueError(f"{entry}: 'caption' is a {type(ann['caption']).__name__}, not a string ({_short(ann)})")
        if ann["image_id"] not in captions:
            raise ValueError(f"{entry} (id {ann.get('id')}) names image {ann['image_id']!r}, not listed in 'images'")
        captions[ann["image_id"]].append(ann["caption"])
    ids = sorted(files)
    return ids, [files[i] for i in ids], [captions[i] for i in ids]


def _short(entry) -> str:
    text = json.dumps(entry, ensure_ascii=False) if isinstance(entry, (dict, list, str, int, float)) else repr(entry)
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass
class _CocoReader(torch.utils.data.Dataset):
    """Decodes and crops source images in DataLoader workers: item k -> (index, (3, S, S) uint8 or None, note)."""

    folder: str
    file_names: list
    indices: list
    size: int
    transform: str

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        index = self.indices[k]
        try:
            image = open_image(os.path.join(self.folder, self.file_names[index]))
            image = to_rgb(image)
        except BadImage as e:
            return index, torch.zeros(0, dtype=torch.uint8), str(e)
        except FileNotFoundError:
            return index, torch.zeros(0, dtype=torch.uint8), "missing file"
        crop = TRANSFORMS[self.transform](image, self.size)
        return index, torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))), ""


def _as_list(batch):
    """DataLoader collate that keeps the items as they are (crops may fail: no stacking in workers)."""
    return batch


def _coco_item_state(split_dir: str, index: int, n_captions: int, size: int, moments_shape, context_shape) -> str:
    """'done' when every file of item `index` exists with the right header, 'tokens' when only caption tokens
    are missing (a rerun re-encodes them from the captions alone), else 'all' (the item is made afresh)."""
    if not _png_is_valid(os.path.join(split_dir, layout.coco_image_name(index)), size):
        return "all"
    if moments_shape is not None and not _npy_is_valid(
        os.path.join(split_dir, layout.coco_moments_name(index)), moments_shape
    ):
        return "all"
    tokens = (os.path.join(split_dir, layout.coco_context_name(index, k)) for k in range(n_captions))
    return "done" if all(_npy_is_valid(path, context_shape) for path in tokens) else "tokens"


def _coco_reconcile(split_dir: str, listing: dict) -> dict:
    """Make the item files already in split_dir agree with `listing` (this run's captions.json), then write it.

    A rerun reuses the files a previous run left, so they must be those of this listing. Compared with the
    captions.json the folder holds (written by `coco` before any item file, so it names what they were made
    from): an item whose image id or file name changed loses all its files; an item whose captions changed
    (edited, added, deleted) loses its caption tokens {i}_{k}.npy, re-encoded by this run; items past the listing
    and images without captions (gaps) lose all their files. A folder with item files but no readable
    captions.json (a killed run of an older version) cannot be checked, so all its item files are removed.
    Returns {"images": items whose files were all removed, "captions": items whose tokens were removed}.
    """
    try:
        previous = layout.read_captions_json(split_dir)
    except ValueError as err:
        print(f"{err}; the files it describes cannot be checked and are made afresh")
        previous = None
    captions, count = listing["captions"], len(listing["captions"])

    def recorded(key, index):
        values = (previous or {}).get(key)
        return values[index] if isinstance(values, list) and index < len(values) else None

    removed = {"images": set(), "captions": set()}
    for name, index, caption, _ext in layout.coco_files(split_dir):
        n = len(captions[index]) if index < count else 0
        if (
            previous is None
            or n == 0
            or any(recorded(k, index) != listing[k][index] for k in ("image_ids", "file_names"))
        ):
            removed["images"].add(index)
        elif caption is not None and (caption >= n or recorded("captions", index) != captions[index]):
            removed["captions"].add(index)
        else:
            continue
        os.remove(os.path.join(split_dir, name))
    layout.atomic_write(os.path.join(split_dir, layout.CAPTIONS_JSON), json.dumps(listing).encode())
    removed["captions"] -= removed["images"]
    return {key: sorted(value) for key, value in removed.items()}


def _write_caption_tokens(encoder, split_dir: str, indices: list, captions: list) -> None:
    """Encode the captions of items `indices` in one batch; write {i}_{k}.npy for each."""
    tokens = encoder.encode([c for index in indices for c in captions[index]]).numpy()  # (sum of captions, 77, D)
    row = 0
    for index in indices:
        for k in range(len(captions[index])):
            layout.atomic_write(os.path.join(split_dir, layout.coco_context_name(index, k)), _npy_bytes(tokens[row]))
            row += 1


def coco(args) -> int:
    """MS-COCO 2014 -> DEST/{split}/{i}.png, {i}.npy, {i}_{k}.npy and DEST/empty_context.npy.

    Images without captions are gaps (listed in report.json), as images that cannot be read: item i stays the
    i-th image by COCO id (U-ViT's numbering). A rerun first brings the files of an earlier run in line with
    the annotations (see _coco_reconcile): changed captions are re-encoded, deleted ones removed.
    """
    from models.text_encoder import MAX_LENGTH, load_text_encoder

    ranks = Ranks.from_env()
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    unknown = [s for s in splits if s not in COCO_SPLITS]
    if unknown or not splits:
        raise ValueError(f"--split {args.split}: choose from {', '.join(COCO_SPLITS)} (comma-separated)")
    size = args.resolution
    if size % layout.VAE_FACTOR:
        raise ValueError(f"--resolution={size} is not a multiple of {layout.VAE_FACTOR} (the SD-VAE's factor)")
    # The annotations first: a broken file stops the run before any model is loaded.
    annotations = {
        split: read_coco_captions(os.path.join(args.source, "annotations", COCO_SPLITS[split][1])) for split in splits
    }
    device = torch.device(args.device or (f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"))
    vae = None if args.vae == "none" else load_vae(args.vae, device)
    encoder = load_text_encoder(args.text_encoder, device, args.text_encoder_weights, args.text_width)
    moments_shape = None
    if vae is not None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        moments_shape = (2 * vae.config.latent_channels, size // factor, size // factor)
    context_shape = (MAX_LENGTH, encoder.width)

    # The null condition, shared by the splits, written once by rank 0 (also on a rerun: it is cheap).
    _claim_dest(args.dest, {"command": "coco", "text_encoder": encoder.describe()}, ranks)
    if ranks.rank == 0:
        layout.atomic_write(os.path.join(args.dest, layout.EMPTY_CONTEXT), _npy_bytes(encoder.encode([""])[0].numpy()))
        meta = {**encoder.describe(), "vae": args.vae, "resolution": size, "transform": args.transform}
        layout.atomic_write(os.path.join(args.dest, layout.TEXT_ENCODER_JSON), json.dumps(meta, indent=1).encode())

    for split in splits:
        image_folder, annotation_file = COCO_SPLITS[split]
        ids, file_names, captions = annotations[split]
        count = len(ids) if args.max_images is None else min(args.max_images, len(ids))
        split_dir = os.path.join(args.dest, split)
        settings = {
            "command": "coco", "source": os.path.abspath(args.source), "split": split, "resolution": size,
            "transform": args.transform, "vae": args.vae, "text_encoder": encoder.describe(),
            "max_images": args.max_images,
        }  # fmt: skip
        _claim_dest(split_dir, settings, ranks)
        listing = {"image_ids": ids[:count], "file_names": file_names[:count], "captions": captions[:count]}
        reconciled, problem = None, None
        if ranks.rank == 0:
            try:
                reconciled = _coco_reconcile(split_dir, listing)
            except OSError as err:
                problem = f"{split_dir}: cannot bring the files of the previous run in line with the captions: {err}"
        problem = ranks.gather(problem)[0]  # doubles as the barrier: no rank reads the folder before it is right
        if problem:
            raise RuntimeError(problem)
        if reconciled and (reconciled["images"] or reconciled["captions"]):
            print(
                f"coco {split}: the annotations changed since the last run into {split_dir}: removed the caption "
                f"tokens of {len(reconciled['captions'])} item(s) (encoded again now) and every file of "
                f"{len(reconciled['images'])} item(s) (other image, no captions or beyond the listing)"
            )
        uncaptioned = [i for i in range(count) if not captions[i]]
        shard = [i for i in range(ranks.rank, count, ranks.world_size) if captions[i]]
        state = {i: _coco_item_state(split_dir, i, len(captions[i]), size, moments_shape, context_shape) for i in shard}
        pending = [i for i in shard if state[i] == "all"]
        retokened = [i for i in shard if state[i] == "tokens"]
        reader = _CocoReader(os.path.join(args.source, image_folder), file_names, pending, size, args.transform)
        loader = torch.utils.data.DataLoader(
            reader, batch_size=args.batch_size, num_workers=args.workers, collate_fn=_as_list
        )
        failed = []
        progress = tqdm(total=len(shard), initial=len(shard) - len(pending) - len(retokened), desc=f"coco {split}",
                        unit="img", disable=ranks.rank != 0)  # fmt: skip
        for start in range(0, len(retokened), args.batch_size):  # images and moments kept: tokens only
            indices = retokened[start : start + args.batch_size]
            _write_caption_tokens(encoder, split_dir, indices, captions)
            progress.update(len(indices))
        for batch in loader:
            good = [(index, image) for index, image, note in batch if not note]
            failed += [
                {"index": index, "source": file_names[index], "reason": note} for index, _, note in batch if note
            ]
            if good:
                indices = [index for index, _ in good]
                images = torch.stack([image for _, image in good])
                moments = encode_mean_logvar(vae, images.to(device)).cpu().numpy() if vae is not None else None
                _write_caption_tokens(encoder, split_dir, indices, captions)
                for j, index in enumerate(indices):
                    if moments is not None:
                        name = layout.coco_moments_name(index)
                        layout.atomic_write(os.path.join(split_dir, name), _npy_bytes(moments[j]))
                    # The PNG last: a valid PNG means the item was begun; validity is checked file by file.
                    png = layout.png_bytes(images[j].permute(1, 2, 0).numpy())
                    layout.atomic_write(os.path.join(split_dir, layout.coco_image_name(index)), png)
            progress.update(len(batch))
        progress.close()

        everyone = ranks.gather({"failed": failed, "written": len(pending), "retokened": len(retokened)})
        if ranks.rank == 0:
            unreadable = [f for o in everyone for f in o["failed"]]
            failed = [{"index": i, "source": file_names[i], "reason": f"no captions in {annotation_file}"}
                      for i in uncaptioned]  # fmt: skip
            failed = sorted(failed + unreadable, key=lambda f: f["index"])
            report = {
                "source": os.path.abspath(args.source), "split": split, "images": count,
                "kept": count - len(failed), "written": sum(o["written"] for o in everyone) - len(unreadable),
                "captions_encoded_again": sum(o["retokened"] for o in everyone), "without_captions": len(uncaptioned),
                "failed": failed,
            }  # fmt: skip
            layout.atomic_write(os.path.join(split_dir, "report.json"), json.dumps(report, indent=1).encode())
            print(
                f"coco {split}: {count} images -> {split_dir}: {count - len(failed)} kept, {len(failed)} failed "
                f"(gaps in the numbering; details in report.json), {sum(len(c) for c in captions[:count])} captions"
            )
            if uncaptioned:
                print(
                    f"  {len(uncaptioned)} image(s) have no captions in {annotation_file} and are left out as gaps, "
                    f"e.g. image id {ids[uncaptioned[0]]} ({file_names[uncaptioned[0]]})"
                )
            for f in failed[:10]:
                print(f"  failed #{f['index']} {f['source']}: {f['reason']}")
        ranks.barrier()
    return 0


def coco_reference(args) -> int:
    """A split's {i}.png images -> an ADM-style reference batch (.npz, arr_0 uint8 N x H x W x 3) for FID.

    Written as a stream (40,504 val images at 256 px are 8 GB), in item order, so the evaluator reads it
    like VIRTUAL_imagenet256_labeled.npz. U-ViT/REPA's own FID statistics cover the whole val split."""
    images, _moments, _counts = layout.scan_coco_split(args.source)
    indices = sorted(images)[: args.max_images]
    if not indices:
        raise FileNotFoundError(f"{args.source}: no {{i}}.png images (a split folder of the COCO layout)")
    with PIL.Image.open(os.path.join(args.source, layout.coco_image_name(indices[0]))) as first:
        width, height = first.size
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(indices), height, width, 3)}
    temp = f"{args.dest}.tmp-{os.getpid()}"
    with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_STORED) as archive:
        info = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
        with archive.open(info, "w", force_zip64=True) as stream:
            np.lib.format.write_array_header_2_0(stream, header)
            for index in tqdm(indices, desc="reference batch", unit="img"):
                with PIL.Image.open(os.path.join(args.source, layout.coco_image_name(index))) as image:
                    array = np.asarray(image.convert("RGB"))
                if array.shape != (height, width, 3):
                    raise ValueError(f"{args.source}/{index}.png is {array.shape}, the first is {(height, width, 3)}")
                stream.write(array.tobytes())
    os.replace(temp, args.dest)
    print(f"coco-reference: {len(indices)} images of {args.source} -> {args.dest} (arr_0 {header['shape']})")
    return 0


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def parse_resolution(text: str) -> tuple[int, int]:
    """'256x256' or '256,256' -> (256, 256)."""
    parts = text.replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"cannot parse resolution {text!r}; expected WxH such as 256x256")
    return int(parts[0]), int(parts[1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    c = commands.add_parser("convert", help="ImageFolder tree or zip -> square PNGs + dataset.json")
    c.add_argument("--source", required=True, help="class-folder tree (ImageNet train/) or .zip")
    c.add_argument("--dest", required=True, help="output folder (DIR/images) or .zip")
    c.add_argument("--resolution", type=parse_resolution, default=(256, 256), help="WxH, e.g. 256x256 or 512x512")
    c.add_argument(
        "--transform",
        choices=sorted(TRANSFORMS),
        default="center-crop-dhariwal",
        help="center-crop-dhariwal: the ADM crop REPA used",
    )
    c.add_argument("--max-images", type=int, default=None, help="only the first N images (sorted order)")
    c.add_argument(
        "--min-size",
        type=int,
        default=0,
        help="report images with a shorter side below this instead of upscaling them (0: keep all, "
        "as the official run)",
    )
    c.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="report larger images as huge")
    c.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader worker processes per rank (0: in the main process)",
    )
    c.set_defaults(run=convert)

    e = commands.add_parser("encode", help="converted images -> SD-VAE posterior mean and std (.npy)")
    e.add_argument("--source", required=True, help="converted images folder (DIR/images) or .zip")
    e.add_argument("--dest", required=True, help="output folder (DIR/vae-sd) or .zip")
    e.add_argument(
        "--vae",
        "--model-url",
        dest="vae",
        default=VAE_NAMES["mse"],  # the paper's training latents come from sd-vae-ft-mse
        help="ema | mse (short for the two SD-VAE releases) | hub name | local folder",
    )
    e.add_argument(
        "--flip",
        action="store_true",
        help="also store the moments of the mirrored image in --flip-dest (the paper does not flip)",
    )
    e.add_argument("--flip-dest", default=None, help="default: DEST with -flip appended (DIR/vae-sd-flip)")
    e.add_argument("--max-images", type=int, default=None, help="only the first N images (sorted order)")
    e.add_argument("--batch-size", type=int, default=32, help="images per VAE forward pass")
    e.add_argument("--workers", type=int, default=4, help="DataLoader worker processes decoding PNGs per rank")
    e.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    e.set_defaults(run=encode)

    t = commands.add_parser(
        "encode-targets", help="converted images -> frozen-encoder tokens for train.py --target-cache"
    )
    t.add_argument("--source", required=True, help="converted images (DIR/images or .zip), as train.py --data-dir DIR reads them")  # fmt: skip
    t.add_argument("--dest", required=True, help="output folder, e.g. DIR/targets-dinov2-vit-b")
    t.add_argument("--enc-type", default="dinov2-vit-b", help="as train.py: one name, or several separated by commas")
    t.add_argument("--enc-ckpt", default="", help="as train.py: local encoder weights (comma-separated per encoder)")
    t.add_argument("--enc-weights", choices=("pretrained", "random"), default="pretrained", help="as train.py")
    t.add_argument(
        "--enc-resolution",
        type=int,
        default=None,
        help="the encoder setting train.py derives, 16 x the SiT token grid (input side / patch); default: the "
        "image side, right for SiT-*/2 on SD-VAE latents (256 px -> 256, 16x16 tokens)",
    )
    t.add_argument("--flip", action="store_true", help="also store the mirrored images' tokens (train.py --hflip)")
    t.add_argument(
        "--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="stored dtype (fp32: exact, 2x disk)"
    )
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast of the encoder forward")  # fmt: skip
    t.add_argument("--shard-size", type=int, default=1000, help="items per shard file")
    t.add_argument(
        "--seed", type=int, default=0, help="train.py's --seed: it sets random weights (--enc-weights random)"
    )
    t.add_argument("--batch-size", type=int, default=64, help="images per encoder forward pass")
    t.add_argument("--workers", type=int, default=4, help="DataLoader worker processes decoding PNGs per rank")
    t.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    t.set_defaults(run=encode_targets)

    m = commands.add_parser("coco", help="MS-COCO 2014 -> images, SD-VAE moments and CLIP caption tokens per split")
    m.add_argument("--source", required=True, help="COCO root holding train2014/, val2014/ and annotations/")
    m.add_argument("--dest", required=True, help="output root (DEST/train, DEST/val, DEST/empty_context.npy)")
    m.add_argument("--split", default="train,val", help="train, val or both (comma-separated)")
    m.add_argument("--resolution", type=int, default=256)
    m.add_argument(
        "--transform",
        choices=sorted(TRANSFORMS),
        default="center-crop",
        help="center-crop: U-ViT's (largest centred square, one LANCZOS resize), which the official features "
        "were made with; center-crop-dhariwal: the ADM crop of the ImageNet data",
    )
    m.add_argument("--vae", default=VAE_NAMES["mse"], help="ema | mse | hub name | folder | none (no moments)")
    m.add_argument("--text-encoder", default="openai/clip-vit-large-patch14", help="hub name or local folder")
    m.add_argument("--text-encoder-weights", choices=("pretrained", "random"), default="pretrained")
    m.add_argument("--text-width", type=int, default=768, help="token width of a random text encoder")
    m.add_argument("--max-images", type=int, default=None, help="only the first N images of each split")
    m.add_argument("--batch-size", type=int, default=32, help="images per VAE forward pass")
    m.add_argument("--workers", type=int, default=4, help="DataLoader worker processes decoding images per rank")
    m.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    m.set_defaults(run=coco)

    r = commands.add_parser("coco-reference", help="a COCO-layout split's images -> a reference batch .npz for FID")
    r.add_argument("--source", required=True, help="split folder, e.g. DATA/coco256_features/val")
    r.add_argument("--dest", required=True, help="output .npz (arr_0: uint8 N x H x W x 3)")
    r.add_argument("--max-images", type=int, default=None, help="only the first N items")
    r.set_defaults(run=coco_reference)
    return parser


def main(argv=None) -> int:
    """The command line; errors propagate as exceptions (callers such as make_demo_data see them)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CLI_ERRORS as err:  # what users get wrong (paths, settings, data): one line, no traceback
        sys.exit(f"error: {err}")
