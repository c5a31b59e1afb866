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
safetensors file; never TorchScript, whose loading runs code from the file), else the Hugging Face cache / hub copy (honours HF_HUB_OFFLINE), else the official
release URL through the torch hub cache. Random weights only when asked for (`--enc-weights random`).
"""

from __future__ import annotations

import argparse
import logging
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


def parse_enc_type(enc_type: str | None) -> list[EncoderSpec]:
    """`"dinov2-vit-b,clip-vit-L"` -> specs; `"none"` / `""` -> [] (vanilla SiT, no alignment)."""
    if enc_type is None or enc_type.strip().lower() in ("", "none"):
        return []
    specs = []
    for name in (n.strip() for n in enc_type.split(",")):
        if name.lower() not in _BY_LOWER_NAME:
            raise ValueError(
                f"unknown encoder {name!r} in enc_type {enc_type!r}; known encoders: {', '.join(ENCODERS)}"
            )
        specs.append(_BY_LOWER_NAME[name.lower()])
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

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 clean images -> (N, grid**2, embed_dim) patch tokens.

        S is the training resolution in the paper's runs (S = R); other sizes are resized to the encoder
        input like /14 ones are. Runs in the caller's autocast context (the training precision).
        """
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
        tokens = self.model.forward_features(x)  # (N, prefix + grid**2, D)
        return tokens[:, self.spec.num_prefix_tokens :]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)

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
        lines.append(f"  - Official release: {spec.release_note}; pass it with --enc-ckpt PATH.")
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


def read_checkpoint(path: str | Path) -> dict:
    """Load a weights file without running code from it: safetensors or a weights-only torch file.

    TorchScript archives are refused: torch.jit.load runs the Python code stored in the archive while it
    loads, so a weights file could run anything on the training machine."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--enc-ckpt {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
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
        raise ValueError(
            f"--enc-ckpt {path}: holds Python objects that a weights-only load refuses ({err}). If you "
            "trust the file, re-save only its state dict: torch.save(<state dict>, 'weights.pth')."
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


def _load_matching(model: nn.Module, spec: EncoderSpec, raw: dict, source: str) -> None:
    """Convert `raw` to the model's keys and load it, naming every missing / unexpected / misshaped key."""
    state = spec.convert(raw)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        top = list(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{source}: not a {spec.name} state dict (top-level keys: {top})")
    # timm's filters: DINOv2 / OpenAI-CLIP / DINOv3 key conversion and pos_embed resampling to our grid.
    timm_filter = timm_eva.checkpoint_filter_fn if isinstance(model, timm_eva.Eva) else timm_vit.checkpoint_filter_fn
    state = timm_filter(dict(state), model)
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or k.split(".")[0] not in _POOLING_PARTS}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or misshaped:

        def listing(keys: list[str]) -> str:
            return f"{len(keys)} {keys[:8]}{' ...' if len(keys) > 8 else ''}"

        raise ValueError(
            f"{source}: checkpoint keys do not match {spec.name} (timm {spec.timm_arch}): "
            f"missing {listing(missing)}; unexpected {listing(unexpected)}; wrong shape {listing(misshaped)}"
        )
    model.load_state_dict(state, strict=True)


#################################################################################
#                                    Loading                                    #
#################################################################################


def _create_model(spec: EncoderSpec, resolution: int) -> nn.Module:
    """The timm architecture at this resolution's input size, without classifier or pooling head."""
    kwargs = dict(img_size=spec.input_size(resolution), num_classes=0, global_pool="")
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
    with torch.device("meta" if device.type == "meta" else "cpu"):
        model = _create_model(spec, resolution)
    _check_registry_entry(spec, model)
    if raw is not None:
        _load_matching(model, spec, raw, source)
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
            spec.name,
            spec.timm_arch,
            encoder.weights_source,
            encoder.num_params / 1e6,
            encoder.gmacs_per_image(),
            encoder.input_size,
            encoder.grid,
            encoder.grid,
            encoder.embed_dim,
        )
    return encoders
