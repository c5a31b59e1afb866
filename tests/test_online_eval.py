"""Online evaluation (train.py --eval-every): it changes no weight, it equals sample_ddp.py + evaluations.evaluate
on the same checkpoint and seeds, it resumes exactly across an evaluation step, and its metrics do not depend
on the number of processes. Tiny sizes, random Inception weights (the plumbing, not a score)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sample_ddp
from checkpoints import load_checkpoint, load_model
from config import config_from_dict
from evaluations.online import OnlineEvaluation
from tests.test_train import run_train, tiny_argv

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def reference(demo_data, tmp_path):
    """An ADM reference batch: 8 demo images (uint8 NHWC)."""
    from dataset import ImageLatentDataset

    dataset = ImageLatentDataset(demo_data, latents=False)
    images = np.stack([np.asarray(dataset[i][0]).transpose(1, 2, 0) for i in range(0, 24, 3)])
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=images.astype(np.uint8))
    return path


def eval_flags(reference, weights, **overrides):
    flags = dict(
        eval_every=2, eval_samples=8, eval_batch_size=4, eval_steps=2, eval_reference=reference,
        eval_weights=weights, eval_align_images=16,
    )  # fmt: skip
    return {**flags, **overrides}


def eval_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], **r["eval"]} for r in rows if "eval" in r]


def weights_of(path: Path) -> dict:
    ckpt = load_checkpoint(path)
    return {f"{key}.{name}": tensor for key in ("model", "ema") for name, tensor in ckpt[key].items()}


def test_evaluation_changes_no_weight_and_equals_sample_ddp_plus_the_evaluator(
    demo_data, tmp_path, reference, random_inception_weights
):
    run_train(tiny_argv(demo_data, tmp_path / "plain", max_train_steps=4, checkpointing_steps=4))
    with pytest.warns(UserWarning, match="NOT torch-fidelity's release file"):
        run_train(tiny_argv(demo_data, tmp_path / "eval", max_train_steps=4, checkpointing_steps=4,
                            **eval_flags(reference, random_inception_weights)))  # fmt: skip
    ckpt = tmp_path / "eval" / "run" / "checkpoints" / "0000004.pt"
    plain, evaluated = weights_of(tmp_path / "plain" / "run" / "checkpoints" / "0000004.pt"), weights_of(ckpt)
    assert all(torch.equal(plain[k], evaluated[k]) for k in plain), "evaluation changed the training"
    rows = eval_rows(tmp_path / "eval" / "run")
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "cknna", "mutual_knn", "probe_accuracy"):
        assert np.isfinite(rows[-1][key]), key
    for name in ("fid_vs_step.png", "alignment_vs_step.png", "samples/eval_0000004.png", "loss.png"):
        assert (tmp_path / "eval" / "run" / name).is_file(), name
    # The same checkpoint, recipe and seeds through sample_ddp.py and the evaluator give the same numbers.
    out = tmp_path / "samples"
    argv = ["--ckpt", str(ckpt), "--sample-dir", str(out), "--mode", "ode", "--heun", "--num-steps", "2"]
    argv += ["--num-fid-samples", "8", "--batch-size", "4", "--global-seed", "0", "--ref-batch", str(reference)]
    with pytest.warns(UserWarning, match="NOT torch-fidelity's release file"):
        sample_ddp.main([*argv, "--inception-weights", str(random_inception_weights)])
    metrics = json.loads(out.with_suffix(".json").read_text())["metrics"]
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert rows[-1][key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key


def test_resume_across_an_evaluation_step_is_exact(demo_data, tmp_path, reference, random_inception_weights):
    flags = eval_flags(reference, random_inception_weights)
    with pytest.warns(UserWarning):
        run_train(tiny_argv(demo_data, tmp_path / "straight", max_train_steps=4, checkpointing_steps=2, **flags))
        run_train(tiny_argv(demo_data, tmp_path / "split", max_train_steps=2, checkpointing_steps=2, **flags))
        run_train(tiny_argv(demo_data, tmp_path / "split", max_train_steps=4, checkpointing_steps=2, **flags))
    a = weights_of(tmp_path / "straight" / "run" / "checkpoints" / "0000004.pt")
    b = weights_of(tmp_path / "split" / "run" / "checkpoints" / "0000004.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight, split = eval_rows(tmp_path / "straight" / "run"), eval_rows(tmp_path / "split" / "run")
    assert [r["step"] for r in split] == [2, 4]  # one line per evaluation, none repeated by the resume
    for x, y in zip(straight, split):
        assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}


def test_two_processes_give_the_metrics_of_one(demo_data, tmp_path, reference, random_inception_weights):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "train.py")]
    cmd += tiny_argv(demo_data, tmp_path, max_train_steps=2, checkpointing_steps=2,
                     **eval_flags(reference, random_inception_weights, eval_samples=12))  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = eval_rows(tmp_path / "run")
    # The same evaluation of the same EMA weights in this one process.
    ckpt = tmp_path / "run" / "checkpoints" / "0000002.pt"
    cfg = config_from_dict(load_checkpoint(ckpt)["config"])
    ema, _ = load_model(ckpt)
    from dataset import ImageLatentDataset
    from models.encoders import load_encoders

    torch.manual_seed(cfg.seed)  # the random encoder of the run: train.py builds it right after seeding
    encoders = load_encoders(cfg.enc_type, "cpu", 16 * 4, enc_weights="random")
    dataset = ImageLatentDataset(demo_data, latents=False)
    with pytest.warns(UserWarning):
        online = OnlineEvaluation(cfg, device=torch.device("cpu"), rank=0, world=1, dataset=dataset, encoders=encoders, log=print, is_main=True)  # fmt: skip
        one = online(ema, 2)
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "cknna", "mutual_knn", "probe_accuracy"):
        assert row[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_evaluation_is_refused_at_start_up_without_its_files(demo_data, tmp_path, reference, monkeypatch):
    with pytest.raises(ValueError, match="--eval-reference"):
        run_train(tiny_argv(demo_data, tmp_path, eval_every=2))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))  # no Inception weights in the usual place
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05"):
        run_train(tiny_argv(demo_data, tmp_path, **eval_flags(reference, "pretrained")))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    with pytest.warns(UserWarning, match="RANDOM INCEPTION WEIGHTS"):
        run_train(tiny_argv(demo_data, tmp_path, max_train_steps=2, **eval_flags(reference, "random")))
    assert eval_rows(tmp_path / "run")[-1]["weights"] == "random"


def test_the_demo_judge_gives_fd_and_label_accuracy_curves(tmp_path):
    import shutil
    import subprocess as sp

    data = tmp_path / "data"
    sp.run([sys.executable, "-m", "demo", "data", "--out", str(data), "--per-class", "3", "--resolution", "16"],
           cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    nets = tmp_path / "nets"  # a copy: the judge writes its held-out real images beside the networks
    shutil.copytree(ROOT / "demo" / "nets", nets, ignore=shutil.ignore_patterns("data"))
    argv = tiny_argv(data, tmp_path, model="SiT-S/4", num_classes=10, resolution=16, max_train_steps=2,
                     checkpointing_steps=2, enc_type="timm:vit_tiny_patch16_224", enc_ckpt=nets / "encoder.pt", enc_weights="pretrained",
                     **eval_flags("", "random", eval_judge="demo", eval_nets=nets, eval_samples=20, eval_batch_size=10))  # fmt: skip
    run_train(argv)
    rows = eval_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [2] and 0 <= rows[0]["label_accuracy"] <= 1 and rows[0]["fd"] > 0
    assert np.isfinite(rows[0]["cknna"]) and (tmp_path / "run" / "fid_vs_step.png").is_file()
