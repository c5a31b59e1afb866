"""Evaluation recipes: every config's recipes parse and run end to end at a tiny size, sample_ddp.py follows the
checkpoint's recipe unless a flag overrides it, and the README's config table is the generated one."""

import argparse
import contextlib
import json
from pathlib import Path

import pytest
import torch

import sample_ddp
from checkpoints import save_checkpoint
from config import EvalRecipe, eval_recipes, load_yaml_config
from evaluations import recipes as recipes_cli
from models import model_family
from models.dit import DiT_models
from models.mmdit import MMDiT
from models.sit import SiT_models

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIGS = recipes_cli.config_files()


def tiny_checkpoint(path: Path, family: str, config: dict, reg: bool = False):
    """A 16 px pixel-space model of `family` whose saved config is `config` (its eval recipes among them); the
    EMA differs from the raw weights, so which one sampled is visible."""
    torch.manual_seed(0)
    if family == "mmdit":
        kwargs = dict(input_size=16, patch_size=8, in_channels=3, depth=2, z_dims=(), context_dim=32)
        model = MMDiT(**kwargs)
        config = {k: v for k, v in config.items() if k != "model"}  # official-style name: read off the weights
    elif family == "dit":
        kwargs = dict(input_size=16, in_channels=3, num_classes=5, z_dims=[], depth=2)
        model = DiT_models["DiT-S/8"](**kwargs)
        config = {**config, "model": "DiT-S/8"}
    else:
        kwargs = dict(input_size=16, in_channels=3, num_classes=5, z_dims=[32], encoder_depth=2, depth=2)
        kwargs |= {"cls_token_dim": 32} if reg else {}
        model = SiT_models["SiT-S/8"](**kwargs)
        config = {**config, "model": "SiT-S/8"}
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ckpt = {"model": model.state_dict(), "ema": ema, "opt": {}, "steps": 10, "model_kwargs": kwargs}
    ckpt |= {"config": {"pixel_space": True, "path_type": "linear", **config}, "args": argparse.Namespace(**config)}
    save_checkpoint(ckpt, path)
    return path


def protocol_of(recipe: EvalRecipe, num_samples: int) -> dict:
    """What sample_ddp.py's summary must say for a run of `recipe` at 2 steps and `num_samples` samples."""
    return {
        "sampler": recipe.mode + ("-heun" if recipe.heun else ""),
        "num_steps": 2,
        "cfg_scale": recipe.cfg_scale,
        "guidance_interval": [recipe.guidance_low, recipe.guidance_high],
        "quantization": recipe.quantization,
        "num_samples": num_samples,
        "weights": "ema" if recipe.use_ema else "raw",
    }


def test_every_config_has_valid_recipes_and_every_paper_figure_a_step():
    assert len(CONFIGS) >= 30
    for path in CONFIGS:
        cfg = load_yaml_config(path)
        for name, recipe in cfg.recipes.items():
            assert recipe.paper == "" or recipe.at_step > 0, f"{path}: recipe {name} states a figure but no step"
            if model_family(cfg.model) == "mmdit":
                assert not recipe.use_ema and recipe.cfg_scale == 1.5  # generate_t2i.py as released
    main = load_yaml_config(ROOT / "configs" / "sit-xl-2_dinov2-b.yaml").recipes
    assert list(main) == ["cfg", "no-cfg"]  # the headline number first
    assert (main["cfg"].cfg_scale, main["cfg"].guidance_high, main["cfg"].num_steps) == (1.8, 0.7, 250)
    reg = load_yaml_config(ROOT / "configs" / "variants" / "reg-sit-xl-2_dinov2-b.yaml").recipes["cfg"]
    assert (reg.cfg_scale, reg.cls_cfg_scale, reg.guidance_high, reg.mode) == (2.3, 2.3, 0.85, "sde")  # REG eval.sh


@pytest.mark.parametrize(
    "model, recipes, message",
    [
        ("DiT-XL/2", {"a": {"mode": "sde"}}, "mode sde does not apply to DiT-XL/2"),
        ("SiT-XL/2", {"a": {"cfg_scale": "1.8"}}, r"eval.a.cfg_scale.*expected float"),
        ("SiT-XL/2", {"a": {"cfg": 1.8}}, "unknown key 'cfg'"),
        ("SiT-XL/2", {"a": {"guidance_high": 1.5}}, r"guidance interval \[0.0, 1.5\]"),
        ("SiT-XL/2", {"a": {"num_fid_samples": 0}}, "applies to MMDiT only"),
        ("SiT-XL/2", {"a": {"heun": True}}, "heun applies to mode ode only"),
        ("SiT-XL/2", ["cfg"], "'eval' must map recipe names"),
    ],
)
def test_bad_recipes_are_refused_naming_the_key(model, recipes, message):
    with pytest.raises((ValueError, KeyError, TypeError), match=message):
        eval_recipes(model, recipes, source="x.yaml")


def test_the_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert recipes_cli.replace_table(readme, recipes_cli.markdown_table()) == readme, (
        "the README's config table is stale: run `python -m evaluations.recipes --write-readme README.md`"
    )


def test_the_listing_names_every_config_its_commands_and_figures(capsys):
    recipes_cli.main([])
    out = capsys.readouterr().out
    for path in CONFIGS:
        assert f"--config {path.relative_to(ROOT)}" in out
    assert "--ckpt exps/sit-xl-2_dinov2-b/checkpoints/4000000.pt --sample-dir" in out  # the first recipe: no flag
    assert "--recipe no-cfg" in out and "paper: FID 1.42 at 4M" in out


def run_recipe(tmp_path, ckpt, family, *flags):
    out = tmp_path / "samples"
    argv = ["--ckpt", str(ckpt), "--sample-dir", str(out), "--num-steps", "2", "--batch-size", "8", "--overwrite"]
    if family == "mmdit":  # captions from a prompt file, encoded by a random text encoder of the model's width
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(f"a red disk number {i}" for i in range(8)) + "\n")
        argv += ["--prompts", str(prompts), "--text-encoder-weights", "random"]
    else:
        argv += ["--num-fid-samples", "8"]
    sample_ddp.main([*argv, *flags])
    return json.loads(out.with_suffix(".json").read_text()), json.loads((out / sample_ddp.MANIFEST).read_text())


def distinct_recipes():
    """(family, REG?, recipe name, config, recipe) for every recipe of every config, one per distinct sampling."""
    seen = {}
    for path in CONFIGS:
        cfg = load_yaml_config(path)
        for name, recipe in cfg.recipes.items():
            key = (model_family(cfg.model), cfg.cls > 0, *(getattr(recipe, k) for k in EvalRecipe.SAMPLING_KEYS))
            seen.setdefault(key, (path.relative_to(ROOT).as_posix(), name, cfg, recipe))
    return [pytest.param(key[0], key[1], *rest, id=f"{rest[0]}:{rest[1]}") for key, rest in seen.items()]


@pytest.mark.parametrize("family, reg, config_path, name, cfg, recipe", distinct_recipes())
def test_every_recipe_samples_end_to_end(tmp_path, family, reg, config_path, name, cfg, recipe):
    # The config's recipes travel in the checkpoint as train.py saves them; sampling follows the named one.
    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt", family, {"eval": cfg.eval}, reg=reg)
    with pytest.warns(UserWarning, match="RANDOM TEXT ENCODER") if family == "mmdit" else contextlib.nullcontext():
        summary, manifest = run_recipe(tmp_path, ckpt, family, "--recipe", name)
    num_samples = 8
    assert {k: summary["protocol"][k] for k in protocol_of(recipe, num_samples)} == protocol_of(recipe, num_samples)
    if reg:
        assert summary["protocol"]["cls_cfg_scale"] == recipe.cls_cfg_scale
    assert summary["protocol"]["labels"] == ("prompts captions" if family == "mmdit" else recipe.labels)
    assert summary["recipe"]["name"] == manifest["recipe"] == name
    assert summary["recipe"]["paper"] == recipe.paper and summary["recipe"]["overridden"] == ["num_steps"] + (
        [] if family == "mmdit" else ["num_fid_samples"]
    )


def test_flags_override_the_recipe_and_the_choice_is_recorded(tmp_path, capsys):
    eval_section = {
        "cfg": {"cfg_scale": 1.8, "guidance_high": 0.7, "paper": "FID 1.42", "at_step": 4000000},
        "no-cfg": {"paper": "FID 5.9", "at_step": 4000000},
    }
    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt", "sit", {"eval": eval_section})
    summary, _ = run_recipe(tmp_path, ckpt, "sit")  # the first recipe by default
    assert summary["recipe"]["name"] == "cfg" and summary["protocol"]["cfg_scale"] == 1.8
    assert "the figure is for step 4000000, this checkpoint is at 10" in capsys.readouterr().out
    summary, _ = run_recipe(tmp_path, ckpt, "sit", "--recipe", "no-cfg")
    assert summary["recipe"]["name"] == "no-cfg" and summary["protocol"]["cfg_scale"] == 1.0
    summary, _ = run_recipe(tmp_path, ckpt, "sit", "--guidance-high", "0.5", "--use-ema", "false")
    assert summary["protocol"]["guidance_interval"] == [0.0, 0.5] and summary["protocol"]["cfg_scale"] == 1.8
    assert summary["protocol"]["weights"] == "raw" and "use_ema" in summary["recipe"]["overridden"]
    with pytest.raises(ValueError, match="--recipe best: .* has the recipes cfg, no-cfg"):
        run_recipe(tmp_path, ckpt, "sit", "--recipe", "best")


def test_official_checkpoints_take_recipes_from_a_config(tmp_path):
    # No config in the file: the family's protocol, or the recipes of a config named on the command line.
    ckpt = tmp_path / "official.pt"
    tiny_checkpoint(ckpt, "sit", {})
    state = torch.load(ckpt, weights_only=False)
    del state["config"]  # an official file records its argparse Namespace only (here: pixel space, no VAE needed)
    state["args"] = argparse.Namespace(model="SiT-S/8", pixel_space=True, path_type="linear")
    torch.save(state, ckpt)
    summary, _ = run_recipe(tmp_path, ckpt, "sit")
    assert summary["recipe"]["name"] == "default" and summary["protocol"]["sampler"] == "sde"
    config = ROOT / "configs" / "sit-xl-2_dinov2-b.yaml"
    summary, _ = run_recipe(tmp_path, ckpt, "sit", "--recipes-from", str(config))
    assert summary["recipe"] == {**summary["recipe"], "name": "cfg", "source": str(config), "paper": "FID 1.42"}
    with pytest.raises(ValueError, match="is a config for DiT-XL/2, but .* holds a sit model"):
        run_recipe(tmp_path, ckpt, "sit", "--recipes-from", str(ROOT / "configs" / "dit-xl-2_dinov2-b.yaml"))


def test_a_reference_folder_resolves_to_the_recipes_batch(tmp_path):
    args = sample_ddp.build_parser().parse_args(["--ckpt", "x", "--ref-batch", str(tmp_path)])
    sample_ddp.apply_recipe(args, eval_recipes("SiT-XL/2", {"a": {"reference": "ref512.npz"}}), "x")
    assert args.ref_batch == str(tmp_path / "ref512.npz")


def test_clip_score_is_for_text_to_image_checkpoints(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt", "sit", {})
    with pytest.raises(ValueError, match="--clip-score applies to text-to-image"):
        run_recipe(tmp_path, ckpt, "sit", "--clip-score", "--clip-weights", "random")
