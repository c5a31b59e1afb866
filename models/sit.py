"""SiT backbone with REPA projectors.

A SiT is a DiT-architecture transformer (adaLN-Zero blocks over patch tokens of a latent image) that
predicts the velocity of a flow-matching interpolant. REPA adds one projector MLP per target encoder
on the hidden state after block `encoder_depth`; its outputs `zs` are aligned with frozen encoder
features of the clean image (see loss.py). iREPA's projectors (`projection_layer_type` linear or conv,
a convolution over the token grid) replace the MLP with its keys (`projectors.K.projection_layer.*`).

State-dict keys are identical to the official REPA code, so its checkpoints (`model` or `ema` entry)
load with strict=True. Differences from the official module, all deliberate:
  * SiT-S works: the final layer is built at the model's own width (officially it is always 768).
  * Attention is written here on top of `F.scaled_dot_product_attention`, with timm's key names
    (`qkv`, `proj`, `q_norm`, `k_norm`), so `qk_norm=True` works without depending on timm internals;
    `fused_attn=False` switches every block to the explicit softmax(q k^T / sqrt(d)) v, as officially.
  * `pos_embed` is a persistent buffer (same key) rather than a frozen parameter, so optimizers, EMA
    and gradient clipping never see it.
  * Bad shapes, labels and depths raise errors that name the value.
models/dit.py builds the DDPM-side DiT from this same class (`out_channels` = 2 x in_channels).
"""

import math
import re
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

#################################################################################
#                         Embedders for patches, time, labels                   #
#################################################################################


class PatchEmbed(nn.Module):
    """(N, C, H, W) latent -> (N, T, D) tokens with a strided conv; T = (H / p) * (W / p)."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)
        self.num_patches = (input_size // patch_size) ** 2

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (N,) real times -> (N, dim), [cos | sin] halves (GLIDE/DiT convention).

    REPA feeds t in [0, 1] as is (no x1000 scaling); the frequencies span 1 .. 1/max_period.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """(N,) times -> (N, D) via the 256-d sinusoidal embedding and a two-layer SiLU MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        # Real times keep their dtype (REPA); integer timesteps (DiT's 0..999) take the MLP's dtype.
        dtype = t.dtype if t.is_floating_point() else self.mlp[0].weight.dtype
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class LabelEmbedder(nn.Module):
    """(N,) class labels -> (N, D). Row `num_classes` is the null class for classifier-free guidance.

    The table has a null row only when label dropout is enabled (as in the official code), so a model
    trained without dropout cannot be guided.
    """

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train, force_drop_ids=None):
        self._check(labels)
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids.bool(), self.num_classes, labels)
        elif train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)

    def _check(self, labels):
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"class labels must be an integer tensor, got dtype {labels.dtype}")
        top = self.embedding_table.num_embeddings - 1  # num_classes (null) if the table has it
        if labels.device.type == "cpu" and not torch.compiler.is_compiling():
            if labels.numel() and (labels.min() < 0 or labels.max() > top):
                bad = labels[(labels < 0) | (labels > top)].unique().tolist()
                raise ValueError(
                    f"class label(s) {bad} out of range: this model has num_classes={self.num_classes}"
                    + (f" (label {self.num_classes} is the null class)" if top == self.num_classes else "")
                )
        else:
            # No host sync on accelerators (nor a graph break when compiled): the check runs on the device.
            torch._assert_async(((labels >= 0) & (labels <= top)).all(), "class label out of range")


#################################################################################
#                              Transformer block                                #
#################################################################################


def modulate(x, shift, scale):
    """adaLN: x (N, T, D) scaled and shifted per sample by (N, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names; optional LayerNorm on q and k per head.

    `fused_attn` (the official flag, an attribute as in timm) picks the kernel, not the math: True runs
    `F.scaled_dot_product_attention`, False the explicit softmax(q k^T / sqrt(head_dim)) v, whose
    probabilities come from `_attention_probs`. Both agree to float rounding; state-dict keys are the same.
    """

    def __init__(self, dim, num_heads, qk_norm=False, fused_attn=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        # HASTE: a block whose attention is aligned computes its logits explicitly and keeps them (self.logits,
        # (N, heads, T, T)) for the loss; every other block stays on the fused kernel.
        self.record_logits = False
        self.logits = None
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def _attention_probs(self, q, k):
        """(N, heads, T, head_dim) queries and keys -> (N, heads, T_query, T_key) probabilities over keys."""
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.record_logits:
            self.logits = q @ k.transpose(-2, -1) * self.scale  # (N, heads, T, T)
            x = self.logits.softmax(dim=-1) @ v
        elif self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = self._attention_probs(q, k) @ v
        return self.proj(x.transpose(1, 2).reshape(N, T, D))  # (N, heads, T, head_dim) -> (N, T, D)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (keys fc1, fc2 as in timm)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the condition c sets shift, scale and a residual gate."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, fused_attn=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map from tokens to patches of the output channels.

    With `cls_token_dim` (REG) a second head `linear_cls` maps the class token (sequence position 0) to the
    velocity of the encoder's class token; both heads share the norm and modulation, as in REG.
    """

    def __init__(self, hidden_size, patch_size, out_channels, cls_token_dim=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.linear_cls = nn.Linear(hidden_size, cls_token_dim) if cls_token_dim else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        """(N, T, D) -> (N, T, p*p*C); with the class head, (N, 1+T, D) -> ((N, T, p*p*C), (N, cls_token_dim))."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        if self.linear_cls is None:
            return self.linear(x)
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])


# Projector types: REPA's MLP, and iREPA's (Singh et al., "What matters for representation alignment",
# End2End-Diffusion/iREPA) per-token linear map and convolution over the token grid.
PROJECTOR_TYPES = ("mlp", "linear", "conv")


class GridProjector(nn.Module):
    """iREPA's `linear` and `conv` projectors; keys `projection_layer.{weight,bias}` as in iREPA.

    `conv` runs a k x k convolution (padding k // 2, so the grid keeps its size) over the (grid x grid)
    layout of the T = grid**2 tokens, so each projected token sees its spatial neighbours; iREPA's point is
    that this keeps the encoder's spatial structure where the per-token MLP mixes it away.
    """

    def __init__(self, layer_type, hidden_size, z_dim, kernel_size=1):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear":
            self.projection_layer = nn.Linear(hidden_size, z_dim)
        elif layer_type == "conv":
            if kernel_size < 1 or kernel_size % 2 == 0:
                raise ValueError(f"conv projector kernel size must be odd and positive, got {kernel_size}")
            self.projection_layer = nn.Conv2d(hidden_size, z_dim, kernel_size, padding=kernel_size // 2)
        else:
            raise ValueError(f"GridProjector is 'linear' or 'conv', got {layer_type!r}")

    def forward(self, x):
        if self.layer_type == "linear":
            return self.projection_layer(x)
        N, T, D = x.shape
        side = math.isqrt(T)
        if side * side != T:
            raise ValueError(f"conv projector needs a square token grid, got {T} tokens")
        x = x.transpose(1, 2).reshape(N, D, side, side)  # row-major tokens -> (N, D, grid, grid)
        return self.projection_layer(x).flatten(2).transpose(1, 2)  # (N, z_dim, grid, grid) -> (N, T, z_dim)


def build_projector(hidden_size, projector_dim, z_dim, layer_type="mlp", kernel_size=1):
    """One projector. `mlp` (REPA): Linear-SiLU-Linear-SiLU-Linear per token, keys 0, 2, 4 as in the official
    REPA code; `linear` and `conv` (iREPA): see GridProjector. projector_dim is used by `mlp` only."""
    if layer_type not in PROJECTOR_TYPES:
        raise ValueError(f"unknown projector type {layer_type!r}; choose one of {PROJECTOR_TYPES}")
    if layer_type != "mlp":
        return GridProjector(layer_type, hidden_size, z_dim, kernel_size)
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


# iREPA wraps every projector, its MLP too, in a module whose layer is `projection_layer`: its MLP keys are
# `projectors.K.projection_layer.{0,2,4}.*`, REPA's are `projectors.K.{0,2,4}.*`.
_IREPA_MLP_KEY = re.compile(r"^(projectors\.\d+\.)projection_layer\.(\d+\.)")


def unpatchify(x, patch_size: int, channels: int):
    """(N, T, p*p*C) row-major patch tokens of a square image -> (N, C, H, W)."""
    p, side = patch_size, math.isqrt(x.shape[1])
    x = x.reshape(x.shape[0], side, side, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, side * p, side * p)


def projector_kwargs_from_state_dict(state_dict: dict) -> dict:
    """The projector keywords of a SiT state dict (for files without recorded constructor keywords).

    Recognises REPA's MLP (`projectors.K.{0,2,4}.*`), iREPA's MLP (`projectors.K.projection_layer.{0,2,4}.*`),
    and iREPA's linear and conv projectors (`projectors.K.projection_layer.{weight,bias}`, 2-d or 4-d weight).
    """
    ids = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("projectors.")})
    if not ids:
        return {"z_dims": []}
    state_dict = {_IREPA_MLP_KEY.sub(r"\1\2", k): v for k, v in state_dict.items() if k.startswith("projectors.")}
    first = f"projectors.{ids[0]}"
    if f"{first}.4.weight" in state_dict:  # an MLP, in either key layout
        return {
            "z_dims": [state_dict[f"projectors.{i}.4.weight"].shape[0] for i in ids],
            "projector_dim": state_dict[f"{first}.0.weight"].shape[0],
            "projection_layer_type": "mlp",
        }
    weight = state_dict.get(f"{first}.projection_layer.weight")
    if weight is None:
        raise KeyError(f"unrecognised projector layout: {sorted(k for k in state_dict if k.startswith(first))}")
    kwargs = {
        "z_dims": [state_dict[f"projectors.{i}.projection_layer.weight"].shape[0] for i in ids],
        "projection_layer_type": "conv" if weight.ndim == 4 else "linear",
    }
    if weight.ndim == 4:
        kwargs["proj_kwargs_kernel_size"] = weight.shape[-1]
    return kwargs


#################################################################################
#                                 Core SiT model                                #
#################################################################################


class SiT(nn.Module):
    """Flow-matching transformer. forward(x, t, y) -> (velocity (N, C, H, W), zs [(N, T, z_dim)])."""

    def __init__(
        self,
        input_size=32,  # latent side: 32 for 256 px images through the SD-VAE (/8)
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,  # label dropout for classifier-free guidance
        num_classes=1000,
        z_dims=(768,),  # one projector per target encoder; () for a vanilla SiT
        encoder_depth=8,  # 1-based block whose output is projected (8 for L/XL, 4 for B in the paper)
        projector_dim=2048,
        qk_norm=False,
        fused_attn=True,  # official flag: False computes attention explicitly (same output, slower)
        out_channels=None,  # channels of the prediction; None = in_channels (DiT passes 2x for learned sigma)
        projection_layer_type="mlp",  # iREPA's keyword: mlp (REPA) | linear | conv
        proj_kwargs_kernel_size=1,  # iREPA's keyword: conv kernel over the token grid (1, 3, 5, 7; iREPA runs 3)
        cls_token_dim=None,  # REG: width of the encoder's class token entangled with the image tokens; None = off
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if z_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must lie in 1..depth={depth}, got {encoder_depth}")
        if projection_layer_type not in PROJECTOR_TYPES:
            raise ValueError(
                f"unknown projection_layer_type {projection_layer_type!r}; choose one of {PROJECTOR_TYPES}"
            )
        if cls_token_dim and projection_layer_type == "conv":
            raise ValueError("a conv projector needs a square token grid; REG's class token makes it 1 + grid**2")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.z_dims = list(z_dims)
        self.encoder_depth = encoder_depth
        self.cls_token_dim = cls_token_dim or None

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed 2D sin-cos position embedding (not trained).
        grid = input_size // patch_size
        pos_embed = torch.tensor(get_2d_sincos_pos_embed(hidden_size, grid), dtype=torch.float32).unsqueeze(0)
        if self.cls_token_dim:
            # REG: the class token is sequence position 0 with a row of zeros (REG's extra-token layout).
            pos_embed = torch.cat([torch.zeros_like(pos_embed[:, :1]), pos_embed], dim=1)
            # REG's names: the class token (N, cls_token_dim) -> Linear -> affine LayerNorm -> one more token.
            self.cls_projectors2 = nn.Linear(self.cls_token_dim, hidden_size)
            self.wg_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.register_buffer("pos_embed", pos_embed)  # (1, T, D), T + 1 rows with REG's class token

        self.blocks = nn.ModuleList(
            [
                SiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm, fused_attn=fused_attn)
                for _ in range(depth)
            ]
        )
        self._recorded_layers = []  # HASTE: blocks whose attention logits are kept (record_attention)
        self.projection_layer_type = projection_layer_type
        self.projectors = nn.ModuleList(
            [
                build_projector(hidden_size, projector_dim, z, projection_layer_type, proj_kwargs_kernel_size)
                for z in self.z_dims
            ]
        )
        if projection_layer_type == "mlp":
            self.register_load_state_dict_pre_hook(_accept_irepa_mlp_keys)
        # Sampling never reads zs: sample_ddp.py sets this to False to skip the projectors (a REPA projector
        # costs about as much as one SiT-B block per token; the official model runs it at every sampling step).
        self.project = True
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, self.cls_token_dim)
        self.initialize_weights()

    def initialize_weights(self):
        # Xavier-uniform for every linear layer, zero biases (iREPA's conv projectors keep PyTorch's default):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # Patch embedding initialised like a linear layer over the flattened patch:
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # Label table and time MLP: small normal:
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Zero-out adaLN modulation, so every block starts as the identity:
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # Zero-out the output layer, so the initial prediction is 0:
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.final_layer.linear_cls is not None:  # REG: the class-token velocity starts at 0 too
            nn.init.zeros_(self.final_layer.linear_cls.weight)
            nn.init.zeros_(self.final_layer.linear_cls.bias)

    def record_attention(self, layers=()):
        """HASTE: keep the attention logits of these 1-based blocks at every forward (explicit softmax there);
        () switches recording off and returns all blocks to the fused kernel."""
        bad = [layer for layer in layers if not 1 <= layer <= len(self.blocks)]
        if bad:
            raise ValueError(f"the SiT has blocks 1..{len(self.blocks)}; attention layers {bad} do not exist")
        for i, block in enumerate(self.blocks):
            block.attn.record_logits = i + 1 in layers
            block.attn.logits = None
        self._recorded_layers = list(layers)

    def attention_logits(self):
        """The logits (N, heads, T, T) kept by the last forward, in the order record_attention was given.
        Reading them releases the blocks' references, so they live no longer than the step's graph."""
        logits = [self.blocks[layer - 1].attn.logits for layer in self._recorded_layers]
        if any(x is None for x in logits):
            raise RuntimeError("no attention logits recorded: call record_attention(layers), then forward")
        for layer in self._recorded_layers:
            self.blocks[layer - 1].attn.logits = None
        return logits

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        return unpatchify(x, self.patch_size, self.out_channels)

    def _check_input(self, x, t, y, cls_token):
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t and y must have shape ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")
        if self.cls_token_dim is None and cls_token is not None:
            raise ValueError("cls_token given, but this model was built without cls_token_dim (REG)")
        if self.cls_token_dim is not None:
            if cls_token is None:
                raise ValueError(f"this REG model (cls_token_dim={self.cls_token_dim}) needs cls_token=")
            if cls_token.shape != (x.shape[0], self.cls_token_dim):
                raise ValueError(
                    f"cls_token must have shape ({x.shape[0]}, {self.cls_token_dim}), got {tuple(cls_token.shape)}"
                )

    def forward(self, x, t, y, force_drop_ids=None, cls_token=None):
        """x: (N, C, H, W) noisy latents; t: (N,) times in [0, 1]; y: (N,) labels (num_classes = null).

        Returns the velocity (N, out_channels, H, W) and a list with one (N, T, z_dim) tensor per projector
        (empty when `self.project` is False). REG models (built with cls_token_dim) take the noisy class
        token cls_token (N, cls_token_dim), run it as sequence position 0 and return (velocity, zs,
        class-token velocity (N, cls_token_dim)); their zs hold 1 + T tokens, the class token first, as REG
        aligns [class token; patch tokens].
        """
        self._check_input(x, t, y, cls_token)
        x = self.x_embedder(x)  # (N, T, D)
        if self.cls_token_dim:
            cls = self.wg_norm(self.cls_projectors2(cls_token.to(x.dtype)))  # (N, D)
            x = torch.cat([cls.unsqueeze(1), x], dim=1)  # (N, 1+T, D)
        x = x + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)

        zs = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)  # (N, T, D)
            if i + 1 == self.encoder_depth and self.project:
                zs = [projector(x) for projector in self.projectors]  # each (N, T, z_dim)
        if self.cls_token_dim:
            x, cls_v = self.final_layer(x, c)  # (N, T, p*p*C), (N, cls_token_dim)
            return self.unpatchify(x), zs, cls_v
        x = self.final_layer(x, c)  # (N, T, p*p*C)
        return self.unpatchify(x), zs


def _accept_irepa_mlp_keys(module, state_dict, prefix, *args):
    """Load hook: iREPA's MLP keys `projectors.K.projection_layer.N.*` are renamed in place to REPA's
    `projectors.K.N.*`, so iREPA checkpoints with `--projection-layer-type mlp` load strictly too."""
    for key in [k for k in state_dict if k.startswith(prefix + "projectors.")]:
        new = prefix + _IREPA_MLP_KEY.sub(r"\1\2", key[len(prefix) :])
        if new != key:
            state_dict[new] = state_dict.pop(key)


#################################################################################
#                      Fixed 2D sine-cosine position embedding                  #
#################################################################################


def get_1d_sincos_pos_embed(embed_dim, pos):
    """(M,) positions -> (M, embed_dim): [sin | cos] of pos times frequencies 1 .. 1/10000."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim), row-major tokens; the first half of channels encodes the column."""
    if embed_dim % 4:
        raise ValueError(f"hidden_size {embed_dim} must be divisible by 4 for the 2D sin-cos embedding")
    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)  # (G, G) each; token (i, j) -> (h=i, w=j)
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, grid_w)
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, grid_h)
    return np.concatenate([emb_w, emb_h], axis=1)


#################################################################################
#                                 Size registry                                 #
#################################################################################

# name -> (depth, hidden_size, num_heads), as DiT and SiT name their sizes.
SIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

SiT_models = {
    f"SiT-{size}/{patch}": partial(SiT, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in SIT_SIZES.items()
    for patch in (2, 4, 8)
}


def sit_flops(model: SiT) -> float:
    """Analytic forward FLOPs for one sample (2 x multiply-accumulates of the matmuls).

    Counts the patch embedding, every block's qkv/attention/projection/MLP/adaLN, the projectors (unless
    `model.project` is False: sampling skips them) and the final layer; ignores norms, activations and
    embeddings of t and y (<0.1%).
    """
    D = model.pos_embed.shape[-1]
    T = model.pos_embed.shape[1]  # the sequence: patches (+ REG's class token)
    patches = model.x_embedder.num_patches
    p, C, C_out = model.patch_size, model.in_channels, model.out_channels
    hidden_mlp = model.blocks[0].mlp.fc1.out_features if len(model.blocks) else 0
    per_block = T * (3 * D * D + 2 * T * D + D * D + 2 * D * hidden_mlp) + 6 * D * D
    macs = patches * p * p * C * D + len(model.blocks) * per_block
    for proj in model.projectors if model.project else ():
        for layer in proj.modules():
            if isinstance(layer, nn.Linear):
                macs += T * layer.in_features * layer.out_features
            elif isinstance(layer, nn.Conv2d):  # iREPA's conv projector: k*k*D MACs per output channel and token
                macs += T * layer.weight[0].numel() * layer.out_channels
    macs += patches * D * p * p * C_out + 2 * D * D
    if model.cls_token_dim:  # REG's class-token input and output maps
        macs += 2 * model.cls_token_dim * D
    return 2.0 * macs
