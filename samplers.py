"""ODE and SDE samplers for velocity-prediction models, with the official REPA semantics.

Time runs from t=1 (noise) to t=0 (data) (convention in loss.py). The state is integrated in float64;
the model sees it cast to the latents' dtype, as in the official code, and the result is returned in
that dtype.

The condition `y` is whatever the model takes third, `model(x, t, y)`: class labels (N,) for the SiT, text
tokens (N, L, 768) for the MMDiT (models/mmdit.py). Guidance pairs it with the null condition, one per
sample: the null class (by default the model's num_classes) or, for text, the empty caption's tokens
(passed as `null_condition=`, the official T2I sampler's y_null).

Classifier-free guidance acts on all channels and only while the current step's start time t_cur lies
in [guidance_low, guidance_high]; there the model runs once on the batched (cond, null) pair, elsewhere
once on the conditional batch alone. With REPA's best setting, cfg_scale=1.8 and [0, 0.7], the noisiest
30% of the trajectory runs unguided (paper, Table 4).

REG (Wu et al. 2025, Martinser/REG): a model built with `cls_token_dim` denoises the encoder's class token
together with the image. Pass its initial noise as `cls_latents` (N, cls_token_dim): both samplers then
integrate the image and the class token jointly with the same time grid, the model is called as
`model(x, t, y, cls_token=c)` and returns `(v, zs, cls_v)`, and the class token's velocity is guided with
its own `cls_cfg_scale` inside the same guidance interval (REG's rule: a scale <= 0 keeps the conditional
class-token velocity, as does 1). Only the image is returned, as REG's sampler does. The SDE draws the
class token's Brownian increment right after the image's, from the same generator(s).

`generator` may be one torch.Generator for the whole batch or a list with one per sample; the latter
makes each sample's SDE noise depend only on its own generator, so a sample is reproducible whatever
batch or process it lands in (sample_ddp.py relies on this).
"""

import torch

from loss import Interpolant


def resolve_null_class(model, null_class):
    """The null label: explicit, else the (possibly DDP-wrapped) model's num_classes. Never 1000 by fiat."""
    if null_class is not None:
        return null_class
    module = getattr(model, "module", model)
    if not hasattr(module, "num_classes"):
        raise ValueError("cfg_scale > 1 needs the null class: pass null_class= or use a model with num_classes")
    return module.num_classes


def null_condition_like(y, model, null_condition=None):
    """The null condition broadcast to y's shape and dtype: `null_condition` if given (a class index, or a
    text model's empty-caption tokens, (L, D) or (1, L, D)), else the (possibly DDP-wrapped) model's num_classes."""
    if null_condition is None:
        module = getattr(model, "module", model)
        if not hasattr(module, "num_classes"):
            raise ValueError(
                "cfg_scale > 1 needs the null condition: pass null_condition= (the null class, or the empty "
                "caption's tokens for a text-conditioned model) or use a model with num_classes"
            )
        null_condition = module.num_classes
    null = torch.as_tensor(null_condition, dtype=y.dtype, device=y.device)
    if null.ndim > y.ndim or any(n not in (1, m) for n, m in zip(reversed(null.shape), reversed(y.shape))):
        raise ValueError(
            f"null_condition of shape {tuple(null.shape)} does not broadcast to the condition's {tuple(y.shape)}"
        )
    return null.expand_as(y)


def _guide(cond_uncond, scale):
    """uncond + scale (cond - uncond) of a (2N, ...) batch stacked [cond; uncond]."""
    cond, uncond = cond_uncond.chunk(2)
    return uncond + scale * (cond - uncond)


def _velocity(model, x, t, y, y_null, cfg_scale, guided, dtype, cls=None, cls_cfg_scale=1.0):
    """Model velocity at state x (float64) and scalar time t, guided when `guided` (one batched call).

    With a REG class-token state `cls` (N, cls_token_dim) it returns (v, cls_v), else (v, None). The class
    token is guided with cls_cfg_scale; REG keeps its conditional velocity when that scale is <= 0.
    """
    if guided:
        model_input, labels = torch.cat([x, x]), torch.cat([y, y_null])
        cls_input = None if cls is None else torch.cat([cls, cls])
    else:
        model_input, labels, cls_input = x, y, cls
    time_input = torch.full((model_input.shape[0],), float(t), device=x.device, dtype=torch.float64)
    if cls_input is None:
        out = model(model_input.to(dtype), time_input.to(dtype), labels)
        cls_v = None
    else:
        out = model(model_input.to(dtype), time_input.to(dtype), labels, cls_token=cls_input.to(dtype))
        cls_v = out[2].to(torch.float64)
    v = out[0].to(torch.float64)
    if guided:
        v = _guide(v, cfg_scale)
        if cls_v is not None:
            cls_v = _guide(cls_v, cls_cfg_scale) if cls_cfg_scale > 0 else cls_v.chunk(2)[0]
    return v, cls_v


def randn_like(x, generator):
    """Standard normal noise shaped like x from one generator, or from one generator per sample (a list)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device) for g in generator])
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


@torch.no_grad()
def euler_sampler(
    model,
    latents,
    y,
    num_steps=20,
    heun=False,
    cfg_scale=1.0,
    guidance_low=0.0,
    guidance_high=1.0,
    path_type="linear",  # the probability-flow ODE of a velocity model does not depend on the path
    null_condition=None,  # the null class or null text tokens for guidance; default: the model's num_classes
    cls_latents=None,  # REG: (N, cls_token_dim) initial noise of the class token, integrated jointly
    cls_cfg_scale=1.0,  # REG: guidance scale of the class token's velocity (<= 0 or 1: conditional)
):
    """Probability-flow ODE dx/dt = v(x, t) on linspace(1, 0, num_steps + 1), Euler or Heun.

    Heun (2nd order) corrects every step but the last, which would evaluate the model at t=0.
    Returns the samples at t=0 in latents.dtype (the image only, for REG models too).
    """
    Interpolant(path_type)  # validates the name
    dtype = latents.dtype
    y_null = null_condition_like(y, model, null_condition) if cfg_scale > 1.0 else None
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x = latents.to(torch.float64)
    cls = None if cls_latents is None else cls_latents.to(torch.float64)  # REG's class-token state
    guide = dict(cls_cfg_scale=cls_cfg_scale)
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        dt = t_next - t_cur
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        d_cur, cls_d_cur = _velocity(model, x, t_cur, y, y_null, cfg_scale, guided, dtype, cls, **guide)
        x_next = x + dt * d_cur
        cls_next = None if cls is None else cls + dt * cls_d_cur
        if heun and i < num_steps - 1:
            # The official code decides guidance for both evaluations from t_cur; kept for equivalence.
            d_next, cls_d_next = _velocity(
                model, x_next, t_next, y, y_null, cfg_scale, guided, dtype, cls_next, **guide
            )
            x_next = x + dt * (0.5 * d_cur + 0.5 * d_next)
            cls_next = None if cls is None else cls + dt * (0.5 * cls_d_cur + 0.5 * cls_d_next)
        x, cls = x_next, cls_next
    return x.to(dtype)


@torch.no_grad()
def euler_maruyama_sampler(
    model,
    latents,
    y,
    num_steps=250,
    cfg_scale=1.0,
    guidance_low=0.0,
    guidance_high=1.0,
    path_type="linear",
    null_condition=None,
    generator=None,
    cls_latents=None,  # REG: (N, cls_token_dim) initial noise of the class token, integrated jointly
    cls_cfg_scale=1.0,  # REG: guidance scale of the class token's velocity (<= 0 or 1: conditional)
):
    """Reverse SDE dx = [v - 1/2 w(t) score] dt + sqrt(w(t)) dW with w(t) = 2t (Euler-Maruyama).

    Grid: linspace(1, 0.04, num_steps) and a final deterministic (mean) step from 0.04 to 0, so the
    model is never evaluated at t=0 and no noise is added at the end. The score comes from the velocity
    through the interpolant (path_type must match training). Guidance is applied to the velocity; since
    the drift is affine in v, this equals the official guidance of the drift (REG guides the drift of the
    image and of the class token; the same argument holds for each). The class token follows the same SDE.
    """
    interpolant = Interpolant(path_type)
    dtype = latents.dtype
    y_null = null_condition_like(y, model, null_condition) if cfg_scale > 1.0 else None
    t_steps = torch.cat(
        [torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
    )
    x = latents.to(torch.float64)
    cls = None if cls_latents is None else cls_latents.to(torch.float64)  # REG's class-token state
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        dt = t_next - t_cur  # negative
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        v, cls_v = _velocity(model, x, t_cur, y, y_null, cfg_scale, guided, dtype, cls, cls_cfg_scale)
        diffusion = 2 * t_cur
        drift = v - 0.5 * diffusion * interpolant.score_from_velocity(v, x, t_cur)
        x_next = x + drift * dt
        if cls is not None:
            cls_drift = cls_v - 0.5 * diffusion * interpolant.score_from_velocity(cls_v, cls, t_cur)
            cls_next = cls + cls_drift * dt
        if i < num_steps - 1:  # the last step is the mean: no noise at t = 0
            x_next = x_next + torch.sqrt(diffusion) * torch.sqrt(-dt) * randn_like(x, generator)
            if cls is not None:
                cls_next = cls_next + torch.sqrt(diffusion) * torch.sqrt(-dt) * randn_like(cls, generator)
        x = x_next
        if cls is not None:
            cls = cls_next
    return x.to(dtype)
