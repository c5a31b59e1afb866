"""train.py end to end on a tiny pixel-space setup: exact resume, 2 processes, non-finite steps, outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def tiny_argv(data_dir, out_dir, **overrides):
    options = dict(
        model="SiT-S/8", depth=3, hidden_size=64, num_heads=2, num_classes=4, encoder_depth=2, projector_dim=64, data_dir=data_dir,
        resolution=32, pixel_space=True, enc_type="dinov2-vit-s", enc_weights="random", batch_size=4,
        max_train_steps=6, checkpointing_steps=3, sampling_steps=0, log_every=1, num_workers=0,
        mixed_precision="no", output_dir=out_dir, exp_name="run", learning_rate=1e-3, keep_last=0, compile=False,
    )  # fmt: skip
    options.update(overrides)
    argv = []
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def run_train(argv):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return train.main(argv)


def test_resume_is_bit_identical(demo_data, tmp_path):
    straight = tmp_path / "straight"
    run_train(tiny_argv(demo_data, straight))
    split = tmp_path / "split"
    run_train(tiny_argv(demo_data, split, max_train_steps=3))
    run_train(tiny_argv(demo_data, split))  # --resume auto picks 0000003.pt
    a = load_checkpoint(straight / "run" / "checkpoints" / "0000006.pt")
    b = load_checkpoint(split / "run" / "checkpoints" / "0000006.pt")
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert a["steps"] == b["steps"] == 6 and a["data_position"] == b["data_position"] == 24
    # The run trained: weights moved away from the zero-initialised output layer.
    assert a["model"]["final_layer.linear.weight"].abs().sum() > 0
    stats = [json.loads(line) for line in (straight / "run" / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2, 3, 4, 5, 6]
    resumed = [json.loads(line) for line in (split / "run" / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in resumed] == [1, 2, 3, 4, 5, 6]  # one line per step across the resume
    assert a["model_kwargs"]["depth"] == 3 and a["model_kwargs"]["z_dims"] == [384]
    assert all(-1 <= s["proj_loss"] <= 1 for s in stats) and stats[0]["grad_norm"] > 0
    assert (straight / "run" / "loss.png").stat().st_size > 0
    assert (straight / "run" / "config.yaml").read_text().startswith("output_dir:")


def test_corrupt_latest_checkpoint_is_skipped(demo_data, tmp_path, capsys):
    run_train(tiny_argv(demo_data, tmp_path, max_train_steps=3, checkpointing_steps=1))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    (ckpt_dir / "0000003.pt").write_bytes(b"truncated")
    run_train(tiny_argv(demo_data, tmp_path, max_train_steps=4, checkpointing_steps=1))
    err = capsys.readouterr()
    assert "skipping unusable checkpoint" in err.out + err.err and "0000003.pt" in err.out + err.err
    assert load_checkpoint(ckpt_dir / "0000004.pt")["steps"] == 4


def test_official_checkpoint_fields_and_previews(demo_data, tmp_path):
    run_train(tiny_argv(demo_data, tmp_path, max_train_steps=2, sampling_steps=2, keep_last=1, checkpointing_steps=1))
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["0000002.pt"]  # keep_last=1 pruned 0000001.pt
    ckpt = load_checkpoint(ckpts[0])
    assert {"model", "ema", "opt", "args", "steps"} <= set(ckpt)
    assert ckpt["args"].proj_coeff == 0.5 and ckpt["config"]["model"] == "SiT-S/8"
    assert (tmp_path / "run" / "samples" / "0000002.png").stat().st_size > 0


def test_nonfinite_loss_is_skipped_then_stops(demo_data, tmp_path, monkeypatch):
    # A learning rate of 1e30 drives the weights to inf after the first update: later losses are non-finite.
    with pytest.raises(RuntimeError, match="non-finite loss"):
        run_train(tiny_argv(demo_data, tmp_path, learning_rate=1e30, max_train_steps=50, max_nonfinite_steps=3))


def test_two_processes_hold_identical_weights_and_resume_exactly(demo_data, tmp_path):
    script = tmp_path / "check_ranks.py"
    # Each rank saves its final weights; the ranks are compared once torchrun has finished.
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import train\n"
        "model, ema = train.train(train.parse_config(sys.argv[1:]))\n"
        "flat = torch.cat([p.detach().flatten() for p in list(model.parameters()) + list(ema.parameters())])\n"
        f"torch.save(flat, {str(tmp_path)!r} + f'/rank{{os.environ[\"RANK\"]}}.pt')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    cmd += tiny_argv(demo_data, tmp_path, max_train_steps=4, checkpointing_steps=2)

    def torchrun(extra=()):
        result = subprocess.run(cmd + list(extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        # A rank's own traceback comes before torchrun's summary: keep every line that names an error.
        errors = "\n".join(line for line in result.stderr.splitlines() if "Error" in line or "Traceback" in line)
        assert result.returncode == 0, result.stdout[-2000:] + errors[-4000:] + result.stderr[-1500:]
        # One run of two processes, not two single-process runs sharing a folder (what accelerate gave on a
        # CPU before train.py passed cpu=True: identical weights by identical seeds, a race on the checkpoint).
        assert result.stdout.count("images per optimizer step on 2 process(es)") == 1, result.stdout[-2000:]
        rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
        assert torch.equal(rank0, rank1), "ranks diverged"
        return rank0

    straight = torchrun()
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "0000004.pt")
    assert final["data_position"] == 16  # 4 steps x global batch 4, split 2 + 2 over the ranks
    resumed = torchrun(["--resume-step", "2"])  # rewinds to step 2 and redoes steps 3-4 on both ranks
    assert torch.equal(resumed, straight)
    again = load_checkpoint(tmp_path / "run" / "checkpoints" / "0000004.pt")
    for key in ("model", "ema"):
        for name, tensor in final[key].items():
            assert torch.equal(again[key][name], tensor), f"{key}.{name}"


def test_dit_trains_with_the_diffusion_loss(demo_data, tmp_path):
    run_train(
        tiny_argv(demo_data, tmp_path, model="DiT-S/8", max_train_steps=2, checkpointing_steps=2, sampling_steps=2)
    )
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "0000002.pt")
    assert ckpt["model"]["final_layer.linear.weight"].shape[0] == 8 * 8 * 2 * 3  # learned sigma: 2 x channels
    assert (tmp_path / "run" / "samples" / "0000002.png").exists()


def test_latent_pipeline_train_then_sample_with_the_vae(tmp_path, tiny_vae):
    # Demo images -> SD-VAE moments (a tiny random AutoencoderKL with the real config keys) -> train on
    # sampled, scaled latents -> previews and sample_ddp decode through the same VAE.
    vae_path, _ = tiny_vae
    data = tmp_path / "latent-data"
    cmd = [sys.executable, "-m", "demo", "data", "--out", str(data), "--per-class", "3"]
    subprocess.run(cmd + ["--num-classes", "4", "--vae", vae_path], cwd=ROOT, check=True, capture_output=True)
    argv = tiny_argv(data, tmp_path, model="SiT-S/2", pixel_space=False, vae=vae_path, max_train_steps=2)
    run_train(argv + ["--sampling-steps", "2", "--checkpointing-steps", "2", "--preview-num-steps", "2"])
    ckpt_path = tmp_path / "run" / "checkpoints" / "0000002.pt"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["model"]["x_embedder.proj.weight"].shape[1] == 4  # 4 latent channels, 4x4 latents
    assert (tmp_path / "run" / "samples" / "0000002.png").exists()

    import sample_ddp

    out = tmp_path / "samples"
    sample_ddp.main(
        ["--ckpt", str(ckpt_path), "--sample-dir", str(out), "--vae", vae_path, "--num-fid-samples", "4"]
        + ["--num-steps", "3", "--batch-size", "2"]
    )
    import numpy as np

    arrays = np.load(out.with_suffix(".npz"))["arr_0"]
    assert arrays.shape == (4, 32, 32, 3)  # decoded back to 32 px images


def test_gradient_accumulation_logs_every_optimizer_step(demo_data, tmp_path, capsys):
    run_train(tiny_argv(demo_data, tmp_path, gradient_accumulation_steps=2, max_train_steps=3, batch_size=2))
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2, 3] and all(s["grad_norm"] > 0 for s in stats)
    assert [s["images_seen"] for s in stats] == [4, 8, 12]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "0000003.pt")
    # --batch-size keeps the official meaning (images per micro-step): 3 steps x 2 micro-batches x 2 images.
    assert ckpt["data_position"] == 12
    out = capsys.readouterr()
    assert "batch: 2 per micro-step x 2 accumulation = 4 images per optimizer step" in out.out + out.err


def test_epochs_stop_training_like_the_official_loop(demo_data, tmp_path):
    # 24 items, batch 4: 6 steps per epoch; the official loop stops after `epochs` passes.
    run_train(tiny_argv(demo_data, tmp_path, epochs=1, max_train_steps=50, checkpointing_steps=50))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["0000006.pt"]


def test_stale_temporary_checkpoints_are_removed(demo_data, tmp_path):
    run_train(tiny_argv(demo_data, tmp_path, max_train_steps=1, checkpointing_steps=1))
    leftover = tmp_path / "run" / "checkpoints" / ".0000002.pt.abc123.tmp"  # a write killed mid-way
    leftover.write_bytes(b"partial")
    run_train(tiny_argv(demo_data, tmp_path, max_train_steps=2, checkpointing_steps=1))
    assert not leftover.exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["0000001.pt", "0000002.pt"]


def test_label_at_or_above_num_classes_is_refused_at_start(demo_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    meta_path = data / "images" / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta["labels"][5][1] = 4  # == num_classes: would silently train as the null class
    meta.pop("class_names", None)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"label 4 at item 5\) but --num-classes is 4: labels must lie in 0\.\.3"):
        run_train(tiny_argv(data, tmp_path))


def test_bad_runs_fail_early_and_name_the_problem(demo_data, tmp_path):
    with pytest.raises(ValueError, match=r"has 4 classes \(label 3 at item \d+\) but --num-classes is 3"):
        run_train(tiny_argv(demo_data, tmp_path, num_classes=3))
    with pytest.raises(ValueError, match="encoder_depth"):
        run_train(tiny_argv(demo_data, tmp_path, encoder_depth=7))  # the tiny model has 3 blocks
    with pytest.raises(ValueError, match="--resolution 64 but"):
        run_train(tiny_argv(demo_data, tmp_path, resolution=64))
    run_train(tiny_argv(demo_data, tmp_path, max_train_steps=1, checkpointing_steps=1))
    with pytest.raises(RuntimeError, match="0000001.pt does not fit --model SiT-S/8"):
        run_train(tiny_argv(demo_data, tmp_path, depth=2, max_train_steps=2))


def test_missing_tracker_package_is_an_error(demo_data, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install wandb"):
        run_train(tiny_argv(demo_data, tmp_path, report_to="wandb"))


def test_disk_full_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path):
    import errno

    from checkpoints import save_checkpoint

    mount = tmp_path / "small"
    mount.mkdir()
    # A real full disk: a 256 KiB tmpfs (root can mount one; elsewhere the test cannot be run).
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        save_checkpoint({"w": torch.zeros(1000)}, mount / "0000001.pt")
        with pytest.raises(OSError, match=r"no space left on the device while writing checkpoint .*0000002.pt") as info:
            save_checkpoint({"w": torch.zeros(200_000)}, mount / "0000002.pt")  # 800 KB
        assert info.value.errno == errno.ENOSPC
        assert sorted(p.name for p in mount.iterdir()) == ["0000001.pt"]  # no partial file, the old one kept
        assert torch.equal(load_checkpoint(mount / "0000001.pt")["w"], torch.zeros(1000))
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_torch_zip_writer_errors_on_a_full_disk_are_named(tmp_path, monkeypatch):
    import checkpoints

    def failing_save(obj, f):  # what torch raises when the disk fills up under its zip writer
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoints.torch, "save", failing_save)
    with pytest.raises(OSError, match="no space left on the device"):
        checkpoints.save_checkpoint({}, tmp_path / "0000001.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_broken_local_vae_is_an_error_a_missing_hub_vae_turns_previews_off(tmp_path):
    from models.vae import VAENotFoundError, load_vae

    broken = tmp_path / "broken-vae"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="broken-vae: the folder does not hold a loadable AutoencoderKL"):
        load_vae(str(broken))
    with pytest.raises(VAENotFoundError, match="no such folder"):
        load_vae(str(tmp_path / "absent"))
    with pytest.raises(VAENotFoundError, match="cannot find the VAE 'stabilityai/sd-vae-ft-ema'"):
        load_vae("ema")  # offline in the tests (HF_HUB_OFFLINE=1), nothing cached


def test_fp16_on_the_cpu_says_it_trains_in_fp32(demo_data, tmp_path):
    with pytest.warns(UserWarning, match="fp16 has no effect on the CPU: this run trains in fp32"):
        run_train(tiny_argv(demo_data, tmp_path, mixed_precision="fp16", max_train_steps=1, checkpointing_steps=1))


def test_learning_rate_warms_up_linearly_then_stays(demo_data, tmp_path):
    run_train(tiny_argv(demo_data, tmp_path, lr_warmup_steps=4, max_train_steps=5, learning_rate=1e-3))
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [s["lr"] for s in stats] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
