"""The SD-VAE: one loader for preprocessing (encode), training previews and sampling (decode).

Latents follow the convention of REPA and DiT: a latent z the diffusion model sees is
    z = latent_scale * (VAE posterior sample) + latent_bias      (scale 0.18215, bias 0 for the SD-VAE),
so decoding applies (z - latent_bias) / latent_scale before the VAE decoder. Both numbers are saved in
every training checkpoint's config; sampling reads them from there.

Names: "ema" and "mse" are short for the two SD-VAE releases (training latents were encoded with
sd-vae-ft-mse, the paper's samples decoded with sd-vae-ft-ema); anything else is a hub name or a local
folder (its own config.json, or a diffusers pipeline folder with a vae/ sub-folder).
"""

import os

import torch

VAE_NAMES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


class VAENotFoundError(OSError):
    """The VAE's files are not here: offline with an empty cache, or a local path that does not exist."""


def resolve_vae_name(name: str) -> str:
    """'ema' / 'mse' -> the hub name; anything else unchanged."""
    return VAE_NAMES.get(name, name)


def load_vae(name: str, device="cpu"):
    """A frozen diffusers AutoencoderKL in eval mode.

    Raises VAENotFoundError (with the command that fetches it) when the weights cannot be found, so a
    caller may carry on without previews; any other failure (a broken config, wrong weights) propagates.
    """
    from diffusers.models import AutoencoderKL

    resolved = resolve_vae_name(name)
    if os.path.isabs(resolved) or resolved.startswith(".") or os.path.exists(resolved):
        if not os.path.isdir(resolved):
            raise VAENotFoundError(f"--vae {name}: no such folder")
        subfolder = None if os.path.isfile(os.path.join(resolved, "config.json")) else "vae"
        try:  # a local folder that is there but does not load is a mistake to stop on, not to skip
            vae = AutoencoderKL.from_pretrained(resolved, subfolder=subfolder)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"--vae {resolved}: the folder does not hold a loadable AutoencoderKL: {e}") from e
    else:
        try:
            vae = AutoencoderKL.from_pretrained(resolved)
        except OSError as e:  # huggingface_hub's "not in the local cache" / "cannot connect" errors
            raise VAENotFoundError(
                f'cannot find the VAE {resolved!r} ({e}). With network access, fetch it once: `python -c "from '
                f"diffusers.models import AutoencoderKL; AutoencoderKL.from_pretrained('{resolved}')\"`; or pass "
                "--vae /local/folder holding its config.json and weights"
            ) from e
    return vae.eval().requires_grad_(False).to(device)


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 2C, H/8, W/8) float32: posterior mean then std (8 x 32 x 32 at 256 px)."""
    x = images.to(torch.float32) / 127.5 - 1  # [0, 255] -> [-1, 1], the SD-VAE input range
    posterior = vae.encode(x).latent_dist
    return torch.cat([posterior.mean, posterior.std], dim=1).float()


@torch.no_grad()
def encode_mean_logvar(vae, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 2C, H/8, W/8) float32: posterior mean then *log-variance*, the encoder's raw
    moments, unclamped: what U-ViT's MS-COCO features store (`{i}.npy`; readers clamp to [-30, 20])."""
    x = images.to(torch.float32) / 127.5 - 1
    return vae.encode(x).latent_dist.parameters.float()


def latent_decoder(vae, latent_scale: float, latent_bias: float):
    """Model latents -> images in [-1, 1] (float32), undoing the training-time scale and bias."""

    @torch.no_grad()
    def decode(z):
        return vae.decode((z.float() - latent_bias) / latent_scale).sample.float()

    return decode
