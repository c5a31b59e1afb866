"""Checkpoint files: atomic writes and safe loading, including the official REPA format.

An official REPA checkpoint is a dict {model, ema, opt, args, steps} whose `args` is an
argparse.Namespace. `torch.load(weights_only=True)` refuses that class unless it is allow-listed; we
allow exactly argparse.Namespace (plain attribute bag, no code runs on unpickling) and nothing else,
so a file can never execute arbitrary code when loaded here.
"""

import argparse
import errno
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Classes a checkpoint may contain besides tensors and Python containers/scalars.
SAFE_GLOBALS = [argparse.Namespace]


def save_checkpoint(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash mid-write leaves the previous file (or nothing) in place, never a truncated checkpoint. A full
    disk is reported as such (torch says only "unexpected pos"), naming the path; earlier files are kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(e):
            free = shutil.disk_usage(path.parent).free
            raise OSError(
                errno.ENOSPC,
                f"no space left on the device while writing checkpoint {path} ({free / 2**20:.1f} MiB free after "
                "removing the partial file); earlier checkpoints are untouched. Free some space (or lower "
                "--keep-last) and rerun the same command to resume",
            ) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC, directly or as torch's zip writer reports it ("unexpected pos", "file write failed")."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, RuntimeError) and ("unexpected pos" in str(error) or "write failed" in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with weights_only=True (plus argparse.Namespace); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, wrong format, disallowed class
        raise RuntimeError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e


def model_state_dict(checkpoint, use_ema=True, path="checkpoint"):
    """The weights to sample from: `ema` (default) or `model` of a training checkpoint, or a bare state dict."""
    if isinstance(checkpoint, dict) and ("ema" in checkpoint or "model" in checkpoint):
        key = "ema" if use_ema and "ema" in checkpoint else "model"
        if use_ema and key != "ema":
            raise KeyError(f"{path} has no 'ema' entry (keys: {sorted(checkpoint)}); pass use_ema=False")
        return checkpoint[key]
    if isinstance(checkpoint, dict) and all(torch.is_tensor(v) for v in checkpoint.values()):
        return checkpoint
    raise ValueError(f"{path} is neither a training checkpoint (model/ema entries) nor a state dict")
