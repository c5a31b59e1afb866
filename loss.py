"""Interpolants, time sampling and the REPA training objective.

Time convention, used everywhere in this project (loss and samplers alike):
    t = 0 is data, t = 1 is noise,    x_t = alpha(t) * x + sigma(t) * eps,
and the network predicts the velocity  v = d x_t / dt = alpha'(t) * x + sigma'(t) * eps.

The objective (REPA, Eq. 8) is
    L = E ||v_theta(x_t, t, y) - v||^2  +  lambda * E[ -1/T sum_n cos(h_phi(h_t^[n]), y_*^[n]) ],
the second term aligning each projected token of the SiT with the frozen encoder's token of the clean
image. Both terms are returned separately so training can log them. iREPA's spatial normalisation of the
targets (`spnorm_method="zscore"`, see spatial_zscore) is a keyword of REPALoss, off by default.

REG (Wu et al. 2025, Martinser/REG; `cls_coeff` > 0, its `--cls`) entangles the encoder's class token with
the image: the class token c is noised with the image's t and noise of its own, x_t^c = alpha c + sigma eps_c,
the model denoises it jointly, and its velocity error is added with weight cls_coeff:
    L_REG = E ||v_theta - v||^2 + lambda * align([c; patches]) + cls_coeff * E ||v_theta^c - v^c||^2,
the alignment running over the class token and the patch tokens alike, as REG's projection loss does.

HASTE (Wang et al. 2025, NUS-HPC-AI-Lab/HASTE; `attn_coeff` > 0, its `--attn-coeff`) adds attention alignment:
for each pair (SiT block, encoder block) the cross-entropy between the frozen encoder's attention distribution
over patch tokens and the SiT's attention logits, head h against head h, mean over pairs, heads, queries and
batch (attention_alignment_loss). train.py switches both alignment losses off at `--early-stop-point`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PATH_TYPES = ("linear", "cosine")
WEIGHTINGS = ("uniform", "lognormal")
SPNORM_METHODS = ("none", "zscore")  # iREPA's spatial normalisations of the encoder targets


@dataclass(frozen=True)
class Interpolant:
    """alpha(t), sigma(t) and their derivatives for one path; t broadcasts against the data."""

    path_type: str = "linear"

    def __post_init__(self):
        if self.path_type not in PATH_TYPES:
            raise ValueError(f"unknown path_type {self.path_type!r}; choose one of {PATH_TYPES}")

    def coefficients(self, t):
        """Returns (alpha, sigma, d_alpha, d_sigma), each shaped like t."""
        if self.path_type == "linear":
            one = torch.ones_like(t)
            return 1 - t, t, -one, one
        half_pi = math.pi / 2
        cos, sin = torch.cos(half_pi * t), torch.sin(half_pi * t)
        return cos, sin, -half_pi * sin, half_pi * cos

    def interpolate(self, x, noise, t):
        """x_t and its velocity target for data x, noise eps and times t (broadcastable, e.g. (N,1,1,1))."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(t)
        return alpha * x + sigma * noise, d_alpha * x + d_sigma * noise

    def score_from_velocity(self, v, x_t, t):
        """grad log p_t(x_t) from the velocity.

        With x_t = alpha x + sigma eps, E[x|x_t] and E[eps|x_t] are linked by x_t; solving v for E[eps|x_t]
        gives eps_hat = (alpha v - alpha' x_t) / (alpha sigma' - alpha' sigma), and score = -eps_hat / sigma.
        Algebraically the same as the official get_score_from_velocity.
        """
        alpha, sigma, d_alpha, d_sigma = self.coefficients(t)
        ratio = alpha / d_alpha
        variance = sigma**2 - ratio * d_sigma * sigma
        return (ratio * v - x_t) / variance


def sample_time(
    batch_size, weighting="uniform", path_type="linear", device=None, generator=None, p_mean=0.0, p_std=1.0
):
    """(N,) training times in (0, 1).

    uniform: t ~ U(0, 1). lognormal (EDM-style): sigma = exp(n), n ~ N(p_mean, p_std^2), mapped to the time
    at which that noise-to-signal ratio occurs: linear t = sigma / (1 + sigma), cosine t = 2/pi atan(sigma).
    """
    if weighting == "uniform":
        return torch.rand(batch_size, device=device, generator=generator)
    if weighting == "lognormal":
        sigma = (torch.randn(batch_size, device=device, generator=generator) * p_std + p_mean).exp()
        if path_type == "linear":
            return sigma / (1 + sigma)
        if path_type == "cosine":
            return 2 / math.pi * torch.atan(sigma)
        raise ValueError(f"unknown path_type {path_type!r}; choose one of {PATH_TYPES}")
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")


def alignment_loss(zs_pred, zs_target):
    """REPA alignment: negative cosine similarity per token, mean over tokens, batch and encoders.

    zs_pred, zs_target: lists with one (N, T, D_k) tensor per encoder. Computed in float32 whatever the
    autocast precision, since normalising fp16 vectors of dim 1024 loses precision.
    """
    if len(zs_pred) != len(zs_target):
        raise ValueError(f"{len(zs_pred)} projector outputs but {len(zs_target)} encoder targets")
    if not zs_pred:
        raise ValueError("alignment_loss needs at least one encoder target")
    losses = []
    for k, (z, z_target) in enumerate(zip(zs_pred, zs_target)):
        if z.shape != z_target.shape:
            raise ValueError(
                f"encoder {k}: projector output {tuple(z.shape)} does not match target {tuple(z_target.shape)}"
                " (token grid or embedding dim differs)"
            )
        cos = (F.normalize(z.float(), dim=-1) * F.normalize(z_target.float(), dim=-1)).sum(dim=-1)  # (N, T)
        losses.append(-cos.mean())
    return torch.stack(losses).mean()


def spatial_zscore(feat, alpha=1.0, eps=1e-6):
    """iREPA's spatial normalisation: (N, T, D) tokens standardised over the T spatial positions, per channel.

    Each channel loses alpha times its mean over the image's tokens and is divided by its (unbiased) standard
    deviation over them, plus eps. Removing the component all tokens share raises the spatial contrast of
    the target (tokens of one region stay similar, unrelated regions stop looking alike), which iREPA finds
    is what the alignment should transfer. alpha=1 is a full z-score; iREPA trains with alpha 0.6.
    """
    mean = feat.mean(dim=1, keepdim=True)  # (N, 1, D)
    std = feat.std(dim=1, keepdim=True)  # (N, 1, D), unbiased as in iREPA
    return (feat - alpha * mean) / (std + eps)


def attention_alignment_loss(student_logits, teacher_probs, skip_tokens=0):
    """HASTE's attention alignment: mean over layer pairs of the cross-entropy H(p_teacher, softmax(logits)).

    student_logits: list of (N, H_s, T_s, T_s) SiT attention logits; teacher_probs: list of (N, H, T, T) encoder
    attention distributions over its patch tokens (rows sum to 1). The student's first H heads are aligned, head
    h with head h (H_s >= H); its first `skip_tokens` positions (REG's class token) are dropped from queries
    and keys, so both sides are distributions over the same T patch tokens. Per (sample, head, query) the loss
    is -sum_k p(k) log softmax(s)(k); it is minimal, and equals the teacher's entropy, where the two agree.
    Computed in float32.
    """
    if len(student_logits) != len(teacher_probs):
        raise ValueError(f"{len(student_logits)} SiT attention maps but {len(teacher_probs)} encoder targets")
    if not student_logits:
        raise ValueError("attention_alignment_loss needs at least one layer pair")
    losses = []
    for i, (s, p) in enumerate(zip(student_logits, teacher_probs)):
        heads, tokens = p.shape[1], p.shape[-1]
        s = s[:, :, skip_tokens:, skip_tokens:]
        if s.shape[1] < heads or s.shape[-1] != tokens or s.shape[0] != p.shape[0]:
            raise ValueError(
                f"layer pair {i}: SiT attention {tuple(s.shape)} (after dropping {skip_tokens} tokens) cannot be "
                f"aligned with the encoder's {tuple(p.shape)}: it needs >= {heads} heads over {tokens} tokens"
            )
        log_q = s[:, :heads].float().log_softmax(dim=-1)
        losses.append(-(p.float() * log_q).sum(dim=-1).mean())
    return torch.stack(losses).mean()


@dataclass
class LossTerms:
    denoising: torch.Tensor  # (N,) per-sample mean squared velocity error
    proj: torch.Tensor  # () alignment loss (0 when REPA is off)
    total: torch.Tensor  # () denoising.mean() + proj_coeff * proj (+ cls_coeff * cls.mean() for REG)
    cls: torch.Tensor | None = None  # REG: (N,) per-sample mean squared class-token velocity error
    attn: torch.Tensor | None = None  # HASTE: () attention alignment cross-entropy


@dataclass
class REPALoss:
    """Flow matching with velocity prediction plus proj_coeff x the alignment loss."""

    path_type: str = "linear"
    weighting: str = "uniform"
    proj_coeff: float = 0.5  # lambda in the paper
    prediction: str = "v"
    spnorm_method: str = "none"  # iREPA: "zscore" normalises the encoder targets over space (spatial_zscore)
    zscore_alpha: float = 0.6  # iREPA's default: the fraction of the spatial mean removed
    cls_coeff: float = 0.0  # REG's --cls: weight of the class-token velocity loss (REG: 0.03); > 0 = REG mode
    attn_coeff: float = 0.0  # HASTE's --attn-coeff: weight of the attention alignment (HASTE: 0.5)

    def __post_init__(self):
        if self.prediction != "v":
            raise ValueError(f"prediction {self.prediction!r} is not supported; REPA predicts the velocity ('v')")
        if self.spnorm_method not in SPNORM_METHODS:
            raise ValueError(f"unknown spnorm_method {self.spnorm_method!r}; choose one of {SPNORM_METHODS}")
        if self.attn_coeff < 0:
            raise ValueError(f"attn_coeff (HASTE's --attn-coeff) must be >= 0, got {self.attn_coeff}")
        if self.cls_coeff < 0:
            raise ValueError(f"cls_coeff (REG's --cls) must be >= 0, got {self.cls_coeff}")
        self.interpolant = Interpolant(self.path_type)
        sample_time(1, self.weighting, self.path_type)  # validates weighting early

    def __call__(self, model, x, y, zs_target=(), generator=None, attn_target=()):
        """x: (N, C, H, W) clean latents; y: (N,) labels; zs_target: list of (N, T, D_k) encoder tokens;
        attn_target (HASTE): list of (N, heads, T, T) encoder attention distributions, one per SiT block the
        model records (SiT.record_attention). Empty targets switch the corresponding loss off (early stop).

        REG (cls_coeff > 0): each target is (N, 1 + T, D_k), the encoder's class token first
        (FrozenEncoder.encode(..., class_token=True)); the first encoder's class token is the one denoised.
        """
        t = sample_time(x.shape[0], self.weighting, self.path_type, x.device, generator).to(x.dtype)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_t, v_target = self.interpolant.interpolate(x, noise, t.view(-1, 1, 1, 1))
        if self.cls_coeff > 0:
            if not zs_target:
                raise ValueError("REG (cls_coeff > 0) needs an encoder target: its class token is denoised")
            cls_token = zs_target[0][:, 0].to(x.dtype)  # (N, D_0)
            cls_noise = torch.randn(cls_token.shape, device=x.device, dtype=x.dtype, generator=generator)
            cls_t, cls_v_target = self.interpolant.interpolate(cls_token, cls_noise, t.view(-1, 1))
            v_pred, zs_pred, cls_v_pred = model(x_t, t, y, cls_token=cls_t)
            cls_loss = (cls_v_pred.float() - cls_v_target.float()).pow(2).mean(dim=1)  # (N,)
        else:
            v_pred, zs_pred = model(x_t, t, y)
            cls_loss = None
        denoising = (v_pred.float() - v_target.float()).pow(2).mean(dim=(1, 2, 3))
        if zs_target and self.proj_coeff != 0:
            proj = alignment_loss(zs_pred, self.normalize_targets(zs_target))
        else:
            proj = torch.zeros((), device=x.device)
        total = denoising.mean() + self.proj_coeff * proj
        if cls_loss is not None:
            total = total + self.cls_coeff * cls_loss.mean()
        attn = None
        if attn_target and self.attn_coeff != 0:
            module = getattr(model, "module", model)  # DDP-wrapped or not
            module = getattr(module, "_orig_mod", module)  # torch.compile'd or not
            skip = 1 if cls_loss is not None else 0  # REG's class token is not a patch
            attn = attention_alignment_loss(module.attention_logits(), attn_target, skip_tokens=skip)
            total = total + self.attn_coeff * attn
        if zs_pred and not zs_target:
            # Alignment switched off (HASTE's early stop): the projectors stay in the graph with zero weight, so
            # DDP's gradient reduction still finds every parameter used. Adds exactly 0 to the loss.
            total = total + 0.0 * sum(z.sum() for z in zs_pred)
        return LossTerms(denoising=denoising, proj=proj, total=total, cls=cls_loss, attn=attn)

    def normalize_targets(self, zs_target):
        """The encoder targets as the alignment sees them: as given, or spatially z-scored (iREPA), in float32."""
        if self.spnorm_method == "none":
            return zs_target
        return [spatial_zscore(z.float(), alpha=self.zscore_alpha) for z in zs_target]
