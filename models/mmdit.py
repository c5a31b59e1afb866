"""MMDiT backbone with REPA projectors: the text-to-image model of REPA's MS-COCO experiments.

MMDiT (Esser et al., 2024, "Scaling Rectified Flow Transformers", the SD3 architecture) keeps two token
streams, the latent patches x and the text tokens, each with its own adaLN-modulated block weights, and
lets them meet in one *joint* attention over the concatenated sequence [text | patches]. The condition
vector c of adaLN is the time embedding alone; the text enters only through attention. REPA projects the
patch tokens after joint block `encoder_depth`, exactly as for the SiT (models/sit.py).

Sizes follow the official REPA code: one number, `depth`, sets the model; hidden size 32 x depth and
depth heads (so every head is 32 wide). The text tokens (N, L, 768), CLIP ViT-L/14 hidden states in the
official MS-COCO setup, go through one Linear(768, hidden). The last block's text stream is
"pre-only": it gives keys and values to the patches but has no output projection and no MLP, since no
later block reads the text.

State-dict keys are those of the official module (`joint_blocks.N.{context_block,x_block}.*`,
`context_embedder.*`, `projectors.K.{0,2,4}.*`, ...), so its checkpoints load with strict=True and
give its outputs. Differences, all deliberate:
  * Only the options the official T2I training uses are offered: no pooled-vector embedder
    (`adm_in_channels`), registers, RMSNorm, SwiGLU, scale-only modulation, learned sigma or q/k norm.
  * The position embedding covers the model's own grid, input_size / patch_size per side. The official
    module crops a fixed 16 x 16 table, so it runs only at that grid (256 px, patch 2), where both agree.
  * Bad shapes and depths raise errors that name the value (officially: an UnboundLocalError for
    encoder_depth > depth, or a reshape error).
Initialisation is PyTorch's default, as officially (the official MMDiT has no adaLN-Zero init).
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.sit import (
    FinalLayer,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    build_projector,
    get_2d_sincos_pos_embed,
    modulate,
    unpatchify,
)

HEAD_DIM = 32  # official: hidden_size = 32 * depth with depth heads

#################################################################################
#                     One stream of a joint block, and the block                #
#################################################################################


class StreamAttention(nn.Module):
    """The per-stream weights of joint attention: `qkv` in and, unless pre-only, `proj` out (official keys)."""

    def __init__(self, dim, pre_only=False):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = None if pre_only else nn.Linear(dim, dim)


class StreamBlock(nn.Module):
    """A DiT block cut at attention: `pre_attention` makes this stream's q, k, v; `post_attention` adds the
    gated attention output and the gated MLP. adaLN-modulated as in DiT, from the time embedding c.

    pre_only (the last block's text stream): modulation of norm1 only (shift, scale); no proj, no MLP.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, pre_only=False):
        super().__init__()
        self.num_heads = num_heads
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = StreamAttention(hidden_size, pre_only=pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))

    def pre_attention(self, x, c):
        """x (N, L, D), c (N, D) -> (q, k, v) each (N, heads, L, head_dim), and the rest of the modulation."""
        shift_msa, scale_msa, *rest = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=-1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        N, L, D = h.shape
        qkv = self.attn.qkv(h).reshape(N, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0), rest

    def post_attention(self, x, attn_out, modulation):
        """x (N, L, D) plus this stream's share of the joint attention output (N, L, D), then the MLP."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn_out)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class JointBlock(nn.Module):
    """Text and patch streams attending jointly over [text | patches]; each keeps its own weights."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, last=False):
        super().__init__()
        self.context_block = StreamBlock(hidden_size, num_heads, mlp_ratio, pre_only=last)
        self.x_block = StreamBlock(hidden_size, num_heads, mlp_ratio)

    def forward(self, context, x, c):
        """context (N, L, D), x (N, T, D), c (N, D) -> (context or None after the last block, x)."""
        context_qkv, context_mod = self.context_block.pre_attention(context, c)
        x_qkv, x_mod = self.x_block.pre_attention(x, c)
        # Every query sees every key of both streams: softmax over L + T keys, text first.
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(context_qkv, x_qkv))  # (N, heads, L + T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (N, L + T, D)
        L = context.shape[1]
        x = self.x_block.post_attention(x, out[:, L:], x_mod)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, out[:, :L], context_mod), x


#################################################################################
#                                Core MMDiT model                               #
#################################################################################


class MMDiT(nn.Module):
    """Text-conditioned flow-matching transformer.

    forward(x, t, context) -> (velocity (N, C, H, W), zs [(N, T, z_dim)]); `context` may be passed by
    keyword as officially (`model(x, t, context=ctx)`), or third, where the SiT takes its labels, so the
    samplers drive both alike.
    """

    def __init__(
        self,
        input_size=32,  # latent side: 32 for 256 px images through the SD-VAE (/8)
        patch_size=2,
        in_channels=4,
        depth=24,  # the official default, and its only T2I setting: hidden 768, 24 heads
        mlp_ratio=4.0,
        encoder_depth=8,  # 1-based joint block whose patch tokens are projected (official default 8)
        z_dims=(768,),  # one projector per target encoder; () for a vanilla MMDiT
        projector_dim=2048,
        context_dim=768,  # width of the text tokens: CLIP ViT-L/14 (hard-coded officially)
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if z_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must lie in 1..depth={depth}, got {encoder_depth}")
        hidden_size = HEAD_DIM * depth
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.num_heads = depth
        self.context_dim = context_dim
        self.z_dims = list(z_dims)
        self.encoder_depth = encoder_depth

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        # Fixed 2D sin-cos position embedding of the patches (not trained); the text has none.
        grid = input_size // patch_size
        pos_embed = torch.tensor(get_2d_sincos_pos_embed(hidden_size, grid), dtype=torch.float32).unsqueeze(0)
        self.register_buffer("pos_embed", pos_embed)  # (1, T, D)

        self.joint_blocks = nn.ModuleList(
            [JointBlock(hidden_size, self.num_heads, mlp_ratio, last=i == depth - 1) for i in range(depth)]
        )
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, z) for z in self.z_dims])
        self.project = True  # False skips the projectors (sampling never reads zs), as models/sit.py's SiT
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        return unpatchify(x, self.patch_size, self.out_channels)

    def _check_input(self, x, t, context):
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"MMDiT expects input of shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if not torch.is_tensor(context) or context.ndim != 3 or context.shape[0] != x.shape[0]:
            shape = tuple(context.shape) if torch.is_tensor(context) else type(context).__name__
            raise ValueError(f"context must be text tokens of shape ({x.shape[0]}, L, {self.context_dim}), got {shape}")
        if context.shape[-1] != self.context_dim or not context.is_floating_point():
            raise ValueError(
                f"context must be float text tokens of width {self.context_dim}, "
                f"got {tuple(context.shape)} {context.dtype}"
            )

    def forward(self, x, t, context):
        """x: (N, C, H, W) noisy latents; t: (N,) times in [0, 1]; context: (N, L, context_dim) text tokens
        (the empty caption's tokens are the null condition of classifier-free guidance).

        Returns the velocity (N, C, H, W) and a list with one (N, T, z_dim) tensor per projector (empty when
        `self.project` is False).
        """
        self._check_input(x, t, context)
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t)  # (N, D): time only; the text acts through attention
        context = self.context_embedder(context)  # (N, L, D)

        zs = []
        for i, block in enumerate(self.joint_blocks):
            context, x = block(context, x, c)
            if i + 1 == self.encoder_depth and self.project:
                zs = [projector(x) for projector in self.projectors]  # each (N, T, z_dim)
        x = self.final_layer(x, c)  # (N, T, p*p*C)
        return self.unpatchify(x), zs


#################################################################################
#                                 Size registry                                 #
#################################################################################

# One number sets an MMDiT: its depth (hidden 32 x depth, depth heads). SD3 names its sizes by depth
# ("d24"); 24 is REPA's MS-COCO model, the others SD3's scaling series (SD3 itself is twice as wide).
MMDIT_DEPTHS = (15, 18, 21, 24, 30, 38)

MMDiT_models = {
    f"MMDiT-d{depth}/{patch}": partial(MMDiT, depth=depth, patch_size=patch)
    for depth in MMDIT_DEPTHS
    for patch in (2, 4, 8)
}


def mmdit_flops(model: MMDiT, context_length=77) -> float:
    """Analytic forward FLOPs for one sample with `context_length` text tokens (77 for CLIP): 2 x the
    multiply-accumulates of every matmul (embedders, both streams' qkv/proj/MLP/adaLN, the joint attention
    over L + T tokens, projectors unless `model.project` is False, final layer); norms and activations are
    not counted.
    """
    D = model.pos_embed.shape[-1]
    T, L = model.pos_embed.shape[1], context_length
    p, C, C_out = model.patch_size, model.in_channels, model.out_channels
    mlp = model.joint_blocks[0].x_block.mlp.fc1.out_features
    full_stream = lambda tokens: tokens * (3 * D * D + D * D + 2 * D * mlp) + 6 * D * D  # qkv, proj, MLP, adaLN
    macs = T * p * p * C * D + (model.t_embedder.frequency_embedding_size * D + D * D) + L * model.context_dim * D
    for block in model.joint_blocks:
        macs += full_stream(T) + 2 * (L + T) ** 2 * D  # patches; q k^T and attention x v over L + T tokens
        macs += L * 3 * D * D + 2 * D * D if block.context_block.pre_only else full_stream(L)
    for proj in model.projectors if model.project else ():
        macs += T * sum(layer.in_features * layer.out_features for layer in proj if isinstance(layer, nn.Linear))
    macs += T * D * p * p * C_out + 2 * D * D
    return 2.0 * macs
