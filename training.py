"""The optimizer step of train.py, shared with benchmarks/train_step.py: `TrainStep` (micro-batches, targets,
loss, backward, clipping, AdamW, EMA), the AdamW it steps, torch.compile where it helps, the per-step seeding
and the learning-rate and alignment schedules. All of a step's randomness comes from (seed, rank, data
position), so a step can be rerun exactly: train.py's exact resume rests on this."""

import os
import shutil

import torch
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from config import TrainConfig
from diffusion import DiffusionLoss
from loss import REPALoss
from models import MODELS, T2I_MODELS, model_family
from models.encoders import encoder_resolution, load_encoders


def step_seed(seed: int, rank: int, position: int) -> int:
    """A distinct seed per (seed, rank, data position): the whole RNG state of one micro-step."""
    return (seed * 1_000_003 + rank * 7_919 + position * 65_537) % (2**63 - 1)


def learning_rate_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up, then constant (the paper's)."""
    if cfg.lr_warmup_steps > 0:
        return cfg.learning_rate * min(1.0, (step + 1) / cfg.lr_warmup_steps)
    return cfg.learning_rate


def alignment_on(cfg: TrainConfig, step: int) -> bool:
    """Whether optimizer step `step` (0-based) aligns: always, unless HASTE's --early-stop-point N ends
    alignment (and the encoder forward) from step N on. A function of the step: resumes exactly."""
    return cfg.early_stop_point == 0 or step < cfg.early_stop_point


def sample_latents(x, cfg: TrainConfig):
    """Dataset `x` -> model input. Latent mode: x holds the posterior mean and std (N, 2C, h, w); draw a
    sample and scale it (0.18215 for the SD-VAE). Pixel mode: x already is the image in [-1, 1]."""
    if cfg.pixel_space:
        return x
    mean, std = x.chunk(2, dim=1)
    return (mean + std * torch.randn_like(mean)) * cfg.latent_scale + cfg.latent_bias


@torch.no_grad()
def update_ema(ema, model, decay, apply=None):
    """ema <- decay * ema + (1 - decay) * model, over parameters (buffers are fixed), as one foreach op.

    apply: an optional bool tensor on the device; False leaves the EMA unchanged (a skipped step) without
    a host-device sync: the lerp weight becomes (1 - decay) * apply = 0.
    """
    ema_params = list(ema.parameters())
    weight = 1 - decay
    if apply is not None:
        weight = torch.tensor(weight, device=apply.device) * apply
    torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)], weight)


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB


def make_optimizer(cfg: TrainConfig, params, device) -> torch.optim.AdamW:
    """AdamW as the paper's, fused into one kernel per step where the device has it (CUDA, CPU, MPS, XPU),
    else the foreach implementation. The fused kernel also takes `found_inf`: a skipped step on the device."""
    fused = device.type in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
        fused=fused or None,
        foreach=None if fused else True,
    )


def compile_available(device) -> tuple[bool, str]:
    """Whether torch.compile can run here: CUDA, or a CPU with a C++ compiler (inductor's CPU backend)."""
    if device.type == "cuda":
        return True, "CUDA"
    if device.type == "cpu":
        compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        found = next((c for c in compilers if c and shutil.which(c)), None)
        return (True, f"CPU with {found}") if found else (False, "no C++ compiler on this CPU machine (set CXX)")
    return False, f"untested on {device.type}"


def compile_step(model, encoders, enabled: bool, device, cpu: bool = False):
    """torch.compile the SiT and the encoders' forward where it works (compile_available) and is asked for:
    on a CPU only with `cpu` (--compile-cpu: measured no faster there, docs/speed.md), else leave them eager.
    Returns (model, [encode per encoder], compiled, a note saying why not); the caller reports the note once."""
    available, note = compile_available(device)
    encode = [enc.encode for enc in encoders]
    if enabled and device.type == "cpu" and not cpu:
        return model, encode, False, "off on the CPU (--compile-cpu true to compile there)"
    if not (enabled and available):
        return model, encode, False, note
    # Random ops inside compiled graphs (the model's label dropout) draw from the global generator as in
    # eager mode: a compiled run takes the same draws as an eager one, and resumes exactly.
    torch._inductor.config.fallback_random = True
    return torch.compile(model), [torch.compile(fn) for fn in encode], True, note


class TrainStep:
    """One optimizer step: for each micro-batch, its randomness (reseeded from its data position), the latent
    sample, the encoder targets, the loss and its backward; then the clip, AdamW and the EMA update.

    train.py's loop and benchmarks/train_step.py run this same object. `targets(indices, images)` gives the
    alignment targets, a list of (N, T, D) tokens per encoder: the frozen encoders by default (run under
    no_grad in the training precision: the tokens feed the cosine of the loss, so they are not inference
    tensors), or precomputed ones (a target cache) instead.

    No host-device sync in a step (bf16/fp32): the finite check, summed over ranks, stays a device tensor;
    a non-finite loss or gradient norm on any rank makes the step a no-op on the device: fused AdamW skips
    the update through its `found_inf` input (weights, moments and Adam's step count unchanged), the EMA
    lerps with weight 0. Such a skipped step still counts as a step (its batches are consumed, the learning
    rate schedule and the step counter advance): the host never waits to find out. `nonfinite_steps` (a
    device tensor, saved in checkpoints) counts them. The logged sums live on the device too; read_stats()
    reads them, one sync per log line.
    With fp16 the loss scaler skips overflowing steps (accelerate reads its scale: one sync per step, and
    the loop retries the step); without a fused AdamW a skip needs one sync (foreach AdamW cannot skip).
    """

    STATS = ("loss", "proj_loss", "cls_loss", "attn_loss", "micro_steps", "grad_norm", "updates")

    def __init__(
        self,
        cfg: TrainConfig,
        accelerator,
        model,
        raw_model,
        ema,
        optimizer,
        loss_fn,
        targets=None,
        nonfinite_steps=0,
        null_condition=None,  # text-to-image: the empty caption's tokens (L, D), which captions drop to
    ):
        self.cfg, self.accelerator, self.loss_fn, self.targets = cfg, accelerator, loss_fn, targets
        self.null_condition = null_condition
        self.model, self.raw_model, self.ema, self.optimizer = model, raw_model, ema, optimizer
        self.device, self.rank = accelerator.device, accelerator.process_index
        self.inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # below accelerate's wrapper
        self.fused = bool(self.inner_optimizer.defaults.get("fused"))
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.stats = torch.zeros(len(self.STATS), device=self.device, dtype=dtype)  # sums since read_stats()
        self.nonfinite_steps = torch.tensor(nonfinite_steps, device=self.device)  # the run's total, every rank

    def __call__(self, micro_batches, step: int):
        """micro_batches: gradient_accumulation_steps tuples (position, indices, images, x, labels, *cached)
        on the device, position = the stream position of the batch's first item (all ranks), cached = the
        items' stored encoder tokens (--target-cache), one tensor per encoder, or nothing; step: 0-based."""
        cfg, accelerator = self.cfg, self.accelerator
        bad_losses = torch.zeros((), device=self.device)  # this rank's non-finite micro-step losses
        aligning = alignment_on(cfg, step)  # no alignment target, no encoder forward after HASTE's stop
        for position, indices, images, x, labels, *cached in micro_batches:
            torch.manual_seed(step_seed(cfg.seed, self.rank, position))  # all randomness of this micro-step
            x = sample_latents(x, cfg)
            if self.null_condition is not None and cfg.cfg_prob > 0:
                # Caption dropout (the official CFGDataset's p_uncond): an item's tokens become the empty
                # caption's with probability cfg_prob; drawn from this micro-step's seed, so resumes are exact.
                drop = torch.rand(labels.shape[0], device=x.device) < cfg.cfg_prob
                labels = torch.where(drop[:, None, None], self.null_condition.to(labels.dtype), labels)
            if cfg.legacy:
                # Official --legacy: the loop drops labels with cfg_prob, then the model drops them again,
                # so the effective rate is 1 - (1 - p)^2 (0.19 for p = 0.1). Only to reproduce early runs.
                drop = torch.rand(labels.shape[0], device=x.device) < cfg.cfg_prob
                labels = torch.where(drop, cfg.num_classes, labels)
            zs_target, extra = [], {}  # none after HASTE's early stop
            with torch.no_grad(), accelerator.autocast():
                if cached and aligning:  # --target-cache: stored tokens, in fp32 as the loss computes the alignment
                    zs_target = [z.float() for z in cached]
                elif self.targets is not None and aligning:
                    zs_target = self.targets(indices, images)
                    if isinstance(zs_target, tuple):  # (tokens, extra loss inputs): HASTE's attention maps
                        zs_target, extra = zs_target
            with accelerator.accumulate(self.model), accelerator.autocast():
                terms = self.loss_fn(self.model, x, labels, zs_target, **extra)
                # A non-finite loss still runs its backward, so DDP's gradient reduction stays in step.
                accelerator.backward(terms.total)
            finite = torch.isfinite(terms.total.detach())
            bad_losses += ~finite
            zero = torch.zeros((), device=self.device)
            cls_loss = zero if terms.cls is None else terms.cls.detach().mean().float()
            attn_loss = zero if terms.attn is None else terms.attn.detach().float()
            logged = [terms.denoising.detach().mean().float(), terms.proj.detach().float(), cls_loss, attn_loss]
            logged = torch.stack(logged + [finite.float()])
            self.stats[:5] += torch.where(finite, logged, 0).to(self.stats.dtype)

        # ---- the update: gradients are synchronised now (last micro-step) ----
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        bad_losses = accelerator.reduce(bad_losses, reduction="sum")  # every rank takes the same decision
        skip = (bad_losses > 0) | ~torch.isfinite(grad_norm)
        for group in self.optimizer.param_groups:  # a function of the step: resumes exactly
            group["lr"] = learning_rate_at(cfg, step)
        if accelerator.scaler is not None or self.fused:
            if accelerator.scaler is None:
                self.inner_optimizer.found_inf = skip.float()  # the fused kernel skips on the device
            self.optimizer.step()
            self.inner_optimizer.__dict__.pop("found_inf", None)
        elif not skip.item():  # foreach AdamW cannot skip by itself: one sync
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.raw_model, cfg.ema_decay, apply=~skip)
        # fp16: overflows are the loss scaler's business (not counted); other precisions count every skip.
        self.nonfinite_steps += bad_losses > 0 if accelerator.scaler is not None else skip
        logged = torch.stack([torch.where(skip, 0, grad_norm.detach().float()), (~skip).float()])
        self.stats[5:] += logged.to(self.stats.dtype)

    def read_stats(self) -> dict:
        """Means over the steps since the last call, summed over ranks (one sync), and the counts."""
        sums = self.accelerator.reduce(self.stats.clone(), reduction="sum")
        *sums, nonfinite = torch.cat([sums, self.nonfinite_steps.view(1).to(sums.dtype)]).tolist()
        world = self.accelerator.num_processes
        values = dict(zip(self.STATS, sums))
        self.stats.zero_()
        micro, updates = max(values["micro_steps"], 1), max(values["updates"] / world, 1)
        return {
            "loss": values["loss"] / micro,
            "proj_loss": values["proj_loss"] / micro,
            "grad_norm": values["grad_norm"] / world / updates,  # the same on every rank
            "nonfinite_steps": int(nonfinite),
            # REG's class-token velocity loss and HASTE's attention cross-entropy (unweighted; 0 after the stop)
            **({"cls_loss": values["cls_loss"] / micro} if self.cfg.cls > 0 else {}),
            **({"attn_loss": values["attn_loss"] / micro} if self.cfg.attn_coeff > 0 else {}),
        }


def alignment_encoders(cfg: TrainConfig, device, input_size: int) -> list:
    """The frozen encoders whose tokens the model aligns with ([] for a vanilla model), at the setting whose
    token grid equals the model's: at 256 px, 32 x 32 latents / patch 2 = 16 x 16 tokens. Deriving it from the
    model's grid keeps that true for pixel-space runs too (the demo: 16 px / patch 4 -> 4 x 4)."""
    if not cfg.encoder_names or not (cfg.proj_coeff > 0 or cfg.cls > 0 or cfg.attn_coeff > 0):
        return []
    patch = {**MODELS, **T2I_MODELS}[cfg.model].keywords["patch_size"]
    if input_size % patch:
        raise ValueError(f"--model {cfg.model}: patch {patch} does not divide the {input_size}px input")
    resolution = encoder_resolution(input_size // patch)
    return load_encoders(cfg.enc_type, device, resolution, ckpt_path=cfg.enc_ckpt or None, enc_weights=cfg.enc_weights)


def build_loss(cfg: TrainConfig):
    """The objective: DDPM's hybrid loss for DiT, flow matching for SiT and MMDiT; + lambda x alignment (and
    REG's class-token and HASTE's attention terms)."""
    if model_family(cfg.model) == "dit":
        return DiffusionLoss(proj_coeff=cfg.proj_coeff)
    return REPALoss(
        path_type=cfg.path_type,
        prediction=cfg.prediction,
        weighting=cfg.weighting,
        proj_coeff=cfg.proj_coeff,
        spnorm_method=cfg.spnorm_method,
        zscore_alpha=cfg.zscore_alpha,
        cls_coeff=cfg.cls,
        attn_coeff=cfg.attn_coeff,
    )
