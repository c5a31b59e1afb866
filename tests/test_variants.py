"""REPA variants: iREPA's projectors and spatial normalisation, REG's class token; official references."""

import re
from pathlib import Path

import pytest
import torch

import checkpoints
import sample_ddp
from checkpoints import load_checkpoint
from config import load_yaml_config, parse_config
from evaluations import protocol
from loss import REPALoss, alignment_loss, spatial_zscore
from models.dit import DiT
from models.sit import PROJECTOR_TYPES, SiT, SiT_models, projector_kwargs_from_state_dict, sit_flops

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Keys of the official constructors that this SiT does not take (see tests/test_sit.py).
OFFICIAL_ONLY_KEYS = ("path_type", "use_cfg", "decoder_hidden_size")
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def reference(testdata, variant, **overrides):
    """(reference entry, our SiT built from the official constructor config, official weights loaded strictly)."""
    ref = torch.load(testdata / "variants_reference_tiny.pt", weights_only=True)[variant]
    config = dict(ref["config"])
    assert config.pop("decoder_hidden_size") == config["hidden_size"]
    for key in OFFICIAL_ONLY_KEYS:
        config.pop(key, None)
    model = SiT(**config | overrides).eval()
    model.load_state_dict(ref["state_dict"], strict=True)
    return ref, model


def irepa_mlp_layout(state_dict):
    """REPA's MLP keys `projectors.K.N.*` as iREPA names them: `projectors.K.projection_layer.N.*`."""
    return {re.sub(r"^(projectors\.\d+\.)", r"\1projection_layer.", k): v for k, v in state_dict.items()}


def inputs(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.rand(n, generator=g), torch.randint(0, 5, (n,), generator=g)


#################################################################################
#                               iREPA projectors                                #
#################################################################################


@pytest.mark.parametrize("fused_attn", [True, False])
def test_irepa_conv_projector_matches_official(testdata, fused_attn):
    ref, model = reference(testdata, "irepa", fused_attn=fused_attn)
    assert ref["config"]["projection_layer_type"] == "conv" and ref["config"]["proj_kwargs_kernel_size"] == 3
    with torch.no_grad():
        v, zs = model(ref["x"], ref["t"], ref["y"])
    torch.testing.assert_close(v, ref["v"], rtol=1e-5, atol=1e-5)
    assert [z.shape for z in zs] == [z.shape for z in ref["zs"]] == [(3, 16, 32), (3, 16, 48)]
    for z, z_ref in zip(zs, ref["zs"]):
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)


def test_conv_projector_reads_the_token_grid_row_major(testdata):
    """A transposed grid (tokens read column-major) gives other outputs: the layout is tested, not assumed."""
    ref, model = reference(testdata, "irepa")
    conv = model.projectors[0].projection_layer
    hidden = torch.randn(2, 16, 64)
    grid = hidden.transpose(1, 2).reshape(2, 64, 4, 4)  # token i*4+j at row i, column j
    expected = torch.nn.functional.conv2d(grid, conv.weight, conv.bias, padding=1).flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(model.projectors[0](hidden), expected)
        wrong = torch.nn.functional.conv2d(grid.transpose(2, 3), conv.weight, conv.bias, padding=1)
        assert (model.projectors[0](hidden) - wrong.flatten(2).transpose(1, 2)).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_conv_projector_keeps_the_grid_and_kernel_1_is_a_linear_map(kernel):
    torch.manual_seed(0)
    model = SiT(**TINY, z_dims=[6], encoder_depth=1, projection_layer_type="conv", proj_kwargs_kernel_size=kernel)
    assert model.projectors[0].projection_layer.weight.shape == (6, 32, kernel, kernel)
    hidden = torch.randn(2, 16, 32)
    out = model.projectors[0](hidden)
    assert out.shape == (2, 16, 6)
    if kernel == 1:
        conv = model.projectors[0].projection_layer
        torch.testing.assert_close(out, hidden @ conv.weight[:, :, 0, 0].T + conv.bias)


def test_projector_key_layouts():
    """REPA's MLP keeps the official REPA keys; iREPA's linear and conv use iREPA's `projection_layer`."""
    keys = {}
    for kind in PROJECTOR_TYPES:
        model = SiT(**TINY, z_dims=[6], encoder_depth=1, projector_dim=16, projection_layer_type=kind)
        keys[kind] = sorted(k for k in model.state_dict() if k.startswith("projectors."))
    assert keys["mlp"] == [f"projectors.0.{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight")]
    assert (
        keys["linear"] == keys["conv"] == ["projectors.0.projection_layer.bias", "projectors.0.projection_layer.weight"]
    )


def test_irepa_mlp_layout_loads_strictly_into_the_repa_layout():
    torch.manual_seed(0)
    model = SiT(**TINY, z_dims=[6, 7], encoder_depth=1, projector_dim=16).eval()
    renamed = irepa_mlp_layout(model.state_dict())
    assert "projectors.1.projection_layer.4.weight" in renamed
    other = SiT(**TINY, z_dims=[6, 7], encoder_depth=1, projector_dim=16).eval()
    other.load_state_dict(renamed, strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        for a, b in zip(model(x, t, y)[1], other(x, t, y)[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The renaming is the MLP's only: a conv model refuses MLP keys in either layout.
    with pytest.raises(RuntimeError, match="projection_layer"):
        SiT(**TINY, z_dims=[6, 7], encoder_depth=1, projection_layer_type="conv").load_state_dict(renamed)


@pytest.mark.parametrize(
    "kind, kernel, expected",
    [
        ("mlp", 1, {"z_dims": [6, 7], "projector_dim": 16, "projection_layer_type": "mlp"}),
        ("linear", 1, {"z_dims": [6, 7], "projection_layer_type": "linear"}),
        ("conv", 5, {"z_dims": [6, 7], "projection_layer_type": "conv", "proj_kwargs_kernel_size": 5}),
    ],
)
def test_projector_kwargs_read_back_from_each_layout(kind, kernel, expected):
    built = dict(z_dims=[6, 7], encoder_depth=1, projector_dim=16, projection_layer_type=kind)
    state_dict = SiT(**TINY, **built, proj_kwargs_kernel_size=kernel).state_dict()
    kwargs = projector_kwargs_from_state_dict(state_dict)
    assert kwargs == expected
    SiT(**TINY, encoder_depth=1, **kwargs).load_state_dict(state_dict, strict=True)
    if kind == "mlp":  # iREPA's MLP keys read back the same
        assert projector_kwargs_from_state_dict(irepa_mlp_layout(state_dict)) == expected
    assert projector_kwargs_from_state_dict(SiT(**TINY, z_dims=[]).state_dict()) == {"z_dims": []}


def test_official_irepa_weights_rebuild_from_the_state_dict_alone(testdata):
    """sample_ddp's path for files without recorded constructor keywords."""
    ref, _ = reference(testdata, "irepa")
    kwargs = checkpoints.sit_kwargs_from_state_dict(ref["state_dict"])
    assert kwargs["projection_layer_type"] == "conv" and kwargs["proj_kwargs_kernel_size"] == 3
    assert kwargs["z_dims"] == [32, 48]
    model = SiT(**kwargs, num_heads=ref["config"]["num_heads"], encoder_depth=2).eval()
    model.load_state_dict(ref["state_dict"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(ref["x"], ref["t"], ref["y"])[0], ref["v"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(projection_layer_type="attention"), "unknown projection_layer_type"),
        (dict(projection_layer_type="conv", proj_kwargs_kernel_size=4), "odd"),
    ],
)
def test_bad_projectors_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SiT(**TINY, z_dims=[6], encoder_depth=1, **kwargs)


def test_flops_count_the_projector_type():
    base = dict(**TINY, z_dims=[6], encoder_depth=1)
    vanilla = sit_flops(SiT(**TINY, z_dims=[]))
    tokens = 16
    for kind, kernel, macs in [("linear", 1, 32 * 6), ("conv", 3, 9 * 32 * 6)]:
        model = SiT(**base, projection_layer_type=kind, proj_kwargs_kernel_size=kernel)
        assert sit_flops(model) - vanilla == 2 * tokens * macs


def test_dit_takes_the_projector_keywords():
    model = DiT(**TINY, z_dims=[6], encoder_depth=1, projection_layer_type="conv", proj_kwargs_kernel_size=3)
    assert model.projectors[0].projection_layer.kernel_size == (3, 3)


#################################################################################
#                      iREPA spatial normalisation, config, training            #
#################################################################################


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_spatial_zscore_matches_official(testdata, alpha):
    ref = torch.load(testdata / "variants_reference_tiny.pt", weights_only=True)["irepa"]
    out = spatial_zscore(ref["feat"], alpha=alpha)
    torch.testing.assert_close(out, ref["zscore"][alpha], rtol=1e-5, atol=1e-5)
    assert (ref["zscore"][0.6] - ref["zscore"][1.0]).abs().max() > 1e-2  # alpha matters


def test_spatial_zscore_standardises_each_channel_over_space():
    feat = torch.randn(2, 16, 5) * torch.rand(1, 1, 5) * 3 + torch.randn(1, 1, 5)
    out = spatial_zscore(feat)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(2, 5), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.std(dim=1), torch.ones(2, 5), rtol=0, atol=1e-5)
    # alpha < 1 keeps that fraction of the mean: the mean of the output is (1 - alpha) mean / std.
    partial = spatial_zscore(feat, alpha=0.6)
    expected = 0.4 * feat.mean(dim=1) / (feat.std(dim=1) + 1e-6)
    torch.testing.assert_close(partial.mean(dim=1), expected, rtol=1e-5, atol=1e-6)


def test_repa_loss_aligns_with_the_normalised_targets():
    torch.manual_seed(0)
    model = SiT(**TINY, z_dims=[6], encoder_depth=1, projection_layer_type="conv", proj_kwargs_kernel_size=3)
    x, _, y = inputs()
    targets = [torch.randn(2, 16, 6) + 2.0]  # a shared offset, which the z-score removes
    terms = {}
    for method in ("none", "zscore"):
        loss = REPALoss(spnorm_method=method, zscore_alpha=0.6)
        terms[method] = loss(model, x, y, targets, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        t = torch.rand(2, generator=g)
        noise = torch.randn(x.shape, generator=g)
        zs = model((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise, t, y)[1]
    torch.testing.assert_close(terms["none"].proj, alignment_loss(zs, targets))
    torch.testing.assert_close(terms["zscore"].proj, alignment_loss(zs, [spatial_zscore(targets[0], alpha=0.6)]))
    assert abs(terms["none"].proj - terms["zscore"].proj) > 1e-3
    with pytest.raises(ValueError, match="spnorm_method"):
        REPALoss(spnorm_method="layernorm")


def test_irepa_flags_parse_with_irepa_defaults():
    default = parse_config([])
    assert (default.projection_layer_type, default.proj_kwargs_kernel_size) == ("mlp", 1)
    assert (default.spnorm_method, default.zscore_alpha) == ("none", 0.6)
    argv = ["--projection-layer-type", "conv", "--proj-kwargs-kernel-size", "3", "--spnorm-method", "zscore"]
    cfg = parse_config(argv + ["--zscore-alpha", "0.8"])
    assert (cfg.projection_layer_type, cfg.proj_kwargs_kernel_size, cfg.spnorm_method) == ("conv", 3, "zscore")
    assert cfg.zscore_alpha == 0.8
    for bad, message in [("--proj-kwargs-kernel-size=4", "proj_kwargs_kernel_size"),
                         ("--projection-layer-type=attention", "projection_layer_type"),
                         ("--spnorm-method=layernorm", "spnorm_method")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_config([bad])


def test_irepa_training_run_and_its_checkpoint_samples(demo_data, tmp_path):
    from tests.test_train import run_train, tiny_argv

    argv = tiny_argv(demo_data, tmp_path, max_train_steps=2, checkpointing_steps=1)
    argv += ["--projection-layer-type", "conv", "--proj-kwargs-kernel-size", "3", "--spnorm-method", "zscore"]
    run_train(argv)
    first, path = (tmp_path / "run" / "checkpoints" / f"000000{i}.pt" for i in (1, 2))
    ckpt = load_checkpoint(path)
    assert ckpt["model_kwargs"]["projection_layer_type"] == "conv"
    assert ckpt["model_kwargs"]["proj_kwargs_kernel_size"] == 3
    assert ckpt["config"]["spnorm_method"] == "zscore" and ckpt["args"].spnorm_method == "zscore"
    key = "projectors.0.projection_layer.weight"
    assert ckpt["model"][key].shape == (384, 64, 3, 3)  # dinov2-vit-s targets, hidden 64
    # The conv projector trains: the alignment gradient reaches it.
    assert not torch.equal(ckpt["model"][key], load_checkpoint(first)["model"][key])
    model, settings = checkpoints.load_model(path)
    assert model.projection_layer_type == "conv" and settings["model"] == "SiT-S/8"
    torch.testing.assert_close(model.state_dict()[key], ckpt["ema"][key], rtol=0, atol=0)


#################################################################################
#                           REG: the entangled class token                      #
#################################################################################


@pytest.mark.parametrize("fused_attn", [True, False])
def test_reg_forward_matches_official(testdata, fused_attn):
    ref, model = reference(testdata, "reg", fused_attn=fused_attn)
    with torch.no_grad():
        v, zs, cls_v = model(ref["x"], ref["t"], ref["y"], cls_token=ref["cls_token"])
    torch.testing.assert_close(v, ref["v"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls_v, ref["cls_v"], rtol=1e-5, atol=1e-5)
    assert len(zs) == 1 and zs[0].shape == (3, 17, 32)  # [class token; 16 patch tokens]
    torch.testing.assert_close(zs[0], ref["zs"][0], rtol=1e-5, atol=1e-5)
    # The class token is entangled: another class token changes the image velocity.
    with torch.no_grad():
        v_other = model(ref["x"], ref["t"], ref["y"], cls_token=ref["cls_token"].flip(0))[0]
    assert (v - v_other).abs().max() > 1e-3


def test_reg_layout_keys_and_position_row():
    torch.manual_seed(0)
    model = SiT(**TINY, z_dims=[6], encoder_depth=1, projector_dim=16, cls_token_dim=6)
    plain = SiT(**TINY, z_dims=[6], encoder_depth=1, projector_dim=16)
    extra = sorted(set(model.state_dict()) - set(plain.state_dict()))
    assert extra == sorted(
        ["cls_projectors2.weight", "cls_projectors2.bias", "wg_norm.weight", "wg_norm.bias"]
        + ["final_layer.linear_cls.weight", "final_layer.linear_cls.bias"]
    )
    assert model.state_dict()["final_layer.linear_cls.weight"].shape == (6, 32)
    # The class token's position row is zero; the patch rows are the plain SiT's sin-cos rows.
    assert model.pos_embed.shape == (1, 17, 32) and not model.pos_embed[0, 0].any()
    torch.testing.assert_close(model.pos_embed[:, 1:], plain.pos_embed, rtol=0, atol=0)
    # At initialisation both velocities are zero (zeroed heads and modulation).
    x, t, y = inputs()
    with torch.no_grad():
        v, zs, cls_v = model(x, t, y, cls_token=torch.randn(2, 6))
    assert not v.any() and not cls_v.any() and zs[0].shape == (2, 17, 6)


@pytest.mark.parametrize(
    "build, call, message",
    [
        (dict(cls_token_dim=6), dict(), "needs cls_token"),
        (dict(cls_token_dim=6), dict(cls_token=torch.zeros(2, 5)), "cls_token must have shape"),
        (dict(), dict(cls_token=torch.zeros(2, 6)), "without cls_token_dim"),
    ],
)
def test_reg_inputs_are_checked(build, call, message):
    model = SiT(**TINY, z_dims=[6], encoder_depth=1, projector_dim=16, **build)
    with pytest.raises(ValueError, match=message):
        model(*inputs(), **call)


def test_reg_refuses_a_conv_projector():
    with pytest.raises(ValueError, match="square token grid"):
        SiT(**TINY, z_dims=[6], encoder_depth=1, cls_token_dim=6, projection_layer_type="conv")


def test_reg_flops_add_one_token():
    base = TINY | dict(z_dims=[], depth=1)
    plain, reg = sit_flops(SiT(**base)), sit_flops(SiT(**base, cls_token_dim=6))
    D, T, hidden_mlp = 32, 16, 128
    one_token = 3 * D * D + D * D + 2 * D * hidden_mlp  # qkv, proj, MLP for the extra token
    attention = 2 * ((T + 1) ** 2 - T**2) * D  # scores and weighted values grow with (T+1)^2
    assert reg - plain == 2 * (one_token + attention + 2 * 6 * D)


#################################################################################
#                            configs/variants/                                  #
#################################################################################

VARIANTS = Path(__file__).resolve().parents[1] / "configs" / "variants"


@pytest.mark.parametrize("name", ["irepa-sit-b-2_dinov2-b.yaml", "irepa-sit-xl-2_dinov2-b.yaml"])
def test_irepa_configs_build_their_projector(name):
    cfg = load_yaml_config(VARIANTS / name)
    # iREPA's LDM config and command: a 1x1 conv (ldm/train.py's default kernel), lambda 1.0, z-score 0.6.
    assert (cfg.projection_layer_type, cfg.proj_kwargs_kernel_size, cfg.spnorm_method) == ("conv", 1, "zscore")
    assert (cfg.proj_coeff, cfg.zscore_alpha) == (1.0, 0.6)
    with torch.device("meta"):
        model = SiT_models[cfg.model](
            z_dims=[768],
            encoder_depth=cfg.encoder_depth,
            projection_layer_type=cfg.projection_layer_type,
            proj_kwargs_kernel_size=cfg.proj_kwargs_kernel_size,
        )
    assert model.projectors[0].projection_layer.weight.shape[-2:] == (1, 1)


def test_reg_config_and_flag_checks():
    cfg = load_yaml_config(VARIANTS / "reg-sit-xl-2_dinov2-b.yaml")
    assert (cfg.cls, cfg.proj_coeff, cfg.encoder_depth, cfg.enc_type) == (0.03, 0.5, 8, "dinov2-vit-b")
    assert parse_config([]).cls == 0.0  # REG is off by default
    for argv, message in [(["--cls", "-0.1"], "must be >= 0"), (["--cls", "0.03", "--enc-type", "none"], "class token"),
                          (["--cls", "0.03", "--spnorm-method", "zscore"], "z-score")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_config(argv)


#################################################################################
#                         REG: joint image + class-token sampling               #
#################################################################################


def test_reg_sde_sampler_matches_official(testdata, monkeypatch):
    """REG's SDE with its Brownian increments set to zero: drift, score conversion, CFG on the image and on
    the class token (cls_cfg_scale 1.5), the grid and the deterministic last step."""
    import samplers

    ref, model = reference(testdata, "reg")
    kw = dict(ref["sde_kwargs"])
    assert kw.pop("brownian_increments") == "zero"
    monkeypatch.setattr(samplers, "randn_like", lambda x, generator: torch.zeros_like(x))
    out = samplers.euler_maruyama_sampler(model, ref["sde_noise"], ref["y"], cls_latents=ref["sde_cls_noise"], **kw)
    torch.testing.assert_close(out.double(), ref["sde"], rtol=1e-5, atol=1e-5)
    assert (out.double() - ref["sde"]).abs().max() < 1e-6  # float32 rounding only (2.5e-7 measured)
    # Every ingredient matters, well above that rounding: the class token's guidance (its effect on the image
    # of this random 3-block model is 3e-5), its initial state, the image guidance.
    for change in (dict(cls_cfg_scale=1.0), dict(cls_cfg_scale=3.0), dict(cfg_scale=1.0)):
        other = samplers.euler_maruyama_sampler(
            model, ref["sde_noise"], ref["y"], cls_latents=ref["sde_cls_noise"], **(kw | change)
        )
        assert (other.double() - ref["sde"]).abs().max() > 1e-5, change
    other = samplers.euler_maruyama_sampler(model, ref["sde_noise"], ref["y"], cls_latents=-ref["sde_cls_noise"], **kw)
    assert (other.double() - ref["sde"]).abs().max() > 1e-4


class _LinearREG(torch.nn.Module):
    """A REG-shaped model whose velocities are linear in (x, c) with a label-dependent offset: the ODE's
    Euler steps can then be restated by hand."""

    num_classes = 3

    def forward(self, x, t, y, cls_token=None):
        offset = (y.to(x.dtype) + 1).view(-1, 1, 1, 1)
        v = -0.5 * x + offset * 0.1 + cls_token.mean(dim=1).view(-1, 1, 1, 1)
        cls_v = 0.3 * cls_token - (y == self.num_classes).to(x.dtype).view(-1, 1) + x.mean(dim=(1, 2, 3)).view(-1, 1)
        return v, [], cls_v


def test_reg_ode_integrates_image_and_class_token_jointly():
    from samplers import euler_sampler

    model = _LinearREG()
    g = torch.Generator().manual_seed(0)
    x0, c0 = (
        torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 3, generator=g, dtype=torch.float64),
    )
    y = torch.tensor([0, 2])
    steps, cfg, cls_cfg = 4, 2.0, 1.5
    out = euler_sampler(model, x0, y, num_steps=steps, cfg_scale=cfg, cls_cfg_scale=cls_cfg, cls_latents=c0)
    x, c, null = x0.clone(), c0.clone(), torch.full_like(y, 3)
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    for i in range(steps):
        (v_c, _, cv_c), (v_u, _, cv_u) = model(x, None, y, c), model(x, None, null, c)
        dt = ts[i + 1] - ts[i]
        x, c = x + dt * (v_u + cfg * (v_c - v_u)), c + dt * (cv_u + cls_cfg * (cv_c - cv_u))
    torch.testing.assert_close(out, x)
    # The class token's guidance acts on the image through the entanglement.
    plain = euler_sampler(model, x0, y, num_steps=steps, cfg_scale=cfg, cls_cfg_scale=1.0, cls_latents=c0)
    assert (plain - out).abs().max() > 1e-4
    # REG's rule: a scale <= 0 keeps the conditional class-token velocity, like 1.
    zero = euler_sampler(model, x0, y, num_steps=steps, cfg_scale=cfg, cls_cfg_scale=0.0, cls_latents=c0)
    torch.testing.assert_close(zero, plain)


def test_reg_weights_rebuild_from_the_state_dict_alone(testdata):
    ref, _ = reference(testdata, "reg")
    kwargs = checkpoints.sit_kwargs_from_state_dict(ref["state_dict"])
    assert kwargs["cls_token_dim"] == 32 and kwargs["input_size"] == 8 and kwargs["z_dims"] == [32]
    model = SiT(**kwargs, num_heads=4, encoder_depth=2).eval()
    model.load_state_dict(ref["state_dict"], strict=True)
    with torch.no_grad():
        cls_v = model(ref["x"], ref["t"], ref["y"], cls_token=ref["cls_token"])[2]
    torch.testing.assert_close(cls_v, ref["cls_v"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_sample_ddp_samples_reg_checkpoints_with_the_class_token(tmp_path, mode):
    """A REG checkpoint without recorded keywords is rebuilt from its weights, and sample_ddp equals the
    sampler called directly, each sample's class-token noise drawn from its generator after the image's."""
    import argparse

    import numpy as np

    from checkpoints import save_checkpoint
    from samplers import euler_maruyama_sampler, euler_sampler

    torch.manual_seed(0)
    kwargs = dict(input_size=16, in_channels=3, num_classes=5, z_dims=[32], encoder_depth=2, cls_token_dim=32)
    model = SiT_models["SiT-S/8"](**kwargs).eval()
    for p in (model.final_layer.linear.weight, model.final_layer.linear_cls.weight):
        torch.nn.init.normal_(p, std=0.05)  # non-trivial velocities for the image and the class token
    for block in [*model.blocks, model.final_layer]:  # zero-initialised blocks would ignore the class token
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.2)
    config = {"model": "SiT-S/8", "pixel_space": True, "path_type": "linear", "encoder_depth": 2}
    ckpt = {"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "steps": 1}
    save_checkpoint(ckpt | {"args": argparse.Namespace(**config), "config": config}, tmp_path / "reg.pt")

    def run(name, *extra):
        argv = ["--ckpt", str(tmp_path / "reg.pt"), "--sample-dir", str(tmp_path / name), "--mode", mode]
        argv += ["--num-fid-samples", "4", "--batch-size", "2", "--num-steps", "3", "--global-seed", "3"]
        sample_ddp.main(argv + ["--cfg-scale", "2", *extra])
        return np.load((tmp_path / name).with_suffix(".npz"))["arr_0"]

    images = run("guided", "--cls-cfg-scale", "4")
    labels = protocol.sample_labels(4, 5, 3)
    expected = []
    for start in (0, 2):
        gens = [torch.Generator().manual_seed(3 * 1_000_003 + i) for i in range(start, start + 2)]
        noise = torch.stack([torch.randn(3, 16, 16, generator=g) for g in gens])
        cls = torch.stack([torch.randn(32, generator=g) for g in gens])
        y = torch.from_numpy(labels[start : start + 2])
        common = dict(num_steps=3, cfg_scale=2.0, cls_cfg_scale=4.0, cls_latents=cls)
        with torch.no_grad():
            if mode == "sde":
                expected.append(euler_maruyama_sampler(model, noise, y, generator=gens, **common))
            else:
                expected.append(euler_sampler(model, noise, y, **common))
    expected = torch.cat(expected)
    expected = torch.clamp(255.0 * ((expected + 1) / 2), 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert np.array_equal(images, expected)
    assert not np.array_equal(images, run("plain"))  # the class token's guidance reaches the pixels
    manifest = __import__("json").loads((tmp_path / "guided" / "manifest.json").read_text())
    assert manifest["cls_cfg_scale"] == 4.0


def test_cls_cfg_scale_is_refused_for_models_without_a_class_token(tmp_path):
    import argparse

    from checkpoints import save_checkpoint

    model = SiT_models["SiT-S/8"](input_size=16, in_channels=3, num_classes=5, z_dims=[])
    config = {"model": "SiT-S/8", "pixel_space": True}
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "steps": 1,
                     "args": argparse.Namespace(**config), "config": config}, tmp_path / "c.pt")  # fmt: skip
    with pytest.raises(ValueError, match="--cls-cfg-scale 1.5 applies to REG models only"):
        sample_ddp.main(
            ["--ckpt", str(tmp_path / "c.pt"), "--sample-dir", str(tmp_path / "s"), "--cls-cfg-scale", "1.5"]
        )


#################################################################################
#                      REG training: class tokens, loss, resume                 #
#################################################################################

# Families with a class token (sequence position 0); I-JEPA (average pooling) and SigLIP 2 (attention
# pooling head) have none.
WITHOUT_CLASS_TOKEN = ("jepa-vit-h", "siglip2-vit-b", "siglip2-vit-l", "siglip2-vit-so400m")


@pytest.mark.parametrize("name", sorted(__import__("models.encoders", fromlist=["ENCODERS"]).ENCODERS))
def test_every_encoder_family_says_whether_it_has_a_class_token(name):
    import dataclasses

    from models.encoders import ENCODERS, build_encoder

    spec = dataclasses.replace(ENCODERS[name], timm_kwargs={**ENCODERS[name].timm_kwargs, "depth": 1})
    encoder = build_encoder(spec, "meta", 256, enc_weights="random")
    images = torch.empty(2, 3, 256, 256, dtype=torch.uint8, device="meta")
    if name in WITHOUT_CLASS_TOKEN:
        assert not encoder.has_class_token
        with pytest.raises(ValueError, match="has no class token"):
            encoder.encode(images, class_token=True)
    else:
        assert encoder.has_class_token
        assert tuple(encoder.encode(images, class_token=True).shape) == (2, 1 + 256, spec.embed_dim)


@pytest.mark.parametrize("name", ["dinov2-vit-s", "dinov2reg-vit-s"])
def test_class_token_is_the_normalised_first_token_in_front_of_the_patches(name):
    """DINOv2's x_norm_clstoken: the final norm's output at position 0; registers stay dropped."""
    from models.encoders import ENCODERS, build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(ENCODERS[name], "cpu", 64, enc_weights="random")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with_cls, patches = encoder.encode(images, class_token=True), encoder.encode(images)
    assert with_cls.shape == (2, 1 + 16, 384)
    torch.testing.assert_close(with_cls[:, 1:], patches, rtol=0, atol=0)
    x = torch.nn.functional.interpolate(
        (images.float() / 255 - encoder.mean) / encoder.std, size=56, mode="bicubic", align_corners=False
    )
    blocks_out = encoder.model.blocks(encoder.model._pos_embed(encoder.model.patch_embed(x)))
    torch.testing.assert_close(with_cls[:, 0], encoder.model.norm(blocks_out)[:, 0], rtol=1e-5, atol=1e-5)


def test_reg_loss_equals_a_direct_restatement():
    """REG's objective written out: the class token noised with the image's t and its own noise (drawn after
    the image's), its velocity error weighted by cls, the alignment over [class token; patches]."""
    torch.manual_seed(0)
    model = SiT(**TINY, z_dims=[6, 5], encoder_depth=1, projector_dim=16, cls_token_dim=6)
    for p in (model.final_layer.linear_cls.weight, model.final_layer.adaLN_modulation[-1].weight):
        torch.nn.init.normal_(p, std=0.1)  # non-zero class-token velocity
    x, _, y = inputs()
    targets = [torch.randn(2, 17, 6), torch.randn(2, 17, 5)]  # [class token; 16 patch tokens] per encoder
    terms = REPALoss(proj_coeff=0.5, cls_coeff=0.03)(model, x, y, targets, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    t = torch.rand(2, generator=g)
    noise, cls_noise = torch.randn(x.shape, generator=g), torch.randn(2, 6, generator=g)
    c = targets[0][:, 0]
    tt = t.view(-1, 1, 1, 1)
    with torch.no_grad():
        v, zs, cls_v = model((1 - tt) * x + tt * noise, t, y, cls_token=(1 - t[:, None]) * c + t[:, None] * cls_noise)
    denoising = ((v - (noise - x)) ** 2).mean(dim=(1, 2, 3))
    cls_loss = ((cls_v - (cls_noise - c)) ** 2).mean(dim=1)
    cos = [torch.nn.functional.cosine_similarity(z, zt, dim=-1).mean() for z, zt in zip(zs, targets)]
    proj = -(cos[0] + cos[1]) / 2
    torch.testing.assert_close(terms.denoising, denoising)
    torch.testing.assert_close(terms.cls, cls_loss)
    torch.testing.assert_close(terms.proj, proj)
    torch.testing.assert_close(terms.total, denoising.mean() + 0.5 * proj + 0.03 * cls_loss.mean())
    assert cls_loss.min() > 1e-3 and zs[0].shape == (2, 17, 6)
    # A negative weight is refused (REG with iREPA's z-score is config.py's rule: test_reg_config_and_flag_checks).
    with pytest.raises(ValueError, match="cls_coeff"):
        REPALoss(cls_coeff=-1.0)


def test_reg_trains_resumes_exactly_and_its_checkpoint_samples(demo_data, tmp_path):
    """A few REG steps (--cls): the class-token head learns, model_kwargs carry cls_token_dim, stats log the
    class-token loss, N straight steps equal N/2 + resume + N/2 bit for bit, and sample_ddp rebuilds it."""
    import json

    from tests.test_train import run_train, tiny_argv

    def argv(out, steps):
        return tiny_argv(demo_data, out, max_train_steps=steps, checkpointing_steps=2, sampling_steps=4) + [
            "--cls",
            "0.5",
        ]

    run_train(argv(tmp_path / "straight", 4))
    run_train(argv(tmp_path / "split", 2))
    run_train(argv(tmp_path / "split", 4))
    a, b = (load_checkpoint(tmp_path / d / "run" / "checkpoints" / "0000004.pt") for d in ("straight", "split"))
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert a["model_kwargs"]["cls_token_dim"] == 384  # dinov2-vit-s's class token
    first = load_checkpoint(tmp_path / "straight" / "run" / "checkpoints" / "0000002.pt")
    for key in ("final_layer.linear_cls.weight", "cls_projectors2.weight"):  # both ends of the class token train
        assert not torch.equal(a["model"][key], first["model"][key]), key
    stats = [json.loads(line) for line in (tmp_path / "straight" / "run" / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2, 3, 4] and all(s["cls_loss"] > 0 for s in stats)
    assert (tmp_path / "straight" / "run" / "samples" / "0000004.png").exists()  # REG previews
    model, settings = checkpoints.load_model(tmp_path / "straight" / "run" / "checkpoints" / "0000004.pt")
    assert model.cls_token_dim == 384 and settings["cls_token_dim"] == 384


#################################################################################
#                 HASTE: attention alignment and early stop                     #
#################################################################################


def test_attention_alignment_closed_forms():
    """Identical distributions give the teacher's entropy (the minimum); a permuted head order changes it."""
    from loss import attention_alignment_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5) * 2
    p = logits.softmax(dim=-1)
    entropy = -(p * p.log()).sum(dim=-1).mean()
    torch.testing.assert_close(attention_alignment_loss([logits], [p]), entropy)
    # Logits are defined up to a constant per row: shifting them changes nothing.
    torch.testing.assert_close(attention_alignment_loss([logits + 3.0], [p]), entropy)
    permuted = attention_alignment_loss([logits[:, [1, 2, 0]]], [p])
    assert permuted > entropy + 0.1
    # Extra student heads are left free; its class token (REG) is dropped from queries and keys.
    extra = torch.cat([logits, torch.randn(2, 2, 5, 5)], dim=1)
    torch.testing.assert_close(attention_alignment_loss([extra], [p]), entropy)
    with_cls = torch.randn(2, 3, 6, 6)
    with_cls[:, :, 1:, 1:] = logits
    torch.testing.assert_close(attention_alignment_loss([with_cls], [p], skip_tokens=1), entropy)
    # A uniform student costs log T per row; two pairs are averaged.
    uniform = torch.zeros(2, 3, 5, 5)
    torch.testing.assert_close(attention_alignment_loss([uniform], [p]), torch.log(torch.tensor(5.0)))
    both = attention_alignment_loss([logits, uniform], [p, p])
    torch.testing.assert_close(both, (entropy + torch.log(torch.tensor(5.0))) / 2)
    with pytest.raises(ValueError, match="heads"):
        attention_alignment_loss([logits[:, :2]], [p])


def test_encoder_attention_maps_come_from_hooks_on_the_unpatched_encoder():
    """The hooked maps equal the attention computed by hand from the block's input, over patch tokens only."""
    from models.encoders import ENCODERS, build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(ENCODERS["dinov2reg-vit-s"], "cpu", 64, enc_weights="random")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    inputs = {}
    handle = encoder.model.blocks[2].norm1.register_forward_hook(lambda m, i, o: inputs.setdefault("x", o))
    tokens, (maps, maps_last) = encoder.encode_with_attention(images, [3, 12])
    handle.remove()
    torch.testing.assert_close(tokens, encoder.encode(images), rtol=0, atol=0)  # same forward
    attn = encoder.model.blocks[2].attn
    N, T, D = inputs["x"].shape
    q, k, _ = attn.qkv(inputs["x"]).reshape(N, T, 3, 6, D // 6).permute(2, 0, 3, 1, 4)
    expected = (q[:, :, 5:] @ k[:, :, 5:].transpose(-2, -1) / (D // 6) ** 0.5).softmax(dim=-1)  # 1 CLS + 4 registers
    assert maps.shape == maps_last.shape == (2, 6, 16, 16)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps_last.sum(dim=-1), torch.ones(2, 6, 16), rtol=0, atol=1e-5)
    assert not any(m._forward_hooks for m in encoder.model.modules())  # hooks removed
    with pytest.raises(ValueError, match="blocks 1..12"):
        encoder.encode_with_attention(images, [13])


def test_sit_records_attention_logits_only_where_asked():
    torch.manual_seed(0)
    model = SiT(**TINY | dict(depth=3), z_dims=[6], encoder_depth=1, projector_dim=16)
    for block in model.blocks:  # non-zero adaLN, so attention shapes the output
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    x, t, y = inputs()
    with torch.no_grad():
        fused = model(x, t, y)[0]
        model.record_attention([2])
        recorded = model(x, t, y)[0]
    torch.testing.assert_close(recorded, fused, rtol=1e-5, atol=1e-6)  # same output, explicit softmax in block 2
    assert [b.attn.record_logits for b in model.blocks] == [False, True, False]
    (logits,) = model.attention_logits()
    assert logits.shape == (2, 2, 16, 16)
    with pytest.raises(RuntimeError, match="no attention logits"):  # read once per forward, then released
        model.attention_logits()
    model.record_attention(())
    assert not any(b.attn.record_logits for b in model.blocks)
    with pytest.raises(ValueError, match="blocks 1..3"):
        model.record_attention([4])


def test_haste_flags_and_default_pairing():
    from config import HASTE_DEFAULT_ATTN_LAYERS

    cfg = parse_config(["--attn-coeff", "0.5", "--early-stop-point", "250000"])
    assert cfg.attention_layer_pairs == [(5, 9), (6, 10), (7, 11), (8, 12)]
    assert ("SiT-XL/2", "dinov2-vit-b") in HASTE_DEFAULT_ATTN_LAYERS
    assert parse_config(["--attn-coeff", "0.5", "--attn-align-layers", "2:3,4:6"]).attention_layer_pairs == [
        (2, 3),
        (4, 6),
    ]
    for argv, message in [
        (["--attn-coeff", "0.5", "--model", "SiT-B/2"], "no default attention layer pairing"),
        (["--attn-coeff", "0.5", "--attn-align-layers", "2-3"], "SIT_BLOCK:ENC_BLOCK"),
        (["--attn-coeff", "0.5", "--cache-targets"], "not cached"),
        (["--early-stop-point", "10", "--cls", "0.03"], "cannot stop"),
        (["--attn-coeff", "-1"], ">= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_config(argv)


def test_haste_early_stop_is_exact_across_resume_and_stops_the_encoder(demo_data, tmp_path, monkeypatch):
    """Attention + feature alignment for 2 steps, then none: 4 straight steps equal 3 + resume + 1 (resumed
    past the stop) and 1 + resume + 3 (resumed before it) bit for bit; the encoder runs only before the stop."""
    import json

    from models.encoders import FrozenEncoder
    from tests.test_train import run_train, tiny_argv

    calls = []
    original = FrozenEncoder.encode_with_attention
    monkeypatch.setattr(
        FrozenEncoder, "encode_with_attention", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )

    def argv(out, steps):
        haste = ["--attn-coeff", "0.5", "--attn-align-layers", "2:11,3:12", "--early-stop-point", "2"]
        return tiny_argv(demo_data, out, max_train_steps=steps, checkpointing_steps=1, num_heads=8) + haste

    run_train(argv(tmp_path / "straight", 4))
    assert len(calls) == 2  # steps 1 and 2 only: no encoder forward after the stop
    run_train(argv(tmp_path / "late", 3))
    run_train(argv(tmp_path / "late", 4))
    run_train(argv(tmp_path / "early", 1))
    run_train(argv(tmp_path / "early", 4))
    final = {
        d: load_checkpoint(tmp_path / d / "run" / "checkpoints" / "0000004.pt") for d in ("straight", "late", "early")
    }
    for other in ("late", "early"):
        for key in ("model", "ema"):
            for name, tensor in final["straight"][key].items():
                assert torch.equal(tensor, final[other][key][name]), f"{other}: {key}.{name} differs after resume"
    stats = [json.loads(line) for line in (tmp_path / "straight" / "run" / "stats.jsonl").read_text().splitlines()]
    assert [s["attn_loss"] > 0 for s in stats] == [True, True, False, False]
    assert [s["proj_loss"] != 0 for s in stats] == [True, True, False, False]
    # The attention alignment trains the aligned blocks: with it off from the start, block 2 differs at step 2.
    run_train(tiny_argv(demo_data, tmp_path / "repa", max_train_steps=2, checkpointing_steps=1, num_heads=8))
    repa = load_checkpoint(tmp_path / "repa" / "run" / "checkpoints" / "0000002.pt")["model"]
    haste = load_checkpoint(tmp_path / "straight" / "run" / "checkpoints" / "0000002.pt")["model"]
    assert not torch.equal(repa["blocks.1.attn.qkv.weight"], haste["blocks.1.attn.qkv.weight"])


def test_haste_config_builds_its_alignment():
    cfg = load_yaml_config(VARIANTS / "haste-sit-xl-2_dinov2-b.yaml")
    assert (cfg.attn_coeff, cfg.proj_coeff, cfg.early_stop_point, cfg.encoder_depth) == (0.5, 0.5, 250_000, 8)
    assert (cfg.model, cfg.enc_type, cfg.max_train_steps) == ("SiT-XL/2", "dinov2-vit-b", 2_500_000)
    pairs = cfg.attention_layer_pairs
    with torch.device("meta"):
        model = SiT_models[cfg.model](z_dims=[768], encoder_depth=cfg.encoder_depth)
    model.record_attention([sit for sit, _ in pairs])  # the SiT-XL/2 blocks exist
    assert all(1 <= enc <= 12 for _, enc in pairs) and model.num_heads >= 12  # DINOv2-B: 12 blocks, 12 heads


def test_reg_sde_noise_is_drawn_per_sample_image_first_then_class_token():
    """The SDE written out for a REG-shaped model: per step, each sample's generator gives its image increment,
    then its class token's; the last step is the mean; the score of each comes from its own velocity."""
    from loss import Interpolant
    from samplers import euler_maruyama_sampler

    model = _LinearREG()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64)
    c0 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    y, steps = torch.tensor([0, 2]), 4
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(2)]  # noqa: E731
    out = euler_maruyama_sampler(model, x0, y, num_steps=steps, generator=gens(), cls_latents=c0)
    interp, ts = Interpolant("linear"), torch.cat([torch.linspace(1, 0.04, steps, dtype=torch.float64), torch.zeros(1)])
    x, c, hand_gens = x0.clone(), c0.clone(), gens()
    for i in range(steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        v, _, cv = model(x, None, y, c)
        x_new = x + (v - t * interp.score_from_velocity(v, x, t)) * dt
        c_new = c + (cv - t * interp.score_from_velocity(cv, c, t)) * dt
        if i < steps - 1:
            for n, gen in enumerate(hand_gens):
                x_new[n] += (
                    torch.sqrt(2 * t) * torch.sqrt(-dt) * torch.randn(1, 2, 2, generator=gen, dtype=torch.float64)
                )
                c_new[n] += torch.sqrt(2 * t) * torch.sqrt(-dt) * torch.randn(3, generator=gen, dtype=torch.float64)
        x, c = x_new, c_new
    torch.testing.assert_close(out, x)
