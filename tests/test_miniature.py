"""demo/miniature.py: each method is train.py flags on the same run, and a tiny run of all of them
goes end to end (training, REG's joint sampling, CKNNA, per-method summary, table and figures)."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from checkpoints import load_checkpoint
from config import parse_config

ROOT = Path(__file__).resolve().parents[1]
from demo import miniature as repa_miniature  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def method_config(method, **overrides):
    """train.py's config for `method`'s flags on the miniature's config (what the script runs)."""
    settings = dict(proj_coeff=0.5, encoder_depth=2, reg_cls=0.03, attn_coeff=0.5, haste_layers="1:3,2:4")
    settings |= dict(haste_stop=0, steps=40) | overrides
    flags = repa_miniature.method_flags(type("Args", (), settings), method, "enc.pt")
    return parse_config(["--config", str(ROOT / "configs" / "miniature.yaml"), *flags])


def test_each_method_is_its_papers_switches_on_the_same_config():
    vanilla, repa = method_config("vanilla"), method_config("repa")
    assert vanilla.encoder_names == [] and vanilla.proj_coeff == 0
    assert repa.enc_type == "timm:vit_tiny_patch16_224" and repa.enc_ckpt == "enc.pt"
    assert (repa.proj_coeff, repa.encoder_depth, repa.projection_layer_type, repa.cls, repa.attn_coeff) == (
        0.5, 2, "mlp", 0.0, 0.0,
    )  # fmt: skip
    irepa = method_config("irepa")
    assert (irepa.projection_layer_type, irepa.proj_kwargs_kernel_size) == ("conv", 3)
    assert (irepa.spnorm_method, irepa.zscore_alpha) == ("zscore", 0.6)
    reg = method_config("reg")
    assert reg.cls == 0.03 and reg.proj_coeff == 0.5 and reg.cache_targets  # the class token is cached too
    haste = method_config("haste")
    assert haste.attn_coeff == 0.5 and haste.proj_coeff == 0.5 and not haste.cache_targets
    assert haste.attention_layer_pairs == [(1, 3), (2, 4)] and haste.early_stop_point == 20  # half of 40 steps
    assert method_config("haste", haste_stop=7).early_stop_point == 7
    # Everything else is the shared config: only the method's own keys differ from vanilla's.
    own = {"enc_type", "enc_ckpt", "proj_coeff", "encoder_depth", "projection_layer_type", "proj_kwargs_kernel_size"}
    own |= {"spnorm_method", "zscore_alpha", "cls", "attn_coeff", "attn_align_layers", "early_stop_point"}
    own |= {"cache_targets"}
    for cfg in (repa, irepa, reg, haste):
        differ = {k for k, v in cfg.to_dict().items() if v != vanilla.to_dict()[k]}
        assert differ <= own, differ - own


def test_steps_to_reach_interpolates_in_each_metrics_direction():
    rows = [
        {"step": 100, "fd": 50.0, "label_accuracy": 0.2},
        {"step": 200, "fd": 30.0, "label_accuracy": 0.4},
        {"step": 300, "fd": 20.0, "label_accuracy": 0.6},
    ]
    assert repa_miniature.steps_to_reach(rows, 40.0, "fd") == 150.0  # halfway from 50 down to 30
    assert repa_miniature.steps_to_reach(rows, 0.5, "label_accuracy") == 250.0  # halfway from 0.4 up to 0.6
    assert repa_miniature.steps_to_reach(rows, 60.0, "fd") == 100.0  # reached at the first evaluation
    assert repa_miniature.steps_to_reach(rows, 10.0, "fd") is None
    assert repa_miniature.steps_to_reach(rows, 0.7, "label_accuracy") is None
    with pytest.raises(ValueError, match="cknna"):
        repa_miniature.steps_to_reach(rows, 0.5, "cknna")


def test_the_queue_runs_every_seed_and_method_jobs_at_a_time_and_stops_at_a_failure(tmp_path, monkeypatch):
    """train_runs with a stand-in for train.py (a Python one-liner that records when it ran)."""
    script = "import sys, time, pathlib; p = pathlib.Path(sys.argv[1]); p.write_text(str(time.time())); time.sleep(0.3); sys.exit(int(sys.argv[2]))"  # fmt: skip

    def fake_argv(args, folders, out, method, seed, encoder_path):
        return [sys.executable, "-c", script, str(out / f"{method}-{seed}.ran"), str(int(method == args.fail))]

    monkeypatch.setattr(repa_miniature, "train_argv", fake_argv)
    args = type("Args", (), dict(seeds=[0, 1], methods=["vanilla", "repa", "reg"], jobs=2, fail=""))
    seconds = repa_miniature.train_runs(args, {}, tmp_path, "enc.pt")
    assert {s: sorted(m) for s, m in seconds.items()} == {0: ["reg", "repa", "vanilla"], 1: ["reg", "repa", "vanilla"]}
    starts = sorted(float(f.read_text()) for f in tmp_path.glob("*.ran"))
    assert len(starts) == 6 and starts[2] - starts[0] > 0.25  # never 3 at once: the third waited for a slot
    args.fail, args.seeds = "repa", [2]
    with pytest.raises(RuntimeError, match=r"train.py \(repa, seed 2\) failed"):
        repa_miniature.train_runs(args, {}, tmp_path, "enc.pt")


def test_a_tiny_run_of_every_method_goes_end_to_end(tmp_path, monkeypatch):
    """Every method through train.py (in this process, to skip five imports of torch: the queue is tested
    above) and the whole evaluation: REG's joint sampling and CKNNA, the summary, table and figures."""
    from accelerate.state import AcceleratorState, GradientState

    import train

    def train_in_process(args, folders, out, encoder_path):
        for seed in args.seeds:
            for method in args.methods:
                AcceleratorState._reset_state(reset_partial_state=True)
                GradientState._reset_state()
                argv = repa_miniature.train_argv(args, folders, out, method, seed, encoder_path)
                assert argv[1].endswith("train.py")
                train.train(train.parse_config(argv[2:]))
        return {seed: {method: 0.0 for method in args.methods} for seed in args.seeds}

    monkeypatch.setattr(repa_miniature, "train_runs", train_in_process)
    nets = tmp_path / "nets"  # the committed 16 px networks, copied: the run writes its records there
    shutil.copytree(ROOT / "demo" / "nets", nets, ignore=shutil.ignore_patterns("data"))
    out = tmp_path / "out"
    methods = ["vanilla", "repa", "irepa", "reg", "haste"]
    repa_miniature.main(
        ["--out", str(out), "--nets", str(nets), "--resolution", "16", "--grid", "4", "--seeds", "0",
         "--steps", "2", "--eval-every", "2", "--num-samples", "20", "--sample-steps", "1",
         "--diffusion-per-class", "2", "--methods", *methods, "--train-args", "--batch-size", "10"]
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["methods"] == methods
    for method in methods:
        (row,) = results["runs"]["0"][method]  # one checkpoint, step 2
        assert row["step"] == 2 and row["fd"] > 0 and 0 <= row["label_accuracy"] <= 1 and -1 <= row["cknna"] <= 1
        assert results["summary"][f"{method}_final_fd"]["mean"] == row["fd"]
    reached = results["summary"]["steps_to_vanilla_final_fd"]
    assert sorted(reached) == sorted(methods[1:]) and all(r["seeds"] == 1 for r in reached.values())
    table = (out / "table.md").read_text()
    assert all(f"| {method} |" in table for method in methods)
    for name in ("fd_vs_steps.png", "cknna_vs_steps.png", "accuracy_vs_steps.png", "samples_final.png"):
        assert (out / name).stat().st_size > 0
    # The runs are the methods they claim to be: REG's SiT denoises a class token, HASTE stopped aligning.
    reg = load_checkpoint(out / "runs" / "reg-seed0" / "checkpoints" / "0000002.pt")
    assert reg["model_kwargs"]["cls_token_dim"] == 128
    haste = (out / "runs" / "haste-seed0" / "config.yaml").read_text()
    assert "early_stop_point: 1" in haste and "attn_align_layers: 1:3,2:4" in haste
