"""Gaussian diffusion (DDPM) for DiT + REPA: schedule, hybrid loss, respacing, DDPM and DDIM samplers.

Discrete time runs over t = 0..T-1 (T = 1000): t = 0 is nearly clean, T-1 nearly pure noise, the same
direction as loss.py (t=0 data, t=1 noise). Where a continuous time is needed (the guidance interval)
it is the normalised t / T of the *original* 1000-step process, also after respacing.

Forward process (Ho et al. 2020, Eq. 4), betas linear from 1e-4 to 0.02:
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),   alpha_t = 1 - beta_t,  abar_t = prod_{s<=t} alpha_s.
Posterior (Ho Eq. 6-7), with abar_{-1} = 1:
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta_tilde_t I),
    c1_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t),  c2_t = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t),
    beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).
Model (DiT with learned sigma) outputs [eps | v]:
    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),   mean = c1_t x0_hat + c2_t x_t,
    log variance = (v + 1)/2 log beta_t + (1 - v)/2 log beta_tilde_t     (improved DDPM, Eq. 15).
Training loss (improved DDPM Eq. 16, as DiT trains): L = ||eps - eps_hat||^2 (mean over dims) + L_t,
where L_t is the VLB term in bits per dim with a stop-gradient on the mean, so it trains only the variance:
KL(q posterior || p) for t > 0, the discretized Gaussian decoder NLL for t = 0. iDDPM's lambda = 0.001 on
L_vlb = T * E_t[L_t] is exactly L_t for T = 1000. REPA adds proj_coeff x the alignment loss on the zs of
the same forward, and `DiffusionLoss` returns loss.LossTerms, so training treats SiT and DiT alike.

Samplers (signatures parallel to samplers.py) integrate in float64 and run the model on the latents'
dtype with long timesteps. Classifier-free guidance follows DiT: guide the eps half on all channels, keep
the variance half of the conditional output; it acts only while t / T lies in [guidance_low,
guidance_high], and there the model runs once on the batched (cond, null) pair.
"""

import math
from dataclasses import dataclass, field

import torch

from loss import LossTerms, alignment_loss

# The null-class lookup and per-sample noise are shared with the flow samplers, so that both families give
# batch-independent samples from the same list of generators.
from samplers import randn_like, resolve_null_class


def linear_betas(num_timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """(T,) float64 betas, linear from beta_start to beta_end (DDPM / DiT schedule)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps, num_steps):
    """num_steps timesteps of 0..T-1 evenly spaced, both ends included, rounded to the nearest integer.

    This is DiT's respacing for a plain step count: 250 gives 0, 4, 8, ..., 991, 995, 999.
    """
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must lie in 2..{num_timesteps}, got {num_steps}")
    stride = (num_timesteps - 1) / (num_steps - 1)
    return [round(i * stride) for i in range(num_steps)]


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) elementwise for data on 256 levels in [-1, 1] under N(mean, e^(2 log_scale)) (DDPM decoder).

    Each level owns the bin [x - 1/255, x + 1/255]; the edge levels own the tails (-inf, -1 + 1/255] and
    [1 - 1/255, inf). Uses the exact normal CDF (ADM uses a tanh approximation of it). SD-VAE latents are
    not on this grid; DiT applies the same term to them regardless, and so do we.
    """
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (x - mean + 1 / 255)
    lower = inv_scale * (x - mean - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X <= x + 1/255)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X >= x - 1/255)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


def _extract(values, t, x):
    """values[t] for (T,) float64 values and (N,) long t, shaped (N, 1, ..., 1) to broadcast against x."""
    out = values.to(t.device)[t].to(x.dtype)
    return out.view(-1, *([1] * (x.ndim - 1)))


class GaussianDiffusion:
    """A (possibly respaced) discrete diffusion: its betas and the model timestep of each of its steps.

    `timestep_map[i]` is the original timestep that step i stands for; the model is always called with
    it, so a model trained on 1000 steps samples with any subset of them.
    """

    def __init__(self, betas, timestep_map=None, original_num_timesteps=None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D sequence of at least 2 values, got shape {tuple(betas.shape)}")
        if not ((betas > 0) & (betas <= 1)).all():
            raise ValueError(f"betas must lie in (0, 1], got min {betas.min().item()} max {betas.max().item()}")
        self.betas = betas  # (T,)
        self.num_timesteps = len(betas)
        self.timestep_map = torch.arange(len(betas)) if timestep_map is None else torch.as_tensor(timestep_map)
        self.original_num_timesteps = original_num_timesteps or len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)  # abar_t
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1 - abar_prev) / (1 - abar)  # beta_tilde_t; 0 at t = 0
        # log beta_tilde_0 = -inf: use log beta_tilde_1 there (iDDPM), a floor for the decoder's variance.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1 - abar)  # c1_t, multiplies x_0
        self.posterior_mean_coef2 = alphas.sqrt() * (1 - abar_prev) / (1 - abar)  # c2_t, multiplies x_t
        # Fixed variance for a model without learned sigma: beta_t ("large"), beta_tilde_1 at t = 0 (iDDPM).
        self.log_betas_fixed = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))

    @classmethod
    def linear(cls, num_timesteps=1000, beta_start=1e-4, beta_end=0.02):
        """The DDPM / DiT process: linear betas 1e-4..0.02 over 1000 steps."""
        return cls(linear_betas(num_timesteps, beta_start, beta_end))

    def respace(self, use_timesteps):
        """The process restricted to the given steps (indices into this one), with betas recomputed.

        Keeping abar at the kept steps t_0 < t_1 < ... fixes the new betas: beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}}
        (abar_{t_{-1}} = 1), so q(x_t | x_0) is unchanged at every kept step.
        """
        use = sorted(set(int(t) for t in use_timesteps))
        if not use or use[0] < 0 or use[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps to keep must lie in 0..{self.num_timesteps - 1}, got {use_timesteps!r}")
        abar = self.alphas_cumprod[use]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return GaussianDiffusion(1 - abar / abar_prev, self.timestep_map[use], self.original_num_timesteps)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for (N,) step indices t."""
        return (
            _extract(self.alphas_cumprod.sqrt(), t, x0) * x0 + _extract((1 - self.alphas_cumprod).sqrt(), t, x0) * noise
        )

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), each broadcast like x_t."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x0 + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _extract(self.posterior_variance, t, x_t), _extract(self.posterior_log_variance_clipped, t, x_t)

    def p_mean_variance(self, model_output, x_t, t):
        """Mean, log-variance and x0_hat of p(x_{t-1} | x_t) from the model's [eps | v] (or eps) output."""
        eps, v = split_output(model_output, x_t)
        if v is None:
            log_variance = _extract(self.log_betas_fixed, t, x_t).expand_as(x_t)
        else:
            # v in [-1, 1] interpolates the log-variance between beta_tilde_t (v = -1) and beta_t (v = 1).
            frac = (v + 1) / 2
            log_variance = frac * _extract(self.betas.log(), t, x_t) + (1 - frac) * _extract(
                self.posterior_log_variance_clipped, t, x_t
            )
        x0_hat = self.predict_x0(x_t, t, eps)
        mean, _, _ = self.q_posterior(x0_hat, x_t, t)
        return mean, log_variance, x0_hat

    def predict_x0(self, x_t, t, eps):
        """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (x_t - _extract((1 - self.alphas_cumprod).sqrt(), t, x_t) * eps) / _extract(
            self.alphas_cumprod.sqrt(), t, x_t
        )

    def vb_terms_bpd(self, model_output, x0, x_t, t):
        """(N,) VLB term L_t in bits per dim: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, decoder NLL -log p(x_0|x_1) at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        mean, log_variance, _ = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, mean, log_variance).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_output, x0, x_t, noise, t):
        """(mse, vb), each (N,): the epsilon MSE (mean over dims) and the VLB term with the mean detached.

        The stop-gradient (improved DDPM, Sec. 3.1) lets L_t train only the variance half of the output; the
        mean is trained by the MSE alone. vb is zero for a model without learned sigma.
        """
        model_output = model_output.float()
        eps, v = split_output(model_output, x_t)
        mse = (noise.float() - eps).pow(2).flatten(1).mean(1)
        if v is None:
            return mse, torch.zeros_like(mse)
        frozen = torch.cat([eps.detach(), v], dim=1)
        return mse, self.vb_terms_bpd(frozen, x0.float(), x_t.float(), t)


def split_output(model_output, x_t):
    """[eps | v] -> (eps, v) for a learned-sigma output (2C channels), (eps, None) for an eps-only output (C)."""
    C = x_t.shape[1]
    if model_output.shape[1] == 2 * C:
        return model_output[:, :C], model_output[:, C:]
    if model_output.shape[1] == C:
        return model_output, None
    raise ValueError(f"model output has {model_output.shape[1]} channels; expected {C} (eps) or {2 * C} (eps, v)")


@dataclass
class DiffusionLoss:
    """DiT's hybrid loss (eps MSE + VLB term) plus proj_coeff x the REPA alignment loss; same call as REPALoss."""

    proj_coeff: float = 0.5  # lambda in the paper
    num_timesteps: int = 1000
    diffusion: GaussianDiffusion = field(init=False, repr=False)

    def __post_init__(self):
        self.diffusion = GaussianDiffusion.linear(self.num_timesteps)

    def __call__(self, model, x, y, zs_target=(), generator=None):
        """x: (N, C, H, W) clean latents; y: (N,) labels; zs_target: list of (N, T, D_k) encoder tokens."""
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device, generator=generator)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_t = self.diffusion.q_sample(x, t, noise)
        output, zs_pred = model(x_t, t, y)  # t: long timesteps 0..T-1
        mse, vb = self.diffusion.training_losses(output, x, x_t, noise, t)
        denoising = mse + vb
        if zs_target and self.proj_coeff != 0:
            proj = alignment_loss(zs_pred, zs_target)
        else:
            proj = torch.zeros((), device=x.device)
        return LossTerms(denoising=denoising, proj=proj, total=denoising.mean() + self.proj_coeff * proj)


#################################################################################
#                                   Samplers                                    #
#################################################################################


def _guided_output(model, x, timestep, y, y_null, cfg_scale, guided, dtype):
    """Model output (float64) at state x and one original timestep; CFG on eps, variance from the conditional."""
    if guided:
        model_input, labels = torch.cat([x, x]), torch.cat([y, y_null])
    else:
        model_input, labels = x, y
    t_input = torch.full((model_input.shape[0],), int(timestep), dtype=torch.long, device=x.device)
    out = model(model_input.to(dtype), t_input, labels)[0].to(torch.float64)
    if guided:
        cond, uncond = out.chunk(2)
        C = x.shape[1]
        eps = uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])
        out = torch.cat([eps, cond[:, C:]], dim=1)
    return out


def _in_guidance_interval(cfg_scale, t, guidance_low, guidance_high):
    """Guidance acts while the normalised time t = timestep / T lies in [low, high] (samplers.py semantics)."""
    return cfg_scale > 1.0 and guidance_low <= t <= guidance_high


def _respaced(diffusion, num_steps):
    base = GaussianDiffusion.linear() if diffusion is None else diffusion
    return base.respace(space_timesteps(base.num_timesteps, num_steps))


@torch.no_grad()
def ddpm_sampler(
    model,
    latents,
    y,
    num_steps=250,
    cfg_scale=1.0,
    guidance_low=0.0,
    guidance_high=1.0,
    null_class=None,
    generator=None,
    diffusion=None,  # the training process; None = linear betas 1e-4..0.02 over 1000 steps
):
    """Ancestral sampling x_{t-1} ~ N(mean, exp(log_var)) over num_steps respaced steps (250 for FID, as DiT).

    latents: (N, C, H, W) x_T ~ N(0, I). No noise is added at the last step (the output is the mean).
    `generator`: one torch.Generator or a list with one per sample (batch-independent samples).
    """
    spaced = _respaced(diffusion, num_steps)
    dtype = latents.dtype
    y_null = torch.full_like(y, resolve_null_class(model, null_class)) if cfg_scale > 1.0 else None
    x = latents.to(torch.float64)
    for i in reversed(range(spaced.num_timesteps)):
        timestep = int(spaced.timestep_map[i])
        guided = _in_guidance_interval(cfg_scale, timestep / spaced.original_num_timesteps, guidance_low, guidance_high)
        out = _guided_output(model, x, timestep, y, y_null, cfg_scale, guided, dtype)
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        mean, log_variance, _ = spaced.p_mean_variance(out, x, t)
        x = mean
        if i > 0:
            x = x + torch.exp(0.5 * log_variance) * randn_like(x, generator)
    return x.to(dtype)


@torch.no_grad()
def ddim_sampler(
    model,
    latents,
    y,
    num_steps=50,
    cfg_scale=1.0,
    guidance_low=0.0,
    guidance_high=1.0,
    null_class=None,
    generator=None,
    diffusion=None,
    eta=0.0,  # 0: deterministic DDIM; 1: the DDPM posterior variance beta_tilde of the respaced process
):
    """DDIM (Song et al. 2021, Eq. 12) over num_steps respaced steps, from the eps half of the output:

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    spaced = _respaced(diffusion, num_steps)
    dtype = latents.dtype
    y_null = torch.full_like(y, resolve_null_class(model, null_class)) if cfg_scale > 1.0 else None
    x = latents.to(torch.float64)
    for i in reversed(range(spaced.num_timesteps)):
        timestep = int(spaced.timestep_map[i])
        guided = _in_guidance_interval(cfg_scale, timestep / spaced.original_num_timesteps, guidance_low, guidance_high)
        eps, _ = split_output(_guided_output(model, x, timestep, y, y_null, cfg_scale, guided, dtype), x)
        abar, abar_prev = spaced.alphas_cumprod[i].item(), spaced.alphas_cumprod_prev[i].item()
        x0_hat = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        x = math.sqrt(abar_prev) * x0_hat + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if sigma > 0:  # sigma = 0 at the last step, where abar_prev = 1
            x = x + sigma * randn_like(x, generator)
    return x.to(dtype)
