"""SiT backbone: equivalence with the official implementation, registry, checkpoint loading, errors."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from checkpoints import load_checkpoint, model_state_dict, save_checkpoint
from models.dit import DiT
from models.sit import SIT_SIZES, Attention, SiT, SiT_models, get_2d_sincos_pos_embed, sit_flops

# Keys of the official constructor that this SiT does not take: path_type and use_cfg were unused there,
# decoder_hidden_size must equal hidden_size (its default 768 is what broke SiT-S).
OFFICIAL_ONLY_KEYS = ("path_type", "use_cfg", "decoder_hidden_size")


def reference_model(testdata, **overrides):
    ref = torch.load(testdata / "repa_sit_reference_tiny.pt", weights_only=True)
    config = dict(ref["config"])
    assert config["decoder_hidden_size"] == config["hidden_size"]
    for key in OFFICIAL_ONLY_KEYS:
        config.pop(key, None)
    model = SiT(**config | overrides).eval()
    return ref, model


def test_fixed_pos_embed_matches_official(testdata):
    ref, model = reference_model(testdata)
    # Computed here, before loading: the sin-cos layout (column half first) must match.
    torch.testing.assert_close(model.pos_embed, ref["state_dict"]["pos_embed"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("fused_attn", [True, False])
def test_forward_matches_official_reference(testdata, fused_attn):
    ref, model = reference_model(testdata, fused_attn=fused_attn)
    model.load_state_dict(ref["state_dict"], strict=True)
    with torch.no_grad():
        v, zs = model(ref["x"], ref["t"], ref["y"])
        v_null, _ = model(ref["x"], ref["t"], ref["y_null"])
    torch.testing.assert_close(v, ref["v"], rtol=1e-5, atol=1e-5)
    assert len(zs) == len(ref["zs"]) == 1
    torch.testing.assert_close(zs[0], ref["zs"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_null, ref["v_null"], rtol=1e-5, atol=1e-5)
    # The null label really changes the output (a test that could not fail otherwise).
    assert (v - v_null).abs().max() > 1e-3


def test_force_drop_ids_selects_null_class(testdata):
    ref, model = reference_model(testdata)
    model.load_state_dict(ref["state_dict"])
    with torch.no_grad():
        v_dropped, _ = model(ref["x"], ref["t"], ref["y"], force_drop_ids=torch.ones(3, dtype=torch.long))
    torch.testing.assert_close(v_dropped, ref["v_null"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SiT_models))
def test_registry_entry_builds_with_paper_sizes(name):
    size = name.split("-")[1].split("/")[0]
    patch = int(name.split("/")[1])
    with torch.device("meta"):
        model = SiT_models[name](input_size=32, encoder_depth=4, z_dims=[768])
    depth, hidden, heads = SIT_SIZES[size]
    assert len(model.blocks) == depth and model.pos_embed.shape == (1, (32 // patch) ** 2, hidden)
    assert model.num_heads == heads and model.patch_size == patch
    x = torch.empty(2, 4, 32, 32, device="meta")
    v, zs = model(x, torch.empty(2, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"))
    assert v.shape == (2, 4, 32, 32) and zs[0].shape == (2, (32 // patch) ** 2, 768)


@pytest.mark.parametrize("name", ["SiT-S/2", "SiT-S/4", "SiT-S/8"])
def test_small_models_run_for_real(name):
    # SiT-S crashes in the official code (final layer built at width 768); here it must run and train.
    torch.manual_seed(0)
    model = SiT_models[name](input_size=16, num_classes=10, encoder_depth=4, z_dims=[32, 16])
    x = torch.randn(2, 4, 16, 16)
    v, zs = model(x, torch.rand(2), torch.tensor([0, 9]))
    assert v.shape == x.shape and [z.shape[-1] for z in zs] == [32, 16]
    (v.square().mean() + zs[0].mean() + zs[1].mean()).backward()
    assert model.final_layer.linear.weight.grad is not None


def test_paper_flops():
    # DiT/SiT "Gflops" are fvcore multiply-accumulates: SiT-XL/2 118.6, L/2 80.7, B/2 23.0, S/2 6.1.
    for name, gmacs in {"SiT-XL/2": 118.6, "SiT-L/2": 80.7, "SiT-B/2": 23.0, "SiT-S/2": 6.1}.items():
        with torch.device("meta"):
            model = SiT_models[name](z_dims=[])
        assert sit_flops(model) / 2e9 == pytest.approx(gmacs, rel=0.02), name


TINY = dict(input_size=8, hidden_size=64, depth=3, num_heads=4, num_classes=10, encoder_depth=2, z_dims=(16,))
# Times as each model takes them: real t in [0, 1] for SiT, integer DDPM timesteps for DiT.
TIMES = {SiT: torch.tensor([0.1, 0.5, 0.9]), DiT: torch.tensor([100, 500, 900])}


def zero_init_layers(model):
    """The linear layers adaLN-Zero starts at zero: every block's modulation, the final modulation and output."""
    final = model.final_layer
    return [block.adaLN_modulation[-1] for block in model.blocks] + [final.adaLN_modulation[-1], final.linear]


def randomize_zero_init_layers(model, std=0.05, seed=0):
    """Small random values in the adaLN-Zero layers (as after training), so every block acts on the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in zero_init_layers(model):
            for param in (layer.weight, layer.bias):
                param.copy_(std * torch.randn(param.shape, generator=gen))


@pytest.mark.parametrize("model_class", [SiT, DiT])
def test_adaln_zero_init_zeroes_exactly_the_modulation_and_output(model_class):
    torch.manual_seed(0)
    model = model_class(**TINY)
    # DiT's initialize_weights: Xavier weights and zero biases, then the adaLN modulations and the output
    # linear zeroed. So exactly these weights and the biases are all zero, and no other weight is.
    expected = {f"blocks.{i}.adaLN_modulation.1.weight" for i in range(TINY["depth"])}
    expected |= {"final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight"}
    expected |= {name for name, _ in model.named_parameters() if name.endswith(".bias")}
    assert {name for name, p in model.named_parameters() if torch.count_nonzero(p) == 0} == expected
    for layer in zero_init_layers(model):
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("model_class", [SiT, DiT])
def test_init_predicts_zero_and_blocks_are_identity(model_class):
    torch.manual_seed(0)
    model = model_class(**TINY)
    seen = []  # (input tokens, output tokens) of each block
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 10])
    with torch.no_grad():
        out, zs = model(x, TIMES[model_class], y)
    # Zero gates: x + 0 * attn(...) + 0 * mlp(...) is x itself, bit for bit, in every block.
    assert len(seen) == TINY["depth"] and all(torch.equal(x_in, x_out) for x_in, x_out in seen)
    # So the projector at encoder_depth sees the embedded patches, and the zero output layer predicts 0.
    with torch.no_grad():
        tokens = model.x_embedder(x) + model.pos_embed  # (N, T, D)
        torch.testing.assert_close(zs[0], model.projectors[0](tokens))
    assert torch.count_nonzero(out) == 0 and zs[0].abs().sum() > 0  # projectors are not zero-initialised


def reference_attention(attn, x, qk_norm):
    """Multi-head self-attention from its equations in float64, independent of models/: with qk_norm, q and k
    go through LayerNorm over each head's channels (eps 1e-5, timm's); then softmax(q k^T / sqrt(d)) v."""
    sd = {k: v.double() for k, v in attn.state_dict().items()}
    N, T, D = x.shape
    H = attn.num_heads
    d = D // H
    q, k, v = F.linear(x.double(), sd["qkv.weight"], sd["qkv.bias"]).view(N, T, 3, H, d).unbind(2)  # (N, T, H, d)
    if qk_norm:
        q = F.layer_norm(q, (d,), sd["q_norm.weight"], sd["q_norm.bias"], eps=1e-5)
        k = F.layer_norm(k, (d,), sd["k_norm.weight"], sd["k_norm.bias"], eps=1e-5)
    weights = torch.einsum("nqhd,nkhd->nhqk", q, k).div(math.sqrt(d)).softmax(-1)
    out = torch.einsum("nhqk,nkhd->nqhd", weights, v).reshape(N, T, D)
    return F.linear(out, sd["proj.weight"], sd["proj.bias"])


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_attention_matches_equations(qk_norm, fused_attn):
    torch.manual_seed(0)
    attn = Attention(32, 4, qk_norm=qk_norm, fused_attn=fused_attn)
    if qk_norm:  # away from LayerNorm's (1, 0) init, so that a norm skipped or applied without affine shows
        with torch.no_grad():
            for norm in (attn.q_norm, attn.k_norm):
                norm.weight.uniform_(0.5, 3.0)
                norm.bias.normal_(std=0.5)
    x = 2 * torch.randn(2, 10, 32)
    with torch.no_grad():
        out = attn(x)
    torch.testing.assert_close(out.double(), reference_attention(attn, x, qk_norm), rtol=1e-4, atol=1e-5)


def test_qk_norm_has_timm_keys_and_its_weights_change_the_output():
    torch.manual_seed(0)
    model = SiT(**TINY, qk_norm=True).eval()
    keys = model.state_dict().keys()
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.bias"} <= set(keys)
    randomize_zero_init_layers(model)  # at init the output is 0 whatever attention does
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        v, _ = model(x, t, y)
        assert torch.isfinite(v).all() and v.abs().max() > 0
        for norm in (model.blocks[1].attn.q_norm, model.blocks[1].attn.k_norm):
            saved = norm.weight.clone()
            norm.weight.mul_(3.0)  # a sharper softmax in block 1
            v_changed, _ = model(x, t, y)
            norm.weight.copy_(saved)
            assert (v_changed - v).abs().max() > 1e-3 * v.abs().max()


@pytest.mark.parametrize("model_class", [SiT, DiT])
def test_explicit_attention_equals_fused(model_class, monkeypatch):
    torch.manual_seed(0)
    fused = model_class(**TINY, qk_norm=True).eval()
    randomize_zero_init_layers(fused)
    explicit = model_class(**TINY, qk_norm=True, fused_attn=False).eval()
    explicit.load_state_dict(fused.state_dict(), strict=True)  # same keys: checkpoints load either way
    assert all(b.attn.fused_attn for b in fused.blocks) and not any(b.attn.fused_attn for b in explicit.blocks)
    x, t, y = torch.randn(3, 4, 8, 8), TIMES[model_class], torch.tensor([0, 1, 10])
    with torch.no_grad():
        out_fused, zs_fused = fused(x, t, y)

        def no_fused_kernel(*args, **kwargs):
            raise AssertionError("fused_attn=False must not call scaled_dot_product_attention")

        monkeypatch.setattr(F, "scaled_dot_product_attention", no_fused_kernel)
        out_explicit, zs_explicit = explicit(x, t, y)
        with pytest.raises(AssertionError, match="must not call"):  # the patch is seen by the fused path
            fused(x, t, y)
    assert out_fused.abs().max() > 1e-3
    torch.testing.assert_close(out_explicit, out_fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zs_explicit[0], zs_fused[0], rtol=1e-5, atol=1e-6)


def test_no_projectors_for_vanilla_sit():
    model = SiT(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10, z_dims=[])
    _, zs = model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([3]))
    assert zs == [] and not any(k.startswith("projectors") for k in model.state_dict())


@pytest.mark.parametrize("model_class", [SiT, DiT])
def test_project_false_skips_the_projectors_only(model_class, monkeypatch):
    torch.manual_seed(0)
    model = model_class(**TINY).eval()
    randomize_zero_init_layers(model)
    x, t, y = torch.randn(3, 4, 8, 8), TIMES[model_class], torch.tensor([0, 1, 10])
    with torch.no_grad():
        out, zs = model(x, t, y)
        model.project = False  # what sample_ddp.py sets: the samplers never read zs

        def not_called(*args):
            raise AssertionError("project=False must not run a projector")

        monkeypatch.setattr(model.projectors[0], "forward", not_called)
        out_skipped, zs_skipped = model(x, t, y)
    assert zs and zs_skipped == []
    torch.testing.assert_close(out_skipped, out, rtol=0, atol=0)


def test_label_dropout_uses_num_classes_as_null():
    torch.manual_seed(0)
    model = SiT(
        input_size=8,
        hidden_size=64,
        depth=1,
        num_heads=4,
        num_classes=7,
        encoder_depth=1,
        class_dropout_prob=0.5,
    )
    assert model.y_embedder.embedding_table.num_embeddings == 8
    model.train()
    seen = []
    model.y_embedder.embedding_table.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    model(torch.randn(64, 4, 8, 8), torch.rand(64), torch.zeros(64, dtype=torch.long))
    dropped = (seen[0] == 7).float().mean()
    assert 0.3 < dropped < 0.7 and set(seen[0].tolist()) == {0, 7}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(encoder_depth=0), "encoder_depth"),
        (dict(encoder_depth=3), "encoder_depth"),
        (dict(input_size=9), "not divisible by patch_size"),
        (dict(num_heads=5), "not divisible by num_heads"),
    ],
)
def test_bad_construction_is_refused(kwargs, message):
    config = dict(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10, encoder_depth=1) | kwargs
    with pytest.raises(ValueError, match=message):
        SiT(**config)


def test_bad_inputs_are_refused():
    model = SiT(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10, encoder_depth=1)
    t, y = torch.rand(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"\(N, 4, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), t, y)  # wrong channel count
    with pytest.raises(ValueError, match=r"\(N, 4, 8, 8\)"):
        model(torch.randn(2, 4, 16, 16), t, y)  # wrong size
    with pytest.raises(ValueError, match=r"label\(s\) \[11\] out of range"):
        model(torch.randn(2, 4, 8, 8), t, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.randn(2, 4, 8, 8), t, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.randn(2, 4, 8, 8), t, torch.tensor([0.0, 1.0]))
    model(torch.randn(2, 4, 8, 8), t, torch.tensor([10, 10]))  # the null class itself is valid


def test_pos_embed_is_2d_sincos():
    emb = get_2d_sincos_pos_embed(8, 3)  # (9, 8): [sin w, cos w | sin h, cos h], 2 freqs each
    assert emb.shape == (9, 8)
    token = 1 * 3 + 2  # row h=1, column w=2
    assert emb[token, 0] == pytest.approx(torch.sin(torch.tensor(2.0)).item(), abs=1e-6)
    assert emb[token, 4] == pytest.approx(torch.sin(torch.tensor(1.0)).item(), abs=1e-6)


def official_checkpoint(tmp_path, testdata):
    ref, _ = reference_model(testdata)
    args = argparse.Namespace(model="SiT-B/2", encoder_depth=2, enc_type="dinov2-vit-b", proj_coeff=0.5, resolution=256)
    ckpt = {"model": ref["state_dict"], "ema": ref["state_dict"], "opt": {"state": {}, "param_groups": []}}
    ckpt |= {"args": args, "steps": 4000}
    path = tmp_path / "0004000.pt"
    save_checkpoint(ckpt, path)
    return ref, path


def test_official_checkpoint_loads_safely(tmp_path, testdata):
    ref, path = official_checkpoint(tmp_path, testdata)
    # Plain weights_only loading refuses the Namespace; ours allow-lists exactly that class.
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)
    ckpt = load_checkpoint(path)
    assert ckpt["steps"] == 4000 and ckpt["args"].enc_type == "dinov2-vit-b"
    _, model = reference_model(testdata)
    model.load_state_dict(model_state_dict(ckpt), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(ref["x"], ref["t"], ref["y"])[0], ref["v"], rtol=1e-5, atol=1e-5)


def test_checkpoint_loader_refuses_arbitrary_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Exploit()}, path)
    with pytest.raises(RuntimeError, match="evil.pt"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


class Exploit:
    def __reduce__(self):
        return (open, ("pwned", "w"))


def test_truncated_and_missing_checkpoints_name_the_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RuntimeError, match="ckpt.pt"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp files left behind


def test_model_state_dict_without_ema_is_explicit():
    with pytest.raises(KeyError, match="no 'ema'"):
        model_state_dict({"model": {"w": torch.zeros(1)}})
    assert "w" in model_state_dict({"model": {"w": torch.zeros(1)}}, use_ema=False)
