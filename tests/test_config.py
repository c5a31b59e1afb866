"""The typed config: defaults, YAML overrides, CLI flags, errors, and every file in configs/."""

from pathlib import Path

import pytest
import torch
import yaml

from config import TrainConfig, config_from_dict, load_yaml_config, parse_config
from models import MODELS, T2I_MODELS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_defaults_are_the_papers():
    c = TrainConfig()
    assert (c.model, c.encoder_depth, c.enc_type, c.proj_coeff) == ("SiT-XL/2", 8, "dinov2-vit-b", 0.5)
    assert (c.learning_rate, c.adam_beta1, c.adam_beta2, c.adam_weight_decay, c.adam_epsilon) == (
        1e-4, 0.9, 0.999, 0.0, 1e-8,
    )  # fmt: skip
    assert (c.batch_size, c.max_grad_norm, c.ema_decay, c.cfg_prob, c.mixed_precision) == (
        256,
        1.0,
        0.9999,
        0.1,
        "fp16",
    )
    assert (c.path_type, c.weighting, c.latent_scale) == ("linear", "uniform", 0.18215)


def test_precedence_defaults_yaml_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: SiT-B/2\nencoder_depth: 4\nproj_coeff: 1\n")
    c = parse_config(["--config", str(path), "--proj-coeff", "0.75", "--allow-tf32", "false", "--legacy"])
    assert c.model == "SiT-B/2" and c.encoder_depth == 4  # from YAML
    assert c.proj_coeff == 0.75 and c.allow_tf32 is False and c.legacy is True  # flags win
    assert c.batch_size == 256  # default


def test_official_command_line_parses():
    argv = (
        "--report-to none --allow-tf32 --mixed-precision fp16 --seed 0 --path-type linear --prediction v "
        "--weighting uniform --model SiT-XL/2 --enc-type dinov2-vit-b --proj-coeff 0.5 --encoder-depth 8 "
        "--output-dir exps --exp-name linear-dinov2-b-enc8 --data-dir data --batch-size 256 "
        "--max-train-steps 400000 --checkpointing-steps 50000 --sampling-steps 10000 --resume-step 0 "
        "--resolution 256 --num-workers 4 --learning-rate 1e-4 --cfg-prob 0.1 --fused-attn --qk-norm false"
    ).split()
    c = parse_config(argv)
    assert c.exp_name == "linear-dinov2-b-enc8" and c.learning_rate == 1e-4 and c.fused_attn


def test_unknown_keys_and_wrong_types_name_the_key(tmp_path):
    with pytest.raises(KeyError, match="unknown config key 'proj_coef'"):
        config_from_dict({"proj_coef": 0.5})
    with pytest.raises(TypeError, match="'batch_size': expected int"):
        config_from_dict({"batch_size": "256"})
    with pytest.raises(TypeError, match="'legacy': expected bool"):
        config_from_dict({"legacy": 1})
    with pytest.raises(ValueError, match="'mixed_precision'"):
        config_from_dict({"mixed_precision": "fp8"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("encoder_depht: 4\n")
    with pytest.raises(KeyError, match="bad.yaml"):
        load_yaml_config(bad)
    with pytest.raises(SystemExit):
        parse_config(["--no-such-flag", "1"])


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: SiT-B/2\nproj_coeff: [0.5\nencoder_depth: 4\n")  # unclosed bracket
    with pytest.raises(ValueError, match=r"--config \S*broken.yaml is not valid YAML") as info:
        load_yaml_config(bad)
    assert f'"{bad}", line 3' in str(info.value) and "<unicode string>" not in str(info.value)


def test_yaml_round_trip():
    c = config_from_dict({"model": "SiT-B/2", "proj_coeff": 0.25, "legacy": True})
    again = config_from_dict(yaml.safe_load(c.to_yaml()))
    assert again == c


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_config_parses_and_builds_on_meta(path):
    c = load_yaml_config(path)
    side = c.resolution if c.pixel_space else c.resolution // 8
    common = dict(
        input_size=side,
        in_channels=3 if c.pixel_space else 4,
        z_dims=[768] * len(c.encoder_names) if c.proj_coeff > 0 else [],
        encoder_depth=c.encoder_depth,
    )
    with torch.device("meta"):
        if c.model in T2I_MODELS:  # text-to-image: no classes, the depth override sets the size
            model = T2I_MODELS[c.model](**common, **({"depth": c.depth} if c.depth else {}))
        else:
            model = MODELS[c.model](num_classes=c.num_classes, **common)
    blocks = model.joint_blocks if c.model in T2I_MODELS else model.blocks
    assert len(blocks) >= c.encoder_depth


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--checkpointing-steps", "0", "'checkpointing_steps' .*must be positive"),
        ("--log-every", "0", "'log_every' .*must be positive"),
        ("--batch-size", "0", "'batch_size' .*must be positive"),
        ("--epochs", "0", "'epochs' .*must be positive"),
        ("--sampling-steps", "-1", "'sampling_steps' .*must be >= 0"),
        ("--resolution", "36", "36 is not a multiple of 8"),
    ],
)
def test_bad_counts_fail_when_parsing_not_mid_run(flag, value, message):
    with pytest.raises(ValueError, match=message):
        parse_config([flag, value])


@pytest.mark.parametrize(
    "variant, setting",
    [(["--cls", "0.03"], "'cls'"), (["--attn-coeff", "0.5"], "'attn_coeff'")],
    ids=["REG", "HASTE"],
)
def test_variants_the_disk_target_cache_cannot_serve_are_refused(variant, setting):
    # The disk cache stores patch tokens only: REG would take a patch token for the class token, HASTE would log
    # an attention loss of 0. Either is another experiment than the one asked for, so the config refuses it.
    with pytest.raises(ValueError, match=rf"'target_cache' \(cache/\) and {setting}.*drop --target-cache"):
        parse_config(["--target-cache", "cache/", *variant])
    parse_config(variant)  # each alone is fine


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "DiT-XL/2", "--cls", "0.03"], "implemented for SiT models only, not DiT-XL/2"),
        (["--model", "MMDiT-d24/2", "--attn-coeff", "0.5"], "implemented for SiT models only, not MMDiT-d24/2"),
        (["--model", "DiT-XL/2", "--spnorm-method", "zscore"], "'spnorm_method' .* SiT models only"),
        (["--model", "MMDiT-d24/2", "--hflip"], "do not apply to text-to-image training"),
        (["--model", "MMDiT-d24/2", "--target-cache", "cache/"], "do not apply to text-to-image training"),
    ],
)
def test_variant_switches_that_a_model_family_lacks_are_refused_when_parsing(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)
