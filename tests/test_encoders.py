"""Frozen encoders: registry shapes, official-format round trips against reference forwards, offline errors.

Pretrained weights cannot be fetched in CI, so every round trip writes random weights in the official
release format, loads them through the public loader, and compares with a reference forward that is
written here independently (preprocessing included). Mean/std and token layouts are typed here on purpose:
they are the facts under test, not values imported from the module.
"""

import dataclasses
import json
import math
import subprocess
import sys
import warnings
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from models import encoders
from models.encoders import ENCODERS, FrozenEncoder, build_encoder, load_encoders

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
PAPER_NAMES = [
    *(f"dinov2-vit-{s}" for s in "sblg"),
    *(f"dinov2reg-vit-{s}" for s in "sblg"),
    "dinov1-vit-b",
    *(f"mocov3-vit-{s}" for s in "sbl"),
    "clip-vit-L",
    "mae-vit-l",
    "jepa-vit-h",
]
TINY = dict(depth=2, embed_dim=64, num_heads=4)


@pytest.fixture(autouse=True)
def _quiet_random_weight_warnings():
    # Meta / random builds warn on purpose; the warning itself is tested in test_random_weights_warn.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        yield


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches, offline: nothing can be found unless a test puts it there."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    return tmp_path


def tiny(spec, **overrides):
    """The same family and token layout at 2 blocks of width 64: real numbers on the CPU in milliseconds."""
    kwargs = {**spec.timm_kwargs, **TINY, **overrides}
    return dataclasses.replace(spec, timm_kwargs=kwargs, embed_dim=kwargs["embed_dim"])


def randomize_(model, seed=0):
    """Non-trivial values everywhere (layer scales ~1, not timm's 1e-5), so every parameter shows in tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if (isinstance(module, nn.LayerNorm) and name == "weight") or name.startswith("gamma"):
                    p.copy_(1 + 0.2 * noise)
                elif any(s in name for s in ("pos", "token", "class_embedding")) or p.ndim < 2:
                    p.copy_(0.5 * noise)
                else:
                    p.copy_(noise / math.sqrt(p[0].numel()))  # unit-variance outputs per layer
    return model


def images(n, resolution, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, resolution, resolution), generator=g, dtype=torch.uint8)


def preprocess(x, mean_std, size, resize_first=False):
    """REPA's recipe: /255, normalize, bicubic resize (CLIP's official code resizes before normalizing)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)
    x = x.float() / 255.0
    resize = lambda t: t if t.shape[-1] == size else F.interpolate(t, size=size, mode="bicubic")
    return (resize(x) - mean) / std if resize_first else resize((x - mean) / std)


def timm_reference(spec, native_size, seed=0):
    """timm's own architecture at the release's native size; pos_embed is resampled on the fly."""
    model = timm.create_model(
        spec.timm_arch, num_classes=0, img_size=native_size, dynamic_img_size=True, **spec.timm_kwargs
    )
    return randomize_(model, seed).eval()


def reference_tokens(model, x, prefix, final_norm=True):
    if not final_norm:
        model.norm = nn.Identity()
    with torch.no_grad():
        return model.forward_features(x)[:, prefix:]


#################################################################################
#                                 Registry                                      #
#################################################################################


def test_registry_has_every_paper_encoder():
    assert set(PAPER_NAMES) <= set(ENCODERS)
    # Projector widths the SiT is built with (z_dim): the paper's DINOv2-B target is 256 x 768.
    dims = {"dinov2-vit-b": 768, "dinov2-vit-l": 1024, "dinov2-vit-g": 1536, "clip-vit-L": 1024}
    dims |= {"mae-vit-l": 1024, "jepa-vit-h": 1280, "mocov3-vit-s": 384, "dinov1-vit-b": 768}
    assert {name: ENCODERS[name].embed_dim for name in dims} == dims


@pytest.mark.parametrize("resolution", [256, 512])
@pytest.mark.parametrize("name", list(ENCODERS))
def test_token_grid_for_every_encoder(name, resolution):
    # One block is enough for the token layout (grid, prefix tokens, width); meta tensors hold no data.
    # build_encoder also checks the entry's embed_dim / patch / prefix count against the timm model.
    spec = dataclasses.replace(ENCODERS[name], timm_kwargs={**ENCODERS[name].timm_kwargs, "depth": 1})
    encoder = build_encoder(spec, "meta", resolution, enc_weights="random")
    grid = resolution // 16
    assert encoder.input_size == grid * spec.patch_size  # 224 / 448 for /14, 256 / 512 for /16
    if spec.patch_size == 14:
        assert encoder.input_size == 224 * (resolution // 256)
    tokens = encoder.encode(torch.empty(2, 3, resolution, resolution, dtype=torch.uint8, device="meta"))
    assert tuple(tokens.shape) == (2, grid * grid, spec.embed_dim)


def test_full_size_architecture_facts():
    # Built at full depth on the meta device: parameter counts and the details REPA's targets depend on.
    def meta(name):
        return build_encoder(ENCODERS[name], "meta", 256, enc_weights="random")

    # DINOv2's 86.6M (ViT-B) / 1.136B (ViT-g) count a 37x37 pos_embed; ours holds the 16x16 grid.
    grid_shrink = (37 * 37 - 16 * 16) + 1  # pos_embed rows dropped, plus the mask_token we do not keep
    assert meta("dinov2-vit-b").num_params == pytest.approx(86.58e6 - grid_shrink * 768, rel=2e-3)
    assert meta("dinov2-vit-g").num_params == pytest.approx(1.1365e9 - grid_shrink * 1536, rel=2e-3)
    mocov3 = meta("mocov3-vit-s").model
    assert mocov3.blocks[0].attn.num_heads == 12  # MoCo v3 ViT-S: 12 heads of 32, not timm's 6
    clip = meta("clip-vit-L").model
    x = torch.linspace(-3, 3, 7)
    act = clip.blocks[0].mlp.act
    torch.testing.assert_close(act.to_empty(device="cpu")(x), x * torch.sigmoid(1.702 * x))  # QuickGELU
    assert isinstance(clip.norm, nn.Identity)  # no ln_post on CLIP targets


def test_gmacs_match_vit_formula():
    # ViT-B/14 at 224: T = 257 tokens, D = 768, 12 blocks: 12 T D^2 (qkv, proj, MLP) + 2 T^2 D (attention).
    encoder = build_encoder(ENCODERS["dinov2-vit-b"], "meta", 256, enc_weights="random")
    t, d = 257, 768
    macs = 12 * (12 * t * d * d + 2 * t * t * d) + 256 * d * 3 * 14 * 14
    assert encoder.gmacs_per_image() == pytest.approx(macs / 1e9, rel=1e-3)


#################################################################################
#                  Official release formats -> same tokens as reference         #
#################################################################################


def dinov2_official(state, registers=False):
    """timm keys -> the official DINOv2 release layout (pos_embed with a CLS slot, mask_token, ...)."""
    out = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in state.items()}
    dim = state["cls_token"].shape[-1]
    if registers:
        # Official: registers carry no position; CLS gets pos_embed[:, 0]. timm folds that into cls_token.
        pos_cls = torch.randn(1, 1, dim)
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = state["cls_token"] - pos_cls
        out["pos_embed"] = torch.cat([pos_cls, state["pos_embed"]], dim=1)
    out["mask_token"] = torch.zeros(1, dim)
    return out


@pytest.mark.parametrize(
    "name, resolution", [("dinov2-vit-s", 256), ("dinov2reg-vit-s", 256), ("dinov2reg-vit-s", 512)]
)
def test_dinov2_official_checkpoint_round_trip(tmp_path, name, resolution):
    # Narrow and shallow for CPU time, but the release's 518 px geometry: a 37x37 pos_embed to resample.
    spec = tiny(ENCODERS[name])
    registers = "reg" in name
    reference = timm_reference(spec, native_size=518)
    official = dinov2_official(reference.state_dict(), registers)
    assert official["pos_embed"].shape == (1, 1 + 37 * 37, 64)  # 518 / 14 = 37, plus the CLS slot
    assert "blocks.0.ls1.gamma" in official and "mask_token" in official
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)

    encoder = build_encoder(spec, "cpu", resolution, ckpt_path=path)
    x = images(2, resolution)
    # x_norm_patchtokens: final norm, without the CLS token and the 4 registers.
    want = reference_tokens(reference, preprocess(x, IMAGENET, 224 * resolution // 256), 1 + 4 * registers)
    got = encoder.encode(x)
    assert got.shape == (2, (resolution // 16) ** 2, 64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dinov2_giant_swiglu_keys(tmp_path):
    # ViT-g stores its SwiGLU as mlp.w12 / mlp.w3 in the official file.
    spec = tiny(ENCODERS["dinov2-vit-g"], embed_dim=96)  # SwiGLU hidden 96 * 16/3 = 512 must be even
    reference = timm_reference(spec, native_size=518)
    official = dinov2_official(reference.state_dict(), registers=False)
    assert "blocks.0.mlp.w12.weight" in official
    torch.save(official, tmp_path / "dinov2_vitg14_pretrain.pth")
    encoder = build_encoder(spec, "cpu", 256, ckpt_path=tmp_path / "dinov2_vitg14_pretrain.pth")
    x = images(2, 256)
    want = reference_tokens(reference, preprocess(x, IMAGENET, 224), prefix=1)
    torch.testing.assert_close(encoder.encode(x), want, rtol=1e-4, atol=1e-4)


def mocov3_release(state):
    # vit-s-300ep.pth.tar: base/momentum encoders and predictor under DDP prefixes, projector as `head`.
    noise = {k: torch.randn_like(v) for k, v in state.items()}
    return {
        "epoch": 300,
        "arch": "vit_small",
        "state_dict": {
            **{f"module.base_encoder.{k}": v for k, v in state.items()},
            "module.base_encoder.head.0.weight": torch.randn(32, 64),
            **{f"module.momentum_encoder.{k}": v for k, v in noise.items()},
            "module.predictor.0.weight": torch.randn(32, 32),
        },
    }


def ijepa_release(state):
    # REPA aligns to the online `encoder`; a different `target_encoder` must not be picked up.
    return {
        "encoder": {f"module.{k}": v for k, v in state.items()},
        "target_encoder": {f"module.{k}": torch.randn_like(v) for k, v in state.items()},
        "predictor": {"module.predictor_embed.weight": torch.randn(32, 64)},
        "epoch": 300,
    }


def dino_full_checkpoint(state):
    # dino_vitbase16_pretrain_full_checkpoint.pth: the teacher backbone, DDP-wrapped, with DINO's head.
    return {
        "teacher": {
            **{f"module.backbone.{k}": v for k, v in state.items()},
            "module.head.last_layer.weight_g": torch.ones(8, 1),
        },
        "student": {f"module.backbone.{k}": torch.randn_like(v) for k, v in state.items()},
    }


# name -> (release file writer, file name, native size of the release, mean/std, prefix tokens, final norm)
RELEASES = {
    "dinov1-vit-b": (lambda s: s, "dino_vitbase16_pretrain.pth", 224, IMAGENET, 1, True),
    "dinov1-vit-b/full": (dino_full_checkpoint, "dino_full_checkpoint.pth", 224, IMAGENET, 1, True),
    "mocov3-vit-s": (mocov3_release, "vit-s-300ep.pth.tar", 224, IMAGENET, 1, True),
    "mae-vit-l": (lambda s: {"model": s}, "mae_pretrain_vit_large.pth", 224, IMAGENET, 1, False),
    "jepa-vit-h": (ijepa_release, "IN1K-vit.h.14-300e.pth.tar", 224, IMAGENET, 0, True),
    "dinov3-vit-s": (lambda s: s, "dinov3_s.safetensors", 256, IMAGENET, 5, True),
    "siglip2-vit-b": (lambda s: s, "siglip2_b.safetensors", 256, HALF, 0, True),
}


# 512 px where the pos_embed resampling differs: /16 with a CLS slot, /14 without one, /16 without one.
CASES = [(release, 256) for release in RELEASES] + [(r, 512) for r in ("mocov3-vit-s", "jepa-vit-h", "siglip2-vit-b")]


@pytest.mark.parametrize("release, resolution", CASES)
def test_release_format_round_trip(tmp_path, release, resolution):
    writer, filename, native, mean_std, prefix, final_norm = RELEASES[release]
    spec = tiny(ENCODERS[release.split("/")[0]])
    reference = timm_reference(spec, native)
    path = tmp_path / filename
    if filename.endswith(".safetensors"):
        save_file(reference.state_dict(), str(path))  # timm format, pooling head (SigLIP MAP) included
    else:
        torch.save(writer(reference.state_dict()), path)

    encoder = build_encoder(spec, "cpu", resolution, ckpt_path=path)
    x = images(2, resolution)
    want = reference_tokens(reference, preprocess(x, mean_std, spec.input_size(resolution)), prefix, final_norm)
    got = encoder.encode(x)
    assert got.shape == (2, (resolution // 16) ** 2, 64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mocov3_key_fixes_of_repa_vit_l_file():
    t = torch.zeros(1)
    raw = {"state_dict": {"module.base_encoder.blocks.13.norm13.weight": t, "module.base_encoder.fc.0": t}}
    raw["state_dict"]["module.base_encoder.blocks.14.mlp.fc14.bias"] = t
    assert set(encoders._from_mocov3(raw)) == {"blocks.13.norm1.weight", "blocks.14.mlp.fc2.bias"}


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class OpenAIBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        mlp = [("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]
        self.mlp = nn.Sequential(OrderedDict(mlp))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenAIVisual(nn.Module):
    """OpenAI CLIP's image tower as REPA runs it: tokens after the transformer, before ln_post / proj."""

    def __init__(self, width=64, layers=2, heads=4, patch=14, grid=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[OpenAIBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, 32))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (N, 256, D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        return self.transformer.resblocks(x)[:, 1:]


class OpenAICLIP(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = OpenAIVisual()
        self.logit_scale = nn.Parameter(torch.ones([]))  # text-side keys must be ignored

    def forward(self, x):
        return self.visual(x)


def test_clip_openai_release_round_trip(tmp_path):
    # OpenAI's release is TorchScript (refused below); its state dict, as clip.load(jit=False) gives it, loads.
    clip = randomize_(OpenAICLIP()).eval()
    x = images(2, 256)
    pixels = preprocess(x, CLIP, 224, resize_first=True)  # the order of REPA's CLIP preprocessing
    path = tmp_path / "ViT-L-14.pth"
    torch.save(clip.state_dict(), path)

    encoder = build_encoder(tiny(ENCODERS["clip-vit-L"]), "cpu", 256, ckpt_path=path)
    with torch.no_grad():
        want = clip(pixels)
    torch.testing.assert_close(encoder.encode(x), want, rtol=1e-4, atol=1e-4)


def test_torchscript_archive_is_refused_before_loading(tmp_path, monkeypatch):
    # torch.jit.load runs the code stored in an archive while loading it: a weights file must never get
    # that far. OpenAI's real ViT-L-14.pt is such an archive.
    clip = randomize_(OpenAICLIP()).eval()
    pixels = preprocess(images(1, 256), CLIP, 224, resize_first=True)
    path = tmp_path / "ViT-L-14.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(clip, pixels, check_trace=False), str(path))

    def run_archive(*args, **kwargs):
        raise AssertionError("the archive was loaded (its code would have run)")

    monkeypatch.setattr(torch.jit, "load", run_archive)
    monkeypatch.setattr(torch, "load", run_archive)
    with pytest.raises(ValueError, match=r"ViT-L-14.pt is a TorchScript archive.*runs the code") as info:
        build_encoder(tiny(ENCODERS["clip-vit-L"]), "cpu", 256, ckpt_path=path)
    for advice in ("trusted machine", "state_dict()", "--enc-ckpt", ".safetensors"):
        assert advice in str(info.value)


#################################################################################
#                      Weight sources, offline behaviour, errors                #
#################################################################################


def test_hub_cache_is_used_offline(offline_caches):
    # A timm-format file in the Hugging Face cache layout (as `hf download` leaves it), DINOv2 at 518 px.
    spec = tiny(ENCODERS["dinov2-vit-s"])
    reference = timm_reference(spec, native_size=518)
    repo = offline_caches / "hf" / ("models--" + spec.hub_repo.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(reference.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))

    encoder = build_encoder(spec, "cpu", 256)
    assert encoder.weights_source == f"hub {spec.hub_repo}"
    x = images(2, 256)
    want = reference_tokens(reference, preprocess(x, IMAGENET, 224), prefix=1)
    torch.testing.assert_close(encoder.encode(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mocov3-vit-b", "dinov2-vit-b"])
def test_release_file_in_torch_hub_cache_is_used_offline(offline_caches, name):
    # MoCo v3 has no hub copy; DINOv2's release file sits where REPA's torch.hub.load route left it,
    # and is found although the Hugging Face cache is empty.
    spec = tiny(ENCODERS[name])
    native, size, writer = (224, 256, mocov3_release) if "moco" in name else (518, 224, dinov2_official)
    reference = timm_reference(spec, native_size=native)
    filename = spec.release_url.rsplit("/", 1)[-1]
    (offline_caches / "torch" / "checkpoints").mkdir(parents=True)
    torch.save(writer(reference.state_dict()), offline_caches / "torch" / "checkpoints" / filename)
    encoder = build_encoder(spec, "cpu", 256)
    assert encoder.weights_source.startswith("release file") and filename in encoder.weights_source
    x = images(1, 256)
    want = reference_tokens(reference, preprocess(x, IMAGENET, size), prefix=1)
    torch.testing.assert_close(encoder.encode(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name, needles",
    [
        ("dinov2-vit-b", ["timm/vit_base_patch14_dinov2.lvd142m", "model.safetensors", "dinov2_vitb14_pretrain.pth"]),
        ("mocov3-vit-b", ["vit-b-300ep.pth.tar"]),
        ("jepa-vit-h", ["IN1K-vit.h.14-300e.pth.tar"]),
        ("mocov3-vit-l", ["no public download", "module.base_encoder"]),
        ("clip-vit-L", ["timm/vit_large_patch14_clip_224.openai", "TorchScript", "state dict"]),
    ],
)
def test_offline_without_cache_names_file_and_flag(offline_caches, name, needles):
    with pytest.raises(FileNotFoundError) as info:
        load_encoders(name, "cpu", 256)
    message = str(info.value)
    for needle in [name, "--enc-ckpt", "--enc-weights random", *needles]:
        assert needle in message
    if name != "mocov3-vit-l":
        assert "HF_HUB_OFFLINE" in message


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    spec = tiny(ENCODERS["dinov2-vit-s"])
    state = dinov2_official(timm_reference(spec, 518).state_dict(), registers=False)
    del state["blocks.1.norm2.bias"]
    state["blocks.1.extra.weight"] = torch.zeros(3)
    state["blocks.0.attn.qkv.weight"] = torch.zeros(10, 64)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as info:
        build_encoder(spec, "cpu", 256, ckpt_path=tmp_path / "bad.pth")
    message = str(info.value)
    for needle in ["blocks.1.norm2.bias", "blocks.1.extra.weight", "blocks.0.attn.qkv.weight", "dinov2-vit-s"]:
        assert needle in message


def test_non_tensor_pickles_are_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "note": object.__new__(FrozenEncoder)}, tmp_path / "x.pth")
    with pytest.raises((ValueError, RuntimeError), match="weights-only|re-save"):
        load_encoders("mae-vit-l", "cpu", 256, ckpt_path=tmp_path / "x.pth")


def test_random_weights_warn_and_need_asking():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        warnings.simplefilter("always")
        load_encoders("dinov2-vit-s", "meta", 256, enc_weights="random")
    with pytest.raises(ValueError, match="'pretrained', 'random'"):
        load_encoders("dinov2-vit-s", "meta", 256, enc_weights="randn")
    with pytest.raises(ValueError, match="meta"):
        load_encoders("dinov2-vit-s", "meta", 256)


def test_bad_names_resolutions_and_paths():
    with pytest.raises(ValueError, match="unknown encoder 'dinov2-vit-x'.*dinov2-vit-b.*mae-vit-l"):
        load_encoders("dinov2-vit-x", "meta", 256, enc_weights="random")
    with pytest.raises(ValueError, match="resolution 250 .*multiple of 16.*256, 512"):
        load_encoders("dinov2-vit-s", "meta", 250, enc_weights="random")
    with pytest.raises(ValueError, match="1 path.* 2 encoder"):
        load_encoders("dinov2-vit-s,mae-vit-l", "cpu", 256, ckpt_path=["a.pth"])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_encoders("dinov2-vit-s", "cpu", 256, ckpt_path="missing.pth")


def test_load_encoders_parses_lists_case_and_none():
    found = load_encoders("dinov2-vit-s, clip-vit-l", "meta", 256, enc_weights="random")
    assert [e.spec.name for e in found] == ["dinov2-vit-s", "clip-vit-L"]
    assert [e.embed_dim for e in found] == [384, 1024]
    assert load_encoders("none", "meta", 256) == []


def test_encoder_is_frozen_and_checks_its_input():
    encoder = build_encoder(tiny(ENCODERS["dinov2-vit-s"]), "cpu", 256, enc_weights="random")
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    with torch.enable_grad():
        assert not encoder.encode(images(1, 256)).requires_grad
    with pytest.raises(TypeError, match="uint8"):
        encoder.encode(images(1, 256).float() / 127.5 - 1)
    with pytest.raises(ValueError, match=r"square RGB images \(N, 3, S, S\), got \(1, 3, 256, 128\)"):
        encoder.encode(images(1, 256)[..., :128])


def test_demo_resolution_sets_grid_and_resizes_images(tmp_path, caplog):
    # train.py's pixel-space demo: 32 px images, SiT patch 8 -> a 4x4 grid, i.e. the "64 px" setting.
    spec = tiny(ENCODERS["dinov2-vit-s"])
    reference = timm_reference(spec, native_size=518)
    torch.save(dinov2_official(reference.state_dict(), registers=False), tmp_path / "d.pth")
    encoder = build_encoder(spec, "cpu", 64, ckpt_path=tmp_path / "d.pth")
    assert "not a paper setting" in caplog.text
    x = images(2, 32)
    want = reference_tokens(reference, preprocess(x, IMAGENET, 4 * 14), prefix=1)  # 32 -> 56 px, bicubic
    got = encoder.encode(x)
    assert got.shape == (2, 16, 64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


#################################################################################
#                     Any timm ViT by name: `timm:<model-name>`                 #
#################################################################################
# The demo's own encoder: a tiny ViT trained on 32 px images, saved with save_timm_encoder and used as the
# REPA target at the SiT's 8x8 token grid (32 px, SiT patch 4: encoder resolution 16 * 8).

TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, reg_tokens=2)
TINY_VIT_NORM = ((0.3, 0.4, 0.5), (0.2, 0.25, 0.3))  # not timm's (0.5, 0.5): must come from the file


def tiny_vit(seed=0, **overrides):
    """The architecture as the experiment builds it: with its classifier head (10 shape classes)."""
    kwargs = {**TINY_VIT_KWARGS, **overrides}
    return randomize_(timm.create_model(TINY_VIT, num_classes=10, **kwargs), seed).eval(), kwargs


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_timm_file_gives_forward_features_patch_tokens(tmp_path, suffix):
    model, kwargs = tiny_vit()
    path = encoders.save_timm_encoder(model, TINY_VIT, kwargs, tmp_path / f"tiny_vit{suffix}", *TINY_VIT_NORM)
    (encoder,) = load_encoders(f"timm:{TINY_VIT}", "cpu", 16 * 8, ckpt_path=path)
    assert encoder.spec.name == f"timm:{TINY_VIT}" and str(path) in encoder.weights_source
    assert (encoder.grid, encoder.embed_dim, encoder.input_size, encoder.spec.num_prefix_tokens) == (8, 64, 32, 3)
    assert encoder.num_params == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head"))
    # Same count as the registry's ViT formula: T = 64 patches + CLS + 2 registers, D = 64, 2 blocks.
    t, d = 67, 64
    macs = 2 * (12 * t * d * d + 2 * t * t * d) + 64 * d * 3 * 4 * 4
    assert encoder.gmacs_per_image() == pytest.approx(macs / 1e9, rel=1e-3)

    x = images(2, 32)
    # forward_features (final norm included) minus CLS and the 2 registers, on the file's normalisation.
    want = reference_tokens(model, preprocess(x, TINY_VIT_NORM, 32), prefix=3)
    got = encoder.encode(x)
    assert got.shape == (2, 64, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Images of another size are resized (bicubic) to the encoder's 32 px input; the grid stays 8x8.
    x64 = images(2, 64, seed=1)
    want64 = reference_tokens(model, preprocess(x64, TINY_VIT_NORM, 32), prefix=3)
    torch.testing.assert_close(encoder.encode(x64), want64, rtol=1e-4, atol=1e-4)


def test_timm_file_grid_must_equal_the_sit_grid(tmp_path):
    model, kwargs = tiny_vit()
    path = encoders.save_timm_encoder(model, TINY_VIT, kwargs, tmp_path / "tiny_vit.pt", *TINY_VIT_NORM)
    # SiT-S/8 on 32 px images: a 4x4 grid, encoder resolution 64; the file's ViT has 8x8 patches.
    with pytest.raises(ValueError, match=r"patch grid is 8x8 \(img_size 32, patch 4\).*SiT token grid is 4x4"):
        load_encoders(f"timm:{TINY_VIT}", "cpu", 16 * 4, ckpt_path=path)


def test_timm_file_whose_keys_do_not_fit_names_the_file(tmp_path):
    model, kwargs = tiny_vit()
    path = encoders.save_timm_encoder(model, TINY_VIT, kwargs, tmp_path / "tiny_vit.pt", *TINY_VIT_NORM)
    raw = torch.load(path, weights_only=True)
    raw["timm_kwargs"]["depth"] = 3  # the file's keywords no longer describe its weights
    del raw["state_dict"]["blocks.1.norm2.bias"]
    torch.save(raw, tmp_path / "edited.pt")
    with pytest.raises(ValueError) as info:
        load_encoders(f"timm:{TINY_VIT}", "cpu", 128, ckpt_path=tmp_path / "edited.pt")
    for needle in [str(tmp_path / "edited.pt"), "blocks.2.", "blocks.1.norm2.bias", f"timm:{TINY_VIT}", "'depth': 3"]:
        assert needle in str(info.value)
    # The helper checks keywords against the weights before writing: a wrong one fails at save time.
    with pytest.raises(ValueError, match="do not fit timm vit_tiny_patch16_224.*wrong shape"):
        encoders.save_timm_encoder(model, TINY_VIT, {**kwargs, "embed_dim": 96}, tmp_path / "x.pt", *TINY_VIT_NORM)
    assert not (tmp_path / "x.pt").exists()


def test_timm_files_are_data_only(tmp_path):
    model, kwargs = tiny_vit()
    path = encoders.save_timm_encoder(model, TINY_VIT, kwargs, tmp_path / "tiny_vit.pt", *TINY_VIT_NORM)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"timm_model", "timm_kwargs", "state_dict", "mean", "std"}
    assert raw["timm_kwargs"] == TINY_VIT_KWARGS and not any(k.startswith("head") for k in raw["state_dict"])
    # Keywords that would make timm load another file are refused, in the file and at save time.
    raw["timm_kwargs"]["checkpoint_path"] = str(tmp_path / "other.pth")
    torch.save(raw, tmp_path / "loads_a_file.pt")
    with pytest.raises(ValueError, match=r"\['checkpoint_path'\] refused"):
        load_encoders(f"timm:{TINY_VIT}", "cpu", 128, ckpt_path=tmp_path / "loads_a_file.pt")
    with pytest.raises(ValueError, match=r"\['pretrained'\] refused"):
        encoders.save_timm_encoder(model, TINY_VIT, {**kwargs, "pretrained": True}, tmp_path / "x.pt", *TINY_VIT_NORM)
    # A file for one name is not loaded under another; a timm file is not a registry encoder's weights.
    with pytest.raises(ValueError, match="holds timm vit_tiny_patch16_224, not vit_small_patch16_224"):
        load_encoders("timm:vit_small_patch16_224", "cpu", 128, ckpt_path=path)
    with pytest.raises(ValueError, match="pass it with --enc-type timm:vit_tiny_patch16_224"):
        load_encoders("dinov2-vit-s", "cpu", 128, ckpt_path=path)
    with pytest.raises(ValueError, match="timm has no model 'vit_nonexistent'"):
        load_encoders("timm:vit_nonexistent", "meta", 128, enc_weights="random")
    with pytest.raises(ValueError, match="ResNet is not a ViT-style timm model"):
        load_encoders("timm:resnet18", "meta", 128, enc_weights="random")


def test_timm_and_registry_encoders_mix(tmp_path, monkeypatch):
    # A registry encoder (DINOv2 at test width, official release file) next to the demo's timm file, with
    # --enc-ckpt as train.py passes it: one comma-separated string, one path per encoder.
    dinov2 = tiny(ENCODERS["dinov2-vit-s"])
    monkeypatch.setitem(encoders._BY_LOWER_NAME, "dinov2-vit-s", dinov2)
    reference = timm_reference(dinov2, native_size=518)
    torch.save(dinov2_official(reference.state_dict()), tmp_path / "dinov2_vits14_pretrain.pth")
    model, kwargs = tiny_vit(embed_dim=48, num_heads=3)
    encoders.save_timm_encoder(model, TINY_VIT, kwargs, tmp_path / "tiny_vit.safetensors", *TINY_VIT_NORM)

    paths = f"{tmp_path / 'dinov2_vits14_pretrain.pth'},{tmp_path / 'tiny_vit.safetensors'}"
    found = load_encoders(f"dinov2-vit-s, timm:{TINY_VIT}", "cpu", 128, ckpt_path=paths)
    assert [e.spec.name for e in found] == ["dinov2-vit-s", f"timm:{TINY_VIT}"]
    assert [e.embed_dim for e in found] == [64, 48] and [e.grid for e in found] == [8, 8]
    x = images(2, 32)
    want = [
        reference_tokens(reference, preprocess(x, IMAGENET, 8 * 14), prefix=1),  # 32 -> 112 px for /14
        reference_tokens(model, preprocess(x, TINY_VIT_NORM, 32), prefix=3),
    ]
    for encoder, tokens in zip(found, want):
        torch.testing.assert_close(encoder.encode(x), tokens, rtol=1e-4, atol=1e-4)


def test_timm_plain_state_dict_is_resampled_like_the_registry(tmp_path):
    # A timm state dict without keywords (as the hub holds them): timm's default architecture (test_vit:
    # 160 px, /16, a 10x10 pos_embed) built at grid * patch px with pos_embed resampled once to the 4x4
    # grid, and mean/std from timm's pretrained config (0.5).
    reference = randomize_(timm.create_model("test_vit", num_classes=0, dynamic_img_size=True)).eval()
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    (encoder,) = load_encoders("timm:test_vit", "cpu", 16 * 4, ckpt_path=tmp_path / "model.safetensors")
    assert (encoder.input_size, encoder.grid, encoder.embed_dim) == (64, 4, 64)
    x = images(2, 32)
    want = reference_tokens(reference, preprocess(x, HALF, 64), prefix=1)
    torch.testing.assert_close(encoder.encode(x), want, rtol=1e-4, atol=1e-4)


def test_timm_name_of_a_registry_encoder_builds_the_same_encoder():
    # timm's DINOv2-S by name at 256 px: the registry's 224 px input, 16x16 grid, CLS dropped, same cost.
    named, registered = (
        load_encoders(name, "meta", 256, enc_weights="random")[0]
        for name in ("timm:vit_small_patch14_dinov2.lvd142m", "dinov2-vit-s")
    )
    assert (named.input_size, named.grid, named.embed_dim, named.spec.num_prefix_tokens) == (224, 16, 384, 1)
    assert named.spec.hub_repo == registered.spec.hub_repo and named.spec.mean == registered.spec.mean
    assert named.num_params == registered.num_params
    assert named.gmacs_per_image() == pytest.approx(registered.gmacs_per_image())


def test_timm_name_offline_without_cache_names_file_and_flag(offline_caches):
    name = "timm:vit_small_patch14_dinov2.lvd142m"
    with pytest.raises(FileNotFoundError) as info:
        load_encoders(name, "cpu", 256)
    needles = [name, "timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors", "HF_HUB_OFFLINE"]
    for needle in [*needles, "dinov2_vits14_pretrain.pth", "--enc-ckpt", "--enc-weights random"]:
        assert needle in str(info.value)
    # A model without downloadable weights points at save_timm_encoder.
    with pytest.raises(FileNotFoundError, match=r"(?s)no public download.*save_timm_encoder.*--enc-ckpt"):
        load_encoders("timm:vit_base_patch16_gap_224", "cpu", 256)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from tests.test_train import ROOT

    out = tmp_path_factory.mktemp("data") / "demo"
    cmd = [sys.executable, "-m", "demo", "data", "--out", str(out), "--per-class", "2"]
    subprocess.run(cmd + ["--num-classes", "4", "--resolution", "32"], cwd=ROOT, check=True, capture_output=True)
    return out


def test_train_aligns_to_a_saved_timm_encoder(demo_data, tmp_path):
    # The demo's path end to end: train.py with the file as the target encoder ("pretrained": the file
    # is the weights). SiT-S/4 on 32 px images: 8x8 tokens, the file's grid.
    from checkpoints import load_checkpoint
    from tests.test_train import run_train, tiny_argv

    model, kwargs = tiny_vit()
    path = encoders.save_timm_encoder(model, TINY_VIT, kwargs, tmp_path / "tiny_vit.pt", *TINY_VIT_NORM)
    argv = tiny_argv(demo_data, tmp_path, model="SiT-S/4", enc_type=f"timm:{TINY_VIT}", enc_weights="pretrained")
    run_train(argv + ["--enc-ckpt", str(path), "--max-train-steps", "2", "--checkpointing-steps", "2"])
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "0000002.pt")
    assert ckpt["model_kwargs"]["z_dims"] == [64] and ckpt["steps"] == 2
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert len(stats) == 2 and all(-1 <= s["proj_loss"] <= 1 for s in stats)
