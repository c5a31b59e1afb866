"""Text-to-image end to end: text encoder, COCO preprocessing and layout, captioned data, caption dropout,
MMDiT + REPA training with exact resume, sampling from captions and prompts, and FID against val images.

Everything runs on the CPU with random weights (text encoder, DINOv2-S target, VAE, Inception): the checks are
about the data flow and its determinism; the expected values are computed here from the documented rules.
"""

import argparse
import json
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import sample_ddp
import training
from checkpoints import load_checkpoint, save_checkpoint
from dataset import CaptionedDataset, ResumableSampler, caption_choice
from demo.data import make_captioned_demo_data
from evaluations import protocol
from models.text_encoder import MAX_LENGTH, HashTokenizer, TextEncoderNotFoundError, load_text_encoder
from models.vae import encode_mean_logvar
from preprocessing import dataset_tools, layout
from tests.test_train import run_train

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore:RANDOM")]
WIDTH = 16  # token width of the random text encoder in these tests


def random_encoder():
    return load_text_encoder(weights="random", width=WIDTH)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """The captioned demo set: 3 classes x 4 train images, 3 x 2 val images, 32 px, 2 captions each."""
    out = tmp_path_factory.mktemp("t2i") / "demo_t2i"
    make_captioned_demo_data(str(out), per_class=4, val_per_class=2, num_classes=3, resolution=32, text_width=WIDTH)
    return out


def t2i_argv(data_dir, out_dir, **overrides):
    options = dict(
        model="MMDiT-d15/8", depth=2, encoder_depth=1, projector_dim=32, data_dir=data_dir, resolution=32,
        pixel_space=True, enc_type="dinov2-vit-s", enc_weights="random", batch_size=4, max_train_steps=4,
        checkpointing_steps=2, sampling_steps=0, log_every=1, num_workers=0, mixed_precision="no",
        output_dir=out_dir, exp_name="run", learning_rate=1e-3, keep_last=0,
    )  # fmt: skip
    options.update(overrides)
    return [arg for k, v in options.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


#################################################################################
#                                Text encoder                                   #
#################################################################################


def test_random_text_encoder_is_deterministic_and_shaped_like_clip():
    a, b = random_encoder(), random_encoder()
    tokens = a.encode(["a red disk on a blue background", "", "x " * 200])
    assert tokens.shape == (3, MAX_LENGTH, WIDTH) and tokens.dtype == torch.float32
    torch.testing.assert_close(b.encode(["a red disk on a blue background"]), tokens[:1], rtol=0, atol=0)
    assert not torch.allclose(tokens[0, 1:], tokens[1, 1:])  # the caption changes the tokens after the first
    ids = HashTokenizer()(["Red  disk", "x " * 200])
    assert ids.shape == (2, MAX_LENGTH)
    assert ids[0, 0] == ids[1, 0] == 4094 and (ids[0, 3:] == 4095).all()  # begin, 2 words, end + end padding
    assert ids[0, 1] == HashTokenizer()(["red"])[0, 1]  # lower-cased
    assert ids[1, -1] == 4095 and (ids[1, 1:-1] == ids[1, 1]).all()  # truncated to 77 with the end token last


def test_pretrained_text_encoder_loads_from_a_local_folder_and_pads_like_clip(tmp_path):
    """A tiny CLIP text model + BPE tokenizer saved like the hub's files: the real loading path, offline."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)  # fmt: skip
    CLIPTextModel(config).save_pretrained(tmp_path)
    encoder = load_text_encoder(str(tmp_path))
    assert encoder.weights_source == "pretrained" and encoder.width == 24
    tokens = encoder.encode(["ab c", ""])
    # U-ViT's FrozenCLIPEmbedder: [begin, a, b</w>, c</w>, end, end, ...] (77, padded with the end token), no mask.
    ids = torch.full((2, 77), 1)
    ids[:, 0] = 0
    ids[0, 1:4] = torch.tensor([vocab["a"], vocab["b</w>"], vocab["c</w>"]])
    expected = CLIPTextModel.from_pretrained(tmp_path).eval()(input_ids=ids).last_hidden_state
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


def test_missing_text_encoder_names_what_to_fetch(tmp_path):
    with pytest.raises(TextEncoderNotFoundError, match="no such folder"):
        load_text_encoder(str(tmp_path / "nothing"))
    with pytest.raises(TextEncoderNotFoundError, match=r"(?s)openai/clip-vit-large-patch14.*fetch it once"):
        load_text_encoder("openai/clip-vit-large-patch14")  # HF_HUB_OFFLINE=1 in the tests, nothing cached


#################################################################################
#                          COCO preprocessing and layout                        #
#################################################################################


def fake_coco(root):
    """COCO 2014 in miniature: 3 images per split in shuffled id order with 2-3 captions, and one broken file."""
    rng = np.random.default_rng(0)
    for folder in ("train2014", "val2014"):
        (root / folder).mkdir(parents=True)
        (root / "annotations").mkdir(exist_ok=True)
        images, anns = [], []
        for j, image_id in enumerate([42, 7, 19]):
            name = f"COCO_{folder}_{image_id:012d}.jpg"
            PIL.Image.fromarray(rng.integers(0, 256, (40 + 6 * j, 56, 3), dtype=np.uint8)).save(root / folder / name)
            images.append({"id": image_id, "file_name": name})
        for k in range(3):  # interleaved, so annotation order within an image differs from file order
            for j, image_id in enumerate([42, 7, 19]):
                if k < 2 + (j == 0):
                    anns.append({"id": len(anns), "image_id": image_id, "caption": f"photo {k} of {image_id}"})
        (root / folder / "broken.jpg").write_bytes(b"not a jpeg")
        images.append({"id": 99, "file_name": "broken.jpg"})
        anns.append({"id": 99, "image_id": 99, "caption": "broken"})
        (root / "annotations" / f"captions_{folder}.json").write_text(
            json.dumps({"images": images, "annotations": anns})
        )
    return root


def official_reader_counts(folder):
    """The official MSCOCOFeatureDataset's bookkeeping (get_feature_dir_info), restated: items = #*.npy minus
    #*_*.npy, captions per item from the {i}_{k}.npy names; item i reads {i}.png, {i}.npy, {i}_{k}.npy."""
    names = os.listdir(folder)
    npy = [n for n in names if n.endswith(".npy")]
    with_caption = [n for n in npy if "_" in n]
    counts = {}
    for n in with_caption:
        i = int(n[:-4].split("_")[0])
        counts[i] = counts.get(i, 0) + 1
    return len(npy) - len(with_caption), counts


def test_coco_command_writes_the_official_layout_and_resumes(tmp_path, tiny_vae):
    vae_path, vae = tiny_vae
    source, dest = fake_coco(tmp_path / "coco"), tmp_path / "features"
    argv = ["coco", f"--source={source}", f"--dest={dest}", "--resolution=32", f"--vae={vae_path}", "--workers=0",
            "--text-encoder-weights=random", f"--text-width={WIDTH}"]  # fmt: skip
    dataset_tools.main(argv)
    encoder = random_encoder()
    empty = np.load(dest / layout.EMPTY_CONTEXT)
    np.testing.assert_allclose(empty, encoder.encode([""])[0].numpy(), rtol=0, atol=1e-6)
    for split, folder in (("train", "train2014"), ("val", "val2014")):
        out = dest / split
        # Items in order of COCO image id (7, 19, 42, 99); the broken image 99 is item 3: a reported gap.
        report = json.loads((out / "report.json").read_text())
        assert [f["index"] for f in report["failed"]] == [3] and report["kept"] == 3
        assert official_reader_counts(out) == (3, {0: 2, 1: 2, 2: 3})
        listing = json.loads((out / layout.CAPTIONS_JSON).read_text())
        assert listing["image_ids"] == [7, 19, 42, 99]
        assert listing["captions"][2] == ["photo 0 of 42", "photo 1 of 42", "photo 2 of 42"]  # annotation order
        for i, image_id in enumerate([7, 19, 42]):
            # U-ViT's crop written out: the largest centred square, one LANCZOS resize to 32 px.
            with PIL.Image.open(source / folder / f"COCO_{folder}_{image_id:012d}.jpg") as image:
                w, h = image.size
                side = min(w, h)
                box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
                crop = np.asarray(image.convert("RGB").crop(box).resize((32, 32), PIL.Image.LANCZOS))
            assert np.array_equal(np.asarray(PIL.Image.open(out / f"{i}.png")), crop)
            moments = encode_mean_logvar(vae, torch.from_numpy(crop.transpose(2, 0, 1).copy())[None])[0]
            np.testing.assert_allclose(np.load(out / f"{i}.npy"), moments.numpy(), rtol=1e-5, atol=1e-5)
            tokens = encoder.encode(listing["captions"][i]).numpy()
            for k in range(len(tokens)):
                np.testing.assert_allclose(np.load(out / f"{i}_{k}.npy"), tokens[k], rtol=0, atol=1e-6)
    # Rerunning resumes: finished files are not rewritten; a lost one comes back identical.
    before = {p: p.stat().st_mtime_ns for p in (dest / "train").iterdir() if p.suffix in (".png", ".npy")}
    kept = (dest / "train" / "1_1.npy").read_bytes()
    (dest / "train" / "1_1.npy").unlink()
    dataset_tools.main(argv)
    assert (dest / "train" / "1_1.npy").read_bytes() == kept
    after = {p: p.stat().st_mtime_ns for p in before if p.name[0] != "1"}
    assert after == {p: t for p, t in before.items() if p.name[0] != "1"}
    with pytest.raises(ValueError, match="other settings"):  # another text encoder into the same folder
        dataset_tools.main(argv[:-1] + ["--text-width=8"])

    # The dataset reads it: moments (mean, log-variance) become (mean, std) as the training step samples them.
    data = CaptionedDataset(dest, "train", latents=True)
    assert data.indices.tolist() == [0, 1, 2] and data.num_captions.tolist() == [2, 2, 3]
    image, x, context = data[2]
    raw = np.load(dest / "train" / "2.npy")
    np.testing.assert_allclose(x[:4].numpy(), raw[:4])
    np.testing.assert_allclose(x[4:].numpy(), np.exp(0.5 * np.clip(raw[4:], -30, 20)), rtol=1e-6)
    assert torch.equal(context, torch.from_numpy(np.load(dest / "train" / "2_0.npy")))


def test_caption_choice_is_uniform_and_a_function_of_seed_and_position(captioned):
    data = CaptionedDataset(captioned, "train", latents=False, seed=3)
    picks = np.array([caption_choice(3, p, 2) for p in range(4000)])
    assert abs(picks.mean() - 0.5) < 4 * 0.5 / np.sqrt(4000)  # uniform over 2 captions, as the official draw
    for position in (0, 5, 17):
        k = caption_choice(3, position, 2)
        assert torch.equal(data[(1, position)][2], torch.from_numpy(np.load(captioned / "train" / f"1_{k}.npy")))
    stream = iter(ResumableSampler(len(data), 4, seed=3, with_position=True))
    full = [next(stream) for _ in range(12)]
    assert [position for _, position in full] == list(range(12))
    assert [index for index, _ in full] == [int(i) for i in ResumableSampler(len(data), 4, seed=3).permutation(0)]
    resumed = iter(ResumableSampler(len(data), 4, seed=3, start_index=4, with_position=True))
    assert [next(resumed) for _ in range(8)] == full[4:]  # a resumed stream draws the same items and captions


#################################################################################
#                          Training: dropout and resume                         #
#################################################################################


def test_caption_dropout_replaces_tokens_by_the_empty_caption_at_cfg_prob(captioned, tmp_path, monkeypatch):
    """Every micro-step: item j's tokens become empty_context iff rand_j < cfg_prob, rand drawn first after
    reseeding from step_seed(seed, rank, position); the rest are the drawn caption's tokens."""
    seen = []

    class RecordingLoss(training.REPALoss):
        def __call__(self, model, x, y, zs_target=(), generator=None):
            seen.append(y.detach().clone())
            return super().__call__(model, x, y, zs_target, generator)

    monkeypatch.setattr(training, "REPALoss", RecordingLoss)
    p, batch, steps = 0.3, 8, 12
    run_train(t2i_argv(captioned, tmp_path, cfg_prob=p, batch_size=batch, max_train_steps=steps, enc_type="none",
                       proj_coeff=0.0, checkpointing_steps=steps))  # fmt: skip
    data = CaptionedDataset(captioned, "train", latents=False, seed=0)
    empty = torch.from_numpy(data.empty_context)
    stream = iter(ResumableSampler(len(data), batch, seed=0, with_position=True))
    dropped = 0
    for step, y in enumerate(seen):
        torch.manual_seed(training.step_seed(0, 0, step * batch))
        drop = torch.rand(batch) < p
        for j in range(batch):
            expected = empty if drop[j] else data[next(stream)][2]
            if drop[j]:
                next(stream)
            assert torch.equal(y[j], expected), (step, j)
        dropped += int(drop.sum())
    assert len(seen) == steps
    n = steps * batch
    assert abs(dropped / n - p) < 4 * np.sqrt(p * (1 - p) / n)


def test_mmdit_repa_trains_resumes_bit_exact_samples_and_evaluates(captioned, tmp_path, random_inception_weights):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(t2i_argv(captioned, straight, sampling_steps=4, preview_num_steps=2, preview_cfg_scale=2.0))
    run_train(t2i_argv(captioned, split, max_train_steps=2))
    run_train(t2i_argv(captioned, split))  # --resume auto: 0000002.pt
    a = load_checkpoint(straight / "run" / "checkpoints" / "0000004.pt")
    b = load_checkpoint(split / "run" / "checkpoints" / "0000004.pt")
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert a["model_kwargs"]["context_dim"] == WIDTH and a["model_kwargs"]["z_dims"] == [384]
    assert a["model_kwargs"]["depth"] == 2 and a["text_encoder"]["weights"] == "random"
    assert torch.equal(a["empty_context"], torch.from_numpy(np.load(captioned / layout.EMPTY_CONTEXT)))
    assert (straight / "run" / "samples" / "0000004.png").is_file()
    captions = json.loads((captioned / "train" / layout.CAPTIONS_JSON).read_text())["captions"]
    listed = (straight / "run" / "samples" / "captions.txt").read_text().splitlines()
    assert listed == [captions[k % 12][0] for k in range(16)]

    # Sampling from the val captions: sample i is val item i with caption caption_choice(seed, i, 2).
    ckpt = straight / "run" / "checkpoints" / "0000004.pt"
    common = ["--ckpt", str(ckpt), "--num-steps", "3", "--cfg-scale", "2.0", "--guidance-high", "0.7"]
    out = tmp_path / "samples"
    with pytest.warns(UserWarning, match="RANDOM CLIP WEIGHTS"):
        sample_ddp.main([*common, "--coco-dir", str(captioned), "--num-fid-samples", "5", "--batch-size", "2",
                         "--sample-dir", str(out), "--clip-score", "--clip-weights", "random"])  # fmt: skip
    npz = np.load(tmp_path / "samples.npz")
    ids = npz["arr_1"]
    assert ids.tolist() == [[i, caption_choice(0, i, 2)] for i in range(5)]
    val_captions = json.loads((captioned / "val" / layout.CAPTIONS_JSON).read_text())["captions"]
    assert (tmp_path / "samples.captions.txt").read_text().splitlines() == [val_captions[i][k] for i, k in ids]
    # The same samples computed directly: the raw weights (generate_t2i.py's default, the MMDiT recipe's), per-sample
    # noise, Euler ODE with CFG on the empty caption.
    summary = json.loads((tmp_path / "samples.json").read_text())
    assert summary["recipe"]["name"] == "default" and summary["protocol"]["weights"] == "raw"
    assert summary["recipe"]["overridden"] == ["num_steps", "cfg_scale", "guidance_high"]
    model, _ = sample_ddp.load_model(ckpt, use_ema=False)
    tokens = torch.stack([torch.from_numpy(np.load(captioned / "val" / f"{i}_{k}.npy")) for i, k in ids])
    noise = torch.stack([torch.randn(3, 32, 32, generator=protocol.sample_generator(0, i, "cpu")) for i in range(5)])
    expected = []
    for start in range(0, 5, 2):  # the same batches of 2
        z = protocol.euler_sampler(model, noise[start : start + 2], tokens[start : start + 2], num_steps=3,
                                     cfg_scale=2.0, guidance_high=0.7, null_condition=a["empty_context"])  # fmt: skip
        expected.append(protocol.quantize(z))
    assert np.array_equal(npz["arr_0"], np.concatenate(expected))
    # The CLIP score beside it, of these very samples and captions (random CLIP: the plumbing, not a score).
    from evaluations.clip_score import clip_score

    with pytest.warns(UserWarning, match="RANDOM CLIP WEIGHTS"):
        direct = clip_score(tmp_path / "samples.npz", weights="random", device="cpu")
    assert summary["clip_score"]["clip_score"] == pytest.approx(direct["clip_score"], rel=1e-5)
    assert summary["clip_score"]["num_samples"] == 5 and summary["clip_score"]["clip_weights"] == "random"

    # Prompts from a file go through the recorded (random) text encoder: the caption that sample 0 of the COCO
    # run used, as a prompt, gives its tokens again and (same noise, settings and batch size) the same image.
    prompts = tmp_path / "prompts.txt"
    first = val_captions[0][ids[0][1]]
    prompts.write_text(f"{first}\n\n{val_captions[1][0]}\n")
    sample_ddp.main([*common, "--prompts", str(prompts), "--batch-size", "2", "--sample-dir", str(tmp_path / "p")])
    pnpz = np.load(tmp_path / "p.npz")
    assert pnpz["arr_1"].tolist() == [0, 1] and pnpz["arr_0"].shape == (2, 32, 32, 3)
    stored = torch.from_numpy(np.load(captioned / "val" / f"0_{ids[0][1]}.npy"))
    torch.testing.assert_close(random_encoder().encode([first])[0], stored, rtol=0, atol=1e-6)
    assert np.abs(pnpz["arr_0"][0].astype(int) - npz["arr_0"][0].astype(int)).max() <= 1

    # FID against the val images as a reference batch (random Inception weights: the plumbing, not a score).
    ref = tmp_path / "ref.npz"
    dataset_tools.main(["coco-reference", f"--source={captioned / 'val'}", f"--dest={ref}"])
    assert np.load(ref)["arr_0"].shape == (6, 32, 32, 3)
    from evaluations.evaluate import main as evaluate_main

    metrics = evaluate_main([str(ref), str(tmp_path / "samples.npz"), "--inception-weights",
                             str(random_inception_weights), "--batch-size", "8", "--device", "cpu", "--no-ref-cache"])  # fmt: skip
    assert np.isfinite(metrics["fid"]) and metrics["num_samples"] == 5


def test_official_mmdit_checkpoint_samples_through_sample_ddp(testdata, tmp_path):
    """A train_t2i.py checkpoint (args Namespace without a model name) is read off its weights and loads strictly."""
    ref = torch.load(testdata / "mmdit_reference_tiny.pt", weights_only=True)
    config = ref["config"]
    args = argparse.Namespace(resolution=config["input_size"] * 8, encoder_depth=config["encoder_depth"])
    path = tmp_path / "0150000.pt"
    save_checkpoint({"model": ref["state_dict"], "ema": ref["state_dict"], "args": args, "steps": 150000}, path)
    model, settings = sample_ddp.load_model(path)
    assert settings["model"] == f"MMDiT-d{config['depth']}/{config['patch_size']}" and settings["steps"] == 150000
    with torch.no_grad():
        v, _ = model(ref["x"], ref["t"], ref["context"])
    torch.testing.assert_close(v, ref["v"], rtol=1e-5, atol=1e-5)


def test_t2i_runs_refuse_mismatched_data(captioned, demo_data, tmp_path):
    with pytest.raises(ValueError, match="not in the MS-COCO feature layout"):
        run_train(t2i_argv(demo_data, tmp_path))
    with pytest.raises(ValueError, match="is in the MS-COCO feature layout"):
        run_train(t2i_argv(captioned, tmp_path, model="SiT-S/8", hidden_size=64, num_heads=2))
    with pytest.raises(ValueError, match="--hflip"):
        run_train(t2i_argv(captioned, tmp_path, hflip=True))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
