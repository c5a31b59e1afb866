"""A run folder that stays true to its runs: one training per folder (RunLock), resumes that continue the same
training (a changed config refused unless --allow-config-change, then recorded), logging windows whose means and
img/s are right across resumes and gradient accumulation, and the optimizer step's clipping (fp32 and the fp16
loss-scaler path) and HASTE's attention gradient against computations made here, independently of the loop.

The loop tests reuse test_train_loop's Recorder (what each loss call saw: RNG state, inputs, weights on entry;
the weights after each optimizer step) and replace train.clock with a clock that advances one second per
optimizer step, so img/s has a closed form.
"""

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

import train
from config import TrainConfig
from loss import REPALoss
from tests.test_train import ROOT, tiny_argv
from tests.test_train_loop import checkpoint, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stats_lines(out_dir, exp_name="run"):
    return [json.loads(line) for line in (out_dir / exp_name / "stats.jsonl").read_text().splitlines()]


#################################################################################
#                         One training per run folder                           #
#################################################################################


def test_a_run_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    first = train.RunLock(tmp_path / "run").acquire()
    # flock conflicts between two opens of the file even in one process: the same as another process.
    with pytest.raises(train.RunFolderLocked, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
        train.RunLock(tmp_path / "run").acquire()
    first.release()
    assert (tmp_path / "run" / ".lock").read_text() == ""  # released: no holder named
    train.RunLock(tmp_path / "run").acquire().release()


def hold_lock(run_dir):
    """Another process that holds the run folder's lock, as a training does from its start to its end."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, train; lock = train.RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", str(run_dir)],  # fmt: skip
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_training_into_a_locked_folder_is_refused_at_once_and_kill_9_leaves_no_lock(demo_data, tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        # Process 2: a whole training into the same folder (python train.py). Refused at start-up.
        argv = tiny_argv(demo_data, tmp_path, max_train_steps=2, checkpointing_steps=1)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, "train.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        seconds = time.monotonic() - started
        assert second.returncode != 0
        assert f"run folder {tmp_path / 'run'} is in use by another training" in second.stderr, second.stderr[-3000:]
        assert f"(pid {holder.pid} on host {socket.gethostname()}" in second.stderr
        # Refused before data, encoders or model: nothing written, no time spent (imports only).
        assert seconds < 120
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: no chance to release anything
        holder.wait()
    # The kernel dropped the lock with its holder: the next training runs.
    run(tiny_argv(demo_data, tmp_path, max_train_steps=2, checkpointing_steps=2))
    assert [s["step"] for s in stats_lines(tmp_path)] == [1, 2]
    assert (tmp_path / "run" / ".lock").read_text() == ""  # and released it at its end


def test_every_rank_of_a_two_process_training_is_refused_by_a_locked_folder(demo_data, tmp_path):
    # Rank 0 takes the lock and tells the other ranks (a broadcast): all stop, none waits in a collective.
    holder = hold_lock(tmp_path / "run")
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py"]
        cmd += tiny_argv(demo_data, tmp_path, max_train_steps=2, checkpointing_steps=1)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        refused = f"RunFolderLocked: run folder {tmp_path / 'run'} is in use by another training"
        for rank in (0, 1):  # each rank raises it (torchrun prefixes a rank's lines with [rankN]:)
            assert any(line.startswith(f"[rank{rank}]:") and refused in line for line in result.stderr.splitlines()), result.stderr[-4000:]  # fmt: skip
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


#################################################################################
#                    Resuming with a changed configuration                      #
#################################################################################


def test_config_changes_compare_with_the_saved_config_and_its_defaults():
    cfg = TrainConfig(learning_rate=2e-3, max_train_steps=10)
    saved = TrainConfig(learning_rate=1e-3).to_dict()
    assert train.config_changes(saved, cfg) == {"learning_rate": (1e-3, 2e-3), "max_train_steps": (400_000, 10)}
    # A checkpoint from before a key existed had its default; keys that no longer exist are ignored.
    del saved["qk_norm"], saved["allow_config_change"]
    saved["removed_key"] = 1
    assert train.config_changes(saved, TrainConfig(learning_rate=1e-3, qk_norm=True)) == {"qk_norm": (False, True)}
    assert train.config_changes(None, cfg) == {}  # an official checkpoint: no config of ours to compare
    # The free keys are fields of the config, and none of the keys that change a step is among them.
    assert train.RESUME_FREE_KEYS <= cfg.to_dict().keys()
    changes_training = {"learning_rate", "seed", "batch_size", "gradient_accumulation_steps", "max_grad_norm"}
    changes_training |= {"model", "proj_coeff", "enc_type", "mixed_precision", "allow_tf32", "data_dir", "ema_decay"}
    assert not changes_training & train.RESUME_FREE_KEYS


def test_a_resume_with_another_training_config_is_refused_naming_the_keys(demo_data, tmp_path):
    run(tiny_argv(demo_data, tmp_path, max_train_steps=2, checkpointing_steps=2))
    config_yaml, stats = (tmp_path / "run" / "config.yaml").read_text(), stats_lines(tmp_path)
    changed = tiny_argv(demo_data, tmp_path, max_train_steps=3, learning_rate=2e-3, seed=1)
    with pytest.raises(ValueError, match=r"0000002.pt with another config .*: seed 0 -> 1, learning_rate 0.001 -> 0.002 .*--allow-config-change") as info:  # fmt: skip
        run(changed)
    assert "max_train_steps" not in str(info.value)  # a free key is not a change of training
    # Nothing was written: config.yaml still describes the checkpoints, stats.jsonl is as it was.
    assert (tmp_path / "run" / "config.yaml").read_text() == config_yaml and stats_lines(tmp_path) == stats
    assert not (tmp_path / "run" / "checkpoints" / "0000003.pt").exists()


def test_free_keys_may_change_and_the_resume_stays_exact(demo_data, tmp_path):
    run(tiny_argv(demo_data, tmp_path / "straight", max_train_steps=4, checkpointing_steps=4))
    run(tiny_argv(demo_data, tmp_path, max_train_steps=2, checkpointing_steps=2, exp_name="first"))
    # Another folder (--resume PATH, another exp_name), length, logging, checkpointing, previews, workers, eval.
    ckpt = tmp_path / "first" / "checkpoints" / "0000002.pt"
    argv = tiny_argv(demo_data, tmp_path, max_train_steps=4, checkpointing_steps=1, keep_last=1, log_every=2)
    argv += ["--exp-name", "second", "--resume", str(ckpt), "--preview-cfg-scale", "2", "--max-nonfinite-steps", "5"]
    run(argv + ["--fused-attn", "false", "--compile", "true", "--epochs", "100"])
    final, straight = checkpoint(tmp_path, 4, "second"), checkpoint(tmp_path / "straight", 4)
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(final["model"][name], tensor, rtol=1e-5, atol=1e-7, msg=name)  # another kernel
    assert [s["step"] for s in stats_lines(tmp_path, "second")] == [4]  # no config_change record


def test_allow_config_change_continues_records_the_change_and_rewrites_config_yaml(demo_data, tmp_path):
    run(tiny_argv(demo_data, tmp_path, max_train_steps=2, checkpointing_steps=2))
    changed = tiny_argv(demo_data, tmp_path, max_train_steps=3, checkpointing_steps=1, learning_rate=2e-3)
    run(changed + ["--allow-config-change", "true"])
    stats = stats_lines(tmp_path)
    assert stats[2] == {"step": 2, "config_change": {"learning_rate": [1e-3, 2e-3]}}
    assert [s["step"] for s in stats] == [1, 2, 2, 3] and stats[3]["lr"] == 2e-3
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["learning_rate"] == 2e-3 and saved["allow_config_change"] is True
    assert checkpoint(tmp_path, 3)["config"]["learning_rate"] == 2e-3
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0  # the plot reads past the record
    # The checkpoint at 3 has the new config: resuming it needs no flag (allow_config_change itself is free).
    run(tiny_argv(demo_data, tmp_path, max_train_steps=4, checkpointing_steps=1, learning_rate=2e-3))
    # Rewinding to step 2 with the change again records it once, not twice.
    run(changed + ["--allow-config-change", "true", "--resume-step", "2"])
    assert [s["step"] for s in stats_lines(tmp_path)] == [1, 2, 2, 3]


def test_a_checkpoint_that_does_not_fit_names_the_config_keys_that_differ(demo_data, tmp_path):
    run(tiny_argv(demo_data, tmp_path, max_train_steps=1, checkpointing_steps=1))
    with pytest.raises(RuntimeError, match=r"0000001.pt does not fit --model SiT-S/8 .* It was trained with depth 3 -> 2"):  # fmt: skip
        run(tiny_argv(demo_data, tmp_path, max_train_steps=2, depth=2, allow_config_change=True))


#################################################################################
#                 Logging windows: means and img/s, closed forms                 #
#################################################################################


class StepClock:
    """train.clock for a test: one second per optimizer step (TrainStep call), and `startup` seconds when the
    DataLoader starts (workers, first prefetch: not training, must not enter img/s)."""

    def __init__(self, monkeypatch, startup=100.0):
        self.now = 0.0
        clock = self

        class TimedStep(train.TrainStep):
            def __call__(self, *args, **kwargs):
                clock.now += 1.0
                return super().__call__(*args, **kwargs)

        class SlowStartLoader(train.DataLoader):
            def __iter__(self):
                clock.now += startup
                return super().__iter__()

        monkeypatch.setattr(train, "clock", lambda: clock.now)
        monkeypatch.setattr(train, "TrainStep", TimedStep)
        monkeypatch.setattr(train, "DataLoader", SlowStartLoader)


def test_the_first_window_after_a_resume_holds_the_steps_since_the_resume(demo_data, tmp_path, monkeypatch):
    StepClock(monkeypatch)
    run(tiny_argv(demo_data, tmp_path / "straight", max_train_steps=6, checkpointing_steps=6, log_every=1))
    per_step = {s["step"]: s for s in stats_lines(tmp_path / "straight")}
    run(tiny_argv(demo_data, tmp_path, max_train_steps=3, checkpointing_steps=3, log_every=2))
    run(tiny_argv(demo_data, tmp_path, max_train_steps=6, checkpointing_steps=3, log_every=2))  # resumes at 3
    lines = stats_lines(tmp_path)
    # Windows end at multiples of log_every (and the last step); each holds the steps run since the previous line.
    windows = {2: [1, 2], 3: [3], 4: [4], 6: [5, 6]}
    assert [s["step"] for s in lines] == list(windows)
    for line in lines:
        steps = windows[line["step"]]
        assert line["window_steps"] == len(steps), line
        for key in ("loss", "proj_loss", "grad_norm"):
            expected = sum(per_step[k][key] for k in steps) / len(steps)  # the exact resume repeats each step
            assert line[key] == pytest.approx(expected, rel=1e-12), (line["step"], key)
        # img/s: the images of the steps run over their time, 1 s per step: the effective batch of 4, start-up
        # (100 s per start) excluded.
        assert line["img_per_s"] == pytest.approx(4.0), line
        assert line["images_seen"] == 4 * line["step"]


def test_gradient_accumulation_logs_means_over_micro_steps_and_img_per_s_of_effective_batches(
    demo_data, tmp_path, recorder, monkeypatch
):
    # --batch-size 2 per micro-step x 2 accumulation: 4 images per optimizer step, 4 micro-steps per window.
    StepClock(monkeypatch)
    rec = recorder()
    argv = tiny_argv(demo_data, tmp_path, batch_size=2, gradient_accumulation_steps=2, log_every=2)
    run(argv + ["--max-train-steps", "4", "--checkpointing-steps", "4"])
    lines = stats_lines(tmp_path)
    assert len(rec.calls) == 8 and [s["step"] for s in lines] == [2, 4]
    for w, line in enumerate(lines):
        calls = rec.calls[4 * w : 4 * w + 4]
        assert line["loss"] == pytest.approx(sum(c["denoising"].mean().item() for c in calls) / 4, rel=1e-6)
        assert line["proj_loss"] == pytest.approx(sum(c["proj"] for c in calls) / 4, rel=1e-6)
        assert line["window_steps"] == 2 and line["images_seen"] == 8 * (w + 1)
        assert line["img_per_s"] == pytest.approx(4.0)  # 2 steps x 4 images in 2 s; not 2 images per step


#################################################################################
#          Gradient clipping and AdamW against a computation made here          #
#################################################################################


class GradientsSeen:
    """The gradients the optimizer steps with: a pre-step hook on every torch optimizer, by parameter name."""

    def __init__(self, rec):
        self.steps, self.rec = [], rec
        self.hook = register_optimizer_step_pre_hook(self._record)

    def _record(self, optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        names = [name for name, _ in self.rec.model.named_parameters()]
        assert len(names) == len(params)
        self.steps.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in zip(names, params)})

    def close(self):
        self.hook.remove()


def reference_gradients(rec, call, proj_coeff, scale=None):
    """The micro-step's gradients by hand: the model at the call's weights, the loss redrawn from the call's RNG
    state on the recorded batch and targets, one backward. fp16 (scale): under fp16 autocast, the loss times the
    loss scale, the gradients divided by it, as a GradScaler does."""
    model = copy.deepcopy(rec.model)
    model.__dict__.pop("forward", None)  # accelerate's autocast wrapper of the trained model's forward
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(call["params"][name])
    model.train().zero_grad(set_to_none=True)
    loss_fn = REPALoss(proj_coeff=proj_coeff)  # before the RNG state is set: its constructor draws once
    torch.set_rng_state(call["rng"])
    with torch.autocast("cpu", dtype=torch.float16, enabled=scale is not None):
        terms = loss_fn(model, call["x"], call["y"], call["zs"])
    (terms.total * (scale or 1.0)).backward()
    return {name: p.grad / (scale or 1.0) for name, p in model.named_parameters() if p.grad is not None}


def clip_by_hand(grads, max_norm):
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    coef = min(1.0, max_norm / (norm.item() + 1e-6))  # torch's clip_grad_norm_
    return {name: g.double() * coef for name, g in grads.items()}, norm.item()


def adamw_by_hand(params, grads_per_step, cfg):
    """AdamW (weight decay 0, bias-corrected) over the given gradients, in float64; the weights after each step."""
    b1, b2 = cfg.adam_beta1, cfg.adam_beta2
    p = {n: v.double().clone() for n, v in params.items()}
    m = {n: torch.zeros_like(v) for n, v in p.items()}
    v2 = {n: torch.zeros_like(v) for n, v in p.items()}
    after = []
    for t, grads in enumerate(grads_per_step, start=1):
        for name, g in grads.items():
            m[name] = b1 * m[name] + (1 - b1) * g
            v2[name] = b2 * v2[name] + (1 - b2) * g * g
            denom = (v2[name] / (1 - b2**t)).sqrt() + cfg.adam_epsilon
            p[name] = p[name] - cfg.learning_rate * (m[name] / (1 - b1**t)) / denom
        after.append({n: v.clone() for n, v in p.items()})
    return after


def check_clipped_steps(rec, seen, stats, cfg, scales=None):
    """Every step: the logged grad_norm is the true norm (unscaled), the optimizer gets the gradients clipped to
    cfg.max_grad_norm (clipping active), and the weights are AdamW's on those clipped gradients."""
    clipped_steps = []
    for k, call in enumerate(rec.calls):
        raw = reference_gradients(rec, call, cfg.proj_coeff, scale=None if scales is None else scales[k])
        clipped, norm = clip_by_hand(raw, cfg.max_grad_norm)
        assert norm > 20 * cfg.max_grad_norm, "clipping must be active in this test"
        assert stats[k]["grad_norm"] == pytest.approx(norm, rel=1e-3 if scales else 1e-5), f"step {k + 1}: logged norm"
        for name, g in clipped.items():
            torch.testing.assert_close(seen.steps[k][name].double(), g, rtol=1e-3, atol=1e-9, msg=f"step {k + 1}: {name}")  # fmt: skip
        clipped_steps.append(clipped)
    expected = adamw_by_hand(rec.calls[0]["params"], clipped_steps, cfg)
    for k, weights in enumerate(rec.weights):
        for name, value in weights.items():
            torch.testing.assert_close(value.double(), expected[k][name], rtol=1e-4, atol=2e-6, msg=f"step {k + 1}: {name}")  # fmt: skip


def test_clipping_with_its_threshold_then_adamw(demo_data, tmp_path, recorder):
    rec = recorder()
    seen = GradientsSeen(rec)
    argv = tiny_argv(demo_data, tmp_path, max_train_steps=3, checkpointing_steps=3, max_grad_norm=0.002)
    try:
        run(argv)
    finally:
        seen.close()
    assert len(rec.calls) == len(seen.steps) == len(rec.weights) == 3
    check_clipped_steps(rec, seen, stats_lines(tmp_path), train.parse_config(argv))


def test_fp16_clips_the_unscaled_gradients_and_logs_their_norm(demo_data, tmp_path, recorder, monkeypatch):
    # accelerate has no fp16 on the CPU: give the Accelerator fp16 autocast and a GradScaler there, as
    # test_train_loop's fp16 test does. The loss scale (2^10, doubling every step) multiplies the gradients
    # until they are unscaled; clipping and the logged norm must see them unscaled.
    current = {}

    class CpuFp16Accelerator(train.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            assert self.mixed_precision == "fp16" and self.scaler is None
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
            current["recorder"].accelerator = self

    monkeypatch.setattr(train, "Accelerator", CpuFp16Accelerator)
    rec = current["recorder"] = recorder()
    seen = GradientsSeen(rec)
    argv = tiny_argv(demo_data, tmp_path, max_train_steps=3, checkpointing_steps=3, max_grad_norm=0.002)
    argv += ["--mixed-precision", "fp16"]
    try:
        run(argv)
    finally:
        seen.close()
    scales = [c["scale"] for c in rec.calls]
    assert scales == [2.0**10, 2.0**11, 2.0**12] and len(seen.steps) == 3
    check_clipped_steps(rec, seen, stats_lines(tmp_path), train.parse_config(argv), scales=scales)


#################################################################################
#                  HASTE: the attention alignment's gradient                    #
#################################################################################


def test_attention_alignment_sends_its_gradient_to_the_aligned_block():
    """total(attn_coeff = c) - total(0) is c x the cross-entropy of the encoder's maps against softmax(q k^T /
    sqrt(d)) computed here from block 2's attention input: its gradient must arrive whole, in block 2's qkv and
    everything before it, and nowhere after it."""
    from models.sit import SiT

    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=4, num_classes=5,
                z_dims=[6], encoder_depth=1, projector_dim=16).train()  # fmt: skip
    for block in model.blocks:  # non-zero adaLN (as after training): the gradient also crosses block 1
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    model.record_attention([2])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 4, 8, 8, generator=g), torch.randint(0, 5, (3,), generator=g)
    teacher = (torch.randn(3, 2, 16, 16, generator=g) * 2).softmax(dim=-1)  # 2 encoder heads over 16 patches
    coeff = 0.7

    def gradients(attn_coeff, by_hand=False):
        model.zero_grad(set_to_none=True)
        inputs = []
        hook = model.blocks[1].attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        loss_fn = REPALoss(proj_coeff=0.0, attn_coeff=attn_coeff)
        torch.manual_seed(5)  # the same t, noise and label dropout in every call
        terms = loss_fn(model, x, y, attn_target=[teacher])
        hook.remove()
        if by_hand:  # the formula, from the block's input and its qkv weights
            attn = model.blocks[1].attn
            N, T, D = inputs[0].shape
            q, k, _ = attn.qkv(inputs[0]).reshape(N, T, 3, 4, D // 4).permute(2, 0, 3, 1, 4)
            logits = q[:, :2] @ k[:, :2].transpose(-2, -1) / (D // 4) ** 0.5  # the first 2 heads
            cross_entropy = -(teacher * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
            (coeff * cross_entropy).backward()
            return cross_entropy, terms
        terms.total.backward()
        return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}

    with_attention, without = gradients(coeff), gradients(0.0)
    cross_entropy, terms = gradients(coeff, by_hand=True)
    torch.testing.assert_close(terms.attn, cross_entropy)  # the logged value
    by_hand = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    for name, grad in by_hand.items():
        torch.testing.assert_close(with_attention[name] - without[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert by_hand["blocks.1.attn.qkv.weight"].norm() > 1e-3  # the aligned block gets a gradient ...
    assert by_hand["blocks.0.attn.qkv.weight"].norm() > 0  # ... and so does what feeds it
    assert all(by_hand[n].abs().max() == 0 for n in by_hand if n.startswith("blocks.2."))  # not the block after it
