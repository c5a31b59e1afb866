"""How a sample batch for FID is made, shared by sample_ddp.py (50K samples, many processes) and online
evaluation during training: per-sample labels and noise from (seed, index) alone, so any number of processes
makes the same set; the sampler of each mode; decoding; and the quantisation to uint8 of the paper's protocol.
"""

from contextlib import nullcontext

import numpy as np
import torch

from diffusion import ddim_sampler, ddpm_sampler
from models.vae import latent_decoder, load_vae
from samplers import euler_maruyama_sampler, euler_sampler

# The sampler of each mode (config.SAMPLING_MODES says which modes a model family takes).
SAMPLERS = {"sde": euler_maruyama_sampler, "ode": euler_sampler, "ddpm": ddpm_sampler, "ddim": ddim_sampler}

# [-1, 1] float images -> [0, 255] floats, truncated to uint8 afterwards.
QUANTIZATIONS = {
    "repa": lambda x: torch.clamp(255.0 * ((x + 1) / 2), 0, 255),  # the official REPA generate.py
    "dit": lambda x: torch.clamp(127.5 * x + 128.0, 0, 255),  # DiT's sample_ddp.py: one level higher on ~45%
}


def sample_labels(num_samples, num_classes, seed, balanced=False):
    """Labels of samples 0..N-1 from (seed, N) only: uniform at random (the official protocol), or balanced
    (each class N / C times, in seeded order)."""
    rng = np.random.default_rng([seed, 0x1ABE1])
    if balanced:
        return rng.permutation(np.arange(num_samples) % num_classes)
    return rng.integers(0, num_classes, size=num_samples)


def sample_generator(seed, index, device):
    """The generator of sample `index`: its initial noise and SDE noise depend on (seed, index) only."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


def quantize(images, method="repa"):
    """[-1, 1] float images (N, 3, H, W) -> uint8 (N, H, W, 3), truncating like both official scripts."""
    return QUANTIZATIONS[method](images).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def load_decoder(training: dict, device):
    """Model output -> images in [-1, 1]: identity for pixel-space models, else the run's VAE decoder.
    `training`: pixel_space, vae, latent_scale, latent_bias."""
    if training["pixel_space"]:
        return lambda x: x.float()
    return latent_decoder(load_vae(training["vae"], device), training["latent_scale"], training["latent_bias"])


def is_stochastic(mode: str, ddim_eta: float = 0.0) -> bool:
    """Whether the sampler draws noise after the initial one (it then takes the samples' generators)."""
    return mode in ("sde", "ddpm") or (mode == "ddim" and ddim_eta > 0)


@torch.no_grad()
def generate(
    model, indices, conditions, *, seed, mode, sampler_kwargs, decode, quantization="repa", stochastic=None,
    autocast=None,
):  # fmt: skip
    """uint8 (B, H, W, 3) images of samples `indices` (a range of global sample numbers) under `conditions`
    (their labels, or text tokens): sample i's initial noise (and REG's class-token noise right after it, and any
    SDE noise) comes from sample_generator(seed, i), so a sample does not depend on its batch or process."""
    device = next(model.parameters()).device
    shape = (model.in_channels, model.input_size, model.input_size)
    gens = [sample_generator(seed, i, device) for i in indices]
    noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
    stochastic = is_stochastic(mode, sampler_kwargs.get("eta", 0.0)) if stochastic is None else stochastic
    extra = {"generator": gens} if stochastic else {}
    cls_token_dim = getattr(model, "cls_token_dim", None)
    if cls_token_dim:  # REG: the class token's initial noise, drawn right after the image's
        extra["cls_latents"] = torch.stack([torch.randn(cls_token_dim, generator=g, device=device) for g in gens])
    with autocast or nullcontext():
        z = SAMPLERS[mode](model, noise, conditions, **sampler_kwargs, **extra)
        return quantize(decode(z.float()), quantization)
