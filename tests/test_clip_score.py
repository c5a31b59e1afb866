"""evaluations.clip_score: the CLIP score of text-to-image samples, checked with random CLIP weights on the CPU."""

import json
import warnings

import huggingface_hub.constants as hf_constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluations.clip_score import CLIP_L14, ClipNotFoundError, clip_score, load_clip, main
from models.text_encoder import HashTokenizer

CAPTIONS = ["a red disk on a blue background", "b", "two cats on a sofa", "", "x " * 200, "Blue SQUARE"]


@pytest.fixture(autouse=True)
def _quiet_random_clip_warning():
    # Random CLIP warns on purpose; the warning itself is checked in the CLI test.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM CLIP.*")
        yield


@pytest.fixture(scope="module")
def scorer():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM CLIP.*")
        return load_clip(weights="random")


def images(n, size=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_batch(tmp_path, n, captions=None, name="samples"):
    npz = tmp_path / f"{name}.npz"
    np.savez(npz, arr_0=images(n, size=24, seed=n))
    if captions is not None:
        (tmp_path / f"{name}.captions.txt").write_text("\n".join(captions) + "\n")
    return npz


def direct_cosines(model, ids, x_uint8):
    """Written apart from the module: torch preprocessing by hand, CLIPModel.forward's normalised embeddings."""
    x = torch.tensor(x_uint8).permute(0, 3, 1, 2).to(torch.float32) / 255
    size = model.config.vision_config.image_size
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)  # no antialias, as instruct-pix2pix
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).reshape(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).reshape(3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=(x - mean) / std)
    return (out.image_embeds * out.text_embeds).sum(-1).double().numpy()


def test_score_matches_a_direct_computation(scorer):
    x = images(len(CAPTIONS))
    cos = direct_cosines(scorer.model, HashTokenizer()(CAPTIONS), x)
    assert (cos < 0).any() and (cos > 0).any()  # random weights: both signs, so the clamp is exercised
    expected = 100 * np.maximum(cos, 0)
    np.testing.assert_allclose(scorer.cosine(x, CAPTIONS), cos, rtol=0, atol=1e-5)
    scores = scorer.score(x, CAPTIONS, batch_size=4)
    assert scores.shape == (len(CAPTIONS),) and scores.dtype == np.float64
    np.testing.assert_allclose(scores / 100, expected / 100, rtol=0, atol=1e-5)
    # Batching changes float32 sums only (the cosines agree to ~1e-7).
    np.testing.assert_allclose(scorer.score(x, CAPTIONS, batch_size=1) / 100, scores / 100, rtol=0, atol=1e-5)
    assert scorer.image_size == 224 and scorer.weights_source == "random"
    with pytest.raises(ValueError, match="6 images but 5 captions"):
        scorer.score(x, CAPTIONS[:5])
    with pytest.raises(ValueError, match="uint8"):
        scorer.score(x.astype(np.float32), CAPTIONS)


def test_random_clip_is_deterministic(scorer):
    x = images(2, size=16)
    np.testing.assert_array_equal(load_clip(weights="random").cosine(x, CAPTIONS[:2]), scorer.cosine(x, CAPTIONS[:2]))


def test_local_folder_round_trip(tmp_path, scorer):
    """A tiny CLIPModel + BPE CLIPTokenizer saved like the hub's files load through the pretrained path."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    folder = tmp_path / "tiny-clip"
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(folder)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text = dict(layers, vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1)
    vision = dict(layers, image_size=32, patch_size=8)
    config = CLIPConfig(text_config=dict(text, pad_token_id=1), vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)

    loaded = load_clip(str(folder))
    assert (loaded.name, loaded.weights_source, loaded.image_size) == (str(folder), "pretrained", 32)
    captions = ["ab c", ""]
    # CLIP's tokens: [begin, a, b</w>, c</w>, end, end, ...] (77, padded with the end token).
    ids = torch.full((2, 77), 1)
    ids[:, 0] = 0
    ids[0, 1:4] = torch.tensor([vocab["a"], vocab["b</w>"], vocab["c</w>"]])
    x = images(2, size=48)
    cos = direct_cosines(model, ids, x)
    np.testing.assert_allclose(loaded.cosine(x, captions), cos, rtol=0, atol=1e-5)
    np.testing.assert_allclose(loaded.score(x, captions) / 100, np.maximum(cos, 0), rtol=0, atol=1e-5)

    with pytest.raises(ClipNotFoundError, match="no such folder"):
        load_clip(str(tmp_path / "nothing"))
    with pytest.raises(ClipNotFoundError, match="does not hold a CLIPModel"):
        load_clip(str(tmp_path))  # tokenizer files only


def test_offline_with_nothing_cached_names_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads these at import time: patch its constants too.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ClipNotFoundError, match=r"(?s)openai/clip-vit-large-patch14.*download") as info:
        load_clip(CLIP_L14)
    assert "--clip-model /local/folder" in str(info.value)
    with pytest.raises(ValueError, match="'pretrained' or 'random'"):
        load_clip(weights="imagenet")


def test_clip_score_of_a_batch(tmp_path, scorer):
    npz = write_batch(tmp_path, 5, CAPTIONS[:5])
    result = clip_score(npz, scorer=scorer, batch_size=2)
    with np.load(npz) as f:
        scores = scorer.score(f["arr_0"], CAPTIONS[:5])
        cos = scorer.cosine(f["arr_0"], CAPTIONS[:5])
    assert result["num_samples"] == 5 and result["clip_weights"] == "random"
    # Batches of 2 here, of 5 above: float32 sums differ by ~1e-7 in cosine (1e-5 on the 0-100 scale).
    assert result["clip_score"] == pytest.approx(scores.mean(), abs=1e-3)
    assert result["clip_score_std"] == pytest.approx(scores.std(), abs=1e-3)
    assert result["clip_cosine"] == pytest.approx(cos.mean(), abs=1e-5)
    assert result["captions"] == str(tmp_path / "samples.captions.txt")


def test_missing_or_mismatched_captions_name_the_file(tmp_path, scorer):
    npz = write_batch(tmp_path, 3)
    with pytest.raises(FileNotFoundError, match=r"samples\.captions\.txt: no such captions file"):
        clip_score(npz, scorer=scorer)
    (tmp_path / "samples.captions.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match=r"samples\.captions\.txt: 2 captions for the 3 images of .*samples\.npz"):
        clip_score(npz, scorer=scorer)
    other = tmp_path / "other.txt"
    other.write_text("one\n\nthree")  # an empty caption counts; no final newline is fine
    assert clip_score(npz, other, scorer=scorer)["num_samples"] == 3
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        clip_score(tmp_path / "nowhere.npz", scorer=scorer)


def test_cli_with_random_weights_writes_json_and_warns(tmp_path, capsys):
    npz = write_batch(tmp_path, 4, CAPTIONS[:4])
    out = tmp_path / "out" / "clip.json"
    with pytest.warns(UserWarning, match="RANDOM CLIP WEIGHTS"):
        result = main(
            [str(npz), "--clip-weights", "random", "--batch-size", "3", "--json", str(out), "--device", "cpu"]
        )
    written = json.loads(out.read_text())
    assert written == result
    assert written["clip_weights"] == "random" and written["num_samples"] == 4
    assert 0 <= written["clip_score"] <= 100
    printed = capsys.readouterr().out
    assert f"CLIP score: {result['clip_score']:.4f}" in printed and "RANDOM CLIP weights" in printed
