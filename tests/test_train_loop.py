"""The training loop step by step: what each optimizer step of train.py does, against independent computations.

Each test runs train.train() on a tiny setup (32 px pixel space, or hand-made 4x4 SD-VAE moments; depth 3,
width 64) and records what the loop does by wrapping its collaborators: the DataLoader, the loss object, the
optimizer's step hooks, update_ema, the preview samplers and the encoders. train.py itself is not changed. The
expected values are computed here from the documented rules, not by running the loop's code again (the one
helper used, training.step_seed, has its own test: distinct for every (seed, rank, position)):
    data order     position p -> entry p % n of np.random.default_rng([seed, p // n]).permutation(n)
    randomness     every micro-step reseeds from step_seed(seed, rank, position), then draws in order:
                   [latent eps] [legacy label drop] t, noise (loss), label drop (model)
    latents        scale x (mean + std x eps)
    EMA            ema_k = d^k w_0 + sum_j (1 - d) d^(k-j) w_j over the recorded weights w_j
    previews       a sampler on the EMA weights with noise randn(seed) and labels arange(16) % classes
"""

import copy
import json
import math
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import samplers
import train
import training
from checkpoints import load_checkpoint
from dataset import ImageLatentDataset
from diffusion import ddim_sampler
from loss import LossTerms
from preprocessing import layout
from tests.test_train import tiny_argv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_ITEMS, NUM_CLASSES = 24, 4  # demo_data: 6 images per class, 4 classes
LATENT_SCALE = 0.18215  # SD-VAE


#################################################################################
#                      Recording what the loop does                             #
#################################################################################


# What the recorders wrap, taken once: a second recorder in the same test must not wrap the first one's wrappers.
# Each is looked up where the loop calls it: train.py (data, previews) or training.py (the step, loss, encoders).
HOMES = {
    "DataLoader": train,
    "REPALoss": training,
    "DiffusionLoss": training,
    "update_ema": training,
    "load_encoders": training,
    "euler_sampler": train,
    "ddim_sampler": train,
}
ORIGINAL = {name: getattr(module, name) for name, module in HOMES.items()}


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


class Recorder:
    """Wraps train.py's collaborators (undone by monkeypatch) and keeps what every micro-step saw.

    batches: (indices, images, x, labels) as the loop drew them; calls: one dict per loss call with the global
    RNG state on entry, the loss inputs, the model inputs (x_t, t) and the labels that reached the embedding
    table, and the model / EMA / optimizer state on entry; weights: the parameters after each optimizer step.
    `poison`: indices of loss calls whose loss is replaced by NaN (a non-finite step).
    """

    def __init__(self, monkeypatch, poison=()):
        self.batches, self.calls, self.weights, self.previews = [], [], [], []
        self.encoders, self.encoded, self.encoder_dtypes = [], 0, []
        self.model = self.ema = self.optimizer = self.accelerator = None
        self.ema_updates = 0
        self.poison = set(poison)
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # the expected draws are those of the CPU generator
        monkeypatch.setattr(HOMES["DataLoader"], "DataLoader", self._loader_class(ORIGINAL["DataLoader"]))
        monkeypatch.setattr(HOMES["REPALoss"], "REPALoss", self._loss_class(ORIGINAL["REPALoss"]))
        monkeypatch.setattr(HOMES["DiffusionLoss"], "DiffusionLoss", self._loss_class(ORIGINAL["DiffusionLoss"]))
        monkeypatch.setattr(HOMES["update_ema"], "update_ema", self._wrap_update_ema(ORIGINAL["update_ema"]))
        monkeypatch.setattr(
            HOMES["load_encoders"], "load_encoders", self._wrap_load_encoders(ORIGINAL["load_encoders"])
        )
        for name in ("euler_sampler", "ddim_sampler"):
            monkeypatch.setattr(HOMES[name], name, self._wrap_sampler(name, ORIGINAL[name]))
        self.hooks = [
            register_optimizer_step_pre_hook(self._before_step),
            register_optimizer_step_post_hook(self._after_step),
        ]

    def close(self):
        for hook in self.hooks:
            hook.remove()

    def _loader_class(rec, real):
        class RecordingLoader:
            def __init__(self, *args, **kwargs):
                self.loader = real(*args, **kwargs)

            def __iter__(self):
                inner = iter(self.loader)  # now, not at the first next(): creating it draws from the RNG

                def batches():
                    for batch in inner:
                        rec.batches.append(tuple(t.clone() for t in batch))
                        yield batch

                return batches()

        return RecordingLoader

    def _loss_class(rec, base):
        class RecordingLoss(base):
            def __call__(self, model, x, y, zs_target=(), generator=None):
                rec.model = getattr(model, "module", model)
                call = dict(
                    rng=torch.get_rng_state(),
                    x=x.detach().clone(),
                    y=y.clone(),
                    zs=[z.detach().clone() for z in zs_target],
                    params=snapshot(rec.model),
                    ema=snapshot(rec.ema) if rec.ema is not None else None,
                    opt=copy.deepcopy(rec.optimizer.state_dict()) if rec.optimizer is not None else None,
                )
                if rec.accelerator is not None and rec.accelerator.scaler is not None:
                    call["scale"] = rec.accelerator.scaler.get_scale()

                def forward(x_t, t, y_in):
                    embedded, computed = [], []  # labels after the model's own dropout; final layer dtype
                    table, final = rec.model.y_embedder.embedding_table, rec.model.final_layer.linear
                    hooks = [
                        table.register_forward_pre_hook(lambda module, args: embedded.append(args[0].clone())),
                        final.register_forward_hook(lambda module, args, out: computed.append(out.dtype)),
                    ]
                    try:
                        out = model(x_t, t, y_in)
                    finally:
                        for hook in hooks:
                            hook.remove()
                    call.update(x_t=x_t.detach().clone(), t=t.detach().clone(), y_model=embedded[0])
                    # accelerate returns fp32 outputs; the precision the model computed in shows inside it.
                    call.update(compute_dtype=computed[0])
                    return out

                terms = super().__call__(forward, x, y, zs_target, generator)
                if len(rec.calls) in rec.poison:
                    terms = LossTerms(terms.denoising * math.nan, terms.proj, terms.total * math.nan)
                call.update(
                    denoising=terms.denoising.detach().clone(), proj=terms.proj.item(), total=terms.total.item()
                )
                rec.calls.append(call)
                return terms

        return RecordingLoss

    def _wrap_update_ema(rec, real):
        def update_ema(ema, model, decay, apply=None):
            rec.ema, rec.ema_updates = ema, rec.ema_updates + 1
            return real(ema, model, decay, apply)

        return update_ema

    def _wrap_load_encoders(rec, real):
        def load_encoders(*args, **kwargs):
            rec.encoders = real(*args, **kwargs)
            for enc in rec.encoders:
                enc.encode = rec._counting(enc.encode)
                # The tokens leave through a LayerNorm (fp32 under autocast): record a matmul's precision.
                linear = next(m for m in enc.modules() if isinstance(m, torch.nn.Linear))
                linear.register_forward_hook(lambda module, args, out: rec.encoder_dtypes.append(out.dtype))
            return rec.encoders

        return load_encoders

    def _counting(rec, encode):
        def counted(images):
            rec.encoded += images.shape[0]
            return encode(images)

        return counted

    def _wrap_sampler(rec, name, real):
        def sampler(model, noise, labels, **kwargs):
            out = real(model, noise, labels, **kwargs)
            rec.previews.append(dict(sampler=name, model=model, noise=noise.clone(), labels=labels.clone(), out=out))
            return out

        return sampler

    def _before_step(rec, optimizer, args, kwargs):
        rec.optimizer = optimizer

    def _after_step(rec, optimizer, args, kwargs):
        rec.weights.append(snapshot(rec.model))


def run(argv):
    """train.train() on a fresh accelerate state; returns (model, ema)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return train.train(train.parse_config(argv))


#################################################################################
#                  Independent versions of the documented rules                 #
#################################################################################


def data_order(num_items, seed, positions):
    """Dataset indices at global stream positions: epoch p // n is a permutation seeded by (seed, epoch)."""
    return [int(np.random.default_rng([seed, p // num_items]).permutation(num_items)[p % num_items]) for p in positions]


def step_generator(seed, position, rank=0):
    """A CPU generator in the state the loop's global RNG must have at the start of this micro-step."""
    return torch.Generator().manual_seed(training.step_seed(seed, rank, position))


def generator_from(state):
    generator = torch.Generator()
    generator.set_state(state)
    return generator


def assert_same_state(a, b, what):
    """Equal nested dicts / lists of tensors and numbers."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            assert_same_state(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{what} differs"
    else:
        assert a == b, f"{what}: {a} != {b}"


def checkpoint(out_dir, step, exp_name="run"):
    return load_checkpoint(out_dir / exp_name / "checkpoints" / f"{step:07d}.pt")


def grid_png(images, path):
    from torchvision.utils import save_image

    save_image(images, path, nrow=4)
    return np.asarray(PIL.Image.open(path)).astype(int)


#################################################################################
#                       Randomness, data order and resume                       #
#################################################################################


def test_step_seed_depends_on_seed_rank_and_position():
    seeds = [training.step_seed(s, r, p) for s in range(3) for r in range(4) for p in range(0, 400, 4)]
    assert len(set(seeds)) == len(seeds)


def test_every_draw_of_a_micro_step_comes_from_its_seed_and_data_position(demo_data, tmp_path, recorder):
    # --batch-size 2 per micro-step (the official meaning) x 2 accumulation: positions 0, 2, 4, ... differ
    # from step x batch.
    rec = recorder()
    argv = tiny_argv(
        demo_data, tmp_path, gradient_accumulation_steps=2, batch_size=2, max_train_steps=3, proj_coeff=0.7
    )
    run(argv + ["--checkpointing-steps", "3"])
    assert len(rec.calls) == len(rec.batches) == 6 and len(rec.weights) == 3
    (encoder,) = rec.encoders
    for k, (call, (indices, images, x, labels)) in enumerate(zip(rec.calls, rec.batches)):
        position = 2 * k
        assert indices.tolist() == data_order(NUM_ITEMS, 0, [position, position + 1]), f"micro-step {k}"
        generator = step_generator(0, position)
        assert torch.equal(call["rng"], generator.get_state()), f"micro-step {k} is not seeded from its position"
        t = torch.rand(2, generator=generator)
        noise = torch.randn(x.shape, generator=generator)
        model_drop = torch.rand(2, generator=generator) < 0.1
        assert torch.equal(call["x"], images.float() / 127.5 - 1) and torch.equal(call["y"], labels)
        # The loss sees uniform times and the linear interpolant (1 - t) x + t eps (the defaults).
        assert torch.equal(call["t"], t)
        torch.testing.assert_close(call["x_t"], (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise)
        assert torch.equal(call["y_model"], torch.where(model_drop, NUM_CLASSES, labels))
        # Alignment targets: the frozen encoder on the clean uint8 images; lambda as configured.
        torch.testing.assert_close(call["zs"][0], encoder.encode(images))
        assert call["proj"] != 0 and call["total"] == pytest.approx(
            call["denoising"].mean().item() + 0.7 * call["proj"]
        )
    assert len({call["t"][0].item() for call in rec.calls}) == 6  # no two micro-steps draw alike
    assert checkpoint(tmp_path, 3)["data_position"] == 12


def test_rank_one_draws_its_own_slice_from_its_own_seed(demo_data, tmp_path, recorder, monkeypatch):
    # Rank 1 of 2, simulated in one process: the Accelerator reports process 1 of 2, and its sum over ranks
    # counts this rank twice (as if the other agreed). The two-process test in test_train.py runs the real thing.
    class SecondOfTwo(train.Accelerator):
        process_index, num_processes, is_main_process = 1, 2, False

        def reduce(self, tensor, reduction="sum", scale=1.0):
            return tensor * 2 if reduction == "sum" else tensor

    monkeypatch.setattr(train, "Accelerator", SecondOfTwo)
    rec = recorder()
    run(tiny_argv(demo_data, tmp_path, max_train_steps=2, checkpointing_steps=2))
    assert len(rec.calls) == 2
    for k, (call, (indices, _, _, _)) in enumerate(zip(rec.calls, rec.batches)):
        position = 4 * k  # global batch 4: rank 1 takes positions 4k + 2 and 4k + 3
        assert indices.tolist() == data_order(NUM_ITEMS, 0, [position + 2, position + 3])
        assert torch.equal(call["rng"], step_generator(0, position, rank=1).get_state()), f"micro-step {k}"


def test_a_launch_that_accelerate_does_not_join_is_refused(demo_data, tmp_path, monkeypatch):
    # torchrun says 2 processes, accelerate joined none (what it did on a CPU unless told cpu=True): each
    # process would train alone on the full batch and write the same run folder. train.py stops instead.
    class Alone(train.Accelerator):
        def __init__(self, *args, cpu=False, **kwargs):
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(train, "Accelerator", Alone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"started 2 processes \(WORLD_SIZE\) but accelerate joined 1"):
        run(tiny_argv(demo_data, tmp_path, max_train_steps=1))
    assert not (tmp_path / "run" / "checkpoints").exists()


def draws(calls):
    return [(c["rng"], c["x"], c["y"], c["t"], c["x_t"]) for c in calls]


def assert_same_draws(a, b, what):
    assert len(a) == len(b), what
    for k, (x, y) in enumerate(zip(a, b)):
        assert all(torch.equal(u, v) for u, v in zip(x, y)), f"{what}: micro-step {k} drew differently"


def test_resumed_runs_draw_what_the_uninterrupted_run_drew(demo_data, tmp_path, recorder):
    straight = recorder()
    run(tiny_argv(demo_data, tmp_path, max_train_steps=4, checkpointing_steps=2))
    assert len(straight.calls) == 4
    assert [b[0].tolist() for b in straight.batches] == [data_order(NUM_ITEMS, 0, range(4 * s, 4 * s + 4)) for s in range(4)]  # fmt: skip
    final = checkpoint(tmp_path, 4)

    # --resume PATH into another run folder: continues at position 8 with the same draws and the same end state.
    resumed = recorder()
    path = tmp_path / "run" / "checkpoints" / "0000002.pt"
    run(tiny_argv(demo_data, tmp_path, max_train_steps=4, checkpointing_steps=2, exp_name="other", resume=path))
    assert_same_draws(draws(resumed.calls), draws(straight.calls[2:]), "--resume PATH")
    assert [b[0].tolist() for b in resumed.batches] == [b[0].tolist() for b in straight.batches[2:]]
    other = checkpoint(tmp_path, 4, "other")
    for key in ("model", "ema", "opt"):
        assert_same_state(other[key], final[key], key)
    assert other["data_position"] == 16

    # The official --resume-step N in the run folder: the same.
    by_step = recorder()
    run(tiny_argv(demo_data, tmp_path, max_train_steps=4, checkpointing_steps=2, resume_step=2))
    assert_same_draws(draws(by_step.calls), draws(straight.calls[2:]), "--resume-step 2")

    # --resume none in a folder with checkpoints: starts over from position 0.
    fresh = recorder()
    run(tiny_argv(demo_data, tmp_path, max_train_steps=2, checkpointing_steps=2, resume="none"))
    assert_same_draws(draws(fresh.calls), draws(straight.calls[:2]), "--resume none")
    assert_same_state(fresh.calls[0]["params"], straight.calls[0]["params"], "initial weights")


@pytest.fixture(scope="module")
def latent_data(demo_data, tmp_path_factory):
    """The demo images with hand-made SD-VAE moments (official layout): 4x4 latents, mean ~ N(0, 1) and std in
    [0.2, 1.5], so a sample that ignored the std or the scale would stand out (no VAE needed)."""
    out = tmp_path_factory.mktemp("latent-data") / "demo"
    shutil.copytree(demo_data / "images", out / "images")
    image_meta = json.loads((out / "images" / layout.DATASET_JSON).read_text())
    rng = np.random.default_rng(0)
    labels = []
    for k, (name, label) in enumerate(image_meta["labels"]):
        assert layout.name_index(name) == k
        path = out / "vae-sd" / layout.latent_name(k)
        path.parent.mkdir(parents=True, exist_ok=True)
        moments = np.concatenate([rng.standard_normal((4, 4, 4)), rng.uniform(0.2, 1.5, (4, 4, 4))])
        np.save(path, moments.astype(np.float32))
        labels.append([layout.latent_name(k), label])
    meta = {k: v for k, v in image_meta.items() if k != "labels"}
    (out / "vae-sd" / layout.DATASET_JSON).write_bytes(layout.dataset_json_bytes(labels, **meta))
    return out


def test_latents_are_scaled_samples_of_the_posterior(latent_data, tmp_path, recorder):
    rec = recorder()
    argv = tiny_argv(latent_data, tmp_path, model="SiT-S/2", pixel_space=False, max_train_steps=2)
    run(argv + ["--checkpointing-steps", "2"])
    assert len(rec.calls) == 2
    for k, (call, (_, _, moments, _)) in enumerate(zip(rec.calls, rec.batches)):
        mean, std = moments.chunk(2, dim=1)  # (N, 4, 4, 4) each
        generator = step_generator(0, 4 * k)
        eps = torch.randn(mean.shape, generator=generator)  # the micro-step's first draw
        torch.testing.assert_close(call["x"], LATENT_SCALE * (mean + std * eps), rtol=1e-6, atol=1e-6)
        assert torch.equal(call["rng"], generator.get_state())  # then the loss draws t and noise


#################################################################################
#                     EMA, non-finite steps, previews                           #
#################################################################################


def test_ema_is_the_exponential_average_of_the_weight_trajectory(demo_data, tmp_path, recorder):
    decay, steps = 0.8, 4
    rec = recorder()
    model, ema = run(tiny_argv(demo_data, tmp_path, ema_decay=decay, max_train_steps=steps, checkpointing_steps=steps))
    assert len(rec.weights) == steps
    initial, saved = rec.calls[0]["params"], checkpoint(tmp_path, steps)["ema"]
    for name, value in ema.named_parameters():
        expected = decay**steps * initial[name]
        for j, weights in enumerate(rec.weights, start=1):
            expected = expected + (1 - decay) * decay ** (steps - j) * weights[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=f"ema {name}")
        assert torch.equal(saved[name], value)
    name = "final_layer.linear.weight"  # zero at init: the average is neither the start nor the end
    assert (ema.get_parameter(name) - model.get_parameter(name)).abs().max() > 1e-4
    assert ema.get_parameter(name).abs().max() > 1e-4


def test_a_nonfinite_step_leaves_model_ema_and_optimizer_unchanged(demo_data, tmp_path, recorder):
    # A skipped step is decided on the device (no sync): it counts as a step (its batch is consumed, the step
    # counter advances) but changes nothing: weights, AdamW moments and step count, EMA.
    rec = recorder(poison={2})  # the third micro-step's loss is NaN
    run(tiny_argv(demo_data, tmp_path, ema_decay=0.8, max_train_steps=4, checkpointing_steps=4))
    assert len(rec.calls) == 4 and len(rec.weights) == 4 and rec.ema_updates == 4
    before, after = rec.calls[2], rec.calls[3]
    for key in ("params", "ema", "opt"):
        assert_same_state(after[key], before[key], f"{key} after the non-finite step")
    assert not torch.equal(rec.calls[1]["ema"]["final_layer.linear.weight"], before["ema"]["final_layer.linear.weight"])
    ckpt = checkpoint(tmp_path, 4)
    assert ckpt["nonfinite_steps"] == 1 and ckpt["data_position"] == 16  # the skipped batch is consumed
    assert ckpt["opt"]["state"][0]["step"] == 3  # AdamW's own count (bias correction) skips it too
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [s["nonfinite_steps"] for s in stats] == [0, 0, 1, 1] and stats[2]["grad_norm"] == 0


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_previews_are_sampled_from_the_ema_with_fixed_noise(demo_data, tmp_path, recorder, cfg_scale):
    rec = recorder()
    argv = tiny_argv(demo_data, tmp_path, max_train_steps=3, sampling_steps=3, ema_decay=0.5, preview_num_steps=2)
    model, ema = run(argv + ["--preview-cfg-scale", str(cfg_scale)])
    (preview,) = rec.previews
    noise = torch.randn((16, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % NUM_CLASSES
    sample = lambda net, scale: samplers.euler_sampler(net, noise, labels, num_steps=2, heun=True, cfg_scale=scale)
    expected = sample(ema, cfg_scale)
    torch.testing.assert_close(preview["out"], expected, rtol=0, atol=1e-6)
    # The test can tell: the raw weights (or no guidance) sample something else.
    assert (sample(copy.deepcopy(model).eval(), cfg_scale) - expected).abs().max() > 1e-3
    if cfg_scale > 1:
        assert (sample(ema, 1.0) - expected).abs().max() > 1e-4
    png = np.asarray(PIL.Image.open(tmp_path / "run" / "samples" / "0000003.png")).astype(int)
    assert np.abs(png - grid_png(((expected + 1) / 2).clamp(0, 1), tmp_path / "expected.png")).max() <= 1


#################################################################################
#                                Labels, DiT                                    #
#################################################################################


@pytest.mark.parametrize("legacy", [False, True])
def test_legacy_drops_labels_in_the_loop_and_again_in_the_model(demo_data, tmp_path, recorder, legacy):
    p, batch = 0.5, NUM_ITEMS
    rec = recorder()
    argv = tiny_argv(demo_data, tmp_path, enc_type="none", cfg_prob=p, batch_size=batch, max_train_steps=3)
    run(argv + ["--legacy", str(legacy), "--checkpointing-steps", "3"])
    embedded = []
    for k, (call, (_, _, x, labels)) in enumerate(zip(rec.calls, rec.batches)):
        generator = step_generator(0, batch * k)
        if legacy:  # the loop's drop is the first draw of the micro-step
            labels = torch.where(torch.rand(batch, generator=generator) < p, NUM_CLASSES, labels)
        assert torch.equal(call["y"], labels), f"micro-step {k}: labels reaching the loss"
        torch.rand(batch, generator=generator), torch.randn(x.shape, generator=generator)  # t and noise
        model_drop = torch.rand(batch, generator=generator) < p
        assert torch.equal(call["y_model"], torch.where(model_drop, NUM_CLASSES, labels)), f"micro-step {k}"
        embedded.append(call["y_model"])
    rate = (torch.cat(embedded) == NUM_CLASSES).float().mean().item()
    expected = 1 - (1 - p) ** 2 if legacy else p  # 0.75 or 0.5; 72 labels: binomial sd <= 0.06
    assert abs(rate - expected) < 0.12, rate


def test_dit_with_repa_trains_its_projectors_and_previews_from_the_ema(demo_data, tmp_path, recorder):
    rec = recorder()
    argv = tiny_argv(demo_data, tmp_path, model="DiT-S/8", proj_coeff=0.7, max_train_steps=2, sampling_steps=2)
    model, ema = run(argv + ["--preview-num-steps", "2", "--ema-decay", "0.5"])
    initial = rec.calls[0]["params"]
    projector = [name for name in initial if name.startswith("projectors.0.")]
    assert len(projector) == 6  # three linear layers
    for name in projector:
        assert not torch.equal(model.get_parameter(name), initial[name]), f"{name} did not train"
    for call in rec.calls:
        assert len(call["zs"]) == 1 and call["proj"] != 0
        assert call["total"] == pytest.approx(call["denoising"].mean().item() + 0.7 * call["proj"])
    (preview,) = rec.previews
    noise = torch.randn((16, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    expected = ddim_sampler(ema, noise, torch.arange(16) % NUM_CLASSES, num_steps=2, cfg_scale=1.0)
    assert preview["sampler"] == "ddim_sampler"
    torch.testing.assert_close(preview["out"], expected, rtol=0, atol=1e-6)


#################################################################################
#                       Options, each shown to take effect                      #
#################################################################################


def test_lognormal_times_and_the_cosine_path_reach_the_loss(demo_data, tmp_path, recorder):
    rec = recorder()
    run(tiny_argv(demo_data, tmp_path, weighting="lognormal", path_type="cosine", max_train_steps=2))
    for k, (call, (_, _, x, _)) in enumerate(zip(rec.calls, rec.batches)):
        generator = generator_from(call["rng"])
        sigma = torch.randn(4, generator=generator).exp()  # sigma = exp(n), n ~ N(0, 1)
        t = 2 / math.pi * torch.atan(sigma)  # the time at which the cosine path has that noise-to-signal ratio
        noise = torch.randn(x.shape, generator=generator)
        torch.testing.assert_close(call["t"], t, msg=f"micro-step {k}: times")
        angle = (math.pi / 2 * t).view(-1, 1, 1, 1)
        torch.testing.assert_close(call["x_t"], angle.cos() * x + angle.sin() * noise, msg=f"micro-step {k}: x_t")


def test_cache_targets_changes_speed_not_results(demo_data, tmp_path, recorder):
    # 4 steps of 8 = 32 draws from 24 items: the second epoch starts, and cached items are not re-encoded.
    results = {}
    for cache in (False, True):
        rec = recorder()
        out = tmp_path / str(cache)
        run(tiny_argv(demo_data, out, batch_size=8, max_train_steps=4, checkpointing_steps=4, cache_targets=cache))
        results[cache] = rec.encoded, checkpoint(out, 4)["model"], rec.calls
    assert results[False][0] == 32 and results[True][0] == NUM_ITEMS
    for name, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], value, rtol=1e-4, atol=1e-6, msg=name)
    for uncached, cached in zip(results[False][2], results[True][2]):
        torch.testing.assert_close(cached["zs"][0], uncached["zs"][0], rtol=1e-4, atol=1e-5)


def test_hflip_feeds_mirrored_items(demo_data, tmp_path, recorder):
    rec = recorder()
    run(tiny_argv(demo_data, tmp_path, hflip=True, batch_size=8, max_train_steps=3, checkpointing_steps=3))
    plain = ImageLatentDataset(demo_data, latents=False)
    mirrored = 0
    for k, (call, (indices, images, _, labels)) in enumerate(zip(rec.calls, rec.batches)):
        # 2 x 24 items: index i + 24 is the mirror of item i, drawn from the doubled stream.
        assert indices.tolist() == data_order(2 * NUM_ITEMS, 0, range(8 * k, 8 * k + 8))
        for row, index in enumerate(indices.tolist()):
            image, _, label = plain[index % NUM_ITEMS]
            if index >= NUM_ITEMS:
                image, mirrored = image.flip(-1), mirrored + 1
            assert torch.equal(images[row], image) and labels[row] == label
            assert torch.equal(call["x"][row], image.float() / 127.5 - 1)
    assert mirrored >= 4


def test_bf16_runs_model_and_encoder_in_bfloat16(demo_data, tmp_path, recorder):
    rec = recorder()
    model, _ = run(tiny_argv(demo_data, tmp_path, mixed_precision="bf16", max_train_steps=2, checkpointing_steps=2))
    assert [c["compute_dtype"] for c in rec.calls] == [torch.bfloat16] * 2
    assert rec.encoder_dtypes == [torch.bfloat16] * 2  # the encoder runs in the training precision too
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert len(rec.weights) == 2 and all(math.isfinite(c["total"]) for c in rec.calls)


def test_fp16_loss_scaler_state_is_saved_and_restored(demo_data, tmp_path, recorder, monkeypatch):
    # On the CPU, accelerate ignores --mixed-precision fp16 (no autocast, no GradScaler: plain fp32). This test
    # gives the Accelerator what it has on CUDA (fp16 autocast and a GradScaler, here on the CPU) to check that
    # the loop saves the scaler in the checkpoint and restores it on resume. The scale doubles after each step.
    current = {}

    class CpuFp16Accelerator(train.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            assert self.mixed_precision == "fp16" and self.scaler is None  # what accelerate does on the CPU
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
            current["recorder"].accelerator = self

    monkeypatch.setattr(train, "Accelerator", CpuFp16Accelerator)
    argv = tiny_argv(demo_data, tmp_path, mixed_precision="fp16", max_train_steps=4, checkpointing_steps=2)
    straight = current["recorder"] = recorder()
    run(argv)
    assert [c["compute_dtype"] for c in straight.calls] == [torch.float16] * 4
    assert [c["scale"] for c in straight.calls] == [2.0**10, 2.0**11, 2.0**12, 2.0**13]
    assert checkpoint(tmp_path, 2)["scaler"]["scale"] == 2.0**12
    final = checkpoint(tmp_path, 4)

    resumed = current["recorder"] = recorder()
    run(argv + ["--resume-step", "2"])
    assert [c["scale"] for c in resumed.calls] == [2.0**12, 2.0**13]  # restored, not the initial 2^10
    again = checkpoint(tmp_path, 4)
    for key in ("model", "ema", "opt", "scaler"):
        assert_same_state(again[key], final[key], key)


def test_several_encoders_get_one_projector_each(demo_data, tmp_path, recorder):
    rec = recorder()
    model, _ = run(tiny_argv(demo_data, tmp_path, enc_type="dinov2-vit-s,mocov3-vit-s", max_train_steps=2))
    assert [enc.spec.name for enc in rec.encoders] == ["dinov2-vit-s", "mocov3-vit-s"]
    assert len(model.projectors) == 2
    initial = rec.calls[0]["params"]
    for call, (_, images, _, _) in zip(rec.calls, rec.batches):
        assert len(call["zs"]) == 2 and not torch.allclose(call["zs"][0], call["zs"][1])
        for target, encoder in zip(call["zs"], rec.encoders):
            torch.testing.assert_close(target, encoder.encode(images))
    for k in range(2):
        name = f"projectors.{k}.4.weight"
        assert not torch.equal(model.get_parameter(name), initial[name]), f"projector {k} did not train"
    assert {f"projectors.{k}.0.weight" for k in range(2)} <= set(checkpoint(tmp_path, 2)["model"])


@pytest.mark.parametrize("vanilla", [dict(proj_coeff=0), dict(enc_type="none")])
def test_a_vanilla_run_has_no_encoder_and_no_projector(demo_data, tmp_path, recorder, vanilla):
    rec = recorder()
    model, _ = run(tiny_argv(demo_data, tmp_path, max_train_steps=2, checkpointing_steps=2, **vanilla))
    assert rec.encoders == [] and rec.encoded == 0 and len(model.projectors) == 0
    assert all(c["zs"] == [] and c["proj"] == 0 for c in rec.calls) and len(rec.weights) == 2
    assert not any(k.startswith("projectors.") for k in checkpoint(tmp_path, 2)["model"])


def test_qk_norm_adds_trained_norms(demo_data, tmp_path, recorder):
    rec = recorder()
    model, _ = run(tiny_argv(demo_data, tmp_path, qk_norm=True, max_train_steps=3, checkpointing_steps=3))
    keys = checkpoint(tmp_path, 3)["model"]
    for block in range(3):
        for norm in ("q_norm", "k_norm"):
            name = f"blocks.{block}.attn.{norm}.weight"
            assert name in keys and torch.equal(rec.calls[0]["params"][name], torch.ones(32))
    # adaLN-Zero gates are zero at first, so the norms get gradients from the second step on.
    assert not torch.equal(model.get_parameter("blocks.0.attn.q_norm.weight"), torch.ones(32))


#################################################################################
#               --target-cache: encoder tokens from dataset_tools.py            #
#################################################################################


@pytest.fixture(scope="module")
def target_caches(demo_data, tmp_path_factory):
    """encode-targets on the demo set for tiny_argv's encoder (random DINOv2-S, --seed 0, SiT-S/8 at 32 px ->
    4x4 tokens = encoder resolution 64): fp32 with flips (exact targets), and fp16 without."""
    from preprocessing import dataset_tools

    root = tmp_path_factory.mktemp("targets")
    common = [f"--source={demo_data / 'images'}", "--enc-type=dinov2-vit-s", "--enc-weights=random"]
    common += ["--enc-resolution=64", "--workers=0", "--batch-size=10"]
    dataset_tools.main(["encode-targets", *common, f"--dest={root / 'fp32-flip'}", "--dtype=fp32", "--flip"])
    dataset_tools.main(["encode-targets", *common, f"--dest={root / 'fp16'}", "--dtype=fp16"])
    return {"fp32-flip": root / "fp32-flip", "fp16": root / "fp16"}


def test_target_cache_feeds_the_stored_tokens_and_trains_like_the_encoder(demo_data, tmp_path, recorder, target_caches):
    from preprocessing.target_cache import DiskTargetCache

    cache = DiskTargetCache(target_caches["fp32-flip"])
    common = dict(hflip=True, batch_size=8, max_train_steps=3, checkpointing_steps=3, proj_coeff=0.7)
    runs = {}
    for name, extra in (("encoder", {}), ("cache", dict(target_cache=target_caches["fp32-flip"]))):
        rec = recorder()
        run(tiny_argv(demo_data, tmp_path / name, **common, **extra))
        runs[name] = rec, checkpoint(tmp_path / name, 3)
    (encoder,) = runs["encoder"][0].encoders
    cached, uncached = runs["cache"][0], runs["encoder"][0]
    assert cached.encoded == 0 and uncached.encoded == 24  # with the cache, the encoder never runs
    mirrored = 0
    for k, (call, batch) in enumerate(zip(cached.calls, cached.batches)):
        indices, images = batch[0], batch[1]
        assert len(batch) == 5 and indices.tolist() == data_order(2 * NUM_ITEMS, 0, range(8 * k, 8 * k + 8))
        # Exactly the stored rows (index 24 + i: the flipped image's tokens), as fp32 ...
        assert torch.equal(call["zs"][0], torch.stack([cache[i][0] for i in indices.tolist()]))
        # ... which are the encoder's tokens of the images the loop drew, mirrored ones included.
        torch.testing.assert_close(call["zs"][0], encoder.encode(images), rtol=1e-5, atol=1e-5)
        mirrored += int((indices >= NUM_ITEMS).sum())
        # The same draws and the same losses as the run that runs the encoder.
        other = uncached.calls[k]
        assert torch.equal(call["x_t"], other["x_t"]) and torch.equal(call["t"], other["t"])
        assert call["total"] == pytest.approx(other["total"], rel=1e-5, abs=1e-6)
        assert call["proj"] == pytest.approx(other["proj"], rel=1e-5, abs=1e-6) and call["proj"] != 0
    assert mirrored >= 4
    for name, value in runs["encoder"][1]["model"].items():
        torch.testing.assert_close(runs["cache"][1]["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_resume_is_bit_exact_with_the_target_cache(demo_data, tmp_path, recorder, target_caches):
    argv = tiny_argv(demo_data, tmp_path, max_train_steps=4, checkpointing_steps=2, target_cache=target_caches["fp16"])
    straight = recorder()
    run(argv)
    final = checkpoint(tmp_path, 4)
    assert straight.encoded == 0 and all(z.dtype == torch.float32 for c in straight.calls for z in c["zs"])
    resumed = recorder()
    run(tiny_argv(demo_data, tmp_path, max_train_steps=4, checkpointing_steps=2, target_cache=target_caches["fp16"], exp_name="other", resume=tmp_path / "run" / "checkpoints" / "0000002.pt"))  # fmt: skip
    for a, b in zip(resumed.calls, straight.calls[2:]):
        assert all(torch.equal(u, v) for u, v in zip(a["zs"], b["zs"]))
    other = checkpoint(tmp_path, 4, "other")
    for key in ("model", "ema", "opt"):
        assert_same_state(other[key], final[key], key)


@pytest.fixture(scope="module")
def smaller_demo(tmp_path_factory):
    """The demo set with 5 instead of 6 images per class: 20 items."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("smaller") / "demo"
    cmd = [sys.executable, "-m", "demo", "data", "--out", str(out), "--per-class", "5"]
    subprocess.run(
        [*cmd, "--num-classes", "4", "--resolution", "32"], cwd=train.Path(train.__file__).parent, check=True
    )
    return out


# Each refusal names the manifest (the file) and the key that differs, except the two config conflicts.
@pytest.mark.parametrize(
    "overrides, error",
    [
        (dict(enc_type="mocov3-vit-s"), r"manifest.json: encoders \['dinov2-vit-s'\] but this run uses --enc-type mocov3-vit-s"),
        (dict(model="SiT-S/4"), r"manifest.json: encoders\[0\] \(dinov2-vit-s\) key 'resolution' is 64, this run needs 128"),
        (dict(hflip=True), r"manifest.json: key 'flip' is false, but this run flips \(--hflip\)"),
        (dict(seed=1), r"manifest.json: .* key 'weights_sha256' is '[0-9a-f]+', this run needs '[0-9a-f]+': other weights"),
        ("smaller data", r"manifest.json: dataset key 'items' is 24, but --data-dir .* has 20"),
        ("no manifest", r"manifest.json is missing: .* is not a finished target cache"),
        (dict(proj_coeff=0), r"--target-cache .* given, but this run has no encoder"),
        (dict(cache_targets=True), r"'target_cache' .* and 'cache_targets': choose one"),
    ],
)  # fmt: skip
def test_a_mismatched_target_cache_is_refused(demo_data, smaller_demo, tmp_path, target_caches, overrides, error):
    data, path = demo_data, target_caches["fp16"]
    if overrides == "smaller data":
        data = smaller_demo
    elif overrides == "no manifest":
        path = tmp_path / "unfinished"
        shutil.copytree(target_caches["fp16"], path)
        (path / "manifest.json").unlink()
    overrides = overrides if isinstance(overrides, dict) else {}
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        run(tiny_argv(data, tmp_path, target_cache=path, **overrides))


def test_a_cache_with_flips_serves_a_run_without(demo_data, tmp_path, recorder, target_caches):
    from preprocessing.target_cache import DiskTargetCache

    cache = DiskTargetCache(target_caches["fp32-flip"])
    rec = recorder()
    run(tiny_argv(demo_data, tmp_path, target_cache=cache.root, max_train_steps=2, checkpointing_steps=2))
    for call, (indices, *_) in zip(rec.calls, rec.batches):
        assert (indices < NUM_ITEMS).all()
        assert torch.equal(call["zs"][0], torch.stack([cache[i][0] for i in indices.tolist()]))
