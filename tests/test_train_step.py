"""training.TrainStep's speed-related parts: torch.compile without graph breaks and with eager results, the fused
AdamW, and skipped steps decided on the device. Tiny models, CPU; the compile tests need a C++ compiler."""

import pytest
import torch

import training
from config import TrainConfig
from loss import REPALoss
from models.encoders import load_encoders
from models.sit import SiT

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CAN_COMPILE, COMPILER = training.compile_available(torch.device("cpu"))
needs_compiler = pytest.mark.skipif(not CAN_COMPILE, reason=f"torch.compile unavailable: {COMPILER}")


def tiny_sit(z_dims=(32,)):
    torch.manual_seed(0)
    model = SiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=4,
        z_dims=list(z_dims), encoder_depth=1, projector_dim=32,
    )  # fmt: skip
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # a non-zero output, as after training
    return model


def batch(n=4):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 8, 8, generator=generator)
    y = torch.randint(0, 4, (n,), generator=generator)
    zs = [torch.randn(n, 16, 32, generator=generator)]
    return x, y, zs


@needs_compiler
def test_the_steady_state_step_has_no_graph_breaks():
    model = tiny_sit().train()
    x, y, _ = batch()
    t = torch.rand(4)
    explained = torch._dynamo.explain(model)(x, t, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    # The frozen encoder's forward, compiled too: uint8 images in, tokens out, one graph.
    (encoder,) = load_encoders("dinov2-vit-s", torch.device("cpu"), 32, enc_weights="random")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    explained = torch._dynamo.explain(encoder.encode)(images)
    assert explained.graph_break_count == 0, explained.break_reasons


@needs_compiler
def test_compiled_and_eager_steps_give_the_same_loss_and_gradients():
    results = []
    for compiled in (False, True):
        model = tiny_sit().train()
        step_model, _, used, _ = training.compile_step(model, [], compiled, torch.device("cpu"), cpu=True)
        assert used == compiled
        x, y, zs = batch()
        torch.manual_seed(3)  # t, noise and the model's label dropout (eager draws under compile too)
        terms = REPALoss(proj_coeff=0.5)(step_model, x, y, zs)
        terms.total.backward()
        results.append((terms, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    (eager, eager_grads), (comp, comp_grads) = results
    torch.testing.assert_close(comp.denoising, eager.denoising, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp.proj, eager.proj, rtol=1e-5, atol=1e-6)
    assert eager_grads.keys() == comp_grads.keys() and len(eager_grads) > 10
    for name, grad in eager_grads.items():
        torch.testing.assert_close(comp_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_is_cuda_only_by_default():
    # --compile true (the default) leaves a CPU run eager unless --compile-cpu true: measured no faster there.
    model = tiny_sit()
    assert TrainConfig().compile and not TrainConfig().compile_cpu
    step_model, _, used, note = training.compile_step(model, [], True, torch.device("cpu"))
    assert step_model is model and not used and "--compile-cpu" in note


def test_adamw_is_fused_on_the_cpu_and_a_skip_changes_nothing():
    cfg = TrainConfig(learning_rate=0.1)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = training.make_optimizer(cfg, [param], torch.device("cpu"))
    assert optimizer.defaults["fused"]
    param.grad = torch.ones(3)
    optimizer.step()
    state = {k: v.clone() for k, v in optimizer.state[param].items()}
    weights = param.detach().clone()
    # A non-finite gradient with found_inf = 1: the fused kernel leaves weights, moments and the count alone.
    param.grad = torch.full((3,), float("nan"))
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    assert torch.equal(param.detach(), weights)
    for key, value in optimizer.state[param].items():
        assert torch.equal(value, state[key]), key


def test_ema_update_with_a_device_flag():
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    training.update_ema(ema, model, 0.9, apply=torch.tensor(False))
    assert all(torch.equal(p, b) for p, b in zip(ema.parameters(), before))
    training.update_ema(ema, model, 0.9, apply=torch.tensor(True))
    for p, b, m in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(p, 0.9 * b + 0.1 * m, rtol=0, atol=1e-7)
