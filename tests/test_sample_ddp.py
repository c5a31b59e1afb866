"""sample_ddp.py: model and settings from checkpoints (ours and official), every mode against the sampler
functions called directly, the paper's protocol, determinism across processes, resume and stale folders."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import sample_ddp
from checkpoints import save_checkpoint
from config import eval_recipes
from evaluations import protocol
from models.sit import SiT_models

ROOT = Path(__file__).resolve().parents[1]
# Tiny ops on a shared 2-core CPU run fastest on one thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SAMPLE_ARGS = ["--num-fid-samples", "10", "--batch-size", "3", "--num-steps", "4", "--global-seed", "7"]
TINY_KWARGS = dict(input_size=16, in_channels=3, num_classes=5, z_dims=[32], encoder_depth=2)


def tiny_pixel_checkpoint(path, official=False, with_model_kwargs=False, **config_overrides):
    """A pixel-space SiT-S/8 checkpoint (16 px, 5 classes) whose EMA differs from the raw weights."""
    torch.manual_seed(0)
    model = SiT_models["SiT-S/8"](**TINY_KWARGS)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)  # a non-trivial velocity field
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    config = {"model": "SiT-S/8", "pixel_space": True, "path_type": "linear", "encoder_depth": 2, **config_overrides}
    ckpt = {"model": model.state_dict(), "ema": ema, "opt": {}, "steps": 10}
    if official:
        args = dict(model="SiT-S/8", encoder_depth=2, resolution=128, enc_type="dinov2-vit-b", **config_overrides)
        ckpt["args"] = argparse.Namespace(**args)
    else:
        ckpt |= {"args": argparse.Namespace(**config), "config": config}
    if with_model_kwargs:
        ckpt["model_kwargs"] = TINY_KWARGS
    save_checkpoint(ckpt, path)
    return model, ema


def test_model_is_rebuilt_from_the_state_dict(tmp_path):
    model, ema = tiny_pixel_checkpoint(tmp_path / "ours.pt")
    loaded, settings = sample_ddp.load_model(tmp_path / "ours.pt")
    assert settings["pixel_space"] and loaded.num_classes == 5 and loaded.z_dims == [32]
    assert all(torch.equal(loaded.state_dict()[k], ema[k]) for k in ema)  # EMA weights by default
    raw, _ = sample_ddp.load_model(tmp_path / "ours.pt", use_ema=False)
    assert torch.equal(raw.state_dict()["blocks.0.attn.qkv.weight"], model.state_dict()["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="pass --model"):
        save_checkpoint({"ema": ema, "model": ema}, tmp_path / "bare.pt")
        sample_ddp.load_model(tmp_path / "bare.pt")
    assert sample_ddp.load_model(tmp_path / "bare.pt", model_name="SiT-S/8")[0].patch_size == 8


def test_official_checkpoint_builds(tmp_path, testdata):
    ref = torch.load(testdata / "repa_sit_reference_tiny.pt", weights_only=True)
    ckpt = {"model": ref["state_dict"], "ema": ref["state_dict"], "opt": {}, "steps": 1}
    ckpt["args"] = argparse.Namespace(model="SiT-B/2", encoder_depth=2)  # heads come from the name...
    save_checkpoint(ckpt, tmp_path / "official.pt")
    # ...so a tiny reference (4 heads) needs its own head count: check the rest is read off the weights.
    kwargs = checkpoints.sit_kwargs_from_state_dict(ref["state_dict"])
    expected = {k: ref["config"][k] for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth")}
    assert {k: kwargs[k] for k in expected} == expected
    assert kwargs["num_classes"] == 10 and kwargs["z_dims"] == [32] and kwargs["projector_dim"] == 128


def default_args(model="SiT-XL/2"):
    """sample_ddp.py's settings for a checkpoint without recipes: its family's protocol."""
    args = sample_ddp.build_parser().parse_args(["--ckpt", "x"])
    sample_ddp.apply_recipe(args, eval_recipes(model, None), "x")
    return args


def test_labels_are_random_by_default_balanced_on_request_and_seeded():
    random = protocol.sample_labels(50_000, 1000, seed=0)  # the official generate.py: randint(0, C)
    assert np.bincount(random, minlength=1000).std() > 3  # uniformly random: counts vary
    assert random.min() == 0 and random.max() == 999
    labels = protocol.sample_labels(50_000, 1000, seed=0, balanced=True)
    assert np.bincount(labels, minlength=1000).tolist() == [50] * 1000
    assert not np.array_equal(labels, protocol.sample_labels(50_000, 1000, seed=1, balanced=True))
    assert default_args().labels == "random"


def test_quantisation_is_repa_by_default_and_dit_on_request():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.996, 1.0, 0.5]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    # REPA's generate.py: uint8(clamp(255 * (x + 1) / 2)), truncated: 0.0 -> 127.5 -> 127
    assert protocol.quantize(x)[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 191]
    # DiT's: uint8(clamp(127.5 x + 128)): 0.0 -> 128, 0.5 -> 191.75 -> 191
    assert protocol.quantize(x, "dit")[0, 0, :, 0].tolist() == [0, 0, 128, 254, 255, 191]
    assert default_args().quantization == "repa"


def test_one_and_two_processes_give_the_same_npz_and_resume_fills_gaps(tmp_path, mode="sde"):
    ckpt = tmp_path / "ckpt.pt"
    tiny_pixel_checkpoint(ckpt)
    one = tmp_path / "one" / "samples"
    sample_ddp.main(["--ckpt", str(ckpt), "--sample-dir", str(one), "--mode", mode, *SAMPLE_ARGS, "--cfg-scale", "2"])
    npz_one = one.with_suffix(".npz").read_bytes()
    data = np.load(one.with_suffix(".npz"))
    assert data["arr_0"].shape == (10, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_0"].std() > 0 and len(set(data["arr_1"].tolist())) >= 3

    two = tmp_path / "two" / "samples"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "sample_ddp.py"]
    cmd += ["--ckpt", str(ckpt), "--sample-dir", str(two), "--mode", mode, *SAMPLE_ARGS, "--cfg-scale", "2"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert two.with_suffix(".npz").read_bytes() == npz_one

    # A crash that lost some PNGs: the rerun regenerates exactly those batches and the same npz.
    for i in (0, 4, 9):
        (one / f"{i:06d}.png").unlink()
    sample_ddp.main(["--ckpt", str(ckpt), "--sample-dir", str(one), "--mode", mode, *SAMPLE_ARGS, "--cfg-scale", "2"])
    assert one.with_suffix(".npz").read_bytes() == npz_one


def test_dit_checkpoint_samples_with_ddpm(tmp_path):
    torch.manual_seed(0)
    from models.dit import DiT_models

    model = DiT_models["DiT-S/8"](input_size=16, in_channels=3, num_classes=5, z_dims=[], depth=2)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    config = {"model": "DiT-S/8", "pixel_space": True, "depth": 2}
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "config": config}, tmp_path / "dit.pt")
    loaded, _ = sample_ddp.load_model(tmp_path / "dit.pt")
    assert loaded.learn_sigma and loaded.out_channels == 6
    out = tmp_path / "samples"
    sample_ddp.main(["--ckpt", str(tmp_path / "dit.pt"), "--sample-dir", str(out), *SAMPLE_ARGS, "--cfg-scale", "1.5"])
    arrays = np.load(out.with_suffix(".npz"))["arr_0"]
    assert arrays.shape == (10, 16, 16, 3) and arrays.std() > 0
    with pytest.raises(ValueError, match="--mode sde does not apply to DiT-S/8"):
        sample_ddp.main(["--ckpt", str(tmp_path / "dit.pt"), "--sample-dir", str(out), "--mode", "sde", *SAMPLE_ARGS])


def test_ref_batch_is_evaluated_at_the_end(tmp_path, random_inception_weights):
    ckpt = tmp_path / "ckpt.pt"
    tiny_pixel_checkpoint(ckpt)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "samples"
    argv = ["--ckpt", str(ckpt), "--sample-dir", str(out), "--num-fid-samples", "6", "--batch-size", "3"]
    argv += ["--num-steps", "2", "--ref-batch", str(ref), "--inception-weights", str(random_inception_weights)]
    sample_ddp.main(argv)
    import json

    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["metrics"]["num_samples"] == 6 and summary["metrics"]["fid"] > 0
    assert summary["metrics"]["official_inception_weights"] is False  # random weights are never passed off
    assert out.with_suffix(".metrics.json").exists()
    # The evaluator names the protocol the batch was made with, and only while the summary describes it.
    assert summary["metrics"]["sampling_protocol"] == summary["protocol"]
    assert summary["protocol"]["labels"] == "random" and summary["protocol"]["quantization"] == "repa"
    from evaluations.evaluate import format_metrics, sampling_protocol

    assert "Sampling protocol: sde 2 steps (NFE 2), no CFG, random labels" in format_metrics(summary["metrics"])
    assert summary["metrics"]["pipeline"] == "adm"
    # A pytorch-fid statistics file (mu, sigma only) is another Inception pipeline: refused before any sampling.
    np.savez(tmp_path / "fid_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    argv[argv.index(str(ref))] = str(tmp_path / "fid_stats.npz")
    with pytest.raises(ValueError, match="fid_stats.npz holds only 'mu' and 'sigma'.*--allow-pipeline-mix"):
        sample_ddp.main([*argv[:3], str(tmp_path / "never"), *argv[4:]])
    assert not (tmp_path / "never").exists()
    os.utime(out.with_suffix(".npz"), ns=(0, 0))  # the batch was rewritten since: its protocol is unknown
    assert sampling_protocol(out.with_suffix(".npz")) is None


def test_official_flags_are_checked_against_the_weights(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    tiny_pixel_checkpoint(ckpt)
    base = ["--ckpt", str(ckpt), "--sample-dir", str(tmp_path / "s"), *SAMPLE_ARGS[:2], "--num-steps", "1"]
    sample_ddp.main(base + ["--projector-embed-dims=32", "--resolution=16", "--num-classes=5", "--fused-attn"])
    with pytest.raises(ValueError, match="--projector-embed-dims 768 disagrees"):
        sample_ddp.main(base + ["--projector-embed-dims=768"])
    with pytest.raises(ValueError, match="--num-classes 1000 disagrees"):
        sample_ddp.main(base + ["--num-classes=1000"])


#################################################################################
#             Every mode and flag against the sampler called directly           #
#################################################################################


def direct_samples(state_dict, argv_settings, model_cls=None, model_kwargs=TINY_KWARGS, decode=None):
    """What sample_ddp must write, computed here from the sampler functions: same model weights, the
    per-sample noise and labels, fixed batches of 3, REPA's quantisation written out by hand."""
    from diffusion import ddim_sampler, ddpm_sampler
    from samplers import euler_maruyama_sampler, euler_sampler

    o = dict(mode="sde", heun=False, cfg=1.0, path_type="linear", labels="random", precision="fp32", eta=0.0)
    o.update(argv_settings)
    model = (model_cls or SiT_models["SiT-S/8"])(**model_kwargs).eval()
    model.load_state_dict(state_dict)
    n, bs, seed = 10, 3, 7
    labels = protocol.sample_labels(n, model.num_classes, seed, balanced=o["labels"] == "balanced")
    out = []
    for start in range(0, n, bs):
        idx = range(start, min(start + bs, n))
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in idx]
        noise = torch.stack([torch.randn(model.in_channels, 16, 16, generator=g) for g in gens])
        y = torch.from_numpy(labels[start : idx.stop])
        common = dict(num_steps=4, cfg_scale=o["cfg"])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=o["precision"] == "bf16"):
            if o["mode"] == "sde":
                z = euler_maruyama_sampler(model, noise, y, path_type=o["path_type"], generator=gens, **common)
            elif o["mode"] == "ode":
                z = euler_sampler(model, noise, y, heun=o["heun"], path_type=o["path_type"], **common)
            elif o["mode"] == "ddpm":
                z = ddpm_sampler(model, noise, y, generator=gens, **common)
            else:
                z = ddim_sampler(model, noise, y, eta=o["eta"], generator=gens if o["eta"] else None, **common)
        images = (decode or (lambda x: x))(z.float()).float()
        out.append(torch.clamp(255.0 * ((images + 1) / 2), 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy())
    return np.concatenate(out), labels


def run_sample_ddp(tmp_path, ckpt, name, *extra):
    out = tmp_path / name
    sample_ddp.main(["--ckpt", str(ckpt), "--sample-dir", str(out), *SAMPLE_ARGS, *extra])
    data = np.load(out.with_suffix(".npz"))
    return data["arr_0"], data["arr_1"]


SIT_CASES = {
    "sde": ([], {}),
    "sde-cfg": (["--cfg-scale", "3"], {"cfg": 3.0}),
    "ode": (["--mode", "ode"], {"mode": "ode"}),
    "ode-heun": (["--mode", "ode", "--heun"], {"mode": "ode", "heun": True}),
    "sde-cosine": (["--path-type", "cosine"], {"path_type": "cosine"}),
    "balanced": (["--labels", "balanced"], {"labels": "balanced"}),
    "bf16": (["--precision", "bf16"], {"precision": "bf16"}),
}


def test_every_sit_mode_and_flag_equals_the_sampler_called_directly(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    model, ema = tiny_pixel_checkpoint(ckpt)
    results = {}
    for name, (argv, settings) in SIT_CASES.items():
        images, labels = run_sample_ddp(tmp_path, ckpt, name, *argv)
        expected, expected_labels = direct_samples(ema, settings)
        assert np.array_equal(labels, expected_labels), name
        assert np.abs(images.astype(int) - expected).max() == 0, name
        results[name] = images
    base = results["sde"]
    for name, images in results.items():  # every flag changed the samples
        assert name == "sde" or not np.array_equal(images, base), f"{name} gave the same images as plain sde"
    assert not np.array_equal(results["ode"], results["ode-heun"])
    # --use-ema false samples the raw weights.
    raw, _ = run_sample_ddp(tmp_path, ckpt, "raw", "--use-ema", "false")
    assert np.array_equal(raw, direct_samples(model.state_dict(), {})[0]) and not np.array_equal(raw, base)


def test_dit_modes_equal_the_sampler_called_directly(tmp_path):
    from models.dit import DiT_models

    torch.manual_seed(0)
    kwargs = dict(input_size=16, in_channels=3, num_classes=5, z_dims=[], depth=2)
    model = DiT_models["DiT-S/8"](**kwargs)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    config = {"model": "DiT-S/8", "pixel_space": True, "depth": 2}
    ckpt = tmp_path / "dit.pt"
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "config": config}, ckpt)
    cases = {"ddpm": [], "ddim": ["--mode", "ddim"], "ddim-eta": ["--mode", "ddim", "--ddim-eta", "1"]}
    results = {}
    for name, argv in cases.items():
        images, _ = run_sample_ddp(tmp_path, ckpt, name, *argv, "--cfg-scale", "1.5")
        settings = {"mode": name.split("-")[0], "eta": 1.0 if name == "ddim-eta" else 0.0, "cfg": 1.5}
        expected, _ = direct_samples(model.state_dict(), settings, DiT_models["DiT-S/8"], kwargs)
        assert np.array_equal(images, expected), name
        results[name] = images
    assert len({r.tobytes() for r in results.values()}) == 3  # each mode gives other samples
    with pytest.raises(ValueError, match="--heun applies to --mode ode only"):
        run_sample_ddp(tmp_path, ckpt, "x", "--heun")


#################################################################################
#                  Settings come from the checkpoint's config                   #
#################################################################################


def test_path_type_comes_from_our_config_and_official_args(tmp_path):
    _, ema = tiny_pixel_checkpoint(tmp_path / "ours.pt", path_type="cosine")
    tiny_pixel_checkpoint(tmp_path / "official.pt", official=True, path_type="cosine", pixel_space=True)
    cosine, _ = direct_samples(ema, {"path_type": "cosine"})
    assert not np.array_equal(cosine, direct_samples(ema, {})[0])  # the SDE depends on the path
    assert np.array_equal(run_sample_ddp(tmp_path, tmp_path / "ours.pt", "ours")[0], cosine)
    # The official checkpoint's args Namespace is read: model name, path type, encoder depth.
    assert np.array_equal(run_sample_ddp(tmp_path, tmp_path / "official.pt", "official")[0], cosine)
    with pytest.warns(UserWarning, match="--path-type linear overrides the checkpoint's path_type 'cosine'"):
        run_sample_ddp(tmp_path, tmp_path / "ours.pt", "override", "--path-type", "linear")


def test_model_kwargs_recorded_by_training_build_the_model(tmp_path):
    model, ema = tiny_pixel_checkpoint(tmp_path / "ckpt.pt", with_model_kwargs=True)
    loaded, settings = sample_ddp.load_model(tmp_path / "ckpt.pt")
    assert all(torch.equal(loaded.state_dict()[k], ema[k]) for k in ema)
    assert len(settings["weights_sha256"]) == 64 and settings["steps"] == 10


def test_decoding_applies_the_runs_latent_scale_bias_and_vae(tmp_path, tiny_vae):
    vae_path, vae = tiny_vae
    torch.manual_seed(0)
    kwargs = dict(input_size=2, in_channels=4, num_classes=5, z_dims=[], patch_size=2)
    model = SiT_models["SiT-S/2"](**{k: v for k, v in kwargs.items() if k != "patch_size"})
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    config = {"model": "SiT-S/2", "latent_scale": 0.5, "latent_bias": 0.25, "vae": vae_path, "path_type": "linear"}
    ckpt = tmp_path / "latent.pt"
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "config": config}, ckpt)
    out = tmp_path / "s"
    sample_ddp.main(["--ckpt", str(ckpt), "--sample-dir", str(out), "--num-fid-samples", "2", "--num-steps", "2"])
    images = np.load(out.with_suffix(".npz"))["arr_0"]
    # Independently: the same latents, decoded as (z - 0.25) / 0.5 by the run's VAE.
    from samplers import euler_maruyama_sampler

    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    noise = torch.stack([torch.randn(4, 2, 2, generator=g) for g in gens])
    y = torch.from_numpy(protocol.sample_labels(2, 5, 0))
    with torch.no_grad():
        z = euler_maruyama_sampler(model.eval(), noise, y, num_steps=2, generator=gens)
        decoded = vae.decode((z - 0.25) / 0.5).sample
    expected = torch.clamp(255.0 * ((decoded + 1) / 2), 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert images.shape == (2, 16, 16, 3)
    assert np.abs(images.astype(int) - expected).max() <= 1  # batched decoding may round differently
    with torch.no_grad():
        unscaled = vae.decode(z / 0.18215).sample
    wrong = torch.clamp(255.0 * ((unscaled + 1) / 2), 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert np.abs(images.astype(int) - wrong).max() > 5  # the default scale would have given other images


#################################################################################
#           Sample folders: stale samples are refused, the protocol is named    #
#################################################################################


def test_rerun_with_other_settings_is_refused_and_overwrite_starts_afresh(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    tiny_pixel_checkpoint(ckpt)
    first, _ = run_sample_ddp(tmp_path, ckpt, "s")
    with pytest.raises(
        ValueError, match=r"(?s)num_steps: the folder's samples have 4, this run asks for 2.*--overwrite"
    ):
        run_sample_ddp(tmp_path, ckpt, "s", "--num-steps", "2")
    with pytest.raises(ValueError, match="num_fid_samples"):
        sample_ddp.main(["--ckpt", str(ckpt), "--sample-dir", str(tmp_path / "s"), *SAMPLE_ARGS[2:], "--num-fid-samples", "6"])  # fmt: skip
    # Other weights (the raw model instead of the EMA) are other samples too.
    with pytest.raises(ValueError, match="weights_sha256"):
        run_sample_ddp(tmp_path, ckpt, "s", "--use-ema", "false")
    two_steps, _ = run_sample_ddp(tmp_path, ckpt, "s", "--num-steps", "2", "--overwrite")
    fresh, _ = run_sample_ddp(tmp_path, ckpt, "fresh", "--num-steps", "2")
    assert np.array_equal(two_steps, fresh) and not np.array_equal(two_steps, first)
    # PNGs of unknown origin are not reused either.
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        run_sample_ddp(tmp_path, ckpt, "s", "--num-steps", "2")


def test_summary_names_the_protocol(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    tiny_pixel_checkpoint(ckpt)
    run_sample_ddp(tmp_path, ckpt, "s", "--cfg-scale", "1.8", "--guidance-high", "0.7")
    import json

    protocol = json.loads((tmp_path / "s.json").read_text())["protocol"]
    # SDE, 4 steps, guidance in [0, 0.7] on the grid linspace(1, 0.04, 4) = 1, 0.68, 0.36, 0.04: 1 + 3 x 2
    assert protocol == {
        "sampler": "sde", "num_steps": 4, "nfe": 7, "cfg_scale": 1.8, "guidance_interval": [0.0, 0.7],
        "labels": "random", "quantization": "repa", "num_samples": 10, "weights": "ema", "vae": None,
        "precision": "fp32",
    }  # fmt: skip


@pytest.mark.parametrize("flag", ["--num-fid-samples", "--batch-size", "--num-steps"])
def test_zero_counts_are_refused_when_parsing(flag, capsys):
    with pytest.raises(SystemExit):
        sample_ddp.build_parser().parse_args(["--ckpt", "x", flag, "0"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_fused_attn_false_samples_with_explicit_attention(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt.pt"
    tiny_pixel_checkpoint(ckpt)
    fused, _ = run_sample_ddp(tmp_path, ckpt, "fused", "--mode", "ode")

    def no_sdpa(*args, **kwargs):
        raise AssertionError("the fused kernel ran although --fused-attn false")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    explicit, _ = run_sample_ddp(tmp_path, ckpt, "explicit", "--mode", "ode", "--fused-attn", "false")
    assert np.abs(fused.astype(int) - explicit).max() <= 1  # the same attention up to float rounding


def test_compile_samples_like_eager_and_is_part_of_the_manifest(tmp_path):
    from training import compile_available

    if not compile_available(torch.device("cpu"))[0]:
        pytest.skip("torch.compile needs a C++ compiler on the CPU")
    ckpt = tmp_path / "ckpt.pt"
    tiny_pixel_checkpoint(ckpt)
    eager, labels = run_sample_ddp(tmp_path, ckpt, "eager", "--cfg-scale", "3", "--guidance-high", "0.7")
    compiled, compiled_labels = run_sample_ddp(
        tmp_path, ckpt, "compiled", "--cfg-scale", "3", "--guidance-high", "0.7", "--compile", "true"
    )
    assert np.array_equal(labels, compiled_labels)
    assert np.abs(compiled.astype(int) - eager).max() <= 1  # float rounding of other kernels, at most one level
    manifest = json.loads((tmp_path / "compiled" / "manifest.json").read_text())
    assert manifest["compile"] is True and "compile" not in json.loads(
        (tmp_path / "eager" / "manifest.json").read_text()
    )
