"""The on-disk cache of REPA encoder targets: written by `dataset_tools.py encode-targets`, read by `train.py
--target-cache DIR` instead of running the frozen encoders on every batch.

Layout of DIR:
    manifest.json          what the tokens are (below); written last, so a cache without it is unfinished
    .job.json              the settings of the run writing DIR (a rerun with other settings is refused)
    enc0/plain/00000.npy   encoder 0's tokens of items [0, S): (S, T, D) in the stored dtype
    enc0/plain/00001.npy   items [S, 2S), ...; the last shard holds the remainder
    enc0/flip/00000.npy    (with flips) the tokens of the same items' mirrored images, row for row
    enc1/...               the next encoder of a comma-separated --enc-type, same shards
    pixels/00000.sha256    the pixel hash of shard 0's images (written after its files; a rerun re-encodes a
                           shard whose images changed)
Item k is ImageLatentDataset's item k (the k-th image name in sorted order). With flips, dataset index
N + k, which ImageLatentDataset(flip=True) serves as image k reversed along W, reads row k of enc*/flip:
the tokens of exactly that mirrored uint8 image. numpy has no bfloat16, so bf16 shards hold the raw 16-bit
patterns as uint16 and are viewed as torch.bfloat16 on reading.

manifest.json records every key a run is checked against (DiskTargetCache.check):
  - the encoders (encoder_identity): name, timm architecture and its keywords (act_layer, ...), the input
    normalisation (mean/std), token layout (prefix tokens, final norm), weights source, a SHA-256 of the
    loaded weights, encoder resolution, token grid, tokens, embed dim;
  - the dataset (dataset_identity): item count, image shape, a SHA-256 of its image names and
    images/dataset.json (labels, class names), and a SHA-256 of the images' content (pixels_sha256), so a
    `convert` rerun with another --transform, or one image replaced under the same name, is refused;
  - whether flipped tokens are stored, the stored dtype, and the precision the encoders ran in;
  - "shards": per shard file, the CRC-32 of each of its rows (8 hex digits a row, in row order).
A damaged manifest (bad JSON, a missing key, a value of the wrong type) is refused naming the file and the key.

The pixel hash (pixels_sha256) is computed by encode-targets and again at each train.py start (check): a folder
of images is read whole, one SHA-256 per file in item order (HASH_THREADS threads). Measured on the shared,
loaded 2-core test machine with the files in the page cache: the 4000-image 32 px demo set (12.7 MB) in
~0.2 s; 256 px uncompressed PNGs (197 KB each) at ~1.1 GB/s, so ImageNet (1.28M files, ~250 GB) takes ~4 min
there, and is bound by the disk on a real node (~1.5-2 min at 2-3 GB/s), on every rank. A .zip archive is
not read at all: the CRC-32 and size of each member in its central directory (the zip's own content
checksums, which zipfile checks on every read) are hashed, in milliseconds.

The row checksums are verified as rows are read (DiskTargetCache.__getitem__, in the DataLoader workers), not
at open: a training run reads each row it uses anyway, and checking a 393 KB DINOv2-B row (CRC-32 and the
non-finite scan) takes a read from 0.09 to 0.48 ms per item on the same machine (page cache), while a
whole-shard check would make every worker read every shard (random access touches all of them within the
first steps): 0.5 TB per worker for ImageNet. At open, only every shard file's header and size are checked
(missing or truncated shards are refused there). Non-finite tokens are refused when written, and a non-finite
row read from a shard is refused naming the shard, row and item. Rerunning the same encode-targets command
re-encodes the shards that fail their checksums (or whose images changed) and keeps the others.

How it relates to train.py's TargetCache (`--cache-targets`): that one keeps tokens in memory, filled
during the first epoch, in the training precision, for small sets such as the demo. This one is written
once, ahead of training, is memory-mapped and read per item by the DataLoader workers, survives restarts
(a resumed run reads the very same tokens, so resume stays bit-exact), and scales to ImageNet (0.5 TB for
DINOv2-B at 256 px in fp16, see the README).
"""

import hashlib
import json
import math
import os
import re
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

MANIFEST = "manifest.json"
FORMAT = "repa-target-cache"
VERSION = 2  # 2: encoder mean/std and keywords, the pixel hash, row checksums
# Stored dtypes: name -> (torch dtype of the tokens, numpy dtype of the file).
DTYPES = {
    "fp16": (torch.float16, np.float16),
    "bf16": (torch.bfloat16, np.uint16),  # bit patterns; numpy has no bfloat16
    "fp32": (torch.float32, np.float32),  # exact targets, twice the disk: for tests and small sets
}
# Non-finite values have every exponent bit set: (unsigned view, exponent mask) per stored dtype.
_EXPONENT_BITS = {"fp16": (np.uint16, 0x7C00), "bf16": (np.uint16, 0x7F80), "fp32": (np.uint32, 0x7F800000)}
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_SHARD_SIZE = 1000  # items per shard file (as the layout's 1000 items per folder): 393 MB for DINOv2-B
OPEN_SHARDS = 64  # memory maps kept open per process (each holds a file descriptor)
HASH_THREADS = 8  # threads reading and hashing image files (hashlib and file reads release the GIL)
_HEX64 = re.compile(r"[0-9a-f]{64}")
REWRITE = "rerun `dataset_tools.py encode-targets` to rewrite it"


#################################################################################
#                        What the tokens are: identities                        #
#################################################################################


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, bytes, in name order): the weights' identity,
    for pretrained files and random initialisations alike."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _as_json(value):
    """The value as manifest.json stores it (tuples become lists), so that a fresh identity compares equal."""
    return json.loads(json.dumps(value))


def encoder_identity(encoder) -> dict:
    """What a FrozenEncoder's tokens depend on (models/encoders.py)."""
    spec = encoder.spec
    return _as_json(
        {  # in the order check() compares them: shapes first (the weights hash depends on the grid too)
            "name": spec.name,
            "timm_arch": spec.timm_arch,
            "timm_kwargs": dict(spec.timm_kwargs),  # architecture keywords: act_layer changes no weight
            "resolution": encoder.resolution,  # the encoder setting: grid = resolution / 16
            "grid": encoder.grid,
            "tokens": encoder.grid**2,
            "embed_dim": encoder.embed_dim,
            "num_prefix_tokens": spec.num_prefix_tokens,
            "final_norm": spec.final_norm,
            "mean": list(spec.mean),  # the input normalisation
            "std": list(spec.std),
            "weights_source": encoder.weights_source,
            "weights_sha256": weights_sha256(encoder.model),  # position embeddings are resampled to the grid
        }
    )


def image_digests(store, names) -> np.ndarray:
    """(N, 32) uint8: one SHA-256 per image of `names` (a layout.FileStore's), in that order: of the file's bytes
    in a folder (every file is read, HASH_THREADS threads); of the member's CRC-32 and size in a .zip (only the
    central directory is read: the zip's own content checksums, which zipfile checks on every read)."""
    names = [str(n) for n in names]
    digests = np.empty((len(names), 32), np.uint8)
    if store.is_zip:
        archive = store._zipfile()
        for i, name in enumerate(names):
            info = archive.getinfo(name)
            digests[i] = np.frombuffer(hashlib.sha256(f"{info.CRC:08x} {info.file_size}".encode()).digest(), np.uint8)
        return digests

    def file_digest(name: str) -> bytes:
        with open(os.path.join(store.path, name), "rb") as f:
            return hashlib.sha256(f.read()).digest()

    block = 4096  # a bounded work queue: 1.28M pending futures would take GBs
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        for start in range(0, len(names), block):
            found = b"".join(pool.map(file_digest, names[start : start + block]))
            digests[start : start + block] = np.frombuffer(found, np.uint8).reshape(-1, 32)
    return digests


def pixels_sha256(digests: np.ndarray) -> str:
    """The content hash of a run of images: SHA-256 of their image_digests (not of their names, which
    names_sha256 covers)."""
    return hashlib.sha256(np.ascontiguousarray(digests).tobytes()).hexdigest()


def dataset_identity(dataset, digests: np.ndarray | None = None) -> dict:
    """An ImageLatentDataset's items: count, image shape, a SHA-256 of its image names and images/dataset.json
    (labels, class names), and a SHA-256 of its images' content (pixels_sha256; `digests`: its image_digests,
    when already computed)."""
    from preprocessing import layout

    digest = hashlib.sha256()
    for name in dataset.image_names.tolist():
        digest.update(name.encode() + b"\n")
    if dataset.images.exists(layout.DATASET_JSON):
        digest.update(dataset.images.read(layout.DATASET_JSON))
    if digests is None:
        digests = image_digests(dataset.images, dataset.image_names.tolist())
    return {
        "items": int(dataset.num_items),
        "image_shape": list(dataset.image_shape),
        "names_sha256": digest.hexdigest(),
        "pixels_sha256": pixels_sha256(digests),
    }


def run_identity(encoders, dataset, digests: np.ndarray | None = None) -> dict:
    """What a run needs a cache to hold: {"encoders": [encoder_identity], "dataset": dataset_identity}."""
    return {"encoders": [encoder_identity(e) for e in encoders], "dataset": dataset_identity(dataset, digests)}


#################################################################################
#                          File names, checksums, writing                       #
#################################################################################


def shard_name(encoder: int, flipped: bool, shard: int) -> str:
    """The shard's path relative to the cache folder, '/'-separated (its key in manifest["shards"])."""
    return f"enc{encoder}/{'flip' if flipped else 'plain'}/{shard:05d}.npy"


def shard_path(root: str, encoder: int, flipped: bool, shard: int) -> str:
    return os.path.join(root, *shard_name(encoder, flipped, shard).split("/"))


def shard_pixels_path(root: str, shard: int) -> str:
    """encode-targets' record of the images a shard's rows were encoded from (pixels_sha256 of its items),
    written after the shard's files: a rerun keeps a shard only while its images are unchanged."""
    return os.path.join(root, "pixels", f"{shard:05d}.sha256")


def shard_ranges(items: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) item ranges of the shards."""
    return [(start, min(start + shard_size, items)) for start in range(0, items, shard_size)]


def shard_is_valid(path: str, shape: tuple, dtype: str) -> bool:
    """Header check of a finished shard (shards are renamed into place whole, so one that exists is complete)."""
    return _header_problem(path, tuple(shape), dtype) is None


def _header_problem(path: str, shape: tuple, dtype: str) -> str | None:
    """Why the .npy file at `path` is not a (shape) array of the stored dtype, whole; None when it is. Reads
    the header only."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                found, fortran, found_dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                found, fortran, found_dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return f"unsupported .npy version {version}"
            data_start = f.tell()
        size = os.path.getsize(path)
    except FileNotFoundError:
        return "it is missing"
    except (OSError, ValueError, SyntaxError, TypeError) as err:
        return f"its .npy header is unreadable ({err})"
    expected_dtype = np.dtype(DTYPES[dtype][1])
    if tuple(found) != tuple(shape) or found_dtype != expected_dtype or fortran:
        return f"it holds {found_dtype} {tuple(found)}, expected {expected_dtype} {tuple(shape)}"
    expected_size = data_start + math.prod(shape) * expected_dtype.itemsize
    if size != expected_size:
        return f"it has {size} bytes, expected {expected_size} (truncated or padded)"
    return None


def nonfinite_rows(array: np.ndarray, dtype: str) -> list[int]:
    """Rows of a stored (n, T, D) array holding NaN or inf (every exponent bit set), row by row (no big temp)."""
    unsigned, mask = _EXPONENT_BITS[dtype]
    return [i for i in range(len(array)) if ((np.asarray(array[i]).view(unsigned) & mask) == mask).any()]


def row_checksums(array: np.ndarray) -> str:
    """The CRC-32 of each row's bytes, as 8 hex digits a row: a shard's entry in manifest["shards"]."""
    return "".join(f"{zlib.crc32(np.ascontiguousarray(row)):08x}" for row in array)


def to_storage(tokens: torch.Tensor, dtype: str, what: str, items=None) -> np.ndarray:
    """(n, T, D) tokens -> the stored numpy array; refuses non-finite tokens and values the dtype cannot hold
    (fp16 overflow). `items`: the rows' item indices, named in the error; `what` says where they go."""
    torch_dtype, _ = DTYPES[dtype]
    items = list(range(len(tokens))) if items is None else list(items)

    def bad_items(values: torch.Tensor) -> list:
        finite = torch.isfinite(values).flatten(1).all(dim=1).tolist()
        return [item for item, ok in zip(items, finite) if not ok]

    if bad := bad_items(tokens):
        raise ValueError(
            f"{what}: the encoder returned non-finite tokens for item(s) {bad[:8]}{' ...' if len(bad) > 8 else ''}; "
            "nothing was written for them (check the encoder's weights and mean/std, and the images)"
        )
    stored = tokens.detach().to(torch_dtype).cpu()
    if bad := bad_items(stored):
        raise ValueError(
            f"{what}: tokens of item(s) {bad[:8]} up to |x| = {tokens.abs().max().item():.4g} overflow --dtype "
            f"{dtype} (max {torch.finfo(torch_dtype).max:.4g}); use --dtype bf16"
        )
    if dtype == "bf16":
        return stored.view(torch.int16).numpy().view(np.uint16)
    return stored.numpy()


def write_shard(path: str, array: np.ndarray) -> str:
    """Write a whole shard or nothing, under a temp name that layout.remove_temp_files recognises; returns its
    row checksums (row_checksums). Non-finite rows are refused (the stored dtype follows from the array's)."""
    dtype = {np.dtype(numpy_dtype): name for name, (_, numpy_dtype) in DTYPES.items()}.get(array.dtype)
    if dtype is None:
        raise ValueError(f"{path}: {array.dtype} is not a stored dtype ({list(DTYPES)})")
    if bad := nonfinite_rows(array, dtype):
        raise ValueError(f"{path}: rows {bad[:8]} hold non-finite values; the shard was not written")
    folder, base = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
    with open(temp, "wb") as f:
        np.save(f, array)
    os.replace(temp, path)
    return row_checksums(array)


#################################################################################
#                          manifest.json: parsed and checked                    #
#################################################################################


class _Schema:
    """Typed access to a parsed manifest: every problem is a ValueError naming the file and the key."""

    def __init__(self, path: str):
        self.path = path

    def error(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what}; the cache is damaged or was not written by this code: {REWRITE}")

    def get(self, node: dict, key: str, where: str, kind, check=None, expected: str = ""):
        name = f"{where}{key}" if not where else f"{where}.{key}"
        if key not in node:
            raise self.error(f"key {name!r} is missing")
        value = node[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        wrong_type = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        if wrong_type or (check is not None and not check(value)):
            label = expected or " or ".join(k.__name__ for k in kinds)
            raise self.error(f"key {name!r} is {value!r}, expected {label}")
        return value


def _three_numbers(positive: bool):
    def check(values) -> bool:
        return (
            len(values) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            and (not positive or min(values) > 0)
        )

    return check


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_manifest(path: str, data: bytes) -> dict:
    """manifest.json's bytes -> the checked manifest dict; any damage is a ValueError naming `path` and the key."""
    schema = _Schema(path)
    try:
        manifest = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as err:
        raise schema.error(f"not UTF-8 text (byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise schema.error(f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from err
    except (ValueError, RecursionError) as err:
        raise schema.error(f"not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise schema.error(f"holds a {type(manifest).__name__}, not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise schema.error(
            f"format {manifest.get('format')!r} version {manifest.get('version')!r}, expected {FORMAT!r} version "
            f"{VERSION} (an older encode-targets did not record the pixel hash, the encoders' mean/std and keywords, "
            "or row checksums)"
        )
    positive = dict(check=lambda v: v > 0, expected="a positive int")
    items = schema.get(manifest, "items", "", int, **positive)
    schema.get(manifest, "flip", "", bool)
    schema.get(manifest, "dtype", "", str, lambda v: v in DTYPES, f"one of {list(DTYPES)}")
    shard_size = schema.get(manifest, "shard_size", "", int, **positive)
    schema.get(manifest, "precision", "", str, lambda v: v in PRECISIONS, f"one of {list(PRECISIONS)}")
    hex64 = dict(check=lambda v: _HEX64.fullmatch(v) is not None, expected="64 hex digits")
    encoders = schema.get(manifest, "encoders", "", list, lambda v: len(v) > 0, "a non-empty list")
    for e, info in enumerate(encoders):
        where = f"encoders[{e}]"
        if not isinstance(info, dict):
            raise schema.error(f"key {where!r} is {info!r}, expected an object")
        for key in ("name", "timm_arch", "weights_source"):
            schema.get(info, key, where, str)
        schema.get(info, "timm_kwargs", where, dict)
        for key in ("resolution", "grid", "embed_dim"):
            schema.get(info, key, where, int, **positive)
        tokens = info["grid"] ** 2
        schema.get(info, "tokens", where, int, lambda v, tokens=tokens: v == tokens, f"grid**2 = {tokens}")
        schema.get(info, "num_prefix_tokens", where, int, lambda v: v >= 0, "an int >= 0")
        schema.get(info, "final_norm", where, bool)
        schema.get(info, "mean", where, list, _three_numbers(False), "3 finite numbers")
        schema.get(info, "std", where, list, _three_numbers(True), "3 positive finite numbers")
        schema.get(info, "weights_sha256", where, str, **hex64)
    data_info = schema.get(manifest, "dataset", "", dict)
    schema.get(data_info, "items", "dataset", int, lambda v: v == items, f"the manifest's items ({items})")
    shape_ok = lambda v: len(v) == 3 and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v)
    schema.get(data_info, "image_shape", "dataset", list, shape_ok, "3 positive ints")
    for key in ("names_sha256", "pixels_sha256"):
        schema.get(data_info, key, "dataset", str, **hex64)
    shards = schema.get(manifest, "shards", "", dict)
    views = (False, True) if manifest["flip"] else (False,)
    expected = {
        shard_name(e, f, j): stop - start
        for e in range(len(encoders))
        for f in views
        for j, (start, stop) in enumerate(shard_ranges(items, shard_size))
    }
    if set(shards) != set(expected):
        missing, extra = sorted(set(expected) - set(shards)), sorted(set(shards) - set(expected))
        raise schema.error(
            f"key 'shards' lists {len(shards)} shard files, {len(expected)} expected for {items} items in shards of "
            f"{shard_size}: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for name, rows in expected.items():
        sums = shards[name]
        if not (isinstance(sums, str) and len(sums) == 8 * rows and re.fullmatch(r"[0-9a-f]*", sums)):
            shown = sums if not isinstance(sums, str) or len(sums) < 40 else sums[:40] + "..."
            raise schema.error(
                f"key 'shards.{name}' is {shown!r}, expected {rows} row checksums ({8 * rows} hex digits)"
            )
    return manifest


def read_manifest(root: str) -> dict:
    """The checked manifest of the cache folder `root` (FileNotFoundError when it is unfinished)."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--target-cache {root}: no such folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: {root} is not a finished target cache (it is written last; rerun the same "
            "`dataset_tools.py encode-targets` command to finish it)"
        )
    with open(path, "rb") as f:
        return parse_manifest(path, f.read())


#################################################################################
#                                  Reading                                      #
#################################################################################


class DiskTargetCache:
    """Memory-mapped reader: cache[index] -> one (T, D) token tensor per encoder, in the stored dtype.

    `index` follows ImageLatentDataset: 0 <= index < N for item index, N + k for the mirror of item k
    (needs a cache written with flips). Shards are opened lazily in each process (DataLoader workers
    included; maps are never pickled), at most OPEN_SHARDS at a time. Each row read is checked against its
    CRC-32 in the manifest and for non-finite values; a bad one is refused naming the shard, row and item.
    """

    def __init__(self, root: str):
        self.root = os.fspath(root)
        self.manifest_path = os.path.join(self.root, MANIFEST)
        manifest = read_manifest(self.root)
        # Row checksums as arrays (not 1.28M hex strings per worker); the manifest kept without them.
        self.checksums = {
            name: np.frombuffer(bytes.fromhex(sums), dtype=">u4") for name, sums in manifest.pop("shards").items()
        }
        self.manifest = manifest
        self.items, self.flip = manifest["items"], manifest["flip"]
        self.shard_size, self.dtype = manifest["shard_size"], manifest["dtype"]
        self.num_encoders = len(manifest["encoders"])
        self._unsigned, self._mask = _EXPONENT_BITS[self.dtype]
        self._maps = OrderedDict()
        self._check_shard_files()

    def _shard_shape(self, encoder: int, shard: int) -> tuple:
        info = self.manifest["encoders"][encoder]
        start, stop = shard * self.shard_size, min((shard + 1) * self.shard_size, self.items)
        return stop - start, info["tokens"], info["embed_dim"]

    def _check_shard_files(self) -> None:
        """Every shard file exists, with the manifest's shape and dtype and its full size (headers only)."""
        views = (False, True) if self.flip else (False,)
        for e in range(self.num_encoders):
            for f in views:
                for j in range(len(shard_ranges(self.items, self.shard_size))):
                    path = shard_path(self.root, e, f, j)
                    if problem := _header_problem(path, self._shard_shape(e, j), self.dtype):
                        raise ValueError(
                            f"target shard {path}: {problem} ({self.manifest_path}: {self.dtype} "
                            f"{self._shard_shape(e, j)}); {REWRITE}"
                        )

    def __getstate__(self):
        return {**self.__dict__, "_maps": OrderedDict()}

    def __len__(self) -> int:
        return self.items * (2 if self.flip else 1)

    def _shard(self, encoder: int, flipped: bool, shard: int) -> np.ndarray:
        key = (encoder, flipped, shard)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        path = shard_path(self.root, encoder, flipped, shard)
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read target shard {path}: {err}; {REWRITE}") from err
        expected = self._shard_shape(encoder, shard)
        if array.shape != expected or array.dtype != np.dtype(DTYPES[self.dtype][1]):
            raise ValueError(
                f"{path} is {array.dtype} {array.shape}, {self.manifest_path} says {self.dtype} {expected}; {REWRITE}"
            )
        self._maps[key] = array
        if len(self._maps) > OPEN_SHARDS:
            self._maps.popitem(last=False)
        return array

    def _row(self, encoder: int, flipped: bool, k: int) -> np.ndarray:
        """A copy of item k's row, checked: its CRC-32 against the manifest, and finite values."""
        shard, row = divmod(k, self.shard_size)
        array = np.array(self._shard(encoder, flipped, shard)[row])  # copies one row
        name = shard_name(encoder, flipped, shard)
        where = f"target shard {shard_path(self.root, encoder, flipped, shard)} row {row} (item {k}"
        where += ", mirrored)" if flipped else ")"
        found, recorded = zlib.crc32(array), int(self.checksums[name][row])
        if found != recorded:
            raise ValueError(
                f"{where} fails its checksum: CRC-32 {found:08x}, {self.manifest_path} records {recorded:08x}: the "
                f"shard is corrupt; {REWRITE} (a rerun rewrites the shards that fail their checksums)"
            )
        if ((array.view(self._unsigned) & self._mask) == self._mask).any():
            raise ValueError(f"{where} holds non-finite values (written so: its checksum matches); {REWRITE}")
        return array

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} is outside {self.root} ({len(self)} rows)")
        flipped, k = divmod(index, self.items)
        tokens = []
        for e in range(self.num_encoders):
            array = torch.from_numpy(self._row(e, bool(flipped), k))
            tokens.append(array.view(torch.bfloat16) if self.dtype == "bf16" else array)
        return tokens

    def check(self, encoders, dataset, flip: bool) -> None:
        """Refuse a cache that does not hold this run's targets, naming the manifest key that differs.

        Compared: every encoder's identity (encoder_identity: name, architecture and keywords, mean/std, weights
        hash, resolution, token grid, dim), the dataset (dataset_identity: item count, image shape, names hash,
        pixels hash), and flips: a run with --hflip needs the mirrored images' tokens; a cache with flips also
        serves a run without.
        """
        self.check_identity(run_identity(encoders, dataset), flip, data_dir=dataset.data_dir)

    def check_identity(self, expected: dict, flip: bool, data_dir: str = "--data-dir") -> None:
        """check() against a precomputed run_identity(encoders, dataset)."""
        where, fix = self.manifest_path, "; rerun `dataset_tools.py encode-targets` for this run's settings"
        cached = self.manifest["encoders"]
        names = [e["name"] for e in expected["encoders"]]
        if [c["name"] for c in cached] != names:
            raise ValueError(
                f"{where}: encoders {[c['name'] for c in cached]} but this run uses --enc-type {','.join(names)}; "
                "write a cache for these encoders (`dataset_tools.py encode-targets --enc-type ...`)"
            )
        for e, (info, identity) in enumerate(zip(cached, expected["encoders"])):
            for key, value in identity.items():
                if key == "weights_source":
                    continue  # the hash decides; the same weights may come from a file or the hub
                if info.get(key) != value:
                    grid = "the encoder resolution is 16 x the SiT token grid (input side / patch)"
                    hint = {
                        "weights_sha256": f"other weights (cache: {info.get('weights_source')}, this run: "
                        f"{identity['weights_source']}; random weights depend on --seed)",
                        "resolution": grid,
                        "grid": grid,
                        "timm_kwargs": "other architecture keywords give other tokens from the same weights",
                        "mean": "another input normalisation (an encoder file's mean/std)",
                        "std": "another input normalisation (an encoder file's mean/std)",
                    }.get(key, "")
                    raise ValueError(
                        f"{where}: encoders[{e}] ({info['name']}) key {key!r} is {info.get(key)!r}, this run needs "
                        f"{value!r}" + (f": {hint}" if hint else "") + fix
                    )
        for key, value in expected["dataset"].items():
            if self.manifest["dataset"].get(key) != value:
                hint = {
                    "names_sha256": "other image names or labels (images/dataset.json)",
                    "pixels_sha256": "other image content (e.g. `convert` rerun with another --transform, or "
                    "images replaced under the same names)",
                }.get(key, "")
                raise ValueError(
                    f"{where}: dataset key {key!r} is {self.manifest['dataset'].get(key)!r}, but --data-dir "
                    f"{data_dir} has {value!r}; the cache was written for other data"
                    + (f" ({hint})" if hint else "")
                    + fix
                )
        if flip and not self.flip:
            raise ValueError(
                f"{where}: key 'flip' is false, but this run flips (--hflip): the mirrored images' tokens are "
                "not stored; rerun encode-targets with --flip"
            )

    def describe(self) -> str:
        encoders = ", ".join(f"{c['name']} {c['tokens']}x{c['embed_dim']}" for c in self.manifest["encoders"])
        flips = " (+ flips)" if self.flip else ""
        return f"{self.root}: {self.items} items{flips}, {self.dtype}, {encoders}"


def open_target_cache(root: str, encoders, dataset, flip: bool, verify_pixels: bool = True) -> DiskTargetCache:
    """train.py's entry point: the checked cache of `root` for this run's encoders, data and flip setting.

    verify_pixels: also hash the images (pixels_sha256: every image file is read). train.py asks it of its main
    process only, so that N processes of a node do not each read the whole image folder."""
    if not encoders:
        raise ValueError(
            f"--target-cache {root} given, but this run has no encoder (--enc-type none or --proj-coeff 0)"
        )
    cache = DiskTargetCache(root)
    if verify_pixels:
        cache.check(encoders, dataset, flip)
    else:
        identity = run_identity(encoders, dataset, digests=np.zeros((0, 32), np.uint8))
        del identity["dataset"]["pixels_sha256"]  # the main process compares it
        cache.check_identity(identity, flip, data_dir=dataset.data_dir)
    return cache
