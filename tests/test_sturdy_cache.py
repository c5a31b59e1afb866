"""A sturdy target cache and encoder files: what a stale, corrupt or damaged cache or encoder file does.

Each case is refused with a message naming the file (manifest.json, the shard, the encoder file), the key or
keyword, and the fix, instead of training on wrong targets, skipping every step, or a bare KeyError:
  1. the manifest records and checks the encoders' mean/std and architecture keywords, and a pixel hash
     (a `convert` rerun with another --transform);
  2. row checksums per shard, verified on read; non-finite rows refused when written and named when read;
  3. a damaged manifest.json (flipped bits, deleted keys, truncation, wrong types) is a ValueError naming it;
  4. the names/labels hash: same item count, other image names or labels;
  5. encoder files: NaN mean/std, a pos_embed of another grid, keywords timm refuses, unreadable files.
The demo set (24 images, 32 px) and a random DINOv2-S at encoder resolution 64 (4x4 tokens), as
tests/test_preprocessing.py's encode-targets tests; shards of 10 items.
"""

import hashlib
import json
import pickle
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import timm
import torch
from safetensors.torch import save_file

from dataset import ImageLatentDataset
from models import encoders
from preprocessing import dataset_tools, layout, target_cache
from preprocessing.target_cache import DiskTargetCache, open_target_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGET_ARGS = ["--enc-type=dinov2-vit-s", "--enc-weights=random", "--enc-resolution=64", "--workers=0"]
REWRITE = "rerun `dataset_tools.py encode-targets`"


@pytest.fixture(autouse=True)
def _quiet_random_weight_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        yield


def encode_targets(source, dest, *extra, args=TARGET_ARGS):
    argv = [f"--source={source}", f"--dest={dest}", *args, "--shard-size=10", "--batch-size=10", *extra]
    return dataset_tools.main(["encode-targets", *argv])


def random_dinov2_s():
    torch.manual_seed(0)  # encode-targets' --seed 0
    (encoder,) = encoders.load_encoders("dinov2-vit-s", "cpu", 64, enc_weights="random")
    return encoder


@pytest.fixture(scope="module")
def cache(demo_data, tmp_path_factory):
    """encode-targets on the demo set with flips, fp16 (read-only: tests copy it before changing it)."""
    dest = tmp_path_factory.mktemp("sturdy") / "targets"
    encode_targets(demo_data / "images", dest, "--flip")
    return dest


@pytest.fixture(scope="module")
def encoder():
    return random_dinov2_s()


@pytest.fixture(scope="module")
def expected(demo_data, encoder):
    """The run's identity (encoders, dataset), computed once: what a cache of the demo set must hold."""
    return target_cache.run_identity([encoder], ImageLatentDataset(demo_data, latents=False))


@pytest.fixture(scope="module")
def rows(cache):
    """The 48 rows (24 items + 24 mirrors) of the intact cache."""
    reader = DiskTargetCache(cache)
    return [reader[i][0] for i in range(len(reader))]


def copy_cache(cache, tmp_path) -> Path:
    dest = tmp_path / "targets"
    shutil.copytree(cache, dest)
    return dest


def manifest_of(root) -> dict:
    return json.loads((Path(root) / "manifest.json").read_text())


def copy_data(demo_data, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(demo_data / "images", data / "images")
    return data


#################################################################################
#        1. The encoders' mean/std and keywords, and a hash of the pixels       #
#################################################################################


def test_manifest_records_normalisation_keywords_and_a_pixel_hash(cache, demo_data, encoder):
    manifest = manifest_of(cache)
    (info,) = manifest["encoders"]
    assert (info["mean"], info["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert info["timm_kwargs"] == {} and info["num_prefix_tokens"] == 1 and info["final_norm"] is True
    # The pixel hash, recomputed independently: SHA-256 of the per-file SHA-256s of the images, in item order.
    names = ImageLatentDataset(demo_data, latents=False).image_names.tolist()
    files = b"".join(hashlib.sha256((demo_data / "images" / n).read_bytes()).digest() for n in names)
    assert manifest["dataset"]["pixels_sha256"] == hashlib.sha256(files).hexdigest()
    # The pixel hash leaves the job settings (so that fixed images resume, see below) but is in the manifest.
    assert "pixels_sha256" not in json.loads((cache / ".job.json").read_text())["dataset"]


TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, reg_tokens=2)
TINY_VIT_NORM = ((0.3, 0.4, 0.5), (0.2, 0.25, 0.3))


def tiny_vit_file(path, seed=0, norm=TINY_VIT_NORM, **overrides):
    """A save_timm_encoder file of the demo's tiny ViT (8x8 tokens at 32 px: encoder resolution 128)."""
    torch.manual_seed(seed)
    kwargs = {**TINY_VIT_KWARGS, **overrides}
    model = timm.create_model(TINY_VIT, num_classes=10, **kwargs).eval()
    return encoders.save_timm_encoder(model, TINY_VIT, kwargs, path, *norm)


def test_a_cache_of_another_normalisation_or_keyword_is_refused(demo_data, tmp_path):
    # The same weights with another activation (act_layer) or another mean/std give other tokens while the
    # weights hash stays the same: only the recorded keywords and mean/std can tell.
    files = {
        "cache": tiny_vit_file(tmp_path / "enc.pt"),
        "act_layer": tiny_vit_file(tmp_path / "tanh.pt", act_layer="gelu_tanh"),
        "mean": tiny_vit_file(tmp_path / "mean.pt", norm=((0.5, 0.5, 0.5), TINY_VIT_NORM[1])),
        "std": tiny_vit_file(tmp_path / "std.pt", norm=(TINY_VIT_NORM[0], (0.5, 0.5, 0.5))),
    }
    args = [f"--enc-type=timm:{TINY_VIT}", f"--enc-ckpt={files['cache']}", "--enc-resolution=128", "--workers=0"]
    encode_targets(demo_data / "images", tmp_path / "targets", args=args)
    dataset = ImageLatentDataset(demo_data, latents=False)
    load = lambda path: encoders.load_encoders(f"timm:{TINY_VIT}", "cpu", 128, ckpt_path=path)
    open_target_cache(tmp_path / "targets", load(files["cache"]), dataset, flip=False)  # the writer's encoder fits
    recorded = manifest_of(tmp_path / "targets")["encoders"][0]
    for key in ("act_layer", "mean", "std"):
        other = load(files[key])
        assert target_cache.weights_sha256(other[0].model) == recorded["weights_sha256"]
        with pytest.raises(ValueError) as info:
            open_target_cache(tmp_path / "targets", other, dataset, flip=False)
        message = str(info.value)
        name = "timm_kwargs" if key == "act_layer" else key
        assert f"manifest.json: encoders[0] (timm:{TINY_VIT}) key '{name}' is " in message, message
        assert repr(recorded[name]) in message and REWRITE in message
        found = target_cache.encoder_identity(other[0])[name]
        assert repr(found) in message and (key != "act_layer" or "'gelu_tanh'" in message)


def make_image_folder(root: Path) -> None:
    """2 classes x 3 non-square images: the two crops (--transform) give other pixels under the same names."""
    rng = np.random.default_rng(0)
    for k in range(6):
        array = rng.integers(0, 256, (40 + 8 * k, 64, 3), dtype=np.uint8)
        path = root / f"class{k % 2}" / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(array).save(path)


@pytest.mark.parametrize("store", ["folder", "zip"])
def test_convert_rerun_with_another_transform_is_refused(tmp_path, store):
    make_image_folder(tmp_path / "source")
    suffix = ".zip" if store == "zip" else ""
    for name, transform in (("a", "center-crop-dhariwal"), ("b", "center-crop")):
        argv = [f"--source={tmp_path / 'source'}", f"--dest={tmp_path / name / ('images' + suffix)}"]
        dataset_tools.main(["convert", *argv, "--resolution=32x32", f"--transform={transform}", "--workers=0"])
    encode_targets(tmp_path / "a" / f"images{suffix}", tmp_path / "targets")
    rerun = ImageLatentDataset(tmp_path / "b", latents=False)
    manifest = manifest_of(tmp_path / "targets")
    # Same names and dataset.json (the names hash cannot tell), other pixels.
    identity = target_cache.dataset_identity(rerun)
    assert identity["names_sha256"] == manifest["dataset"]["names_sha256"]
    with pytest.raises(ValueError) as info:
        open_target_cache(tmp_path / "targets", [random_dinov2_s()], rerun, flip=False)
    message = str(info.value)
    assert "manifest.json: dataset key 'pixels_sha256' is " in message and REWRITE in message
    assert manifest["dataset"]["pixels_sha256"] in message and identity["pixels_sha256"] in message
    # The cache still serves the images it was written for.
    open_target_cache(
        tmp_path / "targets", [random_dinov2_s()], ImageLatentDataset(tmp_path / "a", latents=False), False
    )


def test_one_image_replaced_under_its_name_is_refused(cache, demo_data, tmp_path, encoder):
    data = copy_data(demo_data, tmp_path)
    image = data / "images" / layout.image_name(7)
    pixels = np.array(PIL.Image.open(image))
    pixels[0, 0, 0] ^= 1  # one pixel, one bit
    image.write_bytes(layout.png_bytes(pixels))
    with pytest.raises(ValueError, match=r"manifest.json: dataset key 'pixels_sha256' is '[0-9a-f]{64}', but"):
        open_target_cache(cache, [encoder], ImageLatentDataset(data, latents=False), flip=True)
    # train.py's other processes skip the content hash (the main process reads the images once); the rest holds.
    open_target_cache(cache, [encoder], ImageLatentDataset(data, latents=False), flip=True, verify_pixels=False)


def test_rerun_after_replacing_images_re_encodes_only_their_shards(demo_data, tmp_path, capsys):
    # A killed run's shards are kept only while their images are unchanged (the pixel hash per shard).
    data, dest = copy_data(demo_data, tmp_path), tmp_path / "targets"
    encode_targets(data / "images", dest, "--flip")
    (dest / "manifest.json").unlink()  # as a killed run leaves it
    image = data / "images" / layout.image_name(13)  # shard 1
    image.write_bytes(layout.png_bytes(255 - np.array(PIL.Image.open(image))))
    kept = {p: p.stat().st_mtime_ns for p in dest.rglob("0000[02].npy")}
    encode_targets(data / "images", dest, "--flip")
    assert "the images of shard 1 (items 10..19) changed" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())
    assert json.loads((dest / "report.json").read_text())["encoded_now"] == 10
    fresh = tmp_path / "fresh"
    encode_targets(data / "images", fresh, "--flip")
    assert all((dest / p.relative_to(fresh)).read_bytes() == p.read_bytes() for p in fresh.rglob("*.npy"))
    assert manifest_of(dest) == manifest_of(fresh)


#################################################################################
#                 2. Row checksums per shard; non-finite rows                   #
#################################################################################


def data_offset(path: Path) -> int:
    """Where a .npy file's array bytes begin (np.save writes format 1.0 for these headers)."""
    with open(path, "rb") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


def test_manifest_holds_each_rows_crc32(cache):
    shards = manifest_of(cache)["shards"]
    assert sorted(shards) == [f"enc0/{v}/0000{j}.npy" for v in ("flip", "plain") for j in range(3)]
    for name, sums in shards.items():
        array = np.load(cache / name)
        assert sums == "".join(f"{zlib.crc32(row.tobytes()):08x}" for row in array)


def test_a_flipped_byte_in_a_shard_is_refused_and_a_rerun_repairs_it(cache, demo_data, tmp_path, rows, capsys):
    dest = copy_cache(cache, tmp_path)
    shard = dest / "enc0" / "flip" / "00001.npy"
    row_bytes = 16 * 384 * 2
    data = bytearray(shard.read_bytes())
    data[data_offset(shard) + 3 * row_bytes + 101] ^= 0x10  # row 3 of items 10..19: item 13, mirrored
    shard.write_bytes(bytes(data))
    reader = DiskTargetCache(dest)  # headers are fine: the damage shows on reading that row
    assert all(torch.equal(reader[i][0], rows[i]) for i in range(48) if i != 24 + 13)
    with pytest.raises(ValueError) as info:
        reader[24 + 13]
    message = str(info.value)
    assert f"target shard {shard} row 3 (item 13, mirrored) fails its checksum" in message
    assert "manifest.json records" in message and REWRITE in message
    # Rerunning the same command re-encodes the shard (items 10..19, every view) that fails its checksums.
    kept = {p: p.stat().st_mtime_ns for p in dest.rglob("*.npy") if p.name != "00001.npy"}
    encode_targets(demo_data / "images", dest, "--flip")
    assert f"{shard} fails the checksums of the previous manifest.json: encoding it again" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())
    assert shard.read_bytes() == (cache / "enc0" / "flip" / "00001.npy").read_bytes()
    assert torch.equal(DiskTargetCache(dest)[24 + 13][0], rows[24 + 13])


@pytest.mark.parametrize("damage", ["truncated", "missing", "other shape"])
def test_a_truncated_or_missing_shard_is_refused_at_open(cache, tmp_path, damage):
    dest = copy_cache(cache, tmp_path)
    shard = dest / "enc0" / "plain" / "00002.npy"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-7])
    elif damage == "missing":
        shard.unlink()
    else:
        np.save(shard, np.zeros((5, 16, 384), np.float16))
    needle = {"truncated": "bytes, expected", "missing": "it is missing", "other shape": "(5, 16, 384)"}[damage]
    with pytest.raises(ValueError) as info:
        DiskTargetCache(dest)
    assert f"target shard {shard}: " in str(info.value) and needle in str(info.value) and REWRITE in str(info.value)


def test_a_non_finite_row_is_named_when_read_and_in_training(cache, demo_data, tmp_path):
    from tests.test_train_loop import run, tiny_argv

    # A shard holding a NaN row with a matching checksum: what a cache written before rows were checked holds.
    dest = copy_cache(cache, tmp_path)
    shard = dest / "enc0" / "plain" / "00000.npy"
    array = np.load(shard)
    array[4, 2, 7] = np.nan
    np.save(shard, array)
    manifest = manifest_of(dest)
    manifest["shards"]["enc0/plain/00000.npy"] = target_cache.row_checksums(array)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"target shard {shard} row 4 \(item 4\) holds non-finite values"):
        DiskTargetCache(dest)[4]
    # Training reads it within the first epoch (24 items, batches of 4) and stops naming it, instead of
    # skipping steps.
    with pytest.raises(ValueError, match=rf"target shard {shard} row 4 \(item 4\) holds non-finite values"):
        run(tiny_argv(demo_data, tmp_path / "run", target_cache=dest, max_train_steps=6, checkpointing_steps=6))


def test_non_finite_tokens_are_refused_when_written(demo_data, tmp_path, monkeypatch):
    encode = encoders.FrozenEncoder.encode

    def nan_for_the_third_image(self, images, class_token=False):
        tokens = encode(self, images, class_token=class_token)
        tokens[2] = float("nan")
        return tokens

    monkeypatch.setattr(encoders.FrozenEncoder, "encode", nan_for_the_third_image)
    dest = tmp_path / "targets"
    with pytest.raises(ValueError) as info:
        encode_targets(demo_data / "images", dest)
    message = str(info.value)
    assert "non-finite tokens for item(s) [2]" in message and str(dest / "enc0" / "plain" / "00000.npy") in message
    assert not list(dest.rglob("*.npy")) and not (dest / "manifest.json").exists()
    # The writer refuses them too, naming the file and the row.
    array = np.zeros((4, 16, 384), np.float16)
    array[3, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"00000.npy: rows \[3\] hold non-finite values; the shard was not written"):
        target_cache.write_shard(str(tmp_path / "00000.npy"), array)
    assert not (tmp_path / "00000.npy").exists()
    bf16 = torch.zeros(2, 16, 384, dtype=torch.bfloat16)
    bf16[1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\] hold non-finite"):
        target_cache.write_shard(str(tmp_path / "b.npy"), bf16.view(torch.int16).numpy().view(np.uint16))


#################################################################################
#                     3. A damaged manifest.json: always named                  #
#################################################################################


def open_and_read(root, expected, rows) -> str | None:
    """None when the cache opens, passes the run's check and every row reads as the intact one; else the
    ValueError's message. Any other exception fails the test."""
    try:
        reader = DiskTargetCache(root)
        reader.check_identity(expected, flip=True)
        for i in range(len(reader)):
            assert torch.equal(reader[i][0], rows[i]), i
    except ValueError as err:
        return str(err)
    return None


def assert_named(message, root, what):
    assert message is None or str(root / "manifest.json") in message, f"{what}: {message}"


def test_flipped_bits_in_the_manifest_are_named_errors(cache, tmp_path, expected, rows):
    dest = copy_cache(cache, tmp_path)
    original = (cache / "manifest.json").read_bytes()
    outcomes = {"ok": 0, "refused": 0}
    for i in range(len(original)):  # every byte, one bit each (bit i % 8): ~2000 manifests
        damaged = bytearray(original)
        damaged[i] ^= 1 << (i % 8)
        (dest / "manifest.json").write_bytes(bytes(damaged))
        message = open_and_read(dest, expected, rows)
        assert_named(message, dest, f"bit {i % 8} of byte {i} ({original[i : i + 1]!r})")
        outcomes["ok" if message is None else "refused"] += 1
    # Most flips break the JSON or change a checked value; a few land in values nothing depends on.
    assert outcomes["refused"] > 0.9 * len(original), outcomes


def key_paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from key_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from key_paths(value, (*prefix, index))


def test_deleted_keys_and_wrong_types_in_the_manifest_are_named_errors(cache, tmp_path, expected, rows):
    dest = copy_cache(cache, tmp_path)
    manifest = manifest_of(cache)

    def edited(path, value=None, delete=False):
        copy = json.loads(json.dumps(manifest))
        node = copy
        for key in path[:-1]:
            node = node[key]
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return copy

    paths = list(key_paths(manifest))
    assert len(paths) == 33  # 8 top-level keys, 13 per encoder, 4 of the dataset, 6 shards, 2 containers
    for path in paths:
        (dest / "manifest.json").write_text(json.dumps(edited(path, delete=True)))
        message = open_and_read(dest, expected, rows)
        assert message is not None and str(dest / "manifest.json") in message, (path, message)
        # The message names the key (the format check names format/version).
        assert str(path[-1]) in message or path[-1] in ("format", "version"), (path, message)
        for value in (None, "x", -1, 0, 1.5, True, [], {}, [1, 2, 3], "0" * 64, float("nan")):
            (dest / "manifest.json").write_text(json.dumps(edited(path, value)))
            assert_named(open_and_read(dest, expected, rows), dest, f"{path} = {value!r}")


def test_truncated_or_foreign_manifests_are_named_errors(cache, tmp_path, expected, rows):
    dest = copy_cache(cache, tmp_path)
    original = (cache / "manifest.json").read_bytes()
    for size in range(0, len(original), 7):
        (dest / "manifest.json").write_bytes(original[:size])
        message = open_and_read(dest, expected, rows)
        assert message is not None and str(dest / "manifest.json") in message, (size, message)
    foreign = {
        b"": "not valid JSON",
        b"\xff\xfe{}": "not UTF-8",
        b"[1, 2]": "holds a list",
        b"[" * 100_000: "not valid JSON",
        b'{"format": "repa-target-cache", "version": 1}': "version 1, expected 'repa-target-cache' version 2",
        original.replace(b'"items": 24', b'"items": NaN'): "not valid JSON",
    }
    for data, needle in foreign.items():
        (dest / "manifest.json").write_bytes(data)
        with pytest.raises(ValueError) as info:
            DiskTargetCache(dest)
        assert str(dest / "manifest.json") in str(info.value) and needle in str(info.value), str(info.value)[:300]
        assert REWRITE in str(info.value)
    # The errors of the issue: a missing 'dtype' (was KeyError: 'dtype'), broken JSON (was JSONDecodeError).
    broken = manifest_of(cache)
    del broken["dtype"]
    (dest / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"manifest.json: key 'dtype' is missing; .*rerun `dataset_tools.py encode"):
        DiskTargetCache(dest)


#################################################################################
#               4. Same item count, other image names or labels                 #
#################################################################################


@pytest.mark.parametrize("change", ["labels", "names"])
def test_same_count_with_other_names_or_labels_is_refused(cache, demo_data, tmp_path, encoder, change):
    data = copy_data(demo_data, tmp_path)
    meta_path = data / "images" / "dataset.json"
    meta = json.loads(meta_path.read_text())
    if change == "labels":
        first, other = meta["labels"][0], next(e for e in meta["labels"] if e[1] != meta["labels"][0][1])
        first[1], other[1] = other[1], first[1]  # two items swap classes: same count, same class sizes
    else:
        # The last image under another name that still sorts last: same count, same pixels in the same order.
        last = sorted(meta["labels"])[-1]
        new = last[0].replace("img00000023", "img00000099")
        (data / "images" / last[0]).rename(data / "images" / new)
        last[0] = new
    meta_path.write_text(json.dumps(meta))
    dataset = ImageLatentDataset(data, latents=False)
    identity = target_cache.dataset_identity(dataset)
    recorded = manifest_of(cache)["dataset"]
    # Only the names/labels hash tells: the count, shape and pixels are the cache's.
    assert {k: v for k, v in identity.items() if k != "names_sha256"} == {
        k: v for k, v in recorded.items() if k != "names_sha256"
    }
    with pytest.raises(ValueError) as info:
        open_target_cache(cache, [encoder], dataset, flip=False)
    message = str(info.value)
    assert "manifest.json: dataset key 'names_sha256' is " in message and "other image names or labels" in message
    assert recorded["names_sha256"] in message and identity["names_sha256"] in message and REWRITE in message


#################################################################################
#                              5. Encoder files                                 #
#################################################################################


def load_tiny(path, resolution=128):
    return encoders.load_encoders(f"timm:{TINY_VIT}", "cpu", resolution, ckpt_path=path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("key", ["mean", "std"])
def test_a_file_with_non_finite_mean_or_std_is_refused(tmp_path, suffix, key):
    path = tiny_vit_file(tmp_path / f"enc{suffix}")
    if suffix == ".pt":
        raw = torch.load(path, weights_only=True)
        raw[key] = [float("nan"), 0.4, 0.5]
        torch.save(raw, path)
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        save_file(state, str(path), metadata={**meta, key: json.dumps([float("nan"), 0.4, 0.5])})
    with pytest.raises(ValueError) as info:
        load_tiny(path)
    message = str(info.value)
    assert f"--enc-ckpt {path}: {key} must be 3 finite" in message and "nan" in message
    with pytest.raises(ValueError, match="mean must be 3 finite"):  # and it cannot be written
        model = timm.create_model(TINY_VIT, num_classes=10, **TINY_VIT_KWARGS)
        encoders.save_timm_encoder(model, TINY_VIT, TINY_VIT_KWARGS, tmp_path / "x.pt", [0, float("inf"), 0], [1, 1, 1])


def test_a_file_with_non_finite_weights_is_refused(tmp_path):
    path = tiny_vit_file(tmp_path / "enc.pt")
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["blocks.1.mlp.fc2.weight"][3, 4] = float("nan")
    torch.save(raw, path)
    with pytest.raises(ValueError, match=rf"--enc-ckpt {path}: weight blocks.1.mlp.fc2.weight holds non-finite"):
        load_tiny(path)


def test_a_file_whose_pos_embed_is_not_its_img_size_is_refused(tmp_path):
    path = tiny_vit_file(tmp_path / "enc.pt")
    raw = torch.load(path, weights_only=True)
    raw["timm_kwargs"]["img_size"] = 64  # weights of a 32 px (8x8) ViT, keywords of a 64 px (16x16) one
    torch.save(raw, path)
    with pytest.raises(ValueError) as info:
        load_tiny(path, resolution=16 * 16)  # the 16x16 grid passes the SiT grid check: it was resampled before
    message = str(info.value)
    assert f"--enc-ckpt {path}: its pos_embed (1, 67, 64) holds a 8x8 patch grid, 32 px at patch 4" in message
    assert "img_size 64 gives a 16x16 grid" in message and "never resampled" in message, message
    # A plain timm state dict is still resampled to the grid (test_encoders: like the registry's encoders).


@pytest.mark.parametrize(
    "keywords, named",
    [
        (dict(embed_dim="64"), "keyword embed_dim='64'"),  # was TypeError: not all arguments converted
        (dict(act_layer="no_such_activation"), "keyword act_layer='no_such_activation'"),  # was KeyError
        (dict(depth=-1), "keyword depth=-1"),  # was RuntimeError
        (dict(no_such_keyword=1), "keyword no_such_keyword=1"),
        (dict(num_heads=5), "the keywords"),  # 64 / 5: only together with embed_dim
    ],
)
def test_keywords_timm_refuses_are_named_with_the_file(tmp_path, keywords, named):
    path = tiny_vit_file(tmp_path / "enc.pt")
    raw = torch.load(path, weights_only=True)
    raw["timm_kwargs"].update(keywords)
    torch.save(raw, path)
    with pytest.raises(ValueError) as info:
        load_tiny(path)
    message = str(info.value)
    assert f"--enc-ckpt {path}: timm {TINY_VIT} cannot be built with its timm_kwargs: {named}" in message, message
    assert "save_timm_encoder" in message


class _RunsCode:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unreadable_weight_files_name_their_path_and_run_no_code(tmp_path):
    good = tiny_vit_file(tmp_path / "good.safetensors")
    torch_file = tiny_vit_file(tmp_path / "good.pt")
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(_RunsCode(str(marker)))
    files = {
        "empty.safetensors": (b"", "it is empty"),
        "truncated.safetensors": (good.read_bytes()[:-100], "probably truncated or damaged"),
        "header.safetensors": (good.read_bytes()[:5], "not a readable .safetensors file"),
        "torch-file.safetensors": (
            torch_file.read_bytes(),
            "starts like a zip archive (torch.save's format): name it .pt",
        ),
        "pickle.safetensors": (payload, "starts like a Python pickle"),
        "empty.pt": (b"", "it is empty"),
        "truncated.pt": (torch_file.read_bytes()[:1000], "not a readable torch file"),
        "text.pt": (b"hello, weights", "neither a safetensors header nor a torch.save file"),
        "safetensors.pt": (good.read_bytes(), "starts like a safetensors file: name it .safetensors"),
        "pickle.pt": (payload, "a weights-only load refuses"),
    }
    for name, (data, needle) in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as info:
            load_tiny(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and needle in str(info.value), (name, str(info.value)[:400])
    assert not marker.exists()  # nothing in any file ran
