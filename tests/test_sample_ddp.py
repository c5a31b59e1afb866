"""sample_ddp.py: model from checkpoints (ours and official), determinism across processes, resume."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sample_ddp
from checkpoints import save_checkpoint
from models.sit import SiT_models

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ARGS = ["--num-fid-samples", "10", "--batch-size", "3", "--num-steps", "4", "--global-seed", "7"]


def tiny_pixel_checkpoint(path, official=False):
    torch.manual_seed(0)
    model = SiT_models["SiT-S/8"](input_size=16, in_channels=3, num_classes=5, z_dims=[32], encoder_depth=2)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)  # a non-trivial velocity field
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    config = {"model": "SiT-S/8", "pixel_space": True, "path_type": "linear", "encoder_depth": 2}
    ckpt = {"model": model.state_dict(), "ema": ema, "opt": {}, "steps": 10}
    if official:
        ckpt["args"] = argparse.Namespace(model="SiT-S/8", encoder_depth=2, resolution=128, enc_type="dinov2-vit-b")
    else:
        ckpt |= {"args": argparse.Namespace(**config), "config": config}
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
    kwargs = sample_ddp.sit_kwargs_from_state_dict(ref["state_dict"])
    expected = {k: ref["config"][k] for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth")}
    assert {k: kwargs[k] for k in expected} == expected
    assert kwargs["num_classes"] == 10 and kwargs["z_dims"] == [32] and kwargs["projector_dim"] == 128


def test_labels_are_balanced_and_seeded():
    labels = sample_ddp.sample_labels(50_000, 1000, seed=0)
    assert np.bincount(labels, minlength=1000).tolist() == [50] * 1000
    assert not np.array_equal(labels, sample_ddp.sample_labels(50_000, 1000, seed=1))
    random = sample_ddp.sample_labels(50_000, 1000, seed=0, balanced=False)
    assert np.bincount(random, minlength=1000).std() > 3  # uniformly random: counts vary


def test_quantisation_is_the_official_one():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.996, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert sample_ddp.quantize(x)[0, 0, :, 0].tolist() == [0, 0, 128, 254, 255]  # truncation, not rounding


def test_one_and_two_processes_give_the_same_npz_and_resume_fills_gaps(tmp_path, mode="sde"):
    ckpt = tmp_path / "ckpt.pt"
    tiny_pixel_checkpoint(ckpt)
    one = tmp_path / "one" / "samples"
    sample_ddp.main(["--ckpt", str(ckpt), "--sample-dir", str(one), "--mode", mode, *SAMPLE_ARGS, "--cfg-scale", "2"])
    npz_one = one.with_suffix(".npz").read_bytes()
    data = np.load(one.with_suffix(".npz"))
    assert data["arr_0"].shape == (10, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_0"].std() > 0 and len(set(data["arr_1"].tolist())) == 5

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


def test_official_flags_are_checked_against_the_weights(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    tiny_pixel_checkpoint(ckpt)
    base = ["--ckpt", str(ckpt), "--sample-dir", str(tmp_path / "s"), *SAMPLE_ARGS[:2], "--num-steps", "1"]
    sample_ddp.main(base + ["--projector-embed-dims=32", "--resolution=16", "--num-classes=5", "--fused-attn"])
    with pytest.raises(ValueError, match="--projector-embed-dims 768 disagrees"):
        sample_ddp.main(base + ["--projector-embed-dims=768"])
    with pytest.raises(ValueError, match="--num-classes 1000 disagrees"):
        sample_ddp.main(base + ["--num-classes=1000"])
