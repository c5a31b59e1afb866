"""demo/domain.py: the demo domain's REPA target and evaluator, and the demo's verdict on a run."""

import json
from pathlib import Path

import pytest
import torch

from checkpoints import save_checkpoint
from demo import domain as demo_domain
from demo.data import make_demo_data
from models.encoders import load_encoders
from models.sit import SiT_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Both networks trained for one epoch on 20 images per class (fast; weak, which these tests allow)."""
    out = tmp_path_factory.mktemp("nets")
    demo_domain.train_nets(out, 16, 4, 1, 1, per_class=20, evaluator_per_class=30, heldout_per_class=10)
    return out


def test_nets_are_written_once_with_their_record(nets):
    record = json.loads((nets / "nets.json").read_text())
    assert record["resolution"] == 16 and record["grid"] == 4 and record["split_seeds"] == demo_domain.SPLIT_SEEDS
    assert record["encoder"]["enc_type"] == "timm:vit_tiny_patch16_224" and record["encoder"]["train_images"] == 200
    assert record["evaluator"]["train_images"] == 300 and record["heldout_images"] == 100
    assert 0 <= record["encoder"]["heldout_linear_probe_accuracy"] <= 1
    assert 0 <= record["evaluator"]["heldout_accuracy"] <= 1
    mtimes = {f: (nets / f).stat().st_mtime_ns for f in ("encoder.pt", "evaluator.pt")}
    demo_domain.train_nets(nets, 16, 4, 1, 1, per_class=20, evaluator_per_class=30, heldout_per_class=10)
    assert {f: (nets / f).stat().st_mtime_ns for f in mtimes} == mtimes  # reused, not retrained


def test_the_encoder_is_a_registry_target_at_the_sit_grid(nets):
    (enc,) = load_encoders("timm:vit_tiny_patch16_224", "cpu", 16 * 4, ckpt_path=str(nets / "encoder.pt"))
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    assert enc.encode(images).shape == (3, 16, 128)  # 4x4 patch tokens of the 128-wide ViT


def test_the_splits_are_disjoint_sets_from_their_own_seeds(tmp_path):
    folders = demo_domain.make_splits(tmp_path, 16, {"encoder": 3, "heldout": 3})
    a, _ = demo_domain.load_images(folders["encoder"])
    b, _ = demo_domain.load_images(folders["heldout"])
    assert a.shape == b.shape == (30, 3, 16, 16) and not any(torch.equal(x, y) for x in a for y in b)


def tiny_checkpoint(path, resolution=16):
    kwargs = dict(depth=2, hidden_size=32, num_heads=2, input_size=resolution, in_channels=3, num_classes=10)
    kwargs |= dict(class_dropout_prob=0.1, z_dims=[], encoder_depth=1, projector_dim=32)
    torch.manual_seed(0)
    state = SiT_models["SiT-S/4"](**kwargs).state_dict()
    config = {"model": "SiT-S/4", "pixel_space": True, "path_type": "linear", "enc_type": "none"}
    save_checkpoint({"model": state, "ema": state, "steps": 7, "config": config, "model_kwargs": kwargs}, path)


def test_evaluate_prints_the_verdict_and_writes_json_and_grid(nets, tmp_path, capsys):
    tiny_checkpoint(tmp_path / "run" / "checkpoints" / "0000007.pt")
    argv = ["evaluate", "--ckpt", str(tmp_path / "run" / "checkpoints" / "0000007.pt"), "--nets", str(nets)]
    demo_domain.main(argv + ["--num-samples", "20", "--num-steps", "2", "--cfg-scale", "2"])
    result = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert result["step"] == 7 and result["num_samples"] == 20 and result["sampler"] == "Heun ODE, 2 steps, CFG 2.0"
    assert 0 <= result["label_accuracy"] <= 1 and len(result["per_class_accuracy"]) == 10
    assert result["fd"] > 0 and result["real_vs_real_fd"] >= 0
    assert (tmp_path / "run" / "evaluation_samples.png").stat().st_size > 0
    assert "samples are classified as their label by the independent evaluator" in capsys.readouterr().out


def test_generate_samples_reg_models_jointly_from_the_same_image_noise():
    """A REG model's samples integrate the class token with the image (REG's sampler); its noise is drawn
    after the image noise, so REG and other models start from the same images' noise."""
    from samplers import euler_sampler

    kwargs = dict(depth=2, hidden_size=32, num_heads=2, input_size=16, in_channels=3, num_classes=10, z_dims=[])
    torch.manual_seed(0)
    reg = SiT_models["SiT-S/4"](**kwargs, cls_token_dim=6).eval()
    with torch.no_grad():
        for p in reg.parameters():
            p.normal_(0, 0.05)
    samples, labels = demo_domain.generate(reg, 12, 3, seed=4, batch_size=5)
    g = torch.Generator().manual_seed(4)
    noise, cls_noise = torch.randn((12, 3, 16, 16), generator=g), torch.randn((12, 6), generator=g)
    x = euler_sampler(reg, noise, labels, num_steps=3, heun=True, cls_latents=cls_noise)
    assert torch.equal(samples, ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    assert torch.equal(labels, torch.arange(12) % 10)


def test_evaluate_refuses_a_model_of_another_resolution(nets, tmp_path):
    tiny_checkpoint(tmp_path / "0000007.pt", resolution=32)
    with pytest.raises(ValueError, match="a 32 px model, but the evaluator .* judges 16 px"):
        demo_domain.judge(tmp_path / "0000007.pt", nets, 20, 2, 1.0, 0)


def test_make_demo_data_keeps_a_set_with_the_same_settings(tmp_path):
    assert make_demo_data(str(tmp_path / "d"), per_class=2, resolution=16, seed=3) == 20
    first = (tmp_path / "d" / "images" / "dataset.json").stat().st_mtime_ns
    assert make_demo_data(str(tmp_path / "d"), per_class=2, resolution=16, seed=3) == 20
    assert (tmp_path / "d" / "images" / "dataset.json").stat().st_mtime_ns == first
    make_demo_data(str(tmp_path / "d"), per_class=2, resolution=16, seed=4)  # other settings: made anew
    assert json.loads((tmp_path / "d" / "images" / "dataset.json").read_text())["demo"]["seed"] == 4


def test_the_committed_networks_are_what_nets_json_says(tmp_path):
    """demo/nets (the demo's REPA target and judge): they load through the same paths as a run and
    the evaluator still classifies freshly generated images (another seed) about as well as recorded."""
    nets = Path(__file__).resolve().parents[1] / "demo" / "nets"
    record = json.loads((nets / "nets.json").read_text())
    assert record["resolution"] == 16 and record["grid"] == 4
    assert record["evaluator"]["heldout_accuracy"] > 0.9 and record["encoder"]["heldout_linear_probe_accuracy"] > 0.7
    (enc,) = load_encoders(record["encoder"]["enc_type"], "cpu", 16 * 4, ckpt_path=str(nets / "encoder.pt"))
    make_demo_data(str(tmp_path / "fresh"), per_class=30, resolution=16, seed=999)
    images, labels = demo_domain.load_images(tmp_path / "fresh")
    assert enc.encode(images[:2]).shape == (2, 16, 128)
    evaluator = demo_domain.load_evaluator(nets / "evaluator.pt")
    assert demo_domain.accuracy(evaluator, lambda m, x: m(x), images, labels) > 0.85
