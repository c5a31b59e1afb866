"""Backbones and frozen encoders. MODELS maps every class-conditional model name to its constructor:
"SiT-*" (flow matching, models/sit.py) and "DiT-*" (DDPM, models/dit.py), sizes S/B/L/XL, patches 2/4/8.
T2I_MODELS maps the text-conditioned ones, "MMDiT-d{depth}/{patch}" (models/mmdit.py, forward(x, t, context)):
apart, because train.py and sample_ddp.py build MODELS entries with class labels (num_classes, label dropout)."""

from models.dit import DiT_models
from models.mmdit import MMDiT_models
from models.sit import SiT_models

MODELS = {**SiT_models, **DiT_models}
T2I_MODELS = dict(MMDiT_models)


def model_family(name: str) -> str:
    """sit | dit | mmdit, from a model name such as SiT-XL/2, DiT-L/2, MMDiT-d24/2."""
    return "mmdit" if name.startswith("MMDiT") else "dit" if name.startswith("DiT") else "sit"


def build_model(cfg, z_dims, input_size=None, in_channels=None, cls_token_dim=None, context_dim=None):
    """The backbone of a training config (config.TrainConfig): (model, the constructor keywords).

    z_dims: the alignment encoders' widths (one projector each; [] for a vanilla model). input_size and
    in_channels default to the config's (pixels, or SD-VAE latents: resolution / 8, 4 channels);
    cls_token_dim: REG's class-token width; context_dim: the MMDiT's text-token width. The keywords are saved
    in every checkpoint, and checkpoints.load_model rebuilds the model from them.
    """
    all_models = {**MODELS, **T2I_MODELS}
    if cfg.model not in all_models:
        raise ValueError(f"--model {cfg.model!r} is unknown; choose one of {', '.join(all_models)}")
    input_size = input_size or (cfg.resolution if cfg.pixel_space else cfg.resolution // 8)
    in_channels = in_channels or (3 if cfg.pixel_space else 4)
    size_overrides = {k: v for k in ("depth", "hidden_size", "num_heads") if (v := getattr(cfg, k))}
    common = dict(input_size=input_size, in_channels=in_channels, z_dims=list(z_dims), **size_overrides)
    common |= dict(encoder_depth=cfg.encoder_depth, projector_dim=cfg.projector_dim)
    if cfg.model in T2I_MODELS:
        # MMDiT: one number, depth, sets the size (hidden 32 x depth, depth heads); text tokens are its condition.
        unsupported = [k for k in ("hidden_size", "num_heads") if k in size_overrides]
        unsupported += ["qk_norm"] * cfg.qk_norm + ["projection_layer_type"] * (cfg.projection_layer_type != "mlp")
        if unsupported or cfg.spnorm_method != "none":
            raise ValueError(f"--model {cfg.model}: {unsupported or ['spnorm_method']} apply to SiT models only")
        kwargs = dict(**common, context_dim=context_dim or 768)
    else:
        kwargs = dict(
            **common,
            num_classes=cfg.num_classes,
            class_dropout_prob=cfg.cfg_prob,
            qk_norm=cfg.qk_norm,
            fused_attn=cfg.fused_attn,
            projection_layer_type=cfg.projection_layer_type,
            proj_kwargs_kernel_size=cfg.proj_kwargs_kernel_size,
            **({"cls_token_dim": cls_token_dim} if cls_token_dim else {}),  # REG: the class token's width
        )
    return all_models[cfg.model](**kwargs), kwargs
