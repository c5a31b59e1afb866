"""The on-disk cache of REPA encoder targets: written by `dataset_tools.py encode-targets`, read by `train.py
--target-cache DIR` instead of running the frozen encoders on every batch.

Layout of DIR:
    manifest.json          what the tokens are (below); written last, so a cache without it is unfinished
    .job.json              the settings of the run writing DIR (a rerun with other settings is refused)
    enc0/plain/00000.npy   encoder 0's tokens of items [0, S): (S, T, D) in the stored dtype
    enc0/plain/00001.npy   items [S, 2S), ...; the last shard holds the remainder
    enc0/flip/00000.npy    (with flips) the tokens of the same items' mirrored images, row for row
    enc1/...               the next encoder of a comma-separated --enc-type, same shards
Item k is ImageLatentDataset's item k (the k-th image name in sorted order). With flips, dataset index
N + k, which ImageLatentDataset(flip=True) serves as image k reversed along W, reads row k of enc*/flip:
the tokens of exactly that mirrored uint8 image. numpy has no bfloat16, so bf16 shards hold the raw 16-bit
patterns as uint16 and are viewed as torch.bfloat16 on reading.

manifest.json records every key a run is checked against (check_cache): the encoders (name, timm
architecture, weights source, a SHA-256 of the loaded weights, encoder resolution, token grid, tokens,
embed dim), the dataset (item count, image shape, a SHA-256 of its image names and images/dataset.json),
whether flipped tokens are stored, the stored dtype, and the precision the encoders ran in. Image pixels
are not hashed (too slow for 1.28M files): a folder whose images were replaced under the same names
passes the check.

How it relates to train.py's TargetCache (`--cache-targets`): that one keeps tokens in memory, filled
during the first epoch, in the training precision, for small sets such as the demo. This one is written
once, ahead of training, is memory-mapped and read per item by the DataLoader workers, survives restarts
(a resumed run reads the very same tokens, so resume stays bit-exact), and scales to ImageNet (0.5 TB for
DINOv2-B at 256 px in fp16, see the README).
"""

import hashlib
import json
import os
from collections import OrderedDict

import numpy as np
import torch

MANIFEST = "manifest.json"
FORMAT = "repa-target-cache"
VERSION = 1
# Stored dtypes: name -> (torch dtype of the tokens, numpy dtype of the file).
DTYPES = {
    "fp16": (torch.float16, np.float16),
    "bf16": (torch.bfloat16, np.uint16),  # bit patterns; numpy has no bfloat16
    "fp32": (torch.float32, np.float32),  # exact targets, twice the disk: for tests and small sets
}
DEFAULT_SHARD_SIZE = 1000  # items per shard file (as the layout's 1000 items per folder): 393 MB for DINOv2-B
OPEN_SHARDS = 64  # memory maps kept open per process (each holds a file descriptor)


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


def encoder_identity(encoder) -> dict:
    """What a FrozenEncoder's tokens depend on (models/encoders.py)."""
    return {  # in the order check() compares them: shapes first (the weights hash depends on the grid too)
        "name": encoder.spec.name,
        "timm_arch": encoder.spec.timm_arch,
        "resolution": encoder.resolution,  # the encoder setting: grid = resolution / 16
        "grid": encoder.grid,
        "tokens": encoder.grid**2,
        "embed_dim": encoder.embed_dim,
        "weights_source": encoder.weights_source,
        "weights_sha256": weights_sha256(encoder.model),  # position embeddings are resampled to the grid
    }


def dataset_identity(dataset) -> dict:
    """An ImageLatentDataset's items: count, image shape, and a SHA-256 of its image names and
    images/dataset.json (labels, class names). Pixels are not hashed."""
    from preprocessing import layout

    digest = hashlib.sha256()
    for name in dataset.image_names.tolist():
        digest.update(name.encode() + b"\n")
    if dataset.images.exists(layout.DATASET_JSON):
        digest.update(dataset.images.read(layout.DATASET_JSON))
    return {"items": int(dataset.num_items), "image_shape": list(dataset.image_shape), "sha256": digest.hexdigest()}


#################################################################################
#                                 File names                                    #
#################################################################################


def shard_path(root: str, encoder: int, flipped: bool, shard: int) -> str:
    return os.path.join(root, f"enc{encoder}", "flip" if flipped else "plain", f"{shard:05d}.npy")


def shard_ranges(items: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) item ranges of the shards."""
    return [(start, min(start + shard_size, items)) for start in range(0, items, shard_size)]


def shard_is_valid(path: str, shape: tuple, dtype: str) -> bool:
    """Header check of a finished shard (shards are renamed into place whole, so one that exists is complete)."""
    try:
        array = np.load(path, mmap_mode="r")
        return array.shape == tuple(shape) and array.dtype == np.dtype(DTYPES[dtype][1])
    except (OSError, ValueError):
        return False


def to_storage(tokens: torch.Tensor, dtype: str, what: str) -> np.ndarray:
    """(n, T, D) tokens -> the stored numpy array; refuses values the dtype cannot hold (fp16 overflow)."""
    torch_dtype, numpy_dtype = DTYPES[dtype]
    if not torch.isfinite(tokens).all():
        raise ValueError(f"{what}: the encoder returned non-finite tokens; nothing was written for them")
    stored = tokens.detach().to(torch_dtype).cpu()
    if not torch.isfinite(stored).all():
        raise ValueError(
            f"{what}: tokens up to |x| = {tokens.abs().max().item():.4g} overflow --dtype {dtype} "
            f"(max {torch.finfo(torch_dtype).max:.4g}); use --dtype bf16"
        )
    if dtype == "bf16":
        return stored.view(torch.int16).numpy().view(np.uint16)
    return stored.numpy()


def write_shard(path: str, array: np.ndarray) -> None:
    """Write a whole shard or nothing, under a temp name that layout.remove_temp_files recognises."""
    folder, base = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
    with open(temp, "wb") as f:
        np.save(f, array)
    os.replace(temp, path)


#################################################################################
#                                  Reading                                      #
#################################################################################


class DiskTargetCache:
    """Memory-mapped reader: cache[index] -> one (T, D) token tensor per encoder, in the stored dtype.

    `index` follows ImageLatentDataset: 0 <= index < N for item index, N + k for the mirror of item k
    (needs a cache written with flips). Shards are opened lazily in each process (DataLoader workers
    included; maps are never pickled), at most OPEN_SHARDS at a time.
    """

    def __init__(self, root: str):
        self.root = os.fspath(root)
        self.manifest_path = os.path.join(self.root, MANIFEST)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"--target-cache {self.root}: no such folder")
        if not os.path.isfile(self.manifest_path):
            raise FileNotFoundError(
                f"{self.manifest_path} is missing: {self.root} is not a finished target cache (it is written "
                "last; rerun the same `dataset_tools.py encode-targets` command to finish it)"
            )
        with open(self.manifest_path) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(
                f"{self.manifest_path}: format {self.manifest.get('format')!r} version "
                f"{self.manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}"
            )
        self.items, self.flip = self.manifest["items"], self.manifest["flip"]
        self.shard_size, self.dtype = self.manifest["shard_size"], self.manifest["dtype"]
        self.num_encoders = len(self.manifest["encoders"])
        self._maps = OrderedDict()

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
            raise ValueError(f"cannot read target shard {path}: {err}; rerun `encode-targets` to rewrite it") from err
        info = self.manifest["encoders"][encoder]
        start, stop = shard * self.shard_size, min((shard + 1) * self.shard_size, self.items)
        expected = (stop - start, info["tokens"], info["embed_dim"])
        if array.shape != expected or array.dtype != np.dtype(DTYPES[self.dtype][1]):
            raise ValueError(
                f"{path} is {array.dtype} {array.shape}, {self.manifest_path} says {self.dtype} {expected}; "
                "rerun `encode-targets` into an empty folder"
            )
        self._maps[key] = array
        if len(self._maps) > OPEN_SHARDS:
            self._maps.popitem(last=False)
        return array

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} is outside {self.root} ({len(self)} rows)")
        flipped, k = divmod(index, self.items)
        shard, row = divmod(k, self.shard_size)
        tokens = []
        for e in range(self.num_encoders):
            array = torch.from_numpy(np.array(self._shard(e, bool(flipped), shard)[row]))  # copies one row
            tokens.append(array.view(torch.bfloat16) if self.dtype == "bf16" else array)
        return tokens

    def check(self, encoders, dataset, flip: bool) -> None:
        """Refuse a cache that does not hold this run's targets, naming the manifest key that differs.

        Compared: every encoder's identity (encoder_identity: name, architecture, weights hash, resolution,
        token grid, dim), the dataset (dataset_identity: item count, image shape, names hash), and flips:
        a run with --hflip needs the mirrored images' tokens; a cache with flips also serves a run without.
        """
        where = self.manifest_path
        cached = self.manifest["encoders"]
        names = [enc.spec.name for enc in encoders]
        if [c["name"] for c in cached] != names:
            raise ValueError(
                f"{where}: encoders {[c['name'] for c in cached]} but this run uses --enc-type {','.join(names)}; "
                "write a cache for these encoders (`dataset_tools.py encode-targets --enc-type ...`)"
            )
        for e, (info, encoder) in enumerate(zip(cached, encoders)):
            expected = encoder_identity(encoder)
            for key, value in expected.items():
                if key == "weights_source":
                    continue  # the hash decides; the same weights may come from a file or the hub
                if info.get(key) != value:
                    hint = {
                        "weights_sha256": f"other weights (cache: {info.get('weights_source')}, this run: "
                        f"{expected['weights_source']}; random weights depend on --seed)",
                        "resolution": "the encoder resolution is 16 x the SiT token grid (input side / patch)",
                        "grid": "the encoder resolution is 16 x the SiT token grid (input side / patch)",
                    }.get(key, "")
                    raise ValueError(
                        f"{where}: encoders[{e}] ({info['name']}) key {key!r} is {info.get(key)!r}, this run needs "
                        f"{value!r}" + (f": {hint}" if hint else "")
                    )
        data = dataset_identity(dataset)
        for key, value in data.items():
            if self.manifest["dataset"].get(key) != value:
                raise ValueError(
                    f"{where}: dataset key {key!r} is {self.manifest['dataset'].get(key)!r}, but --data-dir "
                    f"{dataset.data_dir} has {value!r}; the cache was written for other data"
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


def open_target_cache(root: str, encoders, dataset, flip: bool) -> DiskTargetCache:
    """train.py's entry point: the checked cache of `root` for this run's encoders, data and flip setting."""
    if not encoders:
        raise ValueError(
            f"--target-cache {root} given, but this run has no encoder (--enc-type none or --proj-coeff 0)"
        )
    cache = DiskTargetCache(root)
    cache.check(encoders, dataset, flip)
    return cache
