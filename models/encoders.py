"""Frozen pretrained vision encoders: REPA's alignment targets.

REPA aligns SiT hidden tokens with the patch tokens of a frozen encoder run on the *clean* image. This
module holds one registry (`ENCODERS`) from the official names (`family-arch-size`, e.g. `dinov2-vit-b`)
to a timm architecture plus everything needed to reproduce the paper's targets:

    uint8 image (N, 3, R, R) -> /255 -> normalize(mean, std) -> [bicubic resize to 16*(R//256)*patch]
        -> ViT -> [final norm] -> drop CLS / register tokens -> (N, T, D),  T = 256 at R=256, 1024 at R=512

so the encoder token grid always equals the SiT/2 token grid (16x16 at 256 px, 32x32 at 512 px). Absolute
position embeddings are resampled once, at load time, to that grid. `resolution` fixes the grid
(resolution // 16 per side); 256 and 512 are the paper's settings. Other multiples of 16 serve tiny demo
runs (e.g. a 4x4 grid for 32 px pixel-space images): images of another size are resized to the encoder
input, and a warning says the setting is not the paper's.

Weights, in this order: `--enc-ckpt PATH` (the official release file of that encoder, or a timm /
safetensors file; never TorchScript, whose loading runs code from the file), else the Hugging Face cache /
hub copy (honours HF_HUB_OFFLINE), else the official release URL through the torch hub cache. Random
weights only when asked for (`--enc-weights random`).

Any timm ViT-style model is a target too, named `timm:<model-name>` (e.g. `timm:vit_small_patch14_dinov2.lvd142m`,
or a small encoder trained for a demo: `timm:vit_tiny_patch16_224 --enc-ckpt tiny_vit.pt`). Its spec is
made on the fly from the timm model (`timm_spec`): patch tokens of `forward_features` without the prefix
(CLS / register) tokens, mean/std from timm's pretrained config. Weights come from timm's hub copy, from a
plain timm state dict, or from a file written by `save_timm_encoder`, which also carries the architecture
keywords and mean/std (see there). Such a file fixes the input size, so its patch grid must equal the SiT's;
hub weights and plain state dicts are built at grid * patch px like the registry's encoders.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import eva as timm_eva
from timm.models import vision_transformer as timm_vit

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# SD-VAE latents are 32x32 (64x64) at 256 (512) px; SiT/2 turns them into a 16x16 (32x32) token grid.
PAPER_RESOLUTIONS = (256, 512)
WEIGHT_CHOICES = ("pretrained", "random")
# Pooling / classifier parts of a checkpoint: never used for patch tokens, so dropped before key matching.
_POOLING_PARTS = ("head", "attn_pool", "fc_norm", "head_drop")


#################################################################################
#                 Official release formats -> timm state-dict keys              #
#################################################################################
# Each converter takes the object stored in the release file and returns timm-style keys; it is a no-op
# on files already in timm format. DINOv2 (`mask_token`, `register_tokens`, SwiGLU `w12/w3`), OpenAI CLIP
# (`visual.*`), DINOv3 and all pos_embed resampling are then handled by timm's own checkpoint filters.


def _strip_prefix(state: dict, prefix: str) -> dict:
    if not any(k.startswith(prefix) for k in state):
        return state
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _identity(raw: dict) -> dict:
    return raw


def _from_dino(raw: dict) -> dict:
    # dino_vitbase16_pretrain.pth is a plain timm-style state dict; the *_full_checkpoint.pth holds the
    # teacher (the network DINO evaluates) under `teacher` with `module.backbone.` prefixes.
    if "teacher" in raw:
        raw = _strip_prefix(_strip_prefix(raw["teacher"], "module."), "backbone.")
    return {k: v for k, v in raw.items() if not k.startswith("head.")}


# REPA's loader renames four keys of its MoCo v3 ViT-L file, where a block's index leaked into names.
_MOCOV3_KEY_FIXES = {
    "blocks.13.norm13.": "blocks.13.norm1.",
    "blocks.13.mlp.fc13.": "blocks.13.mlp.fc1.",
    "blocks.14.norm14.": "blocks.14.norm2.",
    "blocks.14.mlp.fc14.": "blocks.14.mlp.fc2.",
}


def _from_mocov3(raw: dict) -> dict:
    # vit-*-300ep.pth.tar: {'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*',
    # 'module.predictor.*'}, 'optimizer', ...}. The base encoder is the backbone; its `head` is the
    # projection MLP, not part of the token path.
    state = _strip_prefix(raw.get("state_dict", raw), "module.base_encoder.")
    out = {}
    for k, v in state.items():
        for old, new in _MOCOV3_KEY_FIXES.items():
            k = k.replace(old, new)
        if not k.startswith(("head.", "fc.")):
            out[k] = v
    return out


def _from_mae(raw: dict) -> dict:
    # mae_pretrain_vit_large.pth: {'model': encoder state dict}; drop MAE's pretraining-only parts if a
    # full training checkpoint is given.
    state = raw.get("model", raw)
    return {k: v for k, v in state.items() if k != "mask_token" and not k.startswith("decoder")}


def _from_ijepa(raw: dict) -> dict:
    # IN1K-vit.h.14-300e.pth.tar: {'encoder', 'target_encoder', 'predictor', 'opt', ...}, DDP-prefixed.
    # REPA takes the online `encoder` (not the EMA target encoder), so do we.
    return _strip_prefix(raw.get("encoder", raw), "module.")


#################################################################################
#                                   Registry                                    #
#################################################################################


@dataclass(frozen=True)
class EncoderSpec:
    """One frozen encoder: its timm architecture, preprocessing, token layout and weight sources."""

    name: str  # official REPA name, `family-arch-size`
    timm_arch: str  # timm model function that builds the architecture
    embed_dim: int  # D of the returned tokens (the projector's z_dim)
    patch_size: int  # /14 encoders get a bicubic resize to 224 * (R // 256); /16 ones see R px as is
    num_prefix_tokens: int  # CLS + register tokens in front of the patch tokens, dropped from the output
    final_norm: bool = True  # False: REPA took the last block's output without the final LayerNorm
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hub_repo: str | None = None  # Hugging Face copy in timm format (file `model.safetensors`)
    release_url: str | None = None  # official release file; also fetched into the torch hub cache
    release_note: str = ""  # where to get the weights when there is no public URL
    convert: Callable[[dict], dict] = _identity  # official release format -> timm keys
    timm_kwargs: Mapping = field(default_factory=dict)  # architecture overrides on top of timm's defaults
    from_timm_name: bool = False  # a `timm:<model>` name: made by timm_spec, not a registry entry

    def grid(self, resolution: int) -> int:
        """Tokens per side: 16 at 256 px, 32 at 512 px, whatever the patch size."""
        return resolution // 16

    def input_size(self, resolution: int) -> int:
        return self.grid(resolution) * self.patch_size


_DINOV2_SIZES = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}


def _dinov2(size: str, registers: bool) -> EncoderSpec:
    arch_size, dim = _DINOV2_SIZES[size]
    arch = f"vit_{arch_size}_patch14_{'reg4_' if registers else ''}dinov2"
    return EncoderSpec(
        name=f"dinov2{'reg' if registers else ''}-vit-{size}",
        timm_arch=arch,
        embed_dim=dim,
        patch_size=14,
        num_prefix_tokens=1 + 4 * registers,  # x_norm_patchtokens: no CLS, no registers
        hub_repo=f"timm/{arch}.lvd142m",
        release_url=(
            f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/"
            f"dinov2_vit{size}14{'_reg4' if registers else ''}_pretrain.pth"
        ),
    )


def _mocov3(size: str, arch_size: str, dim: int, **timm_kwargs) -> EncoderSpec:
    released = size in ("s", "b")  # MoCo v3 released ViT-S/B only; REPA used a local ViT-L file
    return EncoderSpec(
        name=f"mocov3-vit-{size}",
        timm_arch=f"vit_{arch_size}_patch16_224",
        embed_dim=dim,
        patch_size=16,
        num_prefix_tokens=1,
        convert=_from_mocov3,
        release_url=f"https://dl.fbaipublicfiles.com/moco-v3/vit-{size}-300ep/vit-{size}-300ep.pth.tar"
        if released
        else None,
        release_note="" if released else "a MoCo v3 ViT-L/16 file with module.base_encoder.* keys",
        timm_kwargs=timm_kwargs,
    )


def _dinov3(size: str, arch_size: str, dim: int) -> EncoderSpec:
    return EncoderSpec(
        name=f"dinov3-vit-{size}",
        timm_arch=f"vit_{arch_size}_patch16_dinov3",  # RoPE, no absolute pos_embed to resample
        embed_dim=dim,
        patch_size=16,
        num_prefix_tokens=5,  # CLS + 4 registers ("storage tokens")
        hub_repo=f"timm/vit_{arch_size}_patch16_dinov3.lvd1689m",
        release_note=f"dinov3_vit{size}16_pretrain_lvd1689m-*.pth from github.com/facebookresearch/dinov3 "
        "(download links are sent after accepting its license)",
    )


def _siglip2(size: str, arch_size: str, dim: int) -> EncoderSpec:
    return EncoderSpec(
        name=f"siglip2-vit-{size}",
        timm_arch=f"vit_{arch_size}_patch16_siglip_256",  # no CLS; the MAP pooling head is not used
        embed_dim=dim,
        patch_size=16,
        num_prefix_tokens=0,
        mean=SIGLIP_MEAN,
        std=SIGLIP_STD,
        hub_repo=f"timm/vit_{arch_size}_patch16_siglip_256.v2_webli",
        release_note="the big_vision SigLIP 2 release is not supported; use the timm copy",
    )


_SPECS = [
    *(_dinov2(size, registers=False) for size in "sblg"),
    *(_dinov2(size, registers=True) for size in "sblg"),
    EncoderSpec(
        name="dinov1-vit-b",
        timm_arch="vit_base_patch16_224",
        embed_dim=768,
        patch_size=16,
        num_prefix_tokens=1,
        convert=_from_dino,
        hub_repo="timm/vit_base_patch16_224.dino",
        release_url="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    ),
    # MoCo v3's ViT-S has 12 heads of width 32 (timm's ViT-S has 6).
    _mocov3("s", "small", 384, num_heads=12),
    _mocov3("b", "base", 768),
    _mocov3("l", "large", 1024),
    EncoderSpec(
        name="clip-vit-L",
        # OpenAI CLIP uses QuickGELU; timm's `.openai` weights sit on a GELU arch, so pair the weights
        # with the QuickGELU arch (no parameters differ).
        timm_arch="vit_large_patch14_clip_quickgelu_224",
        embed_dim=1024,
        patch_size=14,
        num_prefix_tokens=1,
        final_norm=False,  # REPA takes the transformer output before ln_post (and before `proj`)
        mean=CLIP_MEAN,
        std=CLIP_STD,
        hub_repo="timm/vit_large_patch14_clip_224.openai",
        # No release_url: OpenAI's ViT-L-14.pt is a TorchScript archive, which read_checkpoint refuses.
        release_note="OpenAI's ViT-L-14.pt is TorchScript, refused (loading runs its code); save its state dict "
        "on a trusted machine (`clip.load('ViT-L/14', jit=False)`, then torch.save(model.state_dict(), PATH))",
    ),
    EncoderSpec(
        name="mae-vit-l",
        timm_arch="vit_large_patch16_224",
        embed_dim=1024,
        patch_size=16,
        num_prefix_tokens=1,
        final_norm=False,  # REPA's MAE forward returns the last block's output, un-normalized
        convert=_from_mae,
        hub_repo="timm/vit_large_patch16_224.mae",
        release_url="https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth",
    ),
    EncoderSpec(
        name="jepa-vit-h",
        timm_arch="vit_huge_patch14_gap_224",  # no CLS token; final LayerNorm applied
        embed_dim=1280,
        patch_size=14,
        num_prefix_tokens=0,
        convert=_from_ijepa,
        release_url="https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar",
    ),
    _dinov3("s", "small", 384),
    _dinov3("b", "base", 768),
    _dinov3("l", "large", 1024),
    _siglip2("b", "base", 768),
    _siglip2("l", "large", 1024),
    _siglip2("so400m", "so400m", 1152),
]
ENCODERS: dict[str, EncoderSpec] = {spec.name: spec for spec in _SPECS}
_BY_LOWER_NAME = {name.lower(): spec for name, spec in ENCODERS.items()}  # "clip-vit-l" works too


#################################################################################
#                      Any timm ViT by name: `timm:<model-name>`                 #
#################################################################################
# A small encoder trained for a demo, or any timm ViT, without a registry entry. The spec is read off the
# timm model itself, so it cannot disagree with it. A file written by save_timm_encoder is a plain dict
#     {"timm_model": "vit_tiny_patch16_224",                 # timm model function (a tag is allowed)
#      "timm_kwargs": {"img_size": 32, "patch_size": 4, ...}, # plain values only: ints, floats, str, lists
#      "state_dict": {...}, "mean": [r, g, b], "std": [r, g, b]}
# loaded with torch.load(weights_only=True); or a .safetensors state dict whose metadata holds the other
# four entries as JSON strings (plus "format": TIMM_FILE_FORMAT). The keywords reach timm.create_model as
# data: no code from the file runs, and keywords that make timm read files or change the output are refused.

TIMM_PREFIX = "timm:"
TIMM_FILE_FORMAT = "repa-timm-encoder"  # safetensors metadata "format" of save_timm_encoder files
# create_model / build_model_with_cfg keywords that load weights from elsewhere or change what is returned.
_REFUSED_TIMM_KWARGS = frozenset(
    ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path")
    + ("cache_dir", "features_only", "feature_cfg", "out_indices")
)


def timm_spec(
    model_name: str,
    timm_kwargs: Mapping | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    source: str | None = None,
) -> EncoderSpec:
    """The spec of `timm:<model_name>` built with `timm_kwargs`: token layout from the model (built on the
    meta device, so this is cheap at any size), mean/std given or from timm's pretrained config, weights
    from timm's Hugging Face copy (or its URL) of that model. `source` (e.g. "--enc-ckpt PATH"): where the
    keywords and mean/std come from, named in errors."""
    name = f"{TIMM_PREFIX}{model_name}"
    where = source or name
    if not timm.is_model(model_name):  # registered names only: `hf-hub:` / `local-dir:` read configs elsewhere
        raise ValueError(f"{where}: timm has no model {model_name!r} (timm.list_models() lists them)")
    kwargs = _check_timm_kwargs(timm_kwargs or {}, where)
    model = _meta_timm_model(model_name, kwargs, where)
    patch_embed = getattr(model, "patch_embed", None)
    if not hasattr(patch_embed, "grid_size") or not hasattr(model, "num_prefix_tokens"):
        raise ValueError(
            f"{name}: {type(model).__name__} is not a ViT-style timm model (patch_embed + prefix tokens + patch "
            "tokens from forward_features); only those give one target token per SiT token"
        )
    patch = tuple(patch_embed.patch_size)
    if patch[0] != patch[1]:
        raise ValueError(f"{name}: non-square patches {patch} are not supported")
    cfg = model.pretrained_cfg or {}
    # timm-format hub copies hold model.safetensors; other hub files (open_clip) and custom-loaded URLs
    # (.npz) are not read here.
    hub_repo = cfg.get("hf_hub_id") if not cfg.get("hf_hub_filename") else None
    release_url = cfg.get("url") if not cfg.get("custom_load") else None
    return EncoderSpec(
        name=name,
        timm_arch=model_name,
        embed_dim=model.embed_dim,
        patch_size=patch[0],
        num_prefix_tokens=model.num_prefix_tokens,
        mean=_three_floats(mean if mean is not None else cfg.get("mean", IMAGENET_MEAN), f"{where}: mean"),
        std=_three_floats(std if std is not None else cfg.get("std", IMAGENET_STD), f"{where}: std", positive=True),
        hub_repo=hub_repo or None,
        release_url=release_url or None,
        release_note=f"timm has no downloadable weights for {model_name}: train one and save it with "
        "models.encoders.save_timm_encoder (or take a timm state dict)",
        timm_kwargs=kwargs,
        from_timm_name=True,
    )


def _three_floats(values, what: str, positive: bool = False) -> tuple[float, float, float]:
    """(R, G, B) as floats: 3 finite numbers (positive ones for a std). NaN or inf would make every target
    token NaN, and every training step would be skipped."""
    ok = isinstance(values, (list, tuple)) and len(values) == 3
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not ok or (positive and min(values) <= 0):
        raise ValueError(
            f"{what} must be 3 finite {'positive ' if positive else ''}numbers (R, G, B), got {values!r}: the "
            "encoder's input normalisation (what its training divided images in [0, 1] by)"
        )
    return tuple(float(v) for v in values)


def _meta_timm_model(model_name: str, kwargs: Mapping, where: str) -> nn.Module:
    """timm's model on the meta device; keywords timm cannot build with are named (each is tried left out)."""

    def build(keywords: Mapping) -> nn.Module:
        with torch.device("meta"):
            return timm.create_model(model_name, pretrained=False, num_classes=0, **keywords)

    try:
        return build(kwargs)
    except Exception as err:  # timm raises TypeError, KeyError, AssertionError, RuntimeError ... for bad values
        culprits = []
        for key in kwargs:
            try:
                build({k: v for k, v in kwargs.items() if k != key})
                culprits.append(key)
            except Exception:
                pass
        named = (
            f"keyword {', '.join(f'{k}={kwargs[k]!r}' for k in culprits)}"
            if culprits
            else f"the keywords {dict(kwargs)} (together; no single one)"
        )
        detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise ValueError(
            f"{where}: timm {model_name} cannot be built with its timm_kwargs: {named} refused by timm "
            f"({type(err).__name__}{': ' + detail if detail else ''}); fix or drop it and save the encoder again "
            "(models.encoders.save_timm_encoder checks the keywords against the weights)"
        ) from err


def _check_timm_kwargs(kwargs: Mapping, where: str) -> dict:
    """Architecture keywords as plain data: str keys, JSON-like values, nothing that loads or reshapes."""

    def plain(v) -> bool:
        return (
            v is None or isinstance(v, (bool, int, float, str)) or (isinstance(v, (list, tuple)) and all(map(plain, v)))
        )

    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{where}: timm_kwargs must be a dict of architecture keywords, got {type(kwargs).__name__}")
    bad = [k for k, v in kwargs.items() if not isinstance(k, str) or k in _REFUSED_TIMM_KWARGS or not plain(v)]
    if bad:
        raise ValueError(
            f"{where}: timm_kwargs {bad} refused: keywords must be architecture settings with plain values "
            f"(numbers, strings, lists), not {sorted(_REFUSED_TIMM_KWARGS)}"
        )
    return {k: v for k, v in kwargs.items() if k != "num_classes"}  # the classifier is never built here


def save_timm_encoder(
    model: nn.Module,
    name: str,
    kwargs: Mapping,
    path: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
) -> Path:
    """Save a timm ViT, built as `timm.create_model(name, **kwargs)`, for `--enc-type timm:<name> --enc-ckpt PATH`.

    `mean` / `std`: the normalisation the encoder was trained with (on images in [0, 1]). The input size is
    recorded (img_size) even if `kwargs` leave it to timm's default, so the file fixes the token grid. The
    classifier head and num_classes are dropped. `.safetensors` paths get the state dict with the rest as
    metadata; other paths a torch.save'd dict (format in the section comment above). The file is checked
    against a model rebuilt from (name, kwargs) before it is written, so a wrong keyword fails here, not in
    the REPA run that loads it.
    """
    path = Path(path)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DistributedDataParallel wrapper
    kwargs = _check_timm_kwargs(kwargs, f"save_timm_encoder({name!r})")
    if "img_size" not in kwargs:
        size = tuple(model.patch_embed.img_size)
        kwargs["img_size"] = size[0] if size[0] == size[1] else list(size)
    mean, std = list(_three_floats(mean, "mean")), list(_three_floats(std, "std", positive=True))
    timm_spec(name, kwargs, mean, std)  # raises for unknown names, non-ViT models, refused keywords
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if k.split(".")[0] not in ("head", "head_drop")}
    with torch.device("meta"):
        twin = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if report := _mismatch_report(twin.state_dict(), state):
        raise ValueError(f"save_timm_encoder: the model's weights do not fit timm {name} with {kwargs}: {report}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = dict(timm_model=name, timm_kwargs=kwargs, mean=mean, std=std)
        save_file(
            state, str(path), metadata={"format": TIMM_FILE_FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
        )
    else:
        torch.save(dict(timm_model=name, timm_kwargs=kwargs, state_dict=state, mean=mean, std=std), path)
    return path


def _is_timm_file(raw) -> bool:
    return isinstance(raw, dict) and "timm_model" in raw


def _timm_file_spec(spec: EncoderSpec, raw: dict, source: str) -> tuple[EncoderSpec, dict]:
    """(spec of the file's architecture, its state dict) for a save_timm_encoder file given as --enc-ckpt."""
    model_name = raw.get("timm_model")
    if not spec.from_timm_name:
        raise ValueError(f"{source} is a timm encoder file ({model_name}): pass it with --enc-type timm:{model_name}")
    missing = [k for k in ("timm_model", "state_dict", "mean", "std") if k not in raw]
    if missing or not isinstance(model_name, str) or not isinstance(raw["state_dict"], dict):
        raise ValueError(
            f"{source}: a timm encoder file is a dict with timm_model (str), timm_kwargs, state_dict (dict), "
            f"mean, std; missing {missing}. Write it with models.encoders.save_timm_encoder."
        )
    if model_name.split(".")[0] != spec.timm_arch.split(".")[0]:  # tags (.lvd142m) only name weights
        raise ValueError(f"{source} holds timm {model_name}, not {spec.timm_arch}: pass --enc-type timm:{model_name}")
    resolved = timm_spec(model_name, raw.get("timm_kwargs") or {}, raw["mean"], raw["std"], source=source)
    return dataclasses.replace(resolved, name=spec.name), raw["state_dict"]


def parse_enc_type(enc_type: str | None) -> list[EncoderSpec]:
    """`"dinov2-vit-b,clip-vit-L,timm:vit_small_patch14_dinov2.lvd142m"` -> specs; `"none"` / `""` -> [].

    `timm:<model>` specs describe timm's default architecture; a save_timm_encoder file given with
    --enc-ckpt replaces it with its own (build_encoder), since only the file knows its keywords."""
    if enc_type is None or enc_type.strip().lower() in ("", "none"):
        return []
    specs = []
    for name in (n.strip() for n in enc_type.split(",")):
        if name.lower().startswith(TIMM_PREFIX):
            specs.append(timm_spec(name[len(TIMM_PREFIX) :].strip()))
        elif name.lower() in _BY_LOWER_NAME:
            specs.append(_BY_LOWER_NAME[name.lower()])
        else:
            raise ValueError(
                f"unknown encoder {name!r} in enc_type {enc_type!r}; known encoders: {', '.join(ENCODERS)}, "
                f"or {TIMM_PREFIX}<timm model name>"
            )
    return specs


#################################################################################
#                               The frozen encoder                              #
#################################################################################


class FrozenEncoder(nn.Module):
    """A frozen, eval-mode encoder: `encode(uint8 images)` -> REPA target patch tokens (N, T, D)."""

    def __init__(self, spec: EncoderSpec, model: nn.Module, resolution: int, weights_source: str):
        super().__init__()
        self.spec = spec
        self.model = model
        self.resolution = resolution
        self.grid = spec.grid(resolution)
        self.input_size = spec.input_size(resolution)
        self.embed_dim = spec.embed_dim
        self.weights_source = weights_source
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        self._gmacs: float | None = None

    def train(self, mode: bool = True) -> FrozenEncoder:
        # Frozen means no dropout / drop-path either: stay in eval whatever a training loop asks.
        return super().train(False)

    @property
    def has_class_token(self) -> bool:
        """Whether the encoder has a class token (sequence position 0): DINOv1/v2/v3, MoCo v3, CLIP, MAE and
        timm ViTs built with one do; I-JEPA and SigLIP 2 (average / attention-pooled heads) do not."""
        return self.spec.num_prefix_tokens > 0 and getattr(self.model, "cls_token", None) is not None

    @torch.no_grad()
    def encode(self, images: torch.Tensor, class_token: bool = False) -> torch.Tensor:
        """(N, 3, S, S) uint8 clean images -> (N, grid**2, embed_dim) patch tokens.

        S is the training resolution in the paper's runs (S = R); other sizes are resized to the encoder
        input like /14 ones are. Runs in the caller's autocast context (the training precision).
        `class_token=True` (REG) puts the class token in front: (N, 1 + grid**2, embed_dim), normalised by
        the final norm like the patch tokens (DINOv2's x_norm_clstoken), registers still dropped.
        """
        if class_token and not self.has_class_token:
            raise ValueError(
                f"{self.spec.name} has no class token, which REG (--cls > 0) entangles with the image; use an "
                "encoder with one (DINOv2, DINOv1, DINOv3, MoCo v3, CLIP, MAE)"
            )
        if images.dtype != torch.uint8:
            raise TypeError(
                f"{self.spec.name}.encode expects the clean uint8 image batch (0..255), got {images.dtype}; "
                "pass the raw image, not the VAE input or latents"
            )
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError(
                f"{self.spec.name}.encode expects square RGB images (N, 3, S, S), got {tuple(images.shape)}"
            )
        x = images.float() / 255.0
        x = (x - self.mean) / self.std
        if images.shape[-1] != self.input_size:
            # /14 encoders: 256 -> 224 (512 -> 448), bicubic without antialiasing as in REPA. Normalizing
            # before or after is the same: bicubic weights sum to 1, so a per-channel affine map commutes.
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        tokens = self.model.forward_features(x)  # (N, prefix + grid**2, D), the class token first
        patches = tokens[:, self.spec.num_prefix_tokens :]
        return torch.cat([tokens[:, :1], patches], dim=1) if class_token else patches

    def forward(self, images: torch.Tensor, class_token: bool = False) -> torch.Tensor:
        return self.encode(images, class_token=class_token)

    @torch.no_grad()
    def encode_with_attention(
        self, images: torch.Tensor, layers: Sequence[int], class_token: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`encode` plus HASTE's attention targets: for each 1-based block in `layers`, the attention
        distributions among the patch tokens, (N, heads, grid**2, grid**2) in float32, rows summing to 1.

        The distributions come from forward hooks on the blocks' `qkv` linears (q k^T / sqrt(head_dim) after the
        blocks' q/k norms), restricted to patch queries and keys and renormalised: softmax over the patch
        logits alone, which equals the full attention row without the class and register tokens, renormalised.
        No patched copy of the encoder is needed, and its own attention keeps its fused kernel.
        """
        blocks = getattr(self.model, "blocks", None)
        if type(self.model).__name__ != "VisionTransformer" or blocks is None:
            raise ValueError(
                f"{self.spec.name}: attention alignment reads plain timm ViT attention (DINOv2, DINOv1, MoCo v3, "
                f"CLIP, MAE); {type(self.model).__name__} (RoPE or pooled heads) is not supported"
            )
        bad = [layer for layer in layers if not 1 <= layer <= len(blocks)]
        if bad:
            raise ValueError(f"{self.spec.name} has blocks 1..{len(blocks)}; attention layers {bad} do not exist")
        prefix, captured, handles = self.spec.num_prefix_tokens, [], []

        def capture(attn):
            def hook(module, inputs, qkv):  # qkv: (N, T, 3 D)
                N, T, _ = qkv.shape
                q, k, _ = qkv.float().reshape(N, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
                q, k = attn.q_norm(q.to(qkv.dtype)).float(), attn.k_norm(k.to(qkv.dtype)).float()
                q, k = q[:, :, prefix:], k[:, :, prefix:]  # patch tokens only: (N, heads, grid**2, head_dim)
                captured.append((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1))

            return hook

        try:
            for layer in layers:
                attn = blocks[layer - 1].attn
                handles.append(attn.qkv.register_forward_hook(capture(attn)))
            tokens = self.encode(images, class_token=class_token)
        finally:
            for handle in handles:
                handle.remove()
        order = sorted(range(len(layers)), key=lambda i: layers[i])  # hooks fire in block order
        probs = [None] * len(layers)
        for position, i in enumerate(order):
            probs[i] = captured[position]
        return tokens, probs

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def gmacs_per_image(self) -> float:
        """Multiply-adds per image in billions (= the "Gflops" of DiT's tables), counted on a meta twin."""
        if self._gmacs is None:
            from torch.utils.flop_counter import FlopCounterMode

            with torch.device("meta"):
                twin = _create_model(self.spec, self.resolution)
                x = torch.empty(1, 3, self.input_size, self.input_size)
                with FlopCounterMode(display=False) as counter:
                    twin.forward_features(x)
            self._gmacs = counter.get_total_flops() / 2e9  # the counter reports 2 flops per multiply-add
        return self._gmacs

    def extra_repr(self) -> str:
        return (
            f"name={self.spec.name}, resolution={self.resolution}, input={self.input_size}px, "
            f"tokens={self.grid}x{self.grid}x{self.embed_dim}, weights={self.weights_source}"
        )


#################################################################################
#                                 Weight sources                                #
#################################################################################


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or env


def _weights_not_found(spec: EncoderSpec, reason: str) -> FileNotFoundError:
    """The error users see offline: which file to fetch, and the flag that takes a local copy."""
    lines = [f"{spec.name}: no pretrained weights available ({reason})."]
    if spec.hub_repo:
        lines.append(
            f"  - Hugging Face: fetch {spec.hub_repo} (file model.safetensors) on a machine with internet, "
            f"e.g. `hf download {spec.hub_repo} model.safetensors`, and copy that cache to {_hf_cache_dir()} "
            "(or point HF_HUB_CACHE at it)."
        )
    if spec.release_url:
        file = spec.release_url.rsplit("/", 1)[-1]
        lines.append(
            f"  - Official release: download {spec.release_url} and pass --enc-ckpt /path/to/{file} (or put it "
            f"in {Path(torch.hub.get_dir()) / 'checkpoints'})."
        )
    elif spec.release_note:
        label = "Weights" if spec.from_timm_name else "Official release"
        lines.append(f"  - {label}: {spec.release_note}; pass it with --enc-ckpt PATH.")
    lines.append("  (--enc-weights random trains against random-feature targets: for debugging only.)")
    return FileNotFoundError("\n".join(lines))


def _hub_file(spec: EncoderSpec, reasons: list[str]) -> Path | None:
    """The timm-format file from the Hugging Face cache, or the hub unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    filename = "model.safetensors"
    if _offline():
        cached = try_to_load_from_cache(spec.hub_repo, filename)
        if isinstance(cached, str):
            return Path(cached)
        reasons.append(f"HF_HUB_OFFLINE is set and {spec.hub_repo}/{filename} is not in {_hf_cache_dir()}")
        return None
    try:
        return Path(hf_hub_download(spec.hub_repo, filename))
    except Exception as err:  # network, auth, missing file: all end in the same advice
        reasons.append(f"downloading {spec.hub_repo}/{filename} failed: {err}")
        return None


def _release_file(spec: EncoderSpec, reasons: list[str]) -> Path | None:
    """The official release file from the torch hub cache, where torch.hub.load (the official REPA route
    for DINOv2) and timm keep URL weights; downloaded there unless HF_HUB_OFFLINE is set."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / spec.release_url.rsplit("/", 1)[-1]
    if path.is_file():
        return path
    if _offline():
        reasons.append(f"HF_HUB_OFFLINE is set and {path} does not exist")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(spec.release_url, str(path))
        return path
    except Exception as err:
        reasons.append(f"downloading {spec.release_url} failed: {err}")
        return None


def _is_torchscript(path: Path) -> bool:
    # OpenAI's CLIP release (ViT-L-14.pt) is a TorchScript archive: a zip with code/ and constants.pkl.
    # Only the zip's table of contents is read: nothing from the file is unpickled or run.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n or n.startswith("code/") for n in archive.namelist())


def _sniff(path: Path) -> tuple[str, bytes]:
    """("empty" | "zip" | "pickle" | "safetensors" | "unknown", first bytes) of a file; nothing is loaded."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty", head
    if head.startswith(b"PK\x03\x04"):
        return "zip", head
    if head[:1] == b"\x80":
        return "pickle", head
    if len(head) > 8 and head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "safetensors", head
    return "unknown", head


def _file_kind(path: Path) -> str:
    """What the first bytes of a weights file say it is, for error messages."""
    kind, head = _sniff(path)
    if kind == "empty":
        return "it is empty (0 bytes)"
    if kind == "unknown":
        return f"it starts with {head[:8]!r}, which is neither a safetensors header nor a torch.save file"
    named_safetensors = path.suffix == ".safetensors"
    described = {
        "zip": "a zip archive (torch.save's format)",
        "pickle": "a Python pickle (an old torch.save format)",
        "safetensors": "a safetensors file",
    }[kind]
    if (kind == "safetensors") == named_safetensors:
        return f"it starts like {described}, so it is probably truncated or damaged"
    return f"it starts like {described}: name it {'.pt' if named_safetensors else '.safetensors'} if that is what it is"


def _read_safetensors(path: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as archive:
            meta = archive.metadata() or {}
        state = load_file(str(path))
    except Exception as err:  # SafetensorError (empty, truncated, another format), OSError
        raise ValueError(
            f"weights file {path} is not a readable .safetensors file ({type(err).__name__}: {err}); "
            f"{_file_kind(path)}. It is never loaded as any other format; fetch or save it again"
        ) from err
    if meta.get("format") != TIMM_FILE_FORMAT:
        return state
    try:  # a save_timm_encoder file: the same dict as its torch form (JSON only: nothing runs)
        info = {k: json.loads(meta[k]) for k in ("timm_model", "timm_kwargs", "mean", "std")}
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"--enc-ckpt {path}: broken {TIMM_FILE_FORMAT} metadata ({err!r})") from err
    return {**info, "state_dict": state}


def read_checkpoint(path: str | Path) -> dict:
    """Load a weights file without running code from it: safetensors or a weights-only torch file.

    TorchScript archives are refused: torch.jit.load runs the Python code stored in the archive while it
    loads, so a weights file could run anything on the training machine. A file that cannot be read (empty,
    truncated, another format under the name) is refused naming its path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--enc-ckpt {path} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        torchscript = _is_torchscript(path)
    except (zipfile.BadZipFile, OSError, ValueError) as err:  # a damaged zip directory
        raise ValueError(f"weights file {path} is a damaged zip archive ({err}); fetch or save it again") from err
    if torchscript:
        raise ValueError(
            f"{path} is a TorchScript archive (as OpenAI's CLIP release ViT-L-14.pt is): loading one runs the code "
            "stored inside it, so it is refused. Convert it to a state dict on a trusted machine with the "
            "official tools (github.com/openai/CLIP: `model, _ = clip.load('ViT-L/14', device='cpu', jit=False); "
            "torch.save(model.state_dict(), 'ViT-L-14.pth')`) and pass that .pth with --enc-ckpt, or pass a "
            ".safetensors state dict (for CLIP ViT-L/14: model.safetensors of timm/vit_large_patch14_clip_224.openai)."
        )
    try:
        # MAE / DeiT-style checkpoints may carry their argparse.Namespace; allow that one class only.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower() or _sniff(path)[0] not in ("zip", "pickle"):
            detail = str(err).strip().splitlines()[0][:200]
            raise ValueError(
                f"weights file {path} is not a readable torch file ({detail}); {_file_kind(path)}"
            ) from err
        raise ValueError(
            f"--enc-ckpt {path}: holds Python objects that a weights-only load refuses ({err}). If you "
            "trust the file, re-save only its state dict: torch.save(<state dict>, 'weights.pth')."
        ) from err
    except Exception as err:  # EOFError (empty), RuntimeError (truncated zip), KeyError / ValueError (garbage)
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ValueError(
            f"weights file {path} is not a readable torch file ({type(err).__name__}{': ' + detail if detail else ''}); "
            f"{_file_kind(path)}. Fetch or save it again"
        ) from err


def _fetch_weights(spec: EncoderSpec, ckpt_path: str | Path | None) -> tuple[dict, str]:
    """(raw checkpoint object, human-readable source): --enc-ckpt, else HF cache/hub, else release file."""
    if ckpt_path:
        return read_checkpoint(ckpt_path), f"--enc-ckpt {ckpt_path}"
    reasons: list[str] = []
    if spec.hub_repo and (path := _hub_file(spec, reasons)):
        return read_checkpoint(path), f"hub {spec.hub_repo}"
    if spec.release_url and (path := _release_file(spec, reasons)):
        return read_checkpoint(path), f"release file {path}"
    raise _weights_not_found(spec, "; ".join(reasons) or "it has no public download")


def _mismatch_report(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """Every missing / unexpected / misshaped key ("" when `state` fits); pooling parts are not compared."""
    state = {k: v for k, v in state.items() if k in expected or k.split(".")[0] not in _POOLING_PARTS}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or misshaped):
        return ""

    def listing(keys: list[str]) -> str:
        return f"{len(keys)} {keys[:8]}{' ...' if len(keys) > 8 else ''}"

    return f"missing {listing(missing)}; unexpected {listing(unexpected)}; wrong shape {listing(misshaped)}"


def _load_matching(model: nn.Module, spec: EncoderSpec, raw: dict, source: str, resample: bool = True) -> None:
    """Convert `raw` to the model's keys and load it, naming every missing / unexpected / misshaped key.

    resample=False (a save_timm_encoder file, which fixes its img_size): a pos_embed of another grid is
    refused instead of resampled. Non-finite weights are refused (they would make every target NaN)."""
    state = spec.convert(raw)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        top = list(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{source}: not a {spec.name} state dict (top-level keys: {top})")
    if not resample:
        _check_pos_embed_grid(model, state, source)
    # timm's filters: DINOv2 / OpenAI-CLIP / DINOv3 key conversion and pos_embed resampling to our grid.
    if isinstance(model, timm_eva.Eva):
        state = timm_eva.checkpoint_filter_fn(dict(state), model)
    elif isinstance(model, timm_vit.VisionTransformer):
        state = timm_vit.checkpoint_filter_fn(dict(state), model)
    if report := _mismatch_report(model.state_dict(), state):
        arch = f"timm {spec.timm_arch}" + (f" with {dict(spec.timm_kwargs)}" if spec.timm_kwargs else "")
        raise ValueError(f"{source}: checkpoint keys do not match {spec.name} ({arch}): {report}")
    state = {k: v for k, v in state.items() if k in model.state_dict()}
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(
                f"{source}: weight {key} holds non-finite values (NaN or inf): every target token would be NaN and "
                "every training step skipped; the file is damaged (fetch or save it again)"
            )
    model.load_state_dict(state, strict=True)


def _check_pos_embed_grid(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """A save_timm_encoder file's pos_embed must be its img_size's: such a file is never resampled."""
    expected, found = getattr(model, "pos_embed", None), state.get("pos_embed")
    if not isinstance(expected, torch.Tensor) or found is None or found.shape == expected.shape:
        return
    patch = model.patch_embed.patch_size[0]
    img_size = tuple(model.patch_embed.img_size)
    grid = tuple(model.patch_embed.grid_size)
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    positions = found.shape[-2] - prefix if found.ndim == 3 else -1
    side = math.isqrt(positions) if positions > 0 else 0
    held = (
        f"a {side}x{side} patch grid, {side * patch} px at patch {patch}"
        if side * side == positions
        else "no square patch grid"
    )
    fix = f"save it again with img_size {side * patch}" if side * side == positions else "save it again"
    raise ValueError(
        f"{source}: its pos_embed {tuple(found.shape)} holds {held}, but its img_size {img_size[0]} gives a "
        f"{grid[0]}x{grid[1]} grid (pos_embed {tuple(expected.shape)}); a save_timm_encoder file is used at the size "
        f"it was trained at and is never resampled: {fix} (the size its weights were trained at)"
    )


#################################################################################
#                                    Loading                                    #
#################################################################################


def _create_model(spec: EncoderSpec, resolution: int) -> nn.Module:
    """The timm architecture at this resolution's input size (unless timm_kwargs fix img_size), no classifier.

    Registry entries also drop the pooling (global_pool=""); `timm:` models keep theirs, since it decides
    which final norm timm builds (`norm` for token pooling, `fc_norm` after average pooling) and so the
    keys of their checkpoints; their targets are timm's `forward_features`, whatever it applies."""
    kwargs = dict(img_size=spec.input_size(resolution), num_classes=0)
    if not spec.from_timm_name:
        kwargs["global_pool"] = ""
    return timm.create_model(spec.timm_arch, pretrained=False, **{**kwargs, **spec.timm_kwargs})


def _check_registry_entry(spec: EncoderSpec, model: nn.Module) -> None:
    # A typo in the registry would silently shift tokens or the projector width: compare with timm.
    found = (model.embed_dim, model.patch_embed.patch_size[0], model.num_prefix_tokens)
    declared = (spec.embed_dim, spec.patch_size, spec.num_prefix_tokens)
    if found != declared:
        raise RuntimeError(
            f"registry entry {spec.name} declares (embed_dim, patch_size, num_prefix_tokens)={declared} but "
            f"timm {spec.timm_arch} has {found}"
        )


def _check_token_grid(spec: EncoderSpec, model: nn.Module, resolution: int) -> None:
    # One target token per SiT token (REPA aligns token i with token i). Registry entries and timm names
    # without a file are built at grid * patch px and always pass; a save_timm_encoder file fixes its
    # img_size, and is not resampled silently to another grid: it was trained at that one.
    grid, found = spec.grid(resolution), tuple(model.patch_embed.grid_size)
    if found != (grid, grid):
        size = tuple(model.patch_embed.img_size)
        raise ValueError(
            f"encoder {spec.name}: its patch grid is {found[0]}x{found[1]} (img_size {size[0]}, patch {spec.patch_size}) "
            f"but the SiT token grid is {grid}x{grid} (encoder resolution {resolution} = 16 x grid; train.py "
            f"derives it as SiT input side / SiT patch). Pick a SiT patch size giving {found[0]}x{found[1]} "
            f"tokens, or an encoder trained at img_size {grid * spec.patch_size}"
        )


def build_encoder(
    spec: EncoderSpec,
    device: str | torch.device,
    resolution: int,
    ckpt_path: str | Path | None = None,
    enc_weights: str = "pretrained",
) -> FrozenEncoder:
    """One frozen encoder whose token grid is resolution // 16 per side.

    Device "meta" builds shapes only (needs enc_weights="random").
    """
    if not isinstance(resolution, int) or resolution < 16 or resolution % 16:
        raise ValueError(
            f"resolution {resolution!r} is not supported: it sets the encoder token grid to resolution / 16 per "
            f"side (16x16 at 256 px, 32x32 at 512 px, matching SiT/2), so it must be a positive multiple of 16; "
            f"the paper's settings are {PAPER_RESOLUTIONS}"
        )
    if enc_weights not in WEIGHT_CHOICES:
        raise ValueError(f"enc_weights {enc_weights!r} is not one of {WEIGHT_CHOICES}")
    device = torch.device(device)
    if enc_weights == "random" and ckpt_path:
        raise ValueError(f"{spec.name}: --enc-ckpt {ckpt_path} given together with --enc-weights random")
    if device.type == "meta" and enc_weights != "random":
        raise ValueError(f"{spec.name}: device 'meta' builds shapes only; pass enc_weights='random'")
    if resolution not in PAPER_RESOLUTIONS:
        logger.warning(
            "encoder %s at resolution %d (%dx%d tokens) is not a paper setting %s: fine for demos, not for "
            "reproducing REPA",
            spec.name,
            resolution,
            resolution // 16,
            resolution // 16,
            PAPER_RESOLUTIONS,
        )

    # Resolve weights before building: offline errors come at once, not after a 1B-parameter init.
    raw, source = _fetch_weights(spec, ckpt_path) if enc_weights == "pretrained" else (None, "RANDOM")
    timm_file = _is_timm_file(raw)
    if timm_file:  # save_timm_encoder's file: its own architecture keywords and mean/std
        spec, raw = _timm_file_spec(spec, raw, source)
    with torch.device("meta" if device.type == "meta" else "cpu"):
        model = _create_model(spec, resolution)
    _check_registry_entry(spec, model)
    _check_token_grid(spec, model, resolution)
    if raw is not None:
        _load_matching(model, spec, raw, source, resample=not timm_file)
    else:
        message = (
            f"encoder {spec.name} has RANDOM weights (--enc-weights random): its alignment targets carry no "
            "pretrained representation. Use this for debugging only."
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        logger.warning(message)
    if not spec.final_norm:
        model.norm = nn.Identity()
    return FrozenEncoder(spec, model, resolution, source).to(device)


def encoder_resolution(grid: int) -> int:
    """The encoders' `resolution` setting whose token grid is grid x grid: resolution / 16 per side (the
    "256 px" setting of every encoder gives 16 x 16 tokens, as SiT-XL/2 on 32 x 32 latents has)."""
    return 16 * grid


def load_encoders(
    enc_type: str | None,
    device: str | torch.device,
    resolution: int,
    ckpt_path: str | Path | Sequence[str | Path | None] | None = None,
    enc_weights: str = "pretrained",
) -> list[FrozenEncoder]:
    """Frozen encoders for `--enc-type` (comma-separated names), in that order.

    ckpt_path: None, one path (one encoder), or one entry per encoder (None / "" = default source); a
    comma-separated string is split like enc_type.
    """
    specs = parse_enc_type(enc_type)
    if ckpt_path is None or ckpt_path == "":
        paths = [None] * len(specs)
    elif isinstance(ckpt_path, (str, Path)):
        paths = str(ckpt_path).split(",") if len(specs) > 1 else [ckpt_path]
    else:
        paths = list(ckpt_path)
    if len(paths) != len(specs):
        raise ValueError(
            f"--enc-ckpt gives {len(paths)} path(s) for {len(specs)} encoder(s) {[s.name for s in specs]}; "
            "give one per encoder (empty for the default source)"
        )
    encoders = []
    for spec, path in zip(specs, paths):
        encoder = build_encoder(spec, device, resolution, ckpt_path=path or None, enc_weights=enc_weights)
        encoders.append(encoder)
        if not logger.isEnabledFor(logging.INFO):
            continue  # counting flops builds a meta twin: only worth it when the line is shown
        logger.info(
            "encoder %s: timm %s, weights %s; %.1fM params, %.2f GMACs/image; %dpx in -> %dx%d tokens x %d",
            encoder.spec.name,
            encoder.spec.timm_arch,
            encoder.weights_source,
            encoder.num_params / 1e6,
            encoder.gmacs_per_image(),
            encoder.input_size,
            encoder.grid,
            encoder.grid,
            encoder.embed_dim,
        )
    return encoders
