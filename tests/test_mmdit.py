"""MMDiT (text-to-image): equivalence with the official module and its T2I samplers, registry, errors."""

import argparse

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from checkpoints import load_checkpoint, model_state_dict, save_checkpoint
from loss import Interpolant, REPALoss
from models.mmdit import MMDIT_DEPTHS, MMDiT, MMDiT_models, mmdit_flops
from samplers import euler_maruyama_sampler, euler_sampler

TOL = dict(rtol=1e-5, atol=1e-5)


def reference_model(testdata, load=True):
    ref = torch.load(testdata / "mmdit_reference_tiny.pt", weights_only=True)
    model = MMDiT(**ref["config"]).eval()  # the official constructor keywords, as recorded
    if load:
        model.load_state_dict(ref["state_dict"], strict=True)
    return ref, model


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(input_size=8, patch_size=2, depth=3, encoder_depth=2, z_dims=(16,), projector_dim=32, context_dim=24)
    return MMDiT(**config | overrides).eval()


def test_fixed_pos_embed_matches_official(testdata, one_torch_thread):
    ref, model = reference_model(testdata, load=False)
    # Computed here, before loading: the sin-cos layout and the official 16 x 16 crop must agree.
    torch.testing.assert_close(model.pos_embed, ref["state_dict"]["pos_embed"], rtol=0, atol=1e-6)


def test_state_dict_keys_and_shapes_are_official(testdata, one_torch_thread):
    ref, model = reference_model(testdata, load=False)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in ref["state_dict"].items()}
    # The last text stream is pre-only: qkv and a 2-way modulation, no output projection, no MLP.
    last = f"joint_blocks.{ref['config']['depth'] - 1}.context_block."
    assert sorted(k[len(last) :] for k in ours if k.startswith(last)) == [
        "adaLN_modulation.1.bias",
        "adaLN_modulation.1.weight",
        "attn.qkv.bias",
        "attn.qkv.weight",
    ]


def test_forward_matches_official_reference(testdata, one_torch_thread):
    ref, model = reference_model(testdata)
    with torch.no_grad():
        v, zs = model(ref["x"], ref["t"], context=ref["context"])
        v_positional, _ = model(ref["x"], ref["t"], ref["context"])  # how the samplers call it
        v_empty, _ = model(ref["x"], ref["t"], context=ref["empty_context"].expand(2, -1, -1))
    torch.testing.assert_close(v, ref["v"], **TOL)
    assert len(zs) == len(ref["zs"]) == 1
    torch.testing.assert_close(zs[0], ref["zs"][0], **TOL)
    assert torch.equal(v_positional, v)
    # The text really reaches the patches, by far more than the tolerance (random weights attend weakly).
    assert (v - v_empty).abs().max() > 1e-4


def test_official_t2i_checkpoint_loads_strictly(tmp_path, testdata, one_torch_thread):
    # train_t2i.py saves {model, ema, opt, args (a Namespace), steps}; `model` holds the weights it samples from.
    ref, _ = reference_model(testdata, load=False)
    args = argparse.Namespace(encoder_depth=1, enc_type="dinov2-vit-b", proj_coeff=0.5, resolution=256)
    ckpt = {"model": ref["state_dict"], "ema": ref["state_dict"], "opt": {"state": {}, "param_groups": []}}
    save_checkpoint(ckpt | {"args": args, "steps": 4000}, tmp_path / "0004000.pt")
    state_dict = model_state_dict(load_checkpoint(tmp_path / "0004000.pt"), use_ema=False)
    _, model = reference_model(testdata, load=False)
    model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(ref["x"], ref["t"], context=ref["context"])[0], ref["v"], **TOL)


@pytest.mark.parametrize("null_shape", ["(1, L, D)", "(L, D)"])
def test_ode_samplers_match_official_t2i_sampler(testdata, null_shape, one_torch_thread):
    ref, model = reference_model(testdata)
    empty = ref["empty_context"] if null_shape == "(1, L, D)" else ref["empty_context"][0]
    common = dict(model=model, latents=ref["noise"], y=ref["context"], num_steps=ref["num_steps"])
    samples = ref["samples"]  # float64, as the official sampler returns them; ours keep the latents' dtype
    euler = euler_sampler(**common)
    heun = euler_sampler(**common, heun=True)
    heun_cfg = euler_sampler(**common, heun=True, null_condition=empty, **ref["sampler_kwargs"])
    assert euler.dtype == ref["noise"].dtype
    torch.testing.assert_close(euler.double(), samples["euler"], **TOL)
    torch.testing.assert_close(heun.double(), samples["heun"], **TOL)
    torch.testing.assert_close(heun_cfg.double(), samples["heun_cfg"], **TOL)
    assert (heun_cfg - heun).abs().max() > 1e-4  # guidance really acted
    # Guiding with another null context gives another result: the empty caption is what was matched.
    other = euler_sampler(**common, heun=True, null_condition=torch.zeros_like(empty), **ref["sampler_kwargs"])
    assert (other.double() - samples["heun_cfg"]).abs().max() > 1e-4


def test_sde_guides_with_the_null_context_like_the_official_t2i_sampler(testdata, one_torch_thread):
    # The official T2I SDE guides the drift v - t * score with the empty context as y_null; we guide v.
    ref, model = reference_model(testdata)
    latents, context, empty, steps, w = ref["noise"], ref["context"], ref["empty_context"], 4, 2.0
    torch.manual_seed(1)
    ours = euler_maruyama_sampler(model, latents, context, num_steps=steps, cfg_scale=w, null_condition=empty)
    interp = Interpolant("linear")
    torch.manual_seed(1)
    grid = torch.cat([torch.linspace(1, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = latents.double()
    for i in range(steps):
        t, dt = grid[i], grid[i + 1] - grid[i]
        xin, cin = torch.cat([x, x]), torch.cat([context, empty.repeat(2, 1, 1)])
        tin = torch.full((4,), float(t), dtype=torch.float64)
        with torch.no_grad():
            v = model(xin.float(), tin.float(), context=cin)[0].double()
        cond, uncond = (v - t * interp.score_from_velocity(v, xin, tin.view(-1, 1, 1, 1))).chunk(2)
        x = x + (uncond + w * (cond - uncond)) * dt
        if i < steps - 1:
            x = x + torch.sqrt(2 * t) * torch.sqrt(-dt) * torch.randn_like(x)
    torch.testing.assert_close(ours, x.float(), **TOL)


def test_guidance_of_a_text_model_needs_its_null_context(one_torch_thread):
    model = tiny_model()
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    with pytest.raises(ValueError, match="null_condition="):
        euler_sampler(model, latents, context, num_steps=1, cfg_scale=2.0)
    with pytest.raises(ValueError, match=r"null_condition of shape \(7, 24\).*\(2, 5, 24\)"):
        euler_sampler(model, latents, context, num_steps=1, cfg_scale=2.0, null_condition=torch.zeros(7, 24))
    euler_sampler(model, latents, context, num_steps=1, cfg_scale=1.0)  # unguided: no null needed


@pytest.mark.parametrize("name", sorted(MMDiT_models))
def test_registry_entry_builds_with_official_sizes(name):
    depth, patch = int(name.split("-d")[1].split("/")[0]), int(name.split("/")[1])
    assert depth in MMDIT_DEPTHS
    with torch.device("meta"):
        model = MMDiT_models[name](input_size=32, encoder_depth=8, z_dims=[768])
        x, t, context = torch.empty(2, 4, 32, 32), torch.empty(2), torch.empty(2, 77, 768)
        v, zs = model(x, t, context)
    hidden = 32 * depth  # official: hidden 32 x depth, depth heads
    assert len(model.joint_blocks) == depth and model.num_heads == depth and model.patch_size == patch
    assert model.pos_embed.shape == (1, (32 // patch) ** 2, hidden)
    assert model.context_embedder.weight.shape == (hidden, 768)
    assert v.shape == (2, 4, 32, 32) and zs[0].shape == (2, (32 // patch) ** 2, 768)


def counted_flops(model, x, t, context):
    """FLOPs of one forward as torch counts them (attention through the math kernel, whose matmuls count)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, context)
    return counter.get_total_flops()


def test_analytic_flops_equal_counted_flops(testdata, one_torch_thread):
    _, model = reference_model(testdata, load=False)
    with torch.no_grad():
        counted = counted_flops(model, torch.randn(1, 4, 32, 32), torch.rand(1), torch.randn(1, 6, 768))
    assert mmdit_flops(model, context_length=6) == counted
    with torch.device("meta"):  # the official size, 77 CLIP tokens: about 125 GFLOPs per forward
        model = MMDiT_models["MMDiT-d24/2"]()
        counted = counted_flops(model, torch.empty(1, 4, 32, 32), torch.empty(1), torch.empty(1, 77, 768))
    assert mmdit_flops(model) == counted and 120e9 < counted < 130e9


def test_trains_end_to_end(one_torch_thread):
    model = tiny_model(z_dims=(16, 8)).train()
    x, t, context = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 24)
    v, zs = model(x, t, context)
    assert v.shape == x.shape and [z.shape for z in zs] == [(2, 16, 16), (2, 16, 8)]
    (v.square().mean() + zs[0].mean() + zs[1].mean()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    # Text reaches the loss through joint attention; the last text stream's qkv feeds the last attention.
    for name in ("context_embedder.weight", "joint_blocks.2.context_block.attn.qkv.weight", "projectors.1.4.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_repa_loss_trains_it_with_text_as_the_condition(one_torch_thread):
    # loss.py calls model(x_t, t, y): with the text tokens as y, the MMDiT trains through the same loss.
    model = tiny_model().train()
    x, context, targets = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24), [torch.randn(2, 16, 16)]
    terms = REPALoss()(model, x, context, targets, generator=torch.Generator().manual_seed(0))
    assert terms.proj.abs() > 0  # the alignment term is computed from the projector
    terms.total.backward()
    assert model.context_embedder.weight.grad.abs().sum() > 0


def test_no_projectors_for_vanilla_mmdit(one_torch_thread):
    model = tiny_model(z_dims=())
    _, zs = model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.randn(1, 3, 24))
    assert zs == [] and not any(k.startswith("projectors") for k in model.state_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(encoder_depth=0), "encoder_depth"),
        (dict(encoder_depth=4), "encoder_depth"),
        (dict(input_size=9), "not divisible by patch_size"),
        (dict(depth=0), "depth"),
    ],
)
def test_bad_construction_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)


def test_bad_inputs_are_refused(one_torch_thread):
    model = tiny_model()
    x, t, context = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 24)
    with pytest.raises(ValueError, match=r"\(N, 4, 8, 8\)"):
        model(torch.randn(2, 4, 16, 16), t, context)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model(x, torch.rand(3), context)
    with pytest.raises(ValueError, match=r"\(2, L, 24\)"):
        model(x, t, torch.tensor([0, 1]))  # class labels given to a text model
    with pytest.raises(ValueError, match=r"\(2, L, 24\)"):
        model(x, t, context[:1])
    with pytest.raises(ValueError, match="width 24"):
        model(x, t, torch.randn(2, 5, 768))
    with pytest.raises(TypeError):
        model(x, t)  # the text is required, as officially
