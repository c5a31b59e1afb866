"""DiT backbone: registry, original-release checkpoint format, integer timesteps, REPA projectors."""

import math

import pytest
import torch
import torch.nn.functional as F

from checkpoints import load_checkpoint, model_state_dict
from diffusion import DiffusionLoss
from models.dit import DiT, DiT_models
from models.sit import SIT_SIZES, get_2d_sincos_pos_embed, sit_flops

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


@pytest.mark.parametrize("name", sorted(DiT_models))
def test_registry_entry_builds_with_paper_sizes(name):
    size, patch = name.split("-")[1].split("/")[0], int(name.split("/")[1])
    with torch.device("meta"):
        model = DiT_models[name](input_size=32, encoder_depth=4, z_dims=[768])
    depth, hidden, heads = SIT_SIZES[size]
    assert len(model.blocks) == depth and model.pos_embed.shape == (1, (32 // patch) ** 2, hidden)
    assert model.num_heads == heads and model.patch_size == patch and model.learn_sigma
    x = torch.empty(2, 4, 32, 32, device="meta")
    out, zs = model(x, torch.zeros(2, dtype=torch.long, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"))
    assert out.shape == (2, 8, 32, 32)  # [eps | v]: learned sigma doubles the channels
    assert len(zs) == 1 and zs[0].shape == (2, (32 // patch) ** 2, 768)


def test_dit_flops_match_paper():
    # DiT paper Table 4: DiT-XL/2 118.6 Gflops, DiT-B/4 5.56 (multiply-accumulates); the doubled output is counted.
    for name, gmacs in {"DiT-XL/2": 118.6, "DiT-B/4": 5.56}.items():
        with torch.device("meta"):
            model = DiT_models[name](z_dims=[])
        assert sit_flops(model) / 2e9 == pytest.approx(gmacs, rel=0.02), name


def original_dit_state_dict(config, seed=0):
    """Random weights under the key names and shapes of facebookresearch/DiT (z_dims empty, learn_sigma=True).

    Written from the release's key list, not from our model, so a renamed or reshaped parameter fails the load.
    pos_embed is stored, as the release does, with the fixed 2D sin-cos values.
    """
    gen = torch.Generator().manual_seed(seed)
    D, p, C, K = config["hidden_size"], config["patch_size"], config["in_channels"], config["num_classes"]
    T = (config["input_size"] // p) ** 2
    shapes = {
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (K + 1, D),  # + the null class row
    }
    for i in range(config["depth"]):
        for name, (out_f, in_f) in {
            "attn.qkv": (3 * D, D),
            "attn.proj": (D, D),
            "mlp.fc1": (4 * D, D),
            "mlp.fc2": (D, 4 * D),
            "adaLN_modulation.1": (6 * D, D),
        }.items():
            shapes[f"blocks.{i}.{name}.weight"], shapes[f"blocks.{i}.{name}.bias"] = (out_f, in_f), (out_f,)
    shapes |= {
        "final_layer.linear.weight": (p * p * 2 * C, D),
        "final_layer.linear.bias": (p * p * 2 * C,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    state = {k: 0.2 * torch.randn(s, generator=gen) / math.sqrt(s[-1] if len(s) > 1 else 1) for k, s in shapes.items()}
    state["pos_embed"] = torch.tensor(get_2d_sincos_pos_embed(D, int(math.sqrt(T))), dtype=torch.float32)[None]
    return state


def reference_forward(sd, x, t, y, config):
    """The original DiT forward from its equations, functionally (independent of models/), in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    p, heads, depth, D = config["patch_size"], config["num_heads"], config["depth"], config["hidden_size"]
    lin = lambda h, name: F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])
    ln = lambda h: F.layer_norm(h, (D,), eps=1e-6)
    h = F.conv2d(x.double(), sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (N, T, D)
    N, T, _ = h.shape
    # Integer timestep t as is (no /1000): [cos | sin] of t * 10000^(-k/128), k = 0..127.
    args = t.double()[:, None] * torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    c = lin(F.silu(lin(torch.cat([args.cos(), args.sin()], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    for i in range(depth):
        b = f"blocks.{i}"
        shift1, scale1, gate1, shift2, scale2, gate2 = lin(F.silu(c), f"{b}.adaLN_modulation.1")[:, None].chunk(6, -1)
        q, k, v = lin(ln(h) * (1 + scale1) + shift1, f"{b}.attn.qkv").view(N, T, 3, heads, -1).unbind(2)
        weights = torch.einsum("nqhd,nkhd->nhqk", q, k).div(math.sqrt(D // heads)).softmax(-1)
        h = h + gate1 * lin(torch.einsum("nhqk,nkhd->nqhd", weights, v).reshape(N, T, D), f"{b}.attn.proj")
        mlp = lin(F.gelu(lin(ln(h) * (1 + scale2) + shift2, f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
        h = h + gate2 * mlp
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1")[:, None].chunk(2, -1)
    out = lin(ln(h) * (1 + scale) + shift, "final_layer.linear")  # (N, T, p*p*2C), channel fastest
    g, C2 = int(math.sqrt(T)), out.shape[-1] // (p * p)
    return out.view(N, g, g, p, p, C2).permute(0, 5, 1, 3, 2, 4).reshape(N, C2, g * p, g * p)


def test_original_release_checkpoint_loads_strictly_and_matches(tmp_path):
    state = original_dit_state_dict(TINY)
    path = tmp_path / "DiT-tiny-256x256.pt"
    torch.save(state, path)  # the release ships a bare (EMA) state dict
    model = DiT(**TINY, z_dims=()).eval()
    model.load_state_dict(model_state_dict(load_checkpoint(path)), strict=True)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([1, 7, 10])  # 10 = null class
    with torch.no_grad():
        out, zs = model(x, t, y)
    assert zs == [] and out.shape == (3, 8, 8, 8)
    torch.testing.assert_close(out.double(), reference_forward(state, x, t, y, TINY), rtol=1e-4, atol=1e-5)
    # REPA projectors are extra keys: a model built with z_dims cannot strict-load the release file.
    with pytest.raises(RuntimeError, match="projectors"):
        DiT(**TINY, z_dims=(16,), encoder_depth=1).load_state_dict(state, strict=True)


def test_integer_timesteps_embed_like_float_and_differ_per_step():
    torch.manual_seed(0)
    model = DiT(**TINY, encoder_depth=1, z_dims=(16,)).eval()
    model.load_state_dict(
        original_dit_state_dict(TINY) | {k: v for k, v in model.state_dict().items() if k.startswith("projectors")}
    )
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    with torch.no_grad():
        out_long, _ = model(x, torch.tensor([999, 998]), y)
        out_float, _ = model(x, torch.tensor([999.0, 998.0]), y)
        out_next, _ = model(x, torch.tensor([998, 997]), y)
    torch.testing.assert_close(out_long, out_float)
    assert (out_long - out_next).abs().max() > 1e-4  # one timestep apart is a different input


def test_learn_sigma_false_predicts_eps_only_and_init_is_zero():
    model = DiT(**TINY, learn_sigma=False, encoder_depth=2, z_dims=(12, 20))
    out, zs = model(torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([0, 1]))
    assert out.shape == (2, 4, 8, 8) and torch.count_nonzero(out) == 0  # zero-initialised output layer
    assert [z.shape for z in zs] == [(2, 16, 12), (2, 16, 20)]


def test_repa_loss_trains_projectors_and_backbone():
    torch.manual_seed(0)
    model = DiT(**TINY, encoder_depth=1, z_dims=(24,))
    x, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 10])
    target = [torch.randn(4, 16, 24)]
    terms = DiffusionLoss(proj_coeff=0.5)(model, x, y, target, generator=torch.Generator().manual_seed(0))
    assert terms.denoising.shape == (4,) and -1 <= terms.proj.item() <= 1
    terms.total.backward()
    assert model.projectors[0][0].weight.grad.abs().sum() > 0
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    # At init (adaLN-Zero, zero output layer) only the alignment reaches the blocks, and only those up to
    # encoder_depth = 1: block 0 gets a gradient, block 1 none.
    assert model.blocks[0].adaLN_modulation[1].weight.grad.abs().sum() > 0
    assert model.blocks[1].adaLN_modulation[1].weight.grad.abs().sum() == 0


def test_bad_input_names_the_model():
    model = DiT(**TINY, z_dims=())
    with pytest.raises(ValueError, match=r"DiT expects input of shape \(N, 4, 8, 8\)"):
        model(torch.randn(1, 8, 8, 8), torch.tensor([1]), torch.tensor([0]))
