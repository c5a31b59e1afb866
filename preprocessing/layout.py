"""The official REPA / EDM2 data layout: file names, dataset.json, folder-or-zip storage.

A data folder holds
    images/   00000/img00000000.png, 00000/img00000001.png, ... and dataset.json
    vae-sd/   00000/img-mean-std-00000000.npy, ...             and dataset.json
Item i lives in sub-folder f"{i:08d}"[:5] (1000 items per folder). Each dataset.json is
{"labels": [[relative_name, int_label], ...]} keyed by that folder's own names ("labels": null when
the source had no classes); we add "class_names" (label -> name), which the official readers ignore.
Each .npy is float32 (2C, H/8, W/8): the SD-VAE posterior mean (C = 4 channels) stacked on its std,
(8, 32, 32) at 256 px. The latent scale 0.18215 is applied at training time, never stored.
Either folder may instead be a zip archive (images.zip) holding the same names.
"""

import io
import json
import os
import re
import zipfile

import numpy as np
import PIL.Image

PIL.Image.init()
# Exactly the extensions the official tools accept as images (".jpeg", ".png", ... lower case).
IMAGE_EXTENSIONS = frozenset(PIL.Image.EXTENSION)
LATENT_EXTENSION = ".npy"
# The SD-VAE downsamples by 8 (4 levels): latents are (2C, H/8, W/8), so image sides must be multiples of 8.
VAE_FACTOR = 8
DATASET_JSON = "dataset.json"
_INDEX_PATTERN = re.compile(r"(\d+)\.[A-Za-z0-9]+$")


def image_name(index: int) -> str:
    """Relative name of converted image `index`: 00012/img00012345.png."""
    digits = f"{index:08d}"
    return f"{digits[:5]}/img{digits}.png"


def latent_name(index: int) -> str:
    """Relative name of the VAE moments of image `index`: 00012/img-mean-std-00012345.npy."""
    digits = f"{index:08d}"
    return f"{digits[:5]}/img-mean-std-{digits}.npy"


def name_index(name: str) -> int | None:
    """The item index encoded in a layout name (the digits before the extension), else None."""
    match = _INDEX_PATTERN.search(name)
    return int(match.group(1)) if match else None


def extension(name: str) -> str:
    return os.path.splitext(name)[1].lower()


class FileStore:
    """Read-only view of a folder or a zip archive by relative '/'-separated names.

    The zip handle is opened lazily and re-opened in each process (DataLoader workers fork or spawn
    copies of this object; a shared zipfile handle is not safe across processes).
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.is_zip = os.path.isfile(self.path) and extension(self.path) == ".zip"
        if not self.is_zip and not os.path.isdir(self.path):
            raise FileNotFoundError(f"{self.path}: no such folder or .zip archive")
        self._zip = None
        self._zip_pid = None

    def __getstate__(self):
        return {**self.__dict__, "_zip": None, "_zip_pid": None}

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def names(self, extensions=None) -> list[str]:
        """Sorted relative names of all files (optionally only those with the given extensions)."""
        if self.is_zip:
            found = [n for n in self._zipfile().namelist() if not n.endswith("/")]
        else:
            found = []
            # os.scandir recursion: several times faster than Path.rglob on 10^6 files.
            stack = [""]
            while stack:
                rel = stack.pop()
                with os.scandir(os.path.join(self.path, rel)) as entries:
                    for entry in entries:
                        child = f"{rel}/{entry.name}" if rel else entry.name
                        if entry.is_dir():
                            stack.append(child)
                        elif entry.is_file():
                            found.append(child)
        if extensions is not None:
            found = [n for n in found if extension(n) in extensions]
        return sorted(found)

    def exists(self, name: str) -> bool:
        if self.is_zip:
            try:
                self._zipfile().getinfo(name)
                return True
            except KeyError:
                return False
        return os.path.isfile(os.path.join(self.path, name))

    def open(self, name: str):
        """A binary file object (seekable, also inside a zip)."""
        if self.is_zip:
            return self._zipfile().open(name)
        return open(os.path.join(self.path, name), "rb")

    def read(self, name: str) -> bytes:
        if self.is_zip:
            return self._zipfile().read(name)
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read()

    def describe(self, name: str) -> str:
        """A human-readable location for error messages."""
        return f"{self.path}!{name}" if self.is_zip else os.path.join(self.path, name)


def open_store(parent: str, name: str) -> FileStore | None:
    """The folder `parent/name`, else the archive `parent/name.zip`, else None."""
    for candidate in (os.path.join(parent, name), os.path.join(parent, name + ".zip")):
        if os.path.isdir(candidate) or os.path.isfile(candidate):
            return FileStore(candidate)
    return None


def read_dataset_json(store: FileStore) -> dict | None:
    """The parsed dataset.json of a store, or None if it has none."""
    if not store.exists(DATASET_JSON):
        return None
    try:
        meta = json.loads(store.read(DATASET_JSON))
    except json.JSONDecodeError as e:
        raise ValueError(f"{store.describe(DATASET_JSON)} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or "labels" not in meta:
        raise ValueError(f'{store.describe(DATASET_JSON)} has no "labels" entry')
    return meta


def labels_by_name(meta: dict | None, where: str) -> dict[str, int] | None:
    """{relative_name: label} from a parsed dataset.json; None when it has no labels."""
    if meta is None or meta["labels"] is None:
        return None
    labels = {}
    for entry in meta["labels"]:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], int)):
            raise ValueError(f"{where}: label entry {entry!r} is not [name, int]")
        labels[entry[0].replace("\\", "/")] = entry[1]
    return labels


def atomic_write(path: str, data: bytes) -> None:
    """Write a whole file or nothing: a killed run never leaves a truncated file under the final name."""
    folder, base = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    # Hidden temp name in the same folder (os.replace is atomic only within one file system); its
    # extension is not an image/.npy one, so readers ignore leftovers, and the next run removes them.
    temp = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
    with open(temp, "wb") as f:
        f.write(data)
    os.replace(temp, path)


def remove_temp_files(root: str) -> int:
    """Delete temp files a killed run left under `root`; returns how many."""
    removed = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(".") and ".tmp-" in name:
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


def dataset_json_bytes(labels: list | None, **extra) -> bytes:
    """dataset.json content: {"labels": [[name, label], ...] or null, **extra}."""
    return json.dumps({"labels": labels, **extra}).encode()


def png_bytes(array: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG file bytes, uncompressed as the official tool writes them: decoding in
    the training loop stays cheap, and the files barely compress anyway."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="png", compress_level=0, optimize=False)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# The MS-COCO feature layout (U-ViT's, read by the official REPA MSCOCO256Features): text-to-image data
# ---------------------------------------------------------------------------------------------------
# ROOT/empty_context.npy         (77, D) float32: text tokens of the empty caption, the null condition of CFG
# ROOT/{train,val}/{i}.png       the 256 px crop of image i (images sorted by COCO image id)
# ROOT/{train,val}/{i}.npy       (2C, H/8, W/8) float32 SD-VAE moments: posterior mean stacked on its *log-variance*
#                                (the encoder's raw output, as U-ViT stores it; the ImageNet layout stores the std)
# ROOT/{train,val}/{i}_{k}.npy   (77, D) float32 text tokens of image i's caption k (COCO's annotation order)
# ROOT/{train,val}/captions.json the caption strings and COCO image ids (ours; the official reader ignores it):
#                                caption k of item i is the text of {i}_{k}.npy. `coco` writes it before any item
#                                file and a rerun first removes files it no longer describes; sampling checks it.
#                                An image without captions is a gap (no {i}.png), as an unreadable one.
# The official reader counts items as (#*.npy - #*_*.npy) and captions per item from the {i}_{k} names.
EMPTY_CONTEXT = "empty_context.npy"
CAPTIONS_JSON = "captions.json"
TEXT_ENCODER_JSON = "text_encoder.json"  # ROOT/text_encoder.json: which encoder made the tokens (ours)
_COCO_PATTERN = re.compile(r"^(\d+)(?:_(\d+))?\.(png|npy)$")


def coco_image_name(index: int) -> str:
    return f"{index}.png"


def coco_moments_name(index: int) -> str:
    return f"{index}.npy"


def coco_context_name(index: int, caption: int) -> str:
    return f"{index}_{caption}.npy"


def is_coco_layout(data_dir: str) -> bool:
    """A text-to-image data root: empty_context.npy next to a train/ (or val/) split folder."""
    return os.path.isfile(os.path.join(data_dir, EMPTY_CONTEXT)) and any(
        os.path.isdir(os.path.join(data_dir, split)) for split in ("train", "val")
    )


def coco_files(folder: str):
    """(name, item index, caption k or None, "png"/"npy") of every file of the COCO layout in a split folder."""
    with os.scandir(folder) as entries:
        for entry in entries:
            match = _COCO_PATTERN.match(entry.name)
            if match and entry.is_file():
                caption = match.group(2)
                yield entry.name, int(match.group(1)), None if caption is None else int(caption), match.group(3)


def scan_coco_split(folder: str) -> tuple[set, set, dict]:
    """(indices with an image, indices with moments, {index: number of captions}) of one split folder.

    Caption numbers of an item must run 0..n-1 (the official reader draws k in that range); a gap raises.
    """
    images, moments, captions = set(), set(), {}
    for _name, index, caption, ext in coco_files(folder):
        if caption is not None and ext == "npy":
            captions.setdefault(index, set()).add(caption)
        elif caption is None:
            (images if ext == "png" else moments).add(index)
    counts = {}
    for index, ks in captions.items():
        if ks != set(range(len(ks))):
            raise ValueError(
                f"{folder}: captions of item {index} are numbered {sorted(ks)[:8]}, not 0..{len(ks) - 1} "
                "(an interrupted preprocessing run? rerun the same command to finish it)"
            )
        counts[index] = len(ks)
    return images, moments, counts


def read_captions_json(folder: str) -> dict | None:
    """The caption listing of a split folder (captions.json), checked; None if the folder has none.

    {"captions": [[str, ...] per item], ...}: item i's caption k is the text of {i}_{k}.npy. `coco` also records
    "image_ids" and "file_names" (lists as long), the demo set "labels". A listing that is not UTF-8 JSON of
    that shape raises ValueError naming the file and the entry.
    """
    path = os.path.join(folder, CAPTIONS_JSON)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    fix = "rerun the `dataset_tools.py coco` command that made the folder (it writes the listing again)"
    try:
        listing = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); {fix}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); {fix}") from e
    if not isinstance(listing, dict) or not isinstance(listing.get("captions"), list):
        raise ValueError(f'{path} has no "captions" list (one list of caption strings per item); {fix}')
    for index, texts in enumerate(listing["captions"]):
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f'{path}: "captions"[{index}] is {str(texts)[:80]}, not a list of strings; {fix}')
    for key in ("image_ids", "file_names"):
        values = listing.get(key)
        if values is not None and (not isinstance(values, list) or len(values) != len(listing["captions"])):
            raise ValueError(f'{path}: "{key}" does not list one entry per item of "captions"; {fix}')
    return listing
