"""preprocessing/: the ADM crop against hand-computed cases, convert on a fake ImageFolder with bad images,
encode with a tiny random AutoencoderKL, resuming after a kill, 2 processes vs 1, and the demo set."""

import io
import json
import os
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from dataset import ImageLatentDataset
from demo import data as make_demo_data
from preprocessing import dataset_tools, layout
from preprocessing.dataset_tools import adm_resize_plan, center_crop_adm

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 16


# Tiny ops on a shared 2-core CPU run fastest on one thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- ADM center crop ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        # 1100x600: 600 >= 512 -> BOX to 550x300; 256/300 * 550 = 469.33 -> 469; crop x (469-256)//2 = 106.
        ((1100, 600), ([(550, 300)], (469, 256), (106, 0))),
        # Portrait, no BOX step (300 < 512): 256/300 * 1000 = 853.33 -> 853; crop y (853-256)//2 = 298.
        ((300, 1000), ([], (256, 853), (0, 298))),
        # 700 -> BOX 500x350; 256/350 * 500 = 365.71 rounds up to 366; crop x 55.
        ((1001, 700), ([(500, 350)], (366, 256), (55, 0))),
        # ">= 2 * size" includes equality: 512 halves once more, to exactly 256 (BICUBIC is then a no-op).
        ((2048, 2048), ([(1024, 1024), (512, 512), (256, 256)], (256, 256), (0, 0))),
    ],
)
def test_adm_resize_plan_hand_computed(size, expected):
    assert adm_resize_plan(*size, 256) == expected


def test_center_crop_adm_pixels_hand_computed():
    # A 12x4 (W x H) image made of 2x2 blocks: block (r, c) has mean B[r, c] and offsets that cancel.
    # ADM to 2 px: 4 >= 2*2, so one BOX halving to 6x2 (exact block means = B), 2 < 4 stops; the BICUBIC
    # target is 6x2 itself (no-op); the center crop takes columns (6-2)//2 = 2 and 3 of B.
    blocks = np.array([[10, 20, 30, 40, 50, 60], [70, 80, 90, 100, 110, 120]])
    offsets = np.array([[-8, 8], [4, -4]])
    source = (np.kron(blocks, np.ones((2, 2), int)) + np.tile(offsets, (2, 6))).astype(np.uint8)
    image = PIL.Image.fromarray(np.repeat(source[..., None], 3, axis=2))
    out = center_crop_adm(image, 2)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], [[30, 40], [90, 100]])


def test_center_crop_adm_upscales_with_bicubic_then_crops():
    # 3x2 -> short side 2 to 4 (scale 2): BICUBIC to 6x4, then columns 1..4 (hand-computed plan).
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (2, 3, 3), dtype=np.uint8))
    assert adm_resize_plan(3, 2, 4) == ([], (6, 4), (1, 0))
    expected = np.asarray(image.resize((6, 4), resample=PIL.Image.Resampling.BICUBIC))[:, 1:5]
    np.testing.assert_array_equal(center_crop_adm(image, 4), expected)


# --- A fake ImageFolder with bad images -----------------------------------------------------------


def _jpeg(array, mode=None) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array, mode).save(buffer, format="jpeg", quality=95)
    return buffer.getvalue()


def _png(image: PIL.Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="png", **kwargs)
    return buffer.getvalue()


def make_image_folder(root: Path):
    """Class folders created out of sorted order; returns the sorted (name, label) list."""
    rng = np.random.default_rng(1)

    def rgb(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    palette = PIL.Image.fromarray(rgb(20, 24)).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=8)
    files = {
        "zebra/0_rgb.jpg": _jpeg(rgb(30, 20)),
        "zebra/1_small.png": _png(PIL.Image.fromarray(rgb(7, 6))),  # 6 px < 16/2: upscaled, noted
        "zebra/2_last.jpg": _jpeg(rgb(20, 33)),
        "ant/0_rgb.jpg": _jpeg(rgb(24, 40)),
        "ant/1_cmyk.jpg": _jpeg(rng.integers(0, 256, (20, 28, 4), dtype=np.uint8), "CMYK"),
        "ant/2_gray.jpg": _jpeg(rng.integers(0, 256, (22, 30), dtype=np.uint8), "L"),
        "moth/0_broken.jpg": _jpeg(rgb(40, 40))[:700],  # truncated mid-scan
        "moth/1_palette.png": _png(palette, transparency=0),
        "moth/2_rgba.png": _png(PIL.Image.fromarray(rng.integers(0, 256, (18, 26, 4), dtype=np.uint8), "RGBA")),
        "moth/3_tiny.png": _png(PIL.Image.fromarray(rgb(3, 3))),  # below --min-size=4: reported
        "moth/notes.txt": b"not an image",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    labels = {"ant": 0, "moth": 1, "zebra": 2}
    return sorted((n, labels[n.split("/")[0]]) for n in files if not n.endswith(".txt"))


def run_convert(source, dest, *extra):
    args = [f"--source={source}", f"--dest={dest}", f"--resolution={RESOLUTION}x{RESOLUTION}"]
    return dataset_tools.main(
        ["convert", *args, "--transform=center-crop-dhariwal", "--min-size=4", "--workers=0", *extra]
    )


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    sources = make_image_folder(root / "train")
    run_convert(root / "train", root / "data" / "images")
    return root, sources


def test_convert_reports_bad_images_and_keeps_labels(converted):
    root, sources = converted
    images = root / "data" / "images"
    report = json.loads((images / "report.json").read_text())
    meta = json.loads((images / "dataset.json").read_text())

    failed = {f["index"]: (f["source"], f["reason"]) for f in report["failed"]}
    assert failed.keys() == {3, 6}, report["failed"]
    assert failed[3][0] == "moth/0_broken.jpg" and failed[3][1].startswith("corrupt or truncated")
    assert failed[6][0] == "moth/3_tiny.png" and failed[6][1].startswith("tiny: 3x3")
    notes = {n["source"]: n["note"] for n in report["notes"]}
    assert notes == {
        "ant/1_cmyk.jpg": "converted from CMYK",
        "ant/2_gray.jpg": "converted from L",
        "moth/1_palette.png": "converted from P",
        "moth/2_rgba.png": "converted from RGBA",
        "zebra/1_small.png": "tiny: 6x7 upscaled 2.7x",
    }
    assert (report["images"], report["kept"], report["ignored_non_image_files"]) == (10, 8, 1)
    assert meta["class_names"] == ["ant", "moth", "zebra"]

    # Index i is source i in sorted order; failures leave gaps, so nothing after them shifts.
    kept = [i for i in range(len(sources)) if i not in failed]
    assert meta["labels"] == [[layout.image_name(i), sources[i][1]] for i in kept]
    for i in kept:
        out = np.asarray(PIL.Image.open(images / layout.image_name(i)))
        source_image = dataset_tools.to_rgb(PIL.Image.open(root / "train" / sources[i][0]))
        np.testing.assert_array_equal(out, center_crop_adm(source_image, RESOLUTION), err_msg=sources[i][0])
        assert out.shape == (RESOLUTION, RESOLUTION, 3)
    gray = np.asarray(PIL.Image.open(images / layout.image_name(2)))  # ant/2_gray.jpg
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert not list(images.rglob(".*.tmp-*"))


def test_convert_resumes_after_kill_with_identical_files(converted, tmp_path, monkeypatch):
    root, _ = converted
    dest = tmp_path / "images"
    adm = dataset_tools.TRANSFORMS["center-crop-dhariwal"]
    calls = []

    def killed_on_fourth_image(image, size):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated kill")
        return adm(image, size)

    monkeypatch.setitem(dataset_tools.TRANSFORMS, "center-crop-dhariwal", killed_on_fourth_image)
    with pytest.raises(KeyboardInterrupt):
        run_convert(root / "train", dest)
    monkeypatch.setitem(dataset_tools.TRANSFORMS, "center-crop-dhariwal", adm)
    assert not (dest / "dataset.json").exists()  # written last: an interrupted run is visibly unfinished
    # Index 0, 1, 2 are done (3 failed). Damage 0 (the header check must catch it) and leave a temp file.
    (dest / layout.image_name(0)).write_bytes(b"garbage")
    stale = dest / "00000" / ".img00000004.png.tmp-999"
    stale.write_bytes(b"partial")

    run_convert(root / "train", dest)
    report = json.loads((dest / "report.json").read_text())
    assert (report["skipped_existing"], report["written"]) == (2, 6)
    assert not stale.exists()
    resumed, fresh = folder_bytes(dest), folder_bytes(root / "data" / "images")
    assert resumed.pop("report.json") != fresh.pop("report.json") and resumed == fresh
    # The report is complete after a resume too: notes of skipped images come from their headers.
    fresh_report = json.loads((root / "data" / "images" / "report.json").read_text())
    assert {k: v for k, v in report.items() if k not in ("written", "skipped_existing")} == {
        k: v for k, v in fresh_report.items() if k not in ("written", "skipped_existing")
    }

    with pytest.raises(ValueError, match="other settings"):
        dataset_tools.main(["convert", f"--source={root / 'train'}", f"--dest={dest}", "--resolution=8x8"])


def test_convert_zip_to_zip_matches_folder(converted, tmp_path):
    root, _ = converted
    source_zip = tmp_path / "train.zip"
    with zipfile.ZipFile(source_zip, "w") as archive:
        for name, data in folder_bytes(root / "train").items():
            archive.writestr(name, data)
    run_convert(source_zip, tmp_path / "images.zip")
    assert not (tmp_path / "images.zip.parts").exists()
    with zipfile.ZipFile(tmp_path / "images.zip") as archive:
        packed = {n: archive.read(n) for n in archive.namelist()}
    folder = folder_bytes(root / "data" / "images")
    assert packed.keys() == folder.keys() - {".job.json"}
    assert all(packed[n] == folder[n] for n in packed if n != "report.json")


def test_convert_refuses_a_resolution_not_divisible_by_8_before_writing(converted, tmp_path):
    root, _ = converted
    with pytest.raises(ValueError, match=r"--resolution=36x36: 36 is not a multiple of 8.*\[32, 40\]"):
        run_convert(root / "train", tmp_path / "images", "--resolution=36x36")
    assert not (tmp_path / "images").exists()


def test_cli_errors_are_one_line_exits(tmp_path, monkeypatch):
    # Library functions raise ordinary exceptions; only `python preprocessing/dataset_tools.py` and
    # `python -m demo data` turn them into a one-line exit.
    (tmp_path / "empty").mkdir()
    script = ROOT / "preprocessing" / "dataset_tools.py"
    monkeypatch.setattr(
        sys, "argv", [str(script), "convert", f"--source={tmp_path / 'empty'}", f"--dest={tmp_path / 'x'}"]
    )
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(script), run_name="__main__")
    assert info.value.code == f"error: {tmp_path / 'empty'}: no image files found"
    (tmp_path / "real" / "images").mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["demo", "data", "--out", str(tmp_path / "real"), "--per-class=1"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("demo", run_name="__main__")
    assert (
        info.value.code
        == f"error: {tmp_path / 'real' / 'images'} exists and is not a demo set; refusing to overwrite it"
    )


# --- encode ---------------------------------------------------------------------------------------


def run_encode(source, dest, vae_path, *extra):
    args = [f"--source={source}", f"--dest={dest}", f"--vae={vae_path}", "--batch-size=3", "--workers=0"]
    return dataset_tools.main(["encode", *args, "--flip", *extra])


@pytest.fixture(scope="module")
def encoded(converted, tiny_vae):
    root, _ = converted
    run_encode(root / "data" / "images", root / "data" / "vae-sd", tiny_vae[0])
    return root / "data"


def test_encode_stores_posterior_mean_and_std(encoded, tiny_vae):
    _, vae = tiny_vae
    image_meta = json.loads((encoded / "images" / "dataset.json").read_text())
    latent_meta = json.loads((encoded / "vae-sd" / "dataset.json").read_text())
    # Same items (gaps included), labels carried over, each latent named after its image.
    assert latent_meta["labels"] == [
        [n.replace("/img", "/img-mean-std-").replace(".png", ".npy"), label] for n, label in image_meta["labels"]
    ]
    assert latent_meta["class_names"] == image_meta["class_names"]
    for name, _label in image_meta["labels"]:
        index = layout.name_index(name)
        image = np.asarray(PIL.Image.open(encoded / "images" / name))
        x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].float() / 127.5 - 1  # [-1, 1]
        stored = np.load(encoded / "vae-sd" / layout.latent_name(index))
        flipped = np.load(encoded / "vae-sd-flip" / layout.latent_name(index))
        assert stored.shape == (8, RESOLUTION // 8, RESOLUTION // 8) and stored.dtype == np.float32
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            mirrored = vae.encode(x.flip(-1)).latent_dist
        np.testing.assert_allclose(stored[:4], posterior.mean[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(stored[4:], torch.exp(0.5 * posterior.logvar[0]).numpy(), rtol=1e-5)
        np.testing.assert_allclose(flipped[:4], mirrored.mean[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(flipped[4:], mirrored.std[0].numpy(), rtol=1e-5)
        # The stored mean decodes through the same VAE like the posterior it came from.
        with torch.no_grad():
            decoded = vae.decode(torch.from_numpy(stored[None, :4])).sample
            reference = vae.decode(posterior.mean).sample
        assert decoded.shape == x.shape
        torch.testing.assert_close(decoded, reference, atol=1e-4, rtol=1e-4)
    assert not (encoded / "vae-sd" / layout.latent_name(3)).exists()  # the failed image's gap stays a gap


def test_encode_refuses_images_not_divisible_by_8(tiny_vae, tmp_path):
    # 36 px would give floored 4x4 latents of a 4.5x4.5 grid: refused before anything is written.
    images = tmp_path / "images"
    entries = []
    for index in range(2):
        pixels = np.full((36, 36, 3), 40 * index, np.uint8)
        layout.atomic_write(str(images / layout.image_name(index)), layout.png_bytes(pixels))
        entries.append([layout.image_name(index), 0])
    (images / "dataset.json").write_bytes(layout.dataset_json_bytes(entries))
    with pytest.raises(ValueError, match=r"img00000000.png is 36x36 px, not a multiple of 8"):
        run_encode(images, tmp_path / "vae-sd", tiny_vae[0])
    assert not (tmp_path / "vae-sd").exists() and not (tmp_path / "vae-sd-flip").exists()


def test_encode_resumes_after_kill(encoded, tiny_vae, tmp_path, monkeypatch):
    encode_moments = dataset_tools.encode_moments
    calls = []

    def killed_in_second_batch(vae, images):
        calls.append(1)
        if len(calls) == 3:  # batch 1 = 2 calls (plain + flipped), then die
            raise KeyboardInterrupt("simulated kill")
        return encode_moments(vae, images)

    monkeypatch.setattr(dataset_tools, "encode_moments", killed_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_encode(encoded / "images", tmp_path / "vae-sd", tiny_vae[0])
    monkeypatch.setattr(dataset_tools, "encode_moments", encode_moments)
    assert len(list((tmp_path / "vae-sd").rglob("*.npy"))) == 3
    run_encode(encoded / "images", tmp_path / "vae-sd", tiny_vae[0])
    for folder in ("vae-sd", "vae-sd-flip"):
        assert_same_latents(tmp_path / folder, encoded / folder)


def assert_same_latents(a: Path, b: Path):
    """Same files; .npy contents equal up to float32 round-off (batch composition may differ)."""
    files_a, files_b = folder_bytes(a), folder_bytes(b)
    assert files_a.keys() == files_b.keys()
    for name in files_a:
        if name.endswith(".npy"):
            np.testing.assert_allclose(np.load(a / name), np.load(b / name), atol=1e-6, err_msg=name)
        elif name != ".job.json":  # holds the absolute source path
            assert files_a[name] == files_b[name], name


# --- Two processes vs one -------------------------------------------------------------------------


def test_two_processes_write_the_same_files(encoded, converted, tiny_vae, tmp_path):
    root, _ = converted
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    script = str(ROOT / "preprocessing" / "dataset_tools.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    convert_args = [
        "convert",
        f"--source={root / 'train'}",
        f"--dest={tmp_path / 'images'}",
        f"--resolution={RESOLUTION}x{RESOLUTION}",
        "--min-size=4",
        "--workers=0",
    ]
    encode_args = [
        "encode",
        f"--source={tmp_path / 'images'}",
        f"--dest={tmp_path / 'vae-sd'}",
        f"--vae={tiny_vae[0]}",
        "--flip",
        "--batch-size=3",
        "--workers=0",
    ]
    for args in (convert_args, encode_args):
        done = subprocess.run([*launch, script, *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
    # The summary sums the ranks' counts: 8 means the shards were disjoint (16 if each did everything).
    assert "8 encoded now" in done.stdout, done.stdout
    assert folder_bytes(tmp_path / "images") == folder_bytes(root / "data" / "images")
    for folder in ("vae-sd", "vae-sd-flip"):
        assert_same_latents(tmp_path / folder, encoded / folder)


# --- encode-targets -------------------------------------------------------------------------------
# The demo set (24 images, 32 px) and a random DINOv2-S at encoder resolution 64 (4x4 tokens): the setting
# tests/test_train.py's tiny runs use (SiT-S/8 on 32 px pixels). Shards of 10 items: 10, 10 and 4.

TARGET_ARGS = ["--enc-type=dinov2-vit-s", "--enc-weights=random", "--enc-resolution=64", "--workers=0"]


def run_encode_targets(source, dest, *extra):
    args = [f"--source={source}", f"--dest={dest}", *TARGET_ARGS, "--shard-size=10", "--batch-size=10"]
    return dataset_tools.main(["encode-targets", *args, *extra])


def random_dinov2_s():
    """The encoder train.py and encode-targets build with --seed 0 and --enc-weights random."""
    from models.encoders import load_encoders

    torch.manual_seed(0)
    (encoder,) = load_encoders("dinov2-vit-s", "cpu", 64, enc_weights="random")
    return encoder


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_encode_targets_round_trips_bit_exact_with_flips(demo_data, tmp_path, dtype):
    from preprocessing.target_cache import DiskTargetCache, weights_sha256

    dest = tmp_path / "targets"
    # One batch of all 24 items: the reference below then runs the encoder on the very same batches.
    run_encode_targets(demo_data / "images", dest, "--flip", f"--dtype={dtype}", "--batch-size=24")
    cache = DiskTargetCache(dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    encoder = random_dinov2_s()
    assert manifest["encoders"][0]["weights_sha256"] == weights_sha256(encoder.model)
    assert (manifest["items"], manifest["flip"], manifest["dtype"]) == (24, True, dtype)
    assert manifest["encoders"][0] | {"weights_sha256": None} == dict(
        name="dinov2-vit-s", timm_arch="vit_small_patch14_dinov2", timm_kwargs={}, resolution=64, grid=4, tokens=16,
        embed_dim=384, num_prefix_tokens=1, final_norm=True, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
        weights_source="RANDOM", weights_sha256=None,
    )  # fmt: skip
    assert [np.load(p, mmap_mode="r").shape[0] for p in sorted((dest / "enc0" / "plain").iterdir())] == [10, 10, 4]

    # The items train.py would draw: index 24 + k is item k's image reversed along W (ImageLatentDataset flip).
    flipping = ImageLatentDataset(demo_data, latents=False, flip=True)
    images = torch.stack([flipping[k][0] for k in range(48)])
    assert torch.equal(images[24:], images[:24].flip(-1))
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    with torch.no_grad():
        expected = torch.cat([encoder.encode(images[:24]), encoder.encode(images[24:])]).to(torch_dtype)
    read = torch.stack([cache[index][0] for index in range(48)])
    assert read.dtype == torch_dtype and read.shape == (48, 16, 384)
    assert torch.equal(read, expected)
    # The test can tell: plain and mirrored tokens differ, and the stored dtype rounds (not fp32 in disguise).
    assert not torch.equal(read[:24], read[24:])
    with torch.no_grad():
        assert not torch.equal(encoder.encode(images[:24]), expected[:24].float())


def test_encode_targets_resumes_after_kill_with_identical_files(demo_data, tmp_path, monkeypatch):
    from preprocessing import target_cache

    fresh = tmp_path / "fresh"
    run_encode_targets(demo_data / "images", fresh, "--flip")
    write_shard, calls = target_cache.write_shard, []

    def killed_at_third_file(path, array):
        calls.append(path)
        if len(calls) == 3:  # shard 0 plain and flipped are done; shard 1 plain was being written
            raise KeyboardInterrupt("simulated kill")
        return write_shard(path, array)

    monkeypatch.setattr(target_cache, "write_shard", killed_at_third_file)
    dest = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_encode_targets(demo_data / "images", dest, "--flip")
    monkeypatch.setattr(target_cache, "write_shard", write_shard)
    assert not (dest / "manifest.json").exists()  # written last: an unfinished cache is visibly unfinished
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        target_cache.DiskTargetCache(dest)
    (dest / "enc0" / "plain" / ".00001.npy.tmp-999").write_bytes(b"partial")
    done = {p: p.stat().st_mtime_ns for p in dest.rglob("0000*.npy")}
    assert len(done) == 2

    run_encode_targets(demo_data / "images", dest, "--flip")
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in done.items())  # finished shards were kept
    assert json.loads((dest / "report.json").read_text())["encoded_now"] == 14
    # Batches of 10 = shards of 10: the resumed shards see the same batches, so every byte is the same.
    resumed, expected = folder_bytes(dest), folder_bytes(fresh)
    assert resumed.pop("report.json") != expected.pop("report.json") and resumed == expected
    with pytest.raises(ValueError, match="other settings.*'dtype': \\('fp16', 'bf16'\\)"):
        run_encode_targets(demo_data / "images", dest, "--flip", "--dtype=bf16")


def test_encode_targets_reports_unreadable_images_and_finishes_on_rerun(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data / "images", data / "images")
    broken = data / "images" / layout.image_name(13)  # shard 1; not one of the items the dataset probes at start
    good = broken.read_bytes()
    broken.write_bytes(good[:100])
    dest = tmp_path / "targets"
    with pytest.raises(ValueError, match=r"1 image\(s\) could not be read.*item 13: .*img00000013.png"):
        run_encode_targets(data / "images", dest)
    report = json.loads((dest / "report.json").read_text())
    assert [f["index"] for f in report["failed"]] == [13] and "img00000013.png" in report["failed"][0]["image"]
    assert sorted(p.name for p in (dest / "enc0" / "plain").glob("*.npy")) == ["00000.npy", "00002.npy"]
    assert not (dest / "manifest.json").exists()
    broken.write_bytes(good)
    run_encode_targets(data / "images", dest)
    assert json.loads((dest / "report.json").read_text()) == {"items": 24, "encoded_now": 10, "failed": []}
    assert (dest / "manifest.json").exists()


def test_encode_targets_two_processes_write_the_same_files(demo_data, tmp_path):
    run_encode_targets(demo_data / "images", tmp_path / "one", "--flip")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    script = str(ROOT / "preprocessing" / "dataset_tools.py")
    args = [f"--source={demo_data / 'images'}", f"--dest={tmp_path / 'two'}", *TARGET_ARGS, "--flip"]
    args += ["--shard-size=10", "--batch-size=10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, script, "encode-targets", *args], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "24 encoded now" in done.stdout, done.stdout  # the ranks' shards were disjoint and complete
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")  # shards, manifest, report


# --- Demo data ------------------------------------------------------------------------------------


def test_demo_data_is_deterministic_labelled_and_readable(tmp_path, tiny_vae):
    make_demo_data.main(["--out", str(tmp_path / "a"), "--per-class=6", "--seed=3", f"--vae={tiny_vae[0]}"])
    make_demo_data.make_demo_data(str(tmp_path / "b"), per_class=6, seed=3)
    make_demo_data.make_demo_data(str(tmp_path / "c"), per_class=6, seed=4)
    a, b, c = (folder_bytes(tmp_path / d / "images") for d in "abc")
    assert a == b and a != c

    data = ImageLatentDataset(tmp_path / "a", latents=False)
    assert len(data) == 60 and data.num_classes == 10 and data.image_shape == (3, 32, 32)
    assert np.bincount(data.labels).tolist() == [6] * 10
    assert sorted(set(data.labels[:20].tolist())) != [data.labels[0]]  # classes interleaved, not sorted
    # Stripes are what their class says: horizontal ones are constant along rows, vertical along columns.
    for k in range(len(data)):
        image = data[k][0].float()
        name = data.class_names[data.labels[k]]
        if name in ("horizontal-stripes", "vertical-stripes"):
            along_rows = image.std(dim=2).mean()  # variation within each row
            along_cols = image.std(dim=1).mean()
            assert (along_rows < along_cols) == (name == "horizontal-stripes"), (k, name)
    with_latents = ImageLatentDataset(tmp_path / "a")
    assert with_latents[0][1].shape == (8, 4, 4)

    # A rerun replaces a demo set, but never a folder that is not one.
    (tmp_path / "real" / "images").mkdir(parents=True)
    (tmp_path / "real" / "images" / "dataset.json").write_text('{"labels": null}')
    with pytest.raises(FileExistsError, match="not a demo set"):
        make_demo_data.make_demo_data(str(tmp_path / "real"), per_class=1)
