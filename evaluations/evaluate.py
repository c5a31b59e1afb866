"""ADM-compatible evaluation of a sample batch against a reference batch.

    python -m evaluations.evaluate VIRTUAL_imagenet256_labeled.npz samples.npz [--json metrics.json]

Both files are ADM batches: `arr_0` holds uint8 NHWC images; a reference batch may also (or instead)
hold precomputed `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (sFID) statistics, which then take
precedence over statistics computed from its images, as in ADM's evaluator. Precision and recall need
the reference images. A file with `mu`, `sigma` only (pytorch-fid's format, e.g. U-ViT's
fid_stats_mscoco256_val.npz) comes from another Inception pipeline: refused unless --allow-pipeline-mix,
and the result's "pipeline" says which pipeline produced the number. Prints ADM's metric lines (Inception Score, FID, sFID, Precision, Recall) and,
with --json, writes them with the settings that produced them.

Reference activations are expensive (10K images through Inception), so they are cached next to the
reference file as `<name>.refstats-<weights sha>.npz`, keyed on the Inception weights' SHA-256 and
checked against the reference file's size and modification time. The cache is written whole (temp file,
fsync, rename); one that cannot be read (empty, truncated, wrong arrays) is ignored with a warning and rewritten.
Refused with the file named: a batch of 0 images, stored statistics holding NaN or infinities. A summary JSON
beside the samples that cannot be read leaves the sampling protocol "unknown".
"""

import argparse
import json
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from evaluations.inception import POOL_DIM, SPATIAL_DIM, WEIGHTS_FLAG, InceptionV3, load_inception
from evaluations.metrics import feature_statistics, frechet_distance, inception_score, precision_recall

CACHE_FORMAT = 1  # bump when the cache's contents change meaning

# ----------------------------------------------------------------------------------------------------
# Reading ADM batches without loading 50K images at once
# ----------------------------------------------------------------------------------------------------


class NpzImages:
    """An `arr_0` array of an .npz, read in batches from the zip stream (50K x 256^2 x 3 is ~10 GB)."""

    def __init__(self, stream, shape, dtype, path: Path | None = None):
        self.stream, self.shape, self.dtype = stream, tuple(shape), np.dtype(dtype)
        self.path = path  # for error messages

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        for start in range(0, len(self), batch_size):
            count = min(batch_size, len(self) - start)
            data = bytearray(count * row_bytes)  # writable, so torch.from_numpy takes it as is
            view, filled = memoryview(data), 0
            while filled < len(data):  # zip streams may return short reads
                try:
                    got = self.stream.readinto(view[filled:])
                except (OSError, EOFError, zipfile.BadZipFile) as err:  # e.g. "Bad CRC-32" of damaged data
                    raise unreadable_batch(self.path, err) from err
                if not got:
                    raise ValueError(f"{self.path}: truncated array data: expected {len(data)} bytes, got {filled}")
                filled += got
            yield np.frombuffer(data, dtype=self.dtype).reshape(count, *self.shape[1:])


class _InMemory:
    # Stands in for the zip stream when the array had to be loaded whole (Fortran order, npy format 3).
    def __init__(self, array):
        self.buffer = memoryview(np.ascontiguousarray(array)).cast("B")
        self.offset = 0

    def readinto(self, view) -> int:
        count = min(len(view), len(self.buffer) - self.offset)
        view[:count] = self.buffer[self.offset : self.offset + count]
        self.offset += count
        return count


# What numpy and zipfile raise on a damaged, truncated or non-.npz file, or an object array (which
# np.load refuses without allow_pickle); their messages do not say which file.
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile)


def unreadable_batch(path: Path | None, err: Exception) -> ValueError:
    return ValueError(
        f"{path}: cannot read it as an ADM batch (an .npz of numeric arrays, e.g. uint8 `arr_0` images; arrays "
        f"of Python objects are never unpickled): {type(err).__name__}: {err}"
    )


def load_npz(path: Path):
    """np.load of an .npz batch, never unpickling; errors name the file. Use as a context manager."""
    try:
        npz = np.load(path, allow_pickle=False)
    except _READ_ERRORS as err:
        raise unreadable_batch(path, err) from err
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a lone .npy array under an .npz name
        raise ValueError(
            f"{path}: holds a single .npy array, not an .npz batch (write it with np.savez(path, arr_0=x))"
        )
    return npz


def read_array(npz, key: str, path: Path) -> np.ndarray:
    """One array of an open .npz; an object array or damaged member raises an error naming the file."""
    try:
        return npz[key]
    except _READ_ERRORS as err:
        raise unreadable_batch(path, err) from err


@contextmanager
def open_images(path: Path, key: str = "arr_0"):
    """Yields an NpzImages over `key` of the .npz at `path`, checked to be uint8 (N, H, W, 3)."""
    try:
        archive = zipfile.ZipFile(path)
    except _READ_ERRORS as err:
        raise unreadable_batch(path, err) from err
    with archive:
        member = f"{key}.npy"
        if member not in archive.namelist():
            raise KeyError(f"{path}: no array '{key}' (arrays: {[n[:-4] for n in archive.namelist()]})")
        with archive.open(member) as stream:
            try:
                version = np.lib.format.read_magic(stream)
                shape, fortran_order, dtype = None, True, None
                if version in ((1, 0), (2, 0)):
                    read_header = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
                    shape, fortran_order, dtype = read_header(stream)
            except _READ_ERRORS as err:
                raise unreadable_batch(path, err) from err
            if fortran_order:  # also npy format 3, whose header has no public reader: load it whole
                with load_npz(path) as npz:
                    array = read_array(npz, key, path)
                shape, dtype, stream = array.shape, array.dtype, _InMemory(array)
            if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3:
                raise ValueError(
                    f"{path}: '{key}' must be uint8 images of shape (N, H, W, 3) as in ADM batches, "
                    f"got dtype {dtype} and shape {shape}"
                )
            if shape[0] == 0:  # no statistics, score or mean exists for an empty batch
                raise ValueError(f"{path}: '{key}' holds 0 images (shape {shape}); give a batch with images")
            yield NpzImages(stream, shape, dtype, path)


def compute_activations(
    model: InceptionV3, path: Path, batch_size: int, device: torch.device, desc: str
) -> dict[str, np.ndarray]:
    """Inception features of every image in `arr_0` of `path`: pool (N, 2048), logits (N, 1008), spatial (N, 2023)."""
    outputs = {"pool": [], "logits": [], "spatial": []}
    with open_images(path) as images, tqdm(total=len(images), desc=desc, unit="img") as progress:
        for batch in images.batches(batch_size):
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
            features = model(x)
            for name in outputs:
                outputs[name].append(getattr(features, name).cpu().numpy())
            progress.update(len(batch))
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


def precomputed_statistics(path: Path) -> dict[str, np.ndarray]:
    """The `mu`, `sigma`, `mu_s`, `sigma_s` arrays that `path` holds (any subset), shape-checked."""
    expected = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,)}
    expected["sigma_s"] = (SPATIAL_DIM, SPATIAL_DIM)
    found = {}
    with load_npz(path) as npz:
        for key, shape in expected.items():
            if key in npz.files:
                found[key] = read_array(npz, key, path).astype(np.float64)
                if found[key].shape != shape:
                    raise ValueError(f"{path}: '{key}' has shape {found[key].shape}, expected {shape}")
                if not np.isfinite(found[key]).all():  # a FID against NaN statistics is NaN, or worse, a number
                    bad = int((~np.isfinite(found[key])).sum())
                    raise ValueError(
                        f"{path}: '{key}' holds {bad} NaN or infinite value(s); recompute these statistics"
                    )
    for mean, cov in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mean in found) != (cov in found):
            raise ValueError(f"{path}: holds '{mean if mean in found else cov}' without its pair '{cov}'/'{mean}'")
    return found


# Which Inception pipeline made a file's stored statistics. ADM's evaluator stores FID and sFID Gaussians
# together (mu, sigma, mu_s, sigma_s); pytorch-fid (and U-ViT's fid_stats_*.npz, made with it) store `mu`,
# `sigma` only, from its own port of the Inception network with its own resizing. FIDs of one pipeline's
# samples against the other's statistics belong to neither, so such a mix is refused unless asked for.
ADM_PIPELINE = "adm"
MIXED_PIPELINE_FLAG = "--allow-pipeline-mix"


def statistics_pipeline(path: Path) -> str | None:
    """'pytorch-fid' if `path` stores FID statistics without sFID ones (pytorch-fid/U-ViT's files), 'adm' if it
    stores ADM's four, None if it stores none (its images are then run through this evaluator's network)."""
    stats = precomputed_statistics(path)
    if "mu" not in stats:
        return None
    return ADM_PIPELINE if "mu_s" in stats else "pytorch-fid"


def check_pipelines(ref_path: Path, sample_path: Path, allow_mix: bool) -> str:
    """The pipeline the FID comes from: 'adm', or a description of the mix (only with `allow_mix`)."""
    foreign = [
        (path, kind)
        for path in (ref_path, sample_path)
        if (kind := statistics_pipeline(path)) not in (None, ADM_PIPELINE)
    ]
    if not foreign:
        return ADM_PIPELINE
    path, kind = foreign[0]
    mix = (
        f"mixed: {path} holds {kind} statistics (mu, sigma only: another Inception port and resize) compared with "
        "ADM-Inception statistics; comparable to neither pipeline's published numbers"
    )
    if not allow_mix:
        raise ValueError(
            f"{path} holds only 'mu' and 'sigma', the statistics of pytorch-fid (e.g. U-ViT's fid_stats_*.npz), whose "
            "Inception network and resizing differ from ADM's, which computes the other side here. Compare against "
            "an ADM reference batch of images instead (e.g. `dataset_tools.py coco-reference` for COCO), or pass "
            f"{MIXED_PIPELINE_FLAG} to accept a number of the mixed pipeline, recorded as such"
        )
    warnings.warn(f"FID of a mixed pipeline ({MIXED_PIPELINE_FLAG}): {mix}", stacklevel=3)
    return mix


def _statistics(path: Path, summary: dict[str, np.ndarray] | None) -> tuple[dict, str]:
    # ADM's rule: statistics stored in the file win over those of its images (`summary`, None if none).
    stats = precomputed_statistics(path)
    sources = {"fid": "file" if "mu" in stats else "images", "sfid": "file" if "mu_s" in stats else "images"}
    if summary is None and "mu" not in stats:
        raise ValueError(f"{path}: needs 'arr_0' images or precomputed 'mu', 'sigma' (and 'mu_s', 'sigma_s')")
    for mean, cov in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if mean not in stats:
            # FID-only statistics files (U-ViT's fid_stats_mscoco256_val.npz: mu, sigma) leave sFID unknown.
            stats[mean], stats[cov] = (summary[mean], summary[cov]) if summary is not None else (None, None)
            sources["sfid" if mean == "mu_s" else "fid"] = "images" if summary is not None else "none"
    return stats, f"FID stats from {sources['fid']}, sFID stats from {sources['sfid']}"


def _summarise(activations: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # What the metrics need from a batch's activations: pool features and both Gaussians.
    mu, sigma = feature_statistics(activations["pool"])
    mu_s, sigma_s = feature_statistics(activations["spatial"])
    return {"pool": activations["pool"], "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


# ----------------------------------------------------------------------------------------------------
# Reference statistics, cached
# ----------------------------------------------------------------------------------------------------


def reference_cache_path(ref_path: Path, weights_sha256: str) -> Path:
    return ref_path.with_name(f"{ref_path.stem}.refstats-{weights_sha256[:12]}.npz")


def _read_cache(cache_path: Path, ref_path: Path, weights_sha256: str) -> dict[str, np.ndarray] | None:
    """The cached reference summary, or None: none, stale, or broken (warned; the caller computes and rewrites it)."""
    if not cache_path.is_file():
        return None
    stat = ref_path.stat()
    try:
        with np.load(cache_path, allow_pickle=False) as npz:
            meta_ok = (
                int(npz["format"]) == CACHE_FORMAT
                and str(npz["weights_sha256"]) == weights_sha256
                and int(npz["ref_size"]) == stat.st_size
                and int(npz["ref_mtime_ns"]) == stat.st_mtime_ns
            )
            summary = {key: npz[key] for key in ("pool", "mu", "sigma", "mu_s", "sigma_s")} if meta_ok else None
        if summary is not None:
            _check_summary(summary)
            return summary
    except Exception as err:  # noqa: BLE001 - any damage (empty, truncated, garbage, wrong arrays): recompute
        warnings.warn(
            f"ignoring the broken reference cache {cache_path} ({type(err).__name__}: {err}); recomputing and "
            "rewriting it",
            stacklevel=3,
        )
        return None
    print(f"reference cache {cache_path} is stale (reference file or Inception weights changed); recomputing")
    return None


def _check_summary(summary: dict[str, np.ndarray]) -> None:
    # What the metrics read from a cached summary: the right shapes, finite numbers.
    n = summary["pool"].shape[0] if summary["pool"].ndim == 2 else 0
    expected = {"pool": (n, POOL_DIM), "mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,)}
    expected["sigma_s"] = (SPATIAL_DIM, SPATIAL_DIM)
    for key, shape in expected.items():
        if summary[key].shape != shape or n == 0:
            raise ValueError(f"'{key}' has shape {summary[key].shape}, expected {shape} with at least one image")
        if not np.isfinite(summary[key]).all():
            raise ValueError(f"'{key}' holds NaN or infinite values")


def _write_cache(cache_path: Path, ref_path: Path, weights_sha256: str, summary: dict[str, np.ndarray]) -> None:
    """Write the cache whole or not at all: to a temp name, flushed to disk (fsync), then renamed over the cache,
    so a killed run or a crash of the machine never leaves a truncated cache under the final name."""
    stat = ref_path.stat()
    meta = {"format": CACHE_FORMAT, "weights_sha256": weights_sha256}
    meta.update(ref_size=stat.st_size, ref_mtime_ns=stat.st_mtime_ns)
    partial = cache_path.with_name(f".{cache_path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as f:
            np.savez(f, **summary, **{k: np.asarray(v) for k, v in meta.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, cache_path)
        _fsync_folder(cache_path.parent)  # the rename itself survives a crash
        print(f"cached reference statistics in {cache_path}")
    except OSError as err:
        print(f"could not write reference cache {cache_path} ({err}); continuing without it")
        partial.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every system opens folders (Windows): the file itself is on disk
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def reference_summary(
    model: InceptionV3, ref_path: Path, batch_size: int, device: torch.device, use_cache: bool = True
) -> dict[str, np.ndarray] | None:
    """Pool features and Gaussians of the reference images; None if the file has no `arr_0`."""
    with load_npz(ref_path) as npz:
        if "arr_0" not in npz.files:
            return None
    # The cache is keyed on the weights file; a model not built by load_inception has none to key on.
    weights_sha256 = getattr(model, "weights_sha256", None)
    use_cache = use_cache and weights_sha256 is not None
    cache_path = reference_cache_path(ref_path, weights_sha256 or "")
    if use_cache:
        cached = _read_cache(cache_path, ref_path, weights_sha256)
        if cached is not None:
            print(f"read reference statistics from cache {cache_path}")
            return cached
    print("computing reference batch activations...")
    summary = _summarise(compute_activations(model, ref_path, batch_size, device, "reference"))
    if use_cache:
        _write_cache(cache_path, ref_path, weights_sha256, summary)
    return summary


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


def evaluate(
    ref_path: str | os.PathLike,
    sample_path: str | os.PathLike,
    model: InceptionV3,
    batch_size: int = 100,
    use_cache: bool = True,
    half_distances: bool = True,
    allow_pipeline_mix: bool = False,
) -> dict:
    """Inception Score, FID, sFID, precision and recall of `sample_path` against `ref_path`, as ADM.

    `model` comes from `load_inception`; inputs go to its device. Returns the metrics (precision and
    recall None when the reference has no images) together with the settings that produced them.
    """
    ref_path, sample_path = Path(ref_path), Path(sample_path)
    for path in (ref_path, sample_path):
        if not path.is_file():
            raise FileNotFoundError(f"no such batch file: {path}")
    device = model.fc.weight.device  # features and distance blocks live where Inception runs
    pipeline = check_pipelines(ref_path, sample_path, allow_pipeline_mix)  # before any Inception pass

    ref = reference_summary(model, ref_path, batch_size, device, use_cache)
    ref_stats, ref_source = _statistics(ref_path, ref)
    print("computing sample batch activations...")
    sample_acts = compute_activations(model, sample_path, batch_size, device, "samples")
    sample = _summarise(sample_acts)
    sample_stats, sample_source = _statistics(sample_path, sample)

    print("computing evaluations...")
    # Precision/recall compare pool_3 features of the reference images with the samples' (k=3 as ADM).
    if ref is None:
        warnings.warn(f"{ref_path} holds no 'arr_0' images: precision and recall are not computed", stacklevel=2)
        precision = recall = None
    else:
        precision, recall = precision_recall(ref["pool"], sample["pool"], half=half_distances, device=device)
    # IS uses the samples alone; FID/sFID put the sample Gaussian first as ADM does (it is symmetric).
    return {
        "inception_score": inception_score(sample_acts["logits"]),
        "fid": frechet_distance(sample_stats["mu"], sample_stats["sigma"], ref_stats["mu"], ref_stats["sigma"]),
        "sfid": None
        if ref_stats["mu_s"] is None
        else frechet_distance(sample_stats["mu_s"], sample_stats["sigma_s"], ref_stats["mu_s"], ref_stats["sigma_s"]),
        "precision": precision,
        "recall": recall,
        "num_samples": len(sample_acts["pool"]),
        "num_reference_images": None if ref is None else len(ref["pool"]),
        "ref_batch": str(ref_path),
        "sample_batch": str(sample_path),
        "pipeline": pipeline,
        "reference_statistics": ref_source,
        "sample_statistics": sample_source,
        "inception_weights": getattr(model, "weights_path", None),
        "inception_weights_sha256": getattr(model, "weights_sha256", None),
        "official_inception_weights": getattr(model, "official_weights", False),
        "half_precision_distances": half_distances,
        "sampling_protocol": sampling_protocol(sample_path),
    }


def describe_protocol(protocol: dict) -> str:
    """One line naming how a sample batch was made (sample_ddp.py's `protocol`), for tables of FIDs."""
    low, high = protocol["guidance_interval"]
    cfg = f"CFG {protocol['cfg_scale']} in [{low}, {high}]" if protocol["cfg_scale"] > 1 else "no CFG"
    labels = protocol["labels"] if "captions" in protocol["labels"] else f"{protocol['labels']} labels"  # T2I: captions
    return (
        f"{protocol['sampler']} {protocol['num_steps']} steps (NFE {protocol['nfe']}), {cfg}, "
        f"{labels}, {protocol['quantization']} quantization, N={protocol['num_samples']}, "
        f"{protocol['weights']} weights, {protocol['precision']}"
    )


def sampling_protocol(sample_path) -> dict | None:
    """The protocol sample_ddp.py recorded beside SAMPLES.npz (in SAMPLES.json), if it describes this very
    file: the summary names the .npz's size and modification time, so a batch rewritten since then (or by
    another tool) is reported as of unknown protocol rather than mislabelled. A summary that cannot be read
    or does not hold a protocol describe_protocol can name (damaged, another tool's JSON) counts as none."""
    summary_path = Path(sample_path).with_suffix(".json")
    try:
        summary = json.loads(summary_path.read_bytes().decode("utf-8"))
        stat = Path(sample_path).stat()
        if not isinstance(summary, dict) or summary.get("npz_identity") != [stat.st_size, stat.st_mtime_ns]:
            return None
        protocol = summary.get("protocol")
        if protocol is None:
            return None
        describe_protocol(protocol)  # raises on a protocol that is not one
        return protocol
    except (OSError, ValueError):  # no file, not UTF-8, not JSON (ValueError covers both)
        return None
    except (TypeError, KeyError, AttributeError, IndexError) as err:
        warnings.warn(
            f"{summary_path}: its 'protocol' is malformed ({type(err).__name__}: {err}); protocol unknown", stacklevel=2
        )
        return None


def format_metrics(results: dict) -> str:
    """ADM's printed lines, so that scripts parsing its output read ours unchanged."""
    lines = []
    for label, key in (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid")):
        lines.append(f"{label}: {results[key] if results[key] is not None else 'n/a (no statistics in the reference)'}")
    for label, key in (("Precision", "precision"), ("Recall", "recall")):
        value = results[key]
        lines.append(f"{label}: {value if value is not None else 'n/a (reference batch has no arr_0 images)'}")
    if results.get("pipeline", ADM_PIPELINE) != ADM_PIPELINE:
        lines.append(f"Pipeline: {results['pipeline']}")
    try:
        described = describe_protocol(results["sampling_protocol"]) if results.get("sampling_protocol") else None
    except (TypeError, KeyError, AttributeError, IndexError, ValueError):  # a malformed protocol: unknown
        described = None
    lines.append(
        f"Sampling protocol: {described}"
        if described
        else "Sampling protocol: unknown (no summary JSON from sample_ddp.py describes this batch)"
    )
    if not results["official_inception_weights"]:
        lines.append("WARNING: NOT computed with the release Inception weights; not comparable to ADM's numbers")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref_batch", help="reference batch .npz (arr_0 images and/or mu, sigma, mu_s, sigma_s)")
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0: uint8 N x H x W x 3)")
    parser.add_argument("--json", default=None, help="write the metrics and settings to this JSON file")
    parser.add_argument(
        WEIGHTS_FLAG, default=None, help="local weights-inception-2015-12-05-6726825d.pth (default: torch hub cache)"
    )
    parser.add_argument("--no-download", action="store_true", help="never try to download the Inception weights")
    parser.add_argument("--batch-size", type=int, default=100, help="images per Inception forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-ref-cache", action="store_true", help="neither read nor write the reference cache")
    parser.add_argument(
        "--float32-distances",
        action="store_true",
        help="exact float32 distances for precision/recall instead of ADM's float16 ones",
    )
    parser.add_argument(
        MIXED_PIPELINE_FLAG,
        action="store_true",
        help="accept FID-only (mu, sigma) statistics of pytorch-fid / U-ViT against ADM-Inception ones; the result "
        "is recorded as a mixed pipeline",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    for path in (args.ref_batch, args.sample_batch):  # before the (slow) Inception load
        if not Path(path).is_file():
            parser.error(f"no such batch file: {path}")

    # Full float32 convolutions and matmuls, as the reference TF graph computes them (no TF32 on Ampere+).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = load_inception(args.inception_weights, device=args.device, allow_download=not args.no_download)
    results = evaluate(
        args.ref_batch,
        args.sample_batch,
        model,
        batch_size=args.batch_size,
        use_cache=not args.no_ref_cache,
        half_distances=not args.float32_distances,
        allow_pipeline_mix=args.allow_pipeline_mix,
    )
    print(format_metrics(results))
    # The JSON keeps the settings next to the numbers, so a result can be traced to its weights and inputs.
    if args.json is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, KeyError) as err:
        sys.exit(f"error: {err}")
