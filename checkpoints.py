"""Checkpoint files: atomic writes and safe loading, including the official REPA format, and the model a
checkpoint holds (`load_model`, used by sample_ddp.py and the analysis tools).

An official REPA checkpoint is a dict {model, ema, opt, args, steps} whose `args` is an
argparse.Namespace. `torch.load(weights_only=True)` refuses that class unless it is allow-listed; we
allow exactly argparse.Namespace (plain attribute bag, no code runs on unpickling) and nothing else,
so a file can never execute arbitrary code when loaded here.
"""

import argparse
import errno
import hashlib
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from models import MODELS, T2I_MODELS
from models.dit import DiT, DiT_models
from models.mmdit import MMDiT
from models.sit import SiT, projector_kwargs_from_state_dict

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


# ----------------------------------------------------------------------------------------------------
# Checkpoint -> model: this project's files (config and model_kwargs recorded) and the official ones
# (the model read off its weights)
# ----------------------------------------------------------------------------------------------------


def sit_kwargs_from_state_dict(state_dict: dict) -> dict:
    """SiT constructor keywords read off the weights (all but num_heads, which no tensor records).

    Only for checkpoints without `model_kwargs` (official ones, and bare state dicts); ours record the
    constructor keywords themselves.
    """
    required = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise KeyError(f"not a SiT state dict: missing {missing}")
    hidden, channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    # REG: a class-token head; its token adds one position row in front of the patch grid.
    cls_head = state_dict.get("final_layer.linear_cls.weight")
    cls_token_dim = None if cls_head is None else cls_head.shape[0]
    grid = math.isqrt(state_dict["pos_embed"].shape[1] - (cls_token_dim is not None))
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    return dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=channels,
        hidden_size=hidden,
        depth=depth,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        # A null row exists iff the model was trained with label dropout; the exact rate does not matter here.
        num_classes=rows - 1,
        class_dropout_prob=0.1,
        **projector_kwargs_from_state_dict(state_dict),
        qk_norm="blocks.0.attn.q_norm.weight" in state_dict,
        **({"cls_token_dim": cls_token_dim} if cls_token_dim else {}),  # REG SiTs only (DiT has no such keyword)
    )


def mmdit_kwargs_from_state_dict(state_dict: dict, settings: dict) -> dict:
    """MMDiT constructor keywords read off official T2I weights (they record no `model_kwargs`)."""
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"joint_blocks\.(\d+)\.", k)))
    _hidden, channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    kwargs = dict(
        input_size=int(settings.get("resolution", 256)) // 8,
        patch_size=patch,
        in_channels=channels,
        depth=depth,
        context_dim=state_dict["context_embedder.weight"].shape[1],
        encoder_depth=settings.get("encoder_depth", 8),
    )
    projectors = projector_kwargs_from_state_dict(state_dict)
    kwargs["z_dims"] = projectors["z_dims"]
    if "projector_dim" in projectors:
        kwargs["projector_dim"] = projectors["projector_dim"]
    return kwargs


def checkpoint_settings(ckpt) -> dict:
    """The run's settings: this project's `config`, else the official `args` Namespace, else nothing."""
    if isinstance(ckpt, dict) and "config" in ckpt:
        return dict(ckpt["config"])
    if isinstance(ckpt, dict) and "args" in ckpt:
        return dict(vars(ckpt["args"]))
    return {}


def weights_digest(state_dict: dict) -> str:
    """sha256 over names, dtypes, shapes and bytes of the weights: which model made a sample folder."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_model(ckpt_path, model_name=None, use_ema=True, encoder_depth=None, ckpt=None):
    """(model in eval mode, the run's settings plus `model` and `weights_sha256`); `ckpt`: already loaded."""
    ckpt = load_checkpoint(ckpt_path) if ckpt is None else ckpt
    settings = checkpoint_settings(ckpt)
    state_dict = model_state_dict(ckpt, use_ema=use_ema, path=ckpt_path)
    if "joint_blocks.0.x_block.attn.qkv.weight" in state_dict:
        return load_mmdit(ckpt, ckpt_path, state_dict, settings, model_name, encoder_depth)
    name = model_name or settings.get("model")
    if model_name and settings.get("model") not in (None, model_name):
        warnings.warn(f"--model {model_name} overrides the checkpoint's model {settings['model']!r}", stacklevel=2)
    if name not in MODELS:
        raise ValueError(f"{ckpt_path}: model {name!r} unknown or not recorded; pass --model (one of {list(MODELS)})")
    if isinstance(ckpt, dict) and "model_kwargs" in ckpt:
        kwargs = dict(ckpt["model_kwargs"])  # the constructor keywords train.py used: nothing to infer
        if encoder_depth is not None and encoder_depth != kwargs.get("encoder_depth"):
            warnings.warn(f"--encoder-depth {encoder_depth} ignored: {ckpt_path} records its own", stacklevel=2)
        model = MODELS[name](**kwargs)
    else:
        kwargs = sit_kwargs_from_state_dict(state_dict)
        kwargs["num_heads"] = settings.get("num_heads") or MODELS[name].keywords["num_heads"]  # custom, else name
        if kwargs["z_dims"]:
            kwargs["encoder_depth"] = encoder_depth or settings.get("encoder_depth", 8)
        if name in DiT_models:
            # learned sigma doubles the output channels: [eps | variance interpolation]
            out = state_dict["final_layer.linear.weight"].shape[0] // kwargs["patch_size"] ** 2
            model = DiT(learn_sigma=out == 2 * kwargs["in_channels"], **kwargs)
        else:
            model = SiT(**kwargs)
    if model.num_classes < 1:
        raise ValueError(f"{ckpt_path}: the label table has no null row, so the model cannot be guided")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{ckpt_path}: the weights do not fit {name} built from the checkpoint: {e}") from e
    steps = ckpt.get("steps") if isinstance(ckpt, dict) else None  # the training step, where recorded
    return model.eval(), {
        **settings, "model": name, "steps": steps, "weights_sha256": weights_digest(state_dict),
        "cls_token_dim": getattr(model, "cls_token_dim", None),  # REG models: the class token's width
    }  # fmt: skip


def load_mmdit(ckpt, ckpt_path, state_dict, settings, model_name=None, encoder_depth=None):
    """load_model for text-to-image weights: ours (model_kwargs, empty_context, text_encoder recorded) or the
    official train_t2i.py's (read off the weights; its args record no model name)."""
    kwargs = dict(ckpt["model_kwargs"]) if isinstance(ckpt, dict) and "model_kwargs" in ckpt else None
    if kwargs is None:
        kwargs = mmdit_kwargs_from_state_dict(state_dict, settings)
        if encoder_depth is not None:
            kwargs["encoder_depth"] = encoder_depth
    name = model_name or settings.get("model")
    if name is None:  # official weights: the depth is the size (any depth, as officially), named like ours
        name = f"MMDiT-d{kwargs['depth']}/{kwargs['patch_size']}"
        model = MMDiT(**kwargs)
    elif name not in T2I_MODELS:
        raise ValueError(f"{ckpt_path} holds MMDiT weights but --model {name} is not one of {list(T2I_MODELS)}")
    else:
        model = T2I_MODELS[name](**kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{ckpt_path}: the weights do not fit {name} built from the checkpoint: {e}") from e
    extras = {}
    if isinstance(ckpt, dict):
        if ckpt.get("empty_context") is not None:
            extras["empty_context"] = torch.as_tensor(ckpt["empty_context"]).float()
        extras["text_encoder"] = ckpt.get("text_encoder")
    steps = ckpt.get("steps") if isinstance(ckpt, dict) else None
    digest = weights_digest(state_dict)
    return model.eval(), {**settings, **extras, "model": name, "steps": steps, "weights_sha256": digest}
