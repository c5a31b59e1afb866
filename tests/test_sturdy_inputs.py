"""Damaged, stale or odd inputs of the COCO pipeline, sampling and evaluation: each is refused with a message that
names the file (key, flag) and the fix, or handled right. The item numbers are those of the issue:
1 a `coco` rerun after the captions changed; sampling checks captions.json against the token files;
2 malformed COCO annotations and captions.json; 3 images without captions, repeated image ids;
4 --prompts files (binary, line separators); 5 empty batches; 6 the evaluator's reference statistics, cache and
summary JSON; 7 every key of sample_ddp's manifest decides whether a sample folder is resumed.
"""

import argparse
import copy
import json
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sample_ddp
from checkpoints import checkpoint_settings, load_checkpoint
from dataset import CaptionedDataset
from demo.data import make_captioned_demo_data
from evaluations import evaluate as evaluate_cli
from evaluations.inception import LOGITS_DIM, POOL_DIM, SPATIAL_DIM
from preprocessing import dataset_tools, layout
from tests.test_sample_ddp import tiny_pixel_checkpoint
from tests.test_t2i import WIDTH, fake_coco, official_reader_counts, random_encoder

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore:RANDOM")]


def coco_argv(source, dest, vae_path, split="val"):
    return ["coco", f"--source={source}", f"--dest={dest}", f"--split={split}", "--resolution=32", f"--vae={vae_path}",
            "--workers=0", "--text-encoder-weights=random", f"--text-width={WIDTH}"]  # fmt: skip


def edit_annotations(source, folder, change):
    path = source / "annotations" / f"captions_{folder}.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def token_files(folder):
    return sorted(p.name for p in folder.glob("*_*.npy"))


@pytest.fixture(scope="module")
def small_captioned(tmp_path_factory):
    """A COCO-layout folder in miniature (2 val items with 2 captions each), to be copied and damaged."""
    out = tmp_path_factory.mktemp("sturdy") / "t2i"
    make_captioned_demo_data(str(out), per_class=1, val_per_class=1, num_classes=2, resolution=16, text_width=WIDTH)
    return out


def copy_of(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / folder.name)


def caption_conditions(**options):
    defaults = dict(coco_dir=None, prompts=None, global_seed=0, text_encoder=None, text_encoder_weights="random")
    args = argparse.Namespace(**{**defaults, **options})
    return sample_ddp.CaptionConditions(args, {"text_encoder": {"width": WIDTH}}, WIDTH, torch.device("cpu"))


#################################################################################
#   1, 3: a coco rerun after the annotations changed; images without captions    #
#################################################################################


def test_coco_rerun_after_the_captions_change_rewrites_the_tokens_to_match_captions_json(tmp_path, tiny_vae, capsys):
    """Items (by image id) 7, 19, 42 with 2, 2, 3 captions; the broken image 99 is the gap 3. Then caption 2 of 42
    is deleted, a caption of 7 edited and every caption of 19 removed: the rerun re-encodes the tokens of 7 and 42
    only (their images and moments stay), removes 42's third token file and makes 19 a reported gap."""
    vae_path, _ = tiny_vae
    source, dest = fake_coco(tmp_path / "coco"), tmp_path / "features"
    dataset_tools.main(coco_argv(source, dest, vae_path))
    out = dest / "val"
    assert official_reader_counts(out) == (3, {0: 2, 1: 2, 2: 3})
    kept = {name: (out / name).stat().st_mtime_ns for name in ("0.png", "0.npy", "2.png", "2.npy")}

    def change(meta):
        anns = meta["annotations"]
        anns.remove(next(a for a in anns if a["caption"] == "photo 2 of 42"))
        next(a for a in anns if a["caption"] == "photo 1 of 7")["caption"] = "a changed caption of 7"
        meta["annotations"] = [a for a in anns if a["image_id"] != 19]

    edit_annotations(source, "val2014", change)
    capsys.readouterr()
    dataset_tools.main(coco_argv(source, dest, vae_path))
    printed = capsys.readouterr().out
    assert "removed the caption tokens of 2 item(s)" in printed and "every file of 1 item(s)" in printed
    assert "have no captions in captions_val2014.json" in printed and "image id 19" in printed
    listing = json.loads((out / layout.CAPTIONS_JSON).read_text())
    assert listing["captions"] == [["photo 0 of 7", "a changed caption of 7"], [], ["photo 0 of 42", "photo 1 of 42"],
                                   ["broken"]]  # fmt: skip
    # The folder is what captions.json says: item 1 a gap, the tokens those of the listed captions.
    assert official_reader_counts(out) == (2, {0: 2, 2: 2})
    assert token_files(out) == ["0_0.npy", "0_1.npy", "2_0.npy", "2_1.npy"] and not list(out.glob("1*"))
    encoder = random_encoder()
    for i in (0, 2):
        expected = encoder.encode(listing["captions"][i]).numpy()
        for k in range(2):
            np.testing.assert_allclose(np.load(out / f"{i}_{k}.npy"), expected[k], rtol=0, atol=1e-6)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # images and moments kept
    report = json.loads((out / "report.json").read_text())
    assert report["captions_encoded_again"] == 2 and report["without_captions"] == 1
    assert [(f["index"], f["reason"]) for f in report["failed"]][0] == (1, "no captions in captions_val2014.json")
    data = CaptionedDataset(dest, "val")
    assert data.indices.tolist() == [0, 2] and data.caption_texts() == listing["captions"]

    # Another image list (a new smallest id, without captions, shifts every item): items are remade from their images.
    pngs = {image_id: (out / f"{i}.png").read_bytes() for i, image_id in ((0, 7), (2, 42))}
    new_image = {"id": 1, "file_name": "COCO_val2014_000000000042.jpg"}
    edit_annotations(source, "val2014", lambda meta: meta["images"].append(new_image))
    dataset_tools.main(coco_argv(source, dest, vae_path))
    listing = json.loads((out / layout.CAPTIONS_JSON).read_text())
    assert listing["image_ids"] == [1, 7, 19, 42, 99] and official_reader_counts(out) == (2, {1: 2, 3: 2})
    assert (out / "1.png").read_bytes() == pngs[7] and (out / "3.png").read_bytes() == pngs[42]
    for i in (1, 3):
        expected = encoder.encode(listing["captions"][i]).numpy()
        np.testing.assert_allclose(np.load(out / f"{i}_1.npy"), expected[1], rtol=0, atol=1e-6)
    assert CaptionedDataset(dest, "val").indices.tolist() == [1, 3]


def test_coco_leaves_images_without_captions_as_reported_gaps(tmp_path, tiny_vae, capsys):
    vae_path, _ = tiny_vae
    source, dest = fake_coco(tmp_path / "coco"), tmp_path / "features"
    # Image 30 (item 2 of 7, 19, 30, 42, 99) has no caption: U-ViT's numbering keeps it, training cannot use it.
    edit_annotations(source, "val2014", lambda meta: meta["images"].append({"id": 30, "file_name": "broken.jpg"}))
    dataset_tools.main(coco_argv(source, dest, vae_path))
    out = dest / "val"
    assert "1 image(s) have no captions in captions_val2014.json and are left out as gaps, e.g. image id 30" in (
        capsys.readouterr().out
    )
    report = json.loads((out / "report.json").read_text())
    assert [f["index"] for f in report["failed"]] == [2, 4]  # 4: the unreadable image, a gap as before
    assert report["failed"][0]["reason"] == "no captions in captions_val2014.json" and report["without_captions"] == 1
    assert report["kept"] == 3 and not list(out.glob("2*"))
    data = CaptionedDataset(dest, "val")  # trains without a "rerun coco"
    assert data.indices.tolist() == [0, 1, 3] and data.num_captions.tolist() == [2, 2, 3]
    # Files without a captions.json (an older version's killed run) cannot be checked: all are made again.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".png", ".npy")}
    (out / layout.CAPTIONS_JSON).unlink()
    dataset_tools.main(coco_argv(source, dest, vae_path))
    assert "every file of 3 item(s)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".png", ".npy")} == before
    assert (out / layout.CAPTIONS_JSON).is_file()


def test_repeated_image_ids_are_refused_naming_the_id(tmp_path):
    source = fake_coco(tmp_path / "coco")
    edit_annotations(source, "val2014", lambda meta: meta["images"].append({"id": 19, "file_name": "other.jpg"}))
    path = source / "annotations" / "captions_val2014.json"
    with pytest.raises(ValueError, match=r"images\[4\]: image id 19 is listed twice \('COCO_val2014_000000000019.jpg'"):
        dataset_tools.read_coco_captions(str(path))


#################################################################################
#        1: sampling checks captions.json against the token files first         #
#################################################################################


def test_sampling_refuses_caption_tokens_that_disagree_with_captions_json(small_captioned, tmp_path):
    data = copy_of(small_captioned, tmp_path)
    conditions = caption_conditions(coco_dir=str(data))
    assert conditions.captions == json.loads((data / "val" / layout.CAPTIONS_JSON).read_text())["captions"]
    assert len(conditions.source["captions_sha256"]) == 64  # other captions: another sample folder
    listing_path = data / "val" / layout.CAPTIONS_JSON
    listing = json.loads(listing_path.read_text())
    # A caption deleted from the listing, its token file left behind (what a `coco` rerun used to leave).
    listing["captions"][1] = listing["captions"][1][:1]
    listing_path.write_text(json.dumps(listing))
    message = re.escape(f"{listing_path} lists 1 caption(s) of item 1, but {data / 'val'} holds 2 token file(s)")
    with pytest.raises(ValueError, match=message + r".*rerun the same `dataset_tools.py coco` command"):
        caption_conditions(coco_dir=str(data))
    with pytest.raises(ValueError, match=message):  # training reads the same check
        CaptionedDataset(data, "val", latents=False)
    listing["captions"] = listing["captions"][:1]
    listing_path.write_text(json.dumps(listing))
    with pytest.raises(ValueError, match=re.escape(f"{listing_path} lists 1 items, but {data / 'val'} holds item 1")):
        caption_conditions(coco_dir=str(data))


#################################################################################
#        2: malformed annotations and caption listings name file and entry      #
#################################################################################


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[: len(text) // 2], r"is not valid JSON: .*; it ends early \(truncated\?\)"),
        (lambda text: "{\"images\": [}" + text, r"is not valid JSON: .*\(line 1 column 13\); download"),
        (lambda text: text.replace("photo 0 of 42", "photo \udcff"), r"is not UTF-8 text \(byte \d+"),
        (lambda text: text.replace('"caption": "photo 1 of 7"', '"text": "photo 1 of 7"'),
         r"annotations\[\d+\] has no 'caption'"),
        (lambda text: text.replace('"image_id": 19, ', "", 1), r"annotations\[\d+\] has no 'image_id'"),
        (lambda text: text.replace('{"id": 7, ', '{"ident": 7, '), r"images\[1\] has no 'id'"),
        (lambda text: text.replace('"file_name": "broken.jpg"', '"name": "broken.jpg"'), r"images\[3\] has no 'file_name'"),
        (lambda text: text.replace('"caption": "photo 0 of 19"', '"caption": 5'), r"'caption' is a int, not a string"),
        (lambda text: "[]", "is not a COCO captions file"),
    ],
)  # fmt: skip
def test_malformed_coco_annotations_are_refused_naming_file_and_entry(tmp_path, damage, message):
    source = fake_coco(tmp_path / "coco")
    path = source / "annotations" / "captions_val2014.json"
    path.write_bytes(damage(path.read_text()).encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r"(: |\S* )?.*" + message):
        dataset_tools.read_coco_captions(str(path))
    # The command stops on it before loading any model or writing anything.
    with pytest.raises(ValueError, match=re.escape(str(path))):
        dataset_tools.main(coco_argv(source, tmp_path / "out", "no-such-vae"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"captions": [["a", "b"], ["c", ', r"is not valid JSON"),
        (b'{"captions": [["a\xff"]]}', r"is not UTF-8 text \(byte 17\)"),
        (b'{"labels": []}', r'has no "captions" list'),
        (b'{"captions": [["a", "b"], "c d"]}', r'"captions"\[1\] is c d, not a list of strings'),
    ],
)
def test_malformed_captions_json_is_refused_naming_the_file(small_captioned, tmp_path, content, message):
    data = copy_of(small_captioned, tmp_path)
    path = data / "val" / layout.CAPTIONS_JSON
    path.write_bytes(content)
    with pytest.raises(
        ValueError, match=re.escape(str(path)) + ":? " + message + ".*rerun the `dataset_tools.py coco`"
    ):
        caption_conditions(coco_dir=str(data))


#################################################################################
#                 4: --prompts files: text only, lines end at \n                #
#################################################################################


def test_prompts_are_split_at_newlines_only(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a cat\x0con a mat\r\n\n  a dog\u2028in fog  \nlast\x1cone".encode())
    data, prompts = sample_ddp.read_prompts(path)
    assert prompts == ["a cat\x0con a mat", "a dog\u2028in fog", "last\x1cone"] and data == path.read_bytes()
    assert "\\n" in sample_ddp.build_parser().format_help()  # documented at the flag


@pytest.mark.parametrize(
    "content", [bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"caf\xe9 au lait\n"]
)
def test_binary_prompt_files_are_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "prompts.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"--prompts {path} is not a text file")):
        caption_conditions(prompts=str(path))


#################################################################################
#                 5: batches of 0 images name their file                        #
#################################################################################


def stub_inception(weights_sha256=None):
    return SimpleNamespace(fc=SimpleNamespace(weight=torch.zeros(1)), weights_sha256=weights_sha256)


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    """ADM statistics (mu, sigma, mu_s, sigma_s) of full size: a reference that needs no Inception pass."""
    path = tmp_path_factory.mktemp("stats") / "stats.npz"
    np.savez(path, mu=np.zeros(POOL_DIM), sigma=np.eye(POOL_DIM, dtype=np.float32), mu_s=np.zeros(SPATIAL_DIM),
             sigma_s=np.eye(SPATIAL_DIM, dtype=np.float32))  # fmt: skip
    return path


def test_batches_of_zero_images_are_refused_naming_the_file(tmp_path, stats_file):
    empty = tmp_path / "empty.npz"
    np.savez(empty, arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    images = tmp_path / "images.npz"
    np.savez(images, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    message = re.escape(f"{empty}: 'arr_0' holds 0 images")
    with pytest.raises(ValueError, match=message):  # as the reference
        evaluate_cli.evaluate(empty, images, stub_inception(), use_cache=False)
    with pytest.raises(ValueError, match=message):  # as the samples
        evaluate_cli.evaluate(stats_file, empty, stub_inception(), use_cache=False)
    from evaluations.clip_score import clip_score

    (tmp_path / "empty.captions.txt").write_text("")
    with pytest.raises(ValueError, match=message):  # before CLIP is loaded
        clip_score(empty, name_or_path="no-such-clip", device="cpu")


#################################################################################
#      6: NaN statistics, a broken reference cache, a malformed summary JSON    #
#################################################################################


def test_non_finite_reference_statistics_are_refused_naming_the_file(tmp_path, stats_file):
    images = tmp_path / "images.npz"
    np.savez(images, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    with np.load(stats_file) as npz:
        stats = dict(npz)
    for key, bad in (("mu", np.nan), ("sigma_s", np.inf)):
        path = tmp_path / f"nan_{key}.npz"
        np.savez(path, **{**stats, key: np.where(np.arange(stats[key].size).reshape(stats[key].shape) == 3, bad,
                                                   stats[key])})  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(f"{path}: '{key}' holds 1 NaN or infinite value(s)")):
            evaluate_cli.evaluate(path, images, stub_inception(), use_cache=False)


def fake_activations(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"pool": rng.normal(size=(n, POOL_DIM)).astype(np.float32),
            "logits": rng.normal(size=(n, LOGITS_DIM)).astype(np.float32),
            "spatial": rng.normal(size=(n, SPATIAL_DIM)).astype(np.float32)}  # fmt: skip


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "wrong arrays"])
def test_a_broken_reference_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, monkeypatch, damage):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    model, sha = stub_inception("ab" * 32), "ab" * 32
    cache = evaluate_cli.reference_cache_path(ref, sha)
    calls = []
    monkeypatch.setattr(evaluate_cli, "compute_activations", lambda *a: calls.append(a) or fake_activations(4))
    fsynced = []
    real_fsync = evaluate_cli.os.fsync
    monkeypatch.setattr(evaluate_cli.os, "fsync", lambda fd: fsynced.append(fd) or real_fsync(fd))
    first = evaluate_cli.reference_summary(model, ref, 4, torch.device("cpu"))
    assert len(calls) == 1 and fsynced and cache.is_file()  # written through fsync, then renamed
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    good = cache.read_bytes()
    stat = ref.stat()
    if damage == "wrong arrays":  # readable, of this reference and weights, but not a summary the metrics can use
        np.savez(cache, pool=np.zeros((0, 3)), mu=np.zeros(3), sigma=np.eye(3), mu_s=np.zeros(3), sigma_s=np.eye(3),
                 format=evaluate_cli.CACHE_FORMAT, weights_sha256=sha, ref_size=stat.st_size,
                 ref_mtime_ns=stat.st_mtime_ns)  # fmt: skip
    else:
        cache.write_bytes(
            {"empty": b"", "truncated": good[: len(good) // 2], "garbage": b"PK\x03\x04" + b"x" * 50}[damage]
        )
    with pytest.warns(UserWarning, match=re.escape(f"ignoring the broken reference cache {cache}")):
        again = evaluate_cli.reference_summary(model, ref, 4, torch.device("cpu"))
    assert len(calls) == 2 and cache.read_bytes() == good  # recomputed and rewritten
    for key in ("pool", "mu", "sigma_s"):
        np.testing.assert_array_equal(again[key], first[key])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_cli.reference_summary(model, ref, 4, torch.device("cpu"))
    assert len(calls) == 2  # the rewritten cache is read


@pytest.mark.parametrize(
    "summary",
    [
        b'{"protocol": {"sampler": "sde", ',
        b"\xff\xfe not json",
        b'["a", "list"]',
        "IDENTITY_AND_PROTOCOL:a string",
        "IDENTITY_AND_PROTOCOL:[1, 2]",
        'IDENTITY_AND_PROTOCOL:{"sampler": "sde"}',
        'IDENTITY_AND_PROTOCOL:{"sampler": "sde", "num_steps": 4, "nfe": 7, "cfg_scale": "high", '
        '"guidance_interval": [0, 1], "labels": "random", "quantization": "repa", "num_samples": 4, "weights": "ema", '
        '"precision": "fp32"}',
    ],
)
def test_a_malformed_summary_json_only_makes_the_protocol_unknown(tmp_path, monkeypatch, capsys, stats_file, summary):
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    if isinstance(summary, str):  # a summary of this very .npz whose protocol is not one
        stat = samples.stat()
        protocol = json.loads(json.dumps(summary.split(":", 1)[1])) if summary.endswith("string") else None
        protocol = protocol if protocol is not None else json.loads(summary.split(":", 1)[1])
        summary = json.dumps({"npz_identity": [stat.st_size, stat.st_mtime_ns], "protocol": protocol}).encode()
    samples.with_suffix(".json").write_bytes(summary)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert evaluate_cli.sampling_protocol(samples) is None
    # The CLI without --json: metrics, then the protocol line, "unknown" (Inception and distances stubbed).
    monkeypatch.setattr(evaluate_cli, "load_inception", lambda *a, **k: stub_inception())
    monkeypatch.setattr(evaluate_cli, "compute_activations", lambda *a: fake_activations(4))
    monkeypatch.setattr(evaluate_cli, "frechet_distance", lambda *stats: 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = evaluate_cli.main([str(stats_file), str(samples), "--inception-weights", "unused.pth"])
    assert results["fid"] == 1.5 and results["sampling_protocol"] is None
    assert "Sampling protocol: unknown" in capsys.readouterr().out
    # A results dict holding a malformed protocol (e.g. read back from an old metrics JSON) prints "unknown" too.
    assert "Sampling protocol: unknown" in evaluate_cli.format_metrics({**results, "sampling_protocol": {"x": 1}})


#################################################################################
#           7: every key of the sample manifest guards a resumed folder         #
#################################################################################

# sample_ddp's flags that are not keys of its manifest, and why they need not be. Any other flag must be one: a
# flag missing from both (say guidance_high dropped from sampling_manifest) fails the test below.
NOT_IN_MANIFEST = {
    "recipes_from": "only fills flags not given, which the manifest records themselves",
    "encoder_depth": "builds projectors, which sampling never runs",
    "sample_dir": "the folder itself",
    "overwrite": "what to do about a folder that differs",
    "coco_dir": "text-to-image: recorded as manifest['labels'] (CaptionConditions.source)",
    "prompts": "text-to-image: recorded as manifest['labels'] (CaptionConditions.source: the file's sha256)",
    "text_encoder": "text-to-image prompts: recorded in manifest['labels']['text_encoder']",
    "text_encoder_weights": "text-to-image prompts: recorded in manifest['labels']['text_encoder']",
    "projector_embed_dims": "official flag, checked against the weights (a mismatch stops the run)",
    "resolution": "official flag, checked against the weights (a mismatch stops the run)",
    "qk_norm": "official flag, checked against the weights (a mismatch stops the run)",
    "ref_batch": "evaluation after sampling",
    "inception_weights": "evaluation after sampling",
    "clip_score": "evaluation after sampling",
    "clip_model": "evaluation after sampling",
    "clip_weights": "evaluation after sampling",
    "allow_pipeline_mix": "evaluation after sampling",
}
FLAG_KEYS = {"ckpt": "checkpoint"}  # flags recorded under another name
# Flags whose key the manifest fills from what load_model returns, not from the flag itself.
FROM_THE_MODEL = {
    "model": "picks the model built from the weights; the manifest records settings['model']",
    "num_classes": "official flag, checked against the weights; the manifest records the model's number of classes",
}


def other(value):
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, dict):
        return {**value, "other": 1}
    if isinstance(value, list):
        return [*value, "other"]
    assert value is None, type(value)
    return "other"


@pytest.fixture
def manifest_case(tmp_path):
    """(args, settings, manifest builder, a folder of samples made with the base manifest). The base has every
    optional key: a REG model (cls_cfg_scale), latents (vae, latent scale and bias), --compile, explicit attention."""
    ckpt = tmp_path / "ckpt.pt"
    tiny_pixel_checkpoint(ckpt)
    args = sample_ddp.build_parser().parse_args(["--ckpt", str(ckpt), "--compile", "true", "--fused-attn", "false"])
    loaded = load_checkpoint(ckpt)
    sample_ddp.apply_recipe(args, *sample_ddp.checkpoint_recipes(args, loaded, checkpoint_settings(loaded)))
    settings = {**checkpoint_settings(loaded), "weights_sha256": "0" * 64, "model": "SiT-S/8", "cls_token_dim": 8}
    settings["pixel_space"] = False

    def build(args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flags overriding the checkpoint warn
            training = sample_ddp.resolve_training_settings(args, settings)
        return sample_ddp.sampling_manifest(args, training, settings, 5)

    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "000000.png").write_bytes(b"a sample")
    (folder / sample_ddp.MANIFEST).write_text(json.dumps(build(args)))
    return args, build, folder


def test_every_manifest_key_decides_whether_a_sample_folder_is_resumed(manifest_case):
    args, build, folder = manifest_case
    manifest = build(args)
    assert sample_ddp.manifest_problem(folder, manifest) is None
    assert {"guidance_high", "cls_cfg_scale", "compile", "fused_attn", "vae", "latent_scale"} <= set(manifest)
    for key, value in manifest.items():
        for changed in ({**manifest, key: other(value)}, {k: v for k, v in manifest.items() if k != key}):
            problem = sample_ddp.manifest_problem(folder, changed)
            if key in sample_ddp.INFORMATIONAL:  # recorded, not compared
                assert problem is None, key
            else:
                assert problem is not None and f"\n  {key}: the folder's samples have" in problem, key
                assert "--overwrite" in problem


def test_every_sampling_flag_reaches_the_manifest(manifest_case):
    args, build, folder = manifest_case
    manifest = build(args)
    for flag, value in vars(args).items():
        key = FLAG_KEYS.get(flag, flag)
        if flag in NOT_IN_MANIFEST:
            assert key not in manifest, f"{flag} is a manifest key: take it off NOT_IN_MANIFEST"
            continue
        assert key in manifest, f"--{flag.replace('_', '-')} is neither recorded in the manifest nor NOT_IN_MANIFEST"
        if flag in FROM_THE_MODEL:
            continue
        changed = copy.copy(args)
        setattr(changed, flag, other(value))
        problem = sample_ddp.manifest_problem(folder, build(changed))
        if key in sample_ddp.INFORMATIONAL:
            assert problem is None and build(changed)[key] != manifest[key], flag
        else:
            assert problem is not None and f"\n  {key}: the folder's samples have" in problem, flag
