"""DiT backbone with REPA projectors: the DDPM side of the paper (DiT-L/2 and DiT-XL/2 + REPA).

The original DiT (Peebles & Xie, 2023) is the SiT architecture with two differences, and nothing else:
  * learn_sigma: the output has 2 x in_channels, [epsilon | v], where v in [-1, 1] sets the log-variance
    of each reverse step between log beta_t and log beta_tilde_t (improved DDPM; see diffusion.py);
  * the time input is the integer diffusion timestep 0..999, fed to the same 256-d sinusoidal embedding
    (REPA's SiT feeds t in [0, 1]).
So `DiT` is a `SiT` built with `out_channels = 2 * in_channels`; the blocks, embedders, projectors and
initialisation are shared, not copied. With `z_dims=()` the state-dict keys are exactly those of the
original release (facebookresearch/DiT), so e.g. DiT-XL-2-256x256.pt (a bare EMA state dict, `pos_embed`
included) loads with strict=True and gives the original outputs.
"""

from functools import partial

from models.sit import SIT_SIZES, SiT


class DiT(SiT):
    """Diffusion transformer. forward(x, t, y) -> (output (N, 2C or C, H, W), zs [(N, T, z_dim)]).

    t: (N,) integer timesteps 0..num_timesteps-1, best as a long tensor (embedded in float32; bfloat16
    cannot even hold 999). The output's first C channels predict epsilon, the last C (when learn_sigma)
    the variance interpolation v in [-1, 1].
    """

    def __init__(
        self,
        input_size=32,  # latent side: 32 for 256 px images through the SD-VAE (/8)
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,  # label dropout for classifier-free guidance; null class = num_classes
        num_classes=1000,
        learn_sigma=True,  # output [eps | v]: 2 x in_channels (the DiT default, trained with the hybrid loss)
        z_dims=(768,),  # one REPA projector per target encoder; () for the original (vanilla) DiT
        encoder_depth=8,  # 1-based block whose output is projected (8 for DiT-L/2 and DiT-XL/2)
        projector_dim=2048,
        qk_norm=False,
        fused_attn=True,  # official flag: False computes attention explicitly (same output, slower)
        projection_layer_type="mlp",  # iREPA: mlp (REPA) | linear | conv
        proj_kwargs_kernel_size=1,  # iREPA: conv kernel over the token grid
    ):
        super().__init__(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_classes,
            z_dims=z_dims,
            encoder_depth=encoder_depth,
            projector_dim=projector_dim,
            qk_norm=qk_norm,
            fused_attn=fused_attn,
            projection_layer_type=projection_layer_type,
            proj_kwargs_kernel_size=proj_kwargs_kernel_size,
            out_channels=2 * in_channels if learn_sigma else in_channels,
        )
        self.learn_sigma = learn_sigma


# Same sizes as SiT (S/B/L/XL x patch 2/4/8): "DiT-XL/2" etc. Gflops as in the SiT table.
DiT_models = {
    f"DiT-{size}/{patch}": partial(DiT, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in SIT_SIZES.items()
    for patch in (2, 4, 8)
}
