"""The training configuration: one dataclass whose defaults are the paper's, YAML overrides, CLI flags.

Precedence: dataclass defaults < `--config FILE.yaml` (a partial override) < command-line flags. Every
field is a dashed flag (`proj_coeff` -> `--proj-coeff`), so the official REPA command lines work as is.
Unknown YAML keys and values of the wrong type raise with the key named. The resolved config is saved
to the run folder (config.yaml) and into every checkpoint.
"""

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from loss import PATH_TYPES, SPNORM_METHODS, WEIGHTINGS
from models import model_family
from models.sit import PROJECTOR_TYPES

# Sampling modes per model family: flow-matching SiTs and MMDiTs integrate the ODE or the SDE; DDPM-trained
# DiTs run ancestral DDPM or DDIM (sample_ddp.py's --mode, the recipes' `mode`).
SAMPLING_MODES = {"sit": ("ode", "sde"), "mmdit": ("ode", "sde"), "dit": ("ddpm", "ddim")}

# HASTE's attention pairing (SiT block:encoder block, 1-based) for its main run (NUS-HPC-AI-Lab/HASTE). Its README
# and train.sh give --attn-coeff 0.5, --proj-coeff 0.5, --encoder-depth 8, --early-stop-point 250000, DINOv2-B.
# Pairing and heads as HASTE's loss.py (quoted from it: `for i in range(4, 8)` against `zs[i + 4]`, heads
# `[:, :12]`): 0-based SiT blocks 4..7 against encoder blocks 8..11, the first 12 SiT heads head h with head h.
# Still unverified against HASTE's own code (not in the index searched here): the loss form, which follows an
# independent port (seruva19/takenoko, src/enhancements/haste/): teacher logits without the class token,
# softmax(teacher) x log_softmax(student) summed over keys, averaged over queries, heads, batch and pairs.
HASTE_DEFAULT_ATTN_LAYERS = {("SiT-XL/2", "dinov2-vit-b"): "5:9,6:10,7:11,8:12"}


@dataclass(frozen=True)
class EvalRecipe:
    """How a config's paper number is measured: sample_ddp.py's sampling flags (same names) plus the reference
    batch and the figure itself. The defaults are REPA's protocol for SiT (Euler-Maruyama SDE, 250 steps, no
    CFG, 50K samples with random labels from the EMA weights, `uint8(clamp(255 (x + 1) / 2))`, ADM's
    VIRTUAL_imagenet256_labeled.npz); `FAMILY_RECIPES` changes what differs for DiT and MMDiT."""

    mode: str = "sde"  # sde | ode (SiT, MMDiT); ddpm | ddim (DiT)
    num_steps: int = 250
    heun: bool = False  # --mode ode: Heun instead of Euler
    cfg_scale: float = 1.0  # 1 = no guidance
    guidance_low: float = 0.0  # guidance applies while t lies in [guidance_low, guidance_high]
    guidance_high: float = 1.0
    cls_cfg_scale: float = 1.0  # REG: guidance of the class token (1 = none)
    num_fid_samples: int = 50_000  # 0: all the source gives (MMDiT on COCO val: 40,192, as generate_t2i.py)
    labels: str = "random"  # random | balanced (class-conditional models)
    use_ema: bool = True  # EMA or raw weights
    quantization: str = "repa"  # repa | dit
    reference: str = "VIRTUAL_imagenet256_labeled.npz"  # the reference batch the figure is measured against
    paper: str = ""  # the figure this recipe reproduces, with its source ("" = none published)
    at_step: int = 0  # the training step that figure is for (0 = the checkpoint's, whatever it is)

    SAMPLING_KEYS = ("mode", "num_steps", "heun", "cfg_scale", "guidance_low", "guidance_high", "cls_cfg_scale")
    SAMPLING_KEYS += ("num_fid_samples", "labels", "use_ema", "quantization")  # = sample_ddp.py's flags

    def __post_init__(self):
        modes = tuple(sorted({m for family_modes in SAMPLING_MODES.values() for m in family_modes}))
        choices = {"mode": modes, "labels": ("random", "balanced")}  # per family: eval_recipes
        choices["quantization"] = ("repa", "dit")
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"eval recipe key {key!r}: {getattr(self, key)!r} is not one of {allowed}")
        if self.num_steps < 1 or self.num_fid_samples < 0 or self.at_step < 0:
            raise ValueError(f"eval recipe: num_steps must be >= 1, num_fid_samples and at_step >= 0: {self}")
        if not 0 <= self.guidance_low <= self.guidance_high <= 1:
            raise ValueError(
                f"eval recipe: the guidance interval [{self.guidance_low}, {self.guidance_high}] must lie in [0, 1]"
            )
        if self.heun and self.mode != "ode":
            raise ValueError(f"eval recipe: heun applies to mode ode only, not {self.mode}")


# What differs from REPA's SiT protocol per model family: DiT samples with DDPM (250 steps, as DiT and the REPA
# paper's DiT rows); the MMDiT with the official generate_t2i.py's defaults: ODE (Euler) 50 steps, CFG 1.5,
# the raw (not EMA) weights, 40,192 COCO val captions, FID against the val images (`coco-reference`).
FAMILY_RECIPES = {
    "sit": {},
    "dit": {"mode": "ddpm"},
    "mmdit": dict(
        mode="ode", num_steps=50, cfg_scale=1.5, use_ema=False, num_fid_samples=0, reference="coco_val256.npz"
    ),
}


def eval_recipes(model: str, overrides: dict | None, source: str = "config") -> dict[str, EvalRecipe]:
    """A config's `eval:` mapping (name -> keys that differ from the family's protocol) as recipes, in order;
    a config without one has a single recipe, `default`: the family's protocol with no paper figure."""
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"{source}: 'eval' must map recipe names to settings, got {type(overrides).__name__}")
    known = {f.name: f for f in fields(EvalRecipe)}
    family = model_family(model)
    base = FAMILY_RECIPES[family]
    recipes = {}
    for name, keys in (overrides or {"default": {}}).items():
        if not isinstance(keys, dict):
            raise ValueError(f"{source}: eval recipe {name!r} must be a mapping of settings, got {keys!r}")
        for key, value in keys.items():
            if key not in known:
                raise KeyError(f"{source}: eval recipe {name!r}: unknown key {key!r}; known keys: {', '.join(known)}")
            _coerce(f"eval.{name}.{key}", value, _field_type(known[key], EvalRecipe))
        try:
            recipe = recipes[str(name)] = EvalRecipe(**{**base, **keys})
        except ValueError as err:
            raise ValueError(f"{source}: eval recipe {name!r}: {err}") from err
        modes = SAMPLING_MODES[family]
        if recipe.mode not in modes:
            raise ValueError(
                f"{source}: eval recipe {name!r}: mode {recipe.mode} does not apply to {model}; use {modes}"
            )
        if recipe.num_fid_samples == 0 and family != "mmdit":
            raise ValueError(f"{source}: eval recipe {name!r}: num_fid_samples 0 (all captions) applies to MMDiT only")
    return recipes


@dataclass
class TrainConfig:
    # --- run bookkeeping ---------------------------------------------------------------------------
    output_dir: str = "exps"  # runs go to output_dir/exp_name
    exp_name: str = "repa"
    report_to: str = "none"  # none | tensorboard | wandb (wandb runs offline without a login)
    seed: int = 0
    log_every: int = 100  # optimizer steps between stats.jsonl lines
    checkpointing_steps: int = 50_000
    keep_last: int = 3  # checkpoints kept on disk (0 keeps all); the latest is never deleted
    resume: str = "auto"  # auto (latest valid checkpoint in the run folder) | none | PATH
    resume_step: int = 0  # official flag: resume from output_dir/exp_name/checkpoints/{step:07d}.pt
    # A resume whose config differs from the checkpoint's in a key that changes training is refused, naming the
    # keys; true continues with the change, recorded in stats.jsonl (train.RESUME_FREE_KEYS: keys that may change).
    allow_config_change: bool = False
    sampling_steps: int = 10_000  # preview grids from the EMA model every this many steps
    preview_num_steps: int = 50  # ODE (Heun) steps for previews
    preview_cfg_scale: float = 1.0
    # --- model (the paper: SiT-XL/2, projector at block 8, DINOv2-B) ---------------------------------
    model: str = "SiT-XL/2"
    num_classes: int = 1000
    encoder_depth: int = 8  # 8 for SiT-L/XL, 4 for SiT-B (paper)
    projector_dim: int = 2048
    qk_norm: bool = False
    # Custom sizes (0 = from the model name): e.g. a tiny SiT-S/4 for the demo and tests.
    depth: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    fused_attn: bool = True  # official flag: fused SDPA attention; false computes softmax(q k^T) v explicitly
    # --- alignment target ---------------------------------------------------------------------------
    enc_type: str = "dinov2-vit-b"  # comma-separated for several encoders; "none" for vanilla SiT
    enc_ckpt: str = ""  # local encoder weights (comma-separated, matching enc_type)
    enc_weights: str = "pretrained"  # pretrained | random (random checks the pipeline, not the method)
    proj_coeff: float = 0.5  # lambda; 0 trains a vanilla SiT
    cache_targets: bool = False  # keep encoder tokens per item in memory (small datasets only, e.g. the demo)
    target_cache: str = ""  # folder of `dataset_tools.py encode-targets`: tokens read from disk, encoders not run
    # --- iREPA (Singh et al. 2025; defaults are REPA's, as in iREPA's own train.py) --------------------
    projection_layer_type: str = "mlp"  # mlp (REPA) | linear | conv (a conv over the token grid; iREPA: conv)
    proj_kwargs_kernel_size: int = 1  # conv kernel, 1 | 3 | 5 | 7 (iREPA LDM: 1, its JiT recipe: 3)
    spnorm_method: str = "none"  # none | zscore: spatial z-score of the encoder targets (iREPA: zscore)
    zscore_alpha: float = 0.6  # fraction of the spatial mean the z-score removes (iREPA's default)
    # --- REG (Wu et al. 2025): the encoder's class token is denoised with the image ---------------------
    cls: float = 0.0  # REG's --cls: weight of the class-token velocity loss (REG: 0.03); > 0 turns REG on
    # --- HASTE (Wang et al. 2025): attention alignment and one-shot termination of alignment --------
    attn_coeff: float = 0.0  # HASTE's --attn-coeff: weight of the attention alignment (HASTE: 0.5); 0 = off
    attn_align_layers: str = ""  # pairs SIT_BLOCK:ENC_BLOCK (1-based), e.g. "5:9,6:10"; "" = the default pairing
    early_stop_point: int = 0  # HASTE's --early-stop-point: step at which alignment stops (HASTE: 250K); 0 = never
    # --- objective -----------------------------------------------------------------------------------
    path_type: str = "linear"  # linear | cosine
    prediction: str = "v"
    weighting: str = "uniform"  # time sampling: uniform | lognormal
    cfg_prob: float = 0.1  # label dropout for classifier-free guidance
    legacy: bool = False  # official --legacy: drop labels a second time in the loop (early runs only)
    # --- data ---------------------------------------------------------------------------------------
    data_dir: str = "data"  # holds images/ and vae-sd/ (official layout)
    resolution: int = 256
    pixel_space: bool = False  # train on images in [-1, 1] instead of SD-VAE latents (demo)
    hflip: bool = False  # the paper does not flip
    latent_scale: float = 0.18215  # SD-VAE latent scaling
    latent_bias: float = 0.0
    vae: str = "stabilityai/sd-vae-ft-ema"  # decoder for previews (hub name or local path)
    num_workers: int = 4
    # --- optimisation --------------------------------------------------------------------------------
    batch_size: int = 256  # images per micro-step over all processes (official); x accumulation = effective batch
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 400_000
    epochs: int = 1400  # official flag: passes over the data; training stops at this or max_train_steps
    learning_rate: float = 1e-4  # constant after the warm-up
    lr_warmup_steps: int = 0  # linear warm-up over this many optimizer steps (the paper: none)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999  # updated on optimizer steps only
    max_nonfinite_steps: int = 10  # skipped steps (non-finite loss or gradient) before the run stops
    mixed_precision: str = "fp16"  # no | fp16 | bf16
    allow_tf32: bool = True
    compile: bool = True  # torch.compile the model and the encoders' forward on CUDA
    # ... and on a CPU (with a C++ compiler) too: off by default, since on this project's 2-core CPU the
    # compiled step measured no faster than the eager one (docs/speed.md) and compiling takes minutes.
    compile_cpu: bool = False
    # --- online evaluation during training (evaluations/online.py) --------------------------------------
    eval_every: int = 0  # optimizer steps between evaluations (and one at the end); 0 = off
    eval_samples: int = 10_000  # EMA samples per evaluation (the common fast-FID size)
    eval_batch_size: int = 128  # samples per process and batch
    eval_reference: str = ""  # the Inception judge's reference: an ADM batch (or its statistics)
    eval_judge: str = "inception"  # inception (ADM's metrics) | demo (the demo domain's judge in eval_nets)
    eval_nets: str = "demo/nets"  # --eval-judge demo: folder of the demo's evaluator network
    eval_weights: str = "pretrained"  # Inception weights: pretrained (the usual places) | PATH | random (tests)
    eval_mode: str = "ode-heun"  # ode-heun | ode | sde (SiT); ddpm | ddim (DiT)
    eval_steps: int = 25  # sampler steps (Heun: 25 steps = 49 network evaluations)
    eval_cfg_scale: float = 1.0
    eval_seed: int = 0  # the samples' labels and noise: the same set at every evaluation
    eval_align_images: int = 1024  # training images of the alignment measurements (CKNNA, probe); 0 = off
    # --- evaluation recipes (YAML only) ---------------------------------------------------------------
    # Named recipes, the first the default of sample_ddp.py: name -> EvalRecipe keys that differ from the
    # model family's protocol, e.g. {"no-cfg": {"paper": "FID 5.9", "at_step": 4000000}}. Saved in checkpoints.
    eval: dict = field(default_factory=dict)

    def __post_init__(self):
        choices = {
            "report_to": ("none", "tensorboard", "wandb"),
            "path_type": PATH_TYPES,
            "prediction": ("v",),
            "weighting": WEIGHTINGS,
            "enc_weights": ("pretrained", "random"),
            "projection_layer_type": PROJECTOR_TYPES,
            "spnorm_method": SPNORM_METHODS,
            "mixed_precision": ("no", "fp16", "bf16"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config key {key!r}: {getattr(self, key)!r} is not one of {allowed}")
        family = model_family(self.model)
        if (self.cls > 0 or self.attn_coeff > 0) and family != "sit":
            raise ValueError(
                f"config keys 'cls' / 'attn_coeff' (REG, HASTE) are implemented for SiT models only, not {self.model}"
            )
        if self.spnorm_method != "none" and family != "sit":
            raise ValueError(f"config key 'spnorm_method' ({self.spnorm_method}) is implemented for SiT models only")
        if family == "mmdit" and (self.hflip or self.legacy or self.target_cache):
            raise ValueError(
                "--hflip, --legacy and --target-cache (config keys 'hflip', 'legacy', 'target_cache') do not apply to "
                "text-to-image training (captions say left/right; --cache-targets keeps encoder tokens in memory)"
            )
        # Counts checked here, when the config is parsed, not as a ZeroDivisionError after the first step.
        positive = ("batch_size", "gradient_accumulation_steps", "log_every", "checkpointing_steps", "epochs")
        non_negative = (
            "max_train_steps",
            "sampling_steps",
            "keep_last",
            "num_workers",
            "max_nonfinite_steps",
            "lr_warmup_steps",
        )
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(
                    f"config key {key!r} (--{key.replace('_', '-')}): {getattr(self, key)} must be positive"
                )
        for key in non_negative:
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r} (--{key.replace('_', '-')}): {getattr(self, key)} must be >= 0")
        if self.sampling_steps > 0 and self.preview_num_steps <= 0:
            raise ValueError(f"config key 'preview_num_steps': {self.preview_num_steps} must be positive")
        if not self.pixel_space and self.resolution % 8:
            raise ValueError(
                f"config key 'resolution' (--resolution): {self.resolution} is not a multiple of 8, the SD-VAE's "
                "downsampling factor (its latents would be floored)"
            )
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"config key 'ema_decay': {self.ema_decay} must lie in [0, 1]")
        if self.proj_kwargs_kernel_size not in (1, 3, 5, 7):  # iREPA's choices: odd, so the grid keeps its size
            raise ValueError(
                f"config key 'proj_kwargs_kernel_size': {self.proj_kwargs_kernel_size} is not 1, 3, 5 or 7"
            )
        if self.target_cache and self.cache_targets:
            raise ValueError(
                f"config keys 'target_cache' ({self.target_cache}) and 'cache_targets': choose one; the on-disk "
                "cache already holds every item's tokens"
            )
        # The on-disk cache (dataset_tools.py encode-targets) holds each encoder's patch tokens only: no class
        # token (REG) and no attention maps (HASTE). Served from it, REG would take a patch token for the class
        # token and HASTE would log an attention loss of 0: refused rather than trained as another experiment.
        if self.target_cache and self.cls > 0:
            raise ValueError(
                f"config keys 'target_cache' ({self.target_cache}) and 'cls' ({self.cls}): REG needs the encoder's "
                "class token, which the on-disk target cache does not store; drop --target-cache (the encoder then "
                "runs each step) or use --cache-targets"
            )
        if self.target_cache and self.attn_coeff > 0:
            raise ValueError(
                f"config keys 'target_cache' ({self.target_cache}) and 'attn_coeff' ({self.attn_coeff}): HASTE "
                "aligns the encoder's attention maps, which the on-disk target cache does not store; drop "
                "--target-cache (the encoder then runs each step until --early-stop-point)"
            )
        if self.cls < 0:
            raise ValueError(f"config key 'cls' (--cls): {self.cls} must be >= 0")
        if self.cls > 0 and not self.encoder_names:
            raise ValueError(
                f"config key 'cls' (--cls): {self.cls} (REG) needs an encoder's class token; --enc-type is none"
            )
        if self.cls > 0 and self.spnorm_method != "none":
            raise ValueError(
                "config keys 'cls' and 'spnorm_method': REG aligns [class token; patches], iREPA's "
                "z-score is defined over the patch grid; use one or the other"
            )
        if self.attn_coeff < 0 or self.early_stop_point < 0:
            raise ValueError(
                f"config keys 'attn_coeff' ({self.attn_coeff}) and 'early_stop_point' ({self.early_stop_point}) must be >= 0"
            )
        if self.attn_coeff > 0:
            if not self.encoder_names:
                raise ValueError(f"config key 'attn_coeff': {self.attn_coeff} needs an encoder; --enc-type is none")
            if self.cache_targets:
                raise ValueError("config keys 'attn_coeff' and 'cache_targets': attention maps are not cached")
            _ = self.attention_layer_pairs  # parses --attn-align-layers (or finds the default) now, not at step 1
        if self.early_stop_point > 0 and self.cls > 0:
            raise ValueError(
                "config keys 'early_stop_point' and 'cls': REG's class token comes from the encoder at every step "
                "(training and sampling), so the encoder cannot stop; HASTE's early stop is for REPA/attention alignment"
            )
        if not 0 <= self.cfg_prob < 1:
            raise ValueError(f"config key 'cfg_prob': {self.cfg_prob} must lie in [0, 1)")
        if self.eval_every < 0 or self.eval_samples < 1 or self.eval_batch_size < 1 or self.eval_steps < 1:
            raise ValueError(
                "config keys 'eval_every' (>= 0), 'eval_samples', 'eval_batch_size' and 'eval_steps' (>= 1): got "
                f"{self.eval_every}, {self.eval_samples}, {self.eval_batch_size}, {self.eval_steps}"
            )
        if self.eval_every > 0:
            modes = ("ddpm", "ddim") if family == "dit" else ("ode-heun", "ode", "sde")
            if self.eval_mode not in modes:
                raise ValueError(
                    f"config key 'eval_mode' (--eval-mode): {self.eval_mode} for {self.model}; use {modes}"
                )
            if self.eval_judge not in ("inception", "demo"):
                raise ValueError(f"config key 'eval_judge' (--eval-judge): {self.eval_judge} is not inception or demo")
            if self.eval_judge == "inception" and not self.eval_reference:
                raise ValueError(
                    "--eval-every needs --eval-reference FILE (an ADM reference batch) for the Inception judge"
                )
            if family == "mmdit":
                raise ValueError(
                    "--eval-every: online evaluation samples class-conditional models; sample text-to-image "
                    "checkpoints with sample_ddp.py --coco-dir"
                )
        _ = self.recipes  # checks the `eval:` section now

    @property
    def recipes(self) -> dict[str, EvalRecipe]:
        """The evaluation recipes, in order (the first is sample_ddp.py's default)."""
        return eval_recipes(self.model, self.eval)

    @property
    def encoder_names(self) -> list[str]:
        names = [n.strip() for n in self.enc_type.split(",") if n.strip()]
        return [] if names in ([], ["none"]) else names

    @property
    def attention_layer_pairs(self) -> list[tuple[int, int]]:
        """HASTE's (SiT block, encoder block) pairs, 1-based: --attn-align-layers, else the default for the
        (model, first encoder) pair; other pairs must name theirs."""
        text = self.attn_align_layers.strip() or HASTE_DEFAULT_ATTN_LAYERS.get((self.model, self.encoder_names[0]), "")
        if not text:
            raise ValueError(
                f"--attn-coeff {self.attn_coeff}: no default attention layer pairing for {self.model} + "
                f"{self.encoder_names[0]}; pass --attn-align-layers SIT_BLOCK:ENC_BLOCK,... (1-based)"
            )
        try:
            pairs = [tuple(int(n) for n in item.split(":")) for item in text.split(",")]
        except ValueError:
            pairs = []
        if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
            raise ValueError(
                f"--attn-align-layers {text!r}: expected SIT_BLOCK:ENC_BLOCK pairs, 1-based, e.g. '5:9,6:10'"
            )
        return pairs

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.exp_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _field_type(f, owner=None):
    """The runtime type of a field (bool/int/float/str; dict for `eval`)."""
    hint = typing.get_type_hints(owner or TrainConfig)[f.name]
    if isinstance(hint, types.UnionType):
        raise TypeError(f"config field {f.name} has a union type; keep fields simple")
    return hint


def _coerce(key, value, kind):
    """Check a YAML value against the field type; ints are accepted for floats."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool) or kind is not bool and isinstance(value, bool):
        raise TypeError(f"config key {key!r}: expected {kind.__name__}, got {value!r}")
    if not isinstance(value, kind):
        raise TypeError(f"config key {key!r}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def config_from_dict(overrides: dict, base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    """Apply a partial override to `base` (default: the paper's defaults), checking keys and types."""
    known = {f.name: f for f in fields(TrainConfig)}
    values = (base or TrainConfig()).to_dict()
    for key, value in (overrides or {}).items():
        name = key.replace("-", "_")
        if name not in known:
            raise KeyError(f"{source}: unknown config key {key!r}; known keys: {', '.join(sorted(known))}")
        values[name] = _coerce(key, value, _field_type(known[name]))
    return TrainConfig(**values)


def load_yaml_config(path, base: TrainConfig | None = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        with open(path) as f:  # a stream, not its text: YAML errors then give this path, not "<unicode string>"
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return config_from_dict(data, base, source=str(path))


def parse_bool(text: str) -> bool:
    """A boolean flag value: 1/true/yes/on or 0/false/no/off (also used by sample_ddp.py)."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """`--config` plus one dashed flag per field. Bools: `--flag` sets True, `--flag false` sets False."""
    parser = argparse.ArgumentParser(description="Train a SiT with REPA.", allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML file of config overrides (see configs/)")
    for f in fields(TrainConfig):
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        if kind is dict:  # the eval recipes: YAML only
            continue
        if kind is bool:
            parser.add_argument(flag, type=parse_bool, nargs="?", const=True, default=None, metavar="BOOL")
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"default: {f.default}")
    return parser


def parse_config(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    config = load_yaml_config(args.config) if args.config else TrainConfig()
    flags = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    return config_from_dict(flags, config, source="command line")
