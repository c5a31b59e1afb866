"""dataset.py: items of the official layout, the start-up consistency checks, flips, zips and the sampler."""

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from dataset import CustomDataset, ImageLatentDataset, ResumableSampler

N, SIZE = 6, 16  # items, image side; latents are (8, SIZE/8, SIZE/8)


def write_official_layout(root: Path, n=N, flipped=False, seed=0, size=SIZE):
    """A data folder written by hand the way the official tools lay it out (no project code involved).
    Returns (images (n, H, W, 3) uint8, moments (n, 8, h, w) float32, labels (n,))."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    moments = rng.normal(size=(n, 8, size // 8, size // 8)).astype(np.float32)
    labels = rng.integers(0, 5, n)
    image_labels, latent_labels = [], []
    for i in range(n):
        image_name, latent_name = f"00000/img{i:08d}.png", f"00000/img-mean-std-{i:08d}.npy"
        (root / "images" / "00000").mkdir(parents=True, exist_ok=True)
        (root / "vae-sd" / "00000").mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(images[i]).save(root / "images" / image_name)
        np.save(root / "vae-sd" / latent_name, moments[i])
        image_labels.append([image_name, int(labels[i])])
        latent_labels.append([latent_name, int(labels[i])])
    (root / "images" / "dataset.json").write_text(json.dumps({"labels": image_labels}))
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": latent_labels}))
    if flipped:
        shutil.copytree(root / "vae-sd", root / "vae-sd-flip")
        for i in range(n):
            np.save(root / "vae-sd-flip" / f"00000/img-mean-std-{i:08d}.npy", -moments[i])  # distinguishable
    return images, moments, labels


def test_items_of_the_official_layout(tmp_path):
    images, moments, labels = write_official_layout(tmp_path)
    data = CustomDataset(tmp_path)
    assert len(data) == N and data.num_classes == labels.max() + 1
    assert data.image_shape == (3, SIZE, SIZE) and data.x_shape == (8, SIZE // 8, SIZE // 8)
    for k in range(N):
        image, x, label = data[k]
        assert image.dtype == torch.uint8 and x.dtype == torch.float32 and label.dtype == torch.int64
        np.testing.assert_array_equal(image.numpy(), images[k].transpose(2, 0, 1))  # (C, H, W)
        np.testing.assert_array_equal(x.numpy(), moments[k])  # raw moments: no 0.18215 here
        assert label.item() == labels[k]
    with pytest.raises(IndexError):
        data[N]


def test_pixel_space_mode_needs_no_latents(tmp_path):
    images, _, labels = write_official_layout(tmp_path)
    shutil.rmtree(tmp_path / "vae-sd")
    data = ImageLatentDataset(tmp_path, latents=False)
    image, x, label = data[2]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), images[2].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1 and label.item() == labels[2]


def test_flip_uses_stored_flipped_moments(tmp_path):
    images, moments, labels = write_official_layout(tmp_path, flipped=True)
    data = ImageLatentDataset(tmp_path, flip=True)
    assert len(data) == 2 * N
    image, x, label = data[N + 1]  # the mirror of item 1
    np.testing.assert_array_equal(image.numpy(), images[1].transpose(2, 0, 1)[:, :, ::-1])
    np.testing.assert_array_equal(x.numpy(), -moments[1])
    assert label.item() == labels[1]
    np.testing.assert_array_equal(data[1][1].numpy(), moments[1])  # unflipped half untouched


def test_flip_without_stored_moments_mirrors_them_and_warns(tmp_path):
    images, moments, _ = write_official_layout(tmp_path)
    with pytest.warns(UserWarning, match="approximation"):
        data = ImageLatentDataset(tmp_path, flip=True)
    np.testing.assert_array_equal(data[N + 3][1].numpy(), moments[3][:, :, ::-1])
    pixels = ImageLatentDataset(tmp_path, latents=False, flip=True)
    expected = images[0].transpose(2, 0, 1)[:, :, ::-1] / 127.5 - 1
    np.testing.assert_allclose(pixels[N][1].numpy(), expected, atol=1e-6)


def test_zip_archives_read_like_folders_in_workers(tmp_path):
    write_official_layout(tmp_path / "folder")
    (tmp_path / "zipped").mkdir()
    for name in ("images", "vae-sd"):
        with zipfile.ZipFile(tmp_path / "zipped" / f"{name}.zip", "w") as archive:
            for path in sorted((tmp_path / "folder" / name).rglob("*")):
                if path.is_file():
                    archive.write(path, str(path.relative_to(tmp_path / "folder" / name)))
    folder, zipped = ImageLatentDataset(tmp_path / "folder"), ImageLatentDataset(tmp_path / "zipped")
    assert zipped.images.is_zip and zipped.moments.is_zip
    # Two workers each open their own zip handle lazily; batches match the folder version.
    loader = torch.utils.data.DataLoader(zipped, batch_size=3, num_workers=2)
    for b, (image, x, label) in enumerate(loader):
        for j in range(3):
            ref = folder[3 * b + j]
            assert torch.equal(image[j], ref[0]) and torch.equal(x[j], ref[1]) and label[j] == ref[2]


# --- Mismatched folders: clear errors at start -----------------------------------------------------


def test_missing_latent_is_named(tmp_path):
    write_official_layout(tmp_path)
    (tmp_path / "vae-sd" / "00000" / "img-mean-std-00000004.npy").unlink()
    with pytest.raises(ValueError, match=r"6 images but .* 5 latents.*without a latent \[4\]"):
        ImageLatentDataset(tmp_path)


def test_missing_folder_is_named(tmp_path):
    write_official_layout(tmp_path)
    shutil.rmtree(tmp_path / "vae-sd")
    with pytest.raises(FileNotFoundError, match="neither vae-sd/ nor vae-sd.zip"):
        ImageLatentDataset(tmp_path)


def test_label_disagreement_between_folders_is_named(tmp_path):
    write_official_layout(tmp_path)
    meta = json.loads((tmp_path / "images" / "dataset.json").read_text())
    meta["labels"][2][1] += 1
    (tmp_path / "images" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="label mismatch for item 2.*img00000002.png"):
        ImageLatentDataset(tmp_path)


def test_labels_of_files_not_on_disk_are_reported(tmp_path):
    write_official_layout(tmp_path)
    for name in ("images/00000/img00000005.png", "vae-sd/00000/img-mean-std-00000005.npy"):
        (tmp_path / name).unlink()
    with pytest.raises(ValueError, match="lists 1 files that are not there.*img-mean-std-00000005"):
        ImageLatentDataset(tmp_path)


def test_unlabelled_file_is_reported(tmp_path):
    write_official_layout(tmp_path)
    meta = json.loads((tmp_path / "vae-sd" / "dataset.json").read_text())
    (tmp_path / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": meta["labels"][:-1]}))
    with pytest.raises(ValueError, match="no label for 1 files.*img-mean-std-00000005"):
        ImageLatentDataset(tmp_path)


def test_bad_shapes_are_named(tmp_path):
    _, moments, _ = write_official_layout(tmp_path)
    np.save(tmp_path / "vae-sd" / "00000" / "img-mean-std-00000005.npy", moments[5][:4])  # last item
    with pytest.raises(ValueError, match=r"item 5: \S*img-mean-std-00000005.npy is float32 \(4, 2, 2\), expected"):
        ImageLatentDataset(tmp_path)
    np.save(tmp_path / "vae-sd" / "00000" / "img-mean-std-00000005.npy", moments[5])
    PIL.Image.new("RGB", (SIZE, 2 * SIZE)).save(tmp_path / "images" / "00000" / "img00000004.png")
    data = ImageLatentDataset(tmp_path)  # only items 0, 3 and 5 are read at start; item 4 fails when loaded
    with pytest.raises(ValueError, match=r"item 4: \S*img00000004.png is \(3, 32, 16\), expected \(3, 16, 16\)"):
        data[4]


def test_wrong_latent_of_item_0_is_blamed_on_item_0(tmp_path):
    # Item 0's shapes are the reference for every other item: a bad item 0 must be named itself, not the
    # good last item that disagrees with it. (8, 4, 4) would fit a /4 VAE; (4, 2, 2) a 2-channel one.
    _, moments, _ = write_official_layout(tmp_path)
    latent = tmp_path / "vae-sd" / "00000" / "img-mean-std-00000000.npy"
    for wrong in (np.zeros((8, 4, 4), np.float32), moments[0][:4]):
        np.save(latent, wrong)
        with pytest.raises(
            ValueError,
            match=r"item 0: \S*img-mean-std-00000000.npy is float32 \(\d, \d, \d\), expected float32 \(8, 2, 2\)",
        ) as info:
            ImageLatentDataset(tmp_path)
        assert "00000005" not in str(info.value)


def test_wrong_image_of_item_0_is_blamed_on_item_0(tmp_path):
    write_official_layout(tmp_path)
    PIL.Image.new("RGB", (2 * SIZE, 2 * SIZE)).save(tmp_path / "images" / "00000" / "img00000000.png")
    with pytest.raises(
        ValueError, match=r"item 0: \S*img00000000.png is \(3, 32, 32\), expected \(3, 16, 16\)"
    ) as info:
        ImageLatentDataset(tmp_path)
    assert "00000005" not in str(info.value)


def test_image_side_not_a_multiple_of_8_is_refused_with_latents(tmp_path):
    # 36 px images with floored 4x4 latents: the SD-VAE would have made 4.5 x 4.5; refuse, naming 36.
    write_official_layout(tmp_path, size=36)
    with pytest.raises(ValueError, match=r"img00000000.png is 36x36 px, not a multiple of 8"):
        ImageLatentDataset(tmp_path)
    assert ImageLatentDataset(tmp_path, latents=False).image_shape == (3, 36, 36)  # pixel space has no VAE


class _Unpickled:
    """Unpickling this creates a file: proof that a loader ran code from the data."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _truncated_png(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _object_npy(path):
    np.save(path, np.array([_Unpickled(path.parent / "UNPICKLED")], dtype=object), allow_pickle=True)


BAD_FILES = {
    "empty image": ("images/00000/img00000002.png", lambda p: p.write_bytes(b"")),
    "truncated image": ("images/00000/img00000002.png", _truncated_png),
    "undecodable image": ("images/00000/img00000002.png", lambda p: p.write_bytes(b"\x89PNG not an image" * 9)),
    "empty latent": ("vae-sd/00000/img-mean-std-00000002.npy", lambda p: p.write_bytes(b"")),
    "truncated latent": ("vae-sd/00000/img-mean-std-00000002.npy", lambda p: p.write_bytes(p.read_bytes()[:-5])),
    "object latent": ("vae-sd/00000/img-mean-std-00000002.npy", _object_npy),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unreadable_file_is_named_with_its_item(tmp_path, case):
    write_official_layout(tmp_path)
    name, damage = BAD_FILES[case]
    damage(tmp_path / name)
    with pytest.warns(UserWarning, match="approximation"):  # mirrors read the same damaged latent
        data = ImageLatentDataset(tmp_path, flip=True)  # item 2 is not read at start; it fails when loaded
    expected = rf"item 2: cannot read (image|latent) \S*{name.split('/')[-1]}"
    for index in (2, N + 2):  # the item and its mirror
        with pytest.raises(ValueError, match=expected) as info:
            data[index]
    if case == "object latent":
        assert "Python objects" in str(info.value)
        assert not (tmp_path / "vae-sd" / "00000" / "UNPICKLED").exists()
    # Read at start as item 0: the constructor names it.
    shutil.copy(tmp_path / name, tmp_path / name.replace("00000002", "00000000"))
    with pytest.raises(ValueError, match=expected.replace("item 2", "item 0").replace("00000002", "00000000")):
        ImageLatentDataset(tmp_path)


def test_object_array_image_npy_is_refused_unpickled(tmp_path):
    # Images may also be stored as .npy (the official reader accepts them): the same rule applies.
    (tmp_path / "images" / "00000").mkdir(parents=True)
    np.save(tmp_path / "images" / "00000" / "img00000000.npy", np.zeros((3, 8, 8), np.uint8))
    _object_npy(tmp_path / "images" / "00000" / "img00000001.npy")
    labels = [[f"00000/img0000000{i}.npy", 0] for i in range(2)]
    (tmp_path / "images" / "dataset.json").write_text(json.dumps({"labels": labels}))
    data = ImageLatentDataset(tmp_path, latents=False, max_items=1)
    assert data[0][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"item 1: cannot read image \S*img00000001.npy.*Python objects"):
        ImageLatentDataset(tmp_path, latents=False)
    assert not (tmp_path / "images" / "00000" / "UNPICKLED").exists()


def test_label_beyond_class_names_is_refused_at_start(tmp_path):
    write_official_layout(tmp_path)
    for folder in ("images", "vae-sd"):
        meta = json.loads((tmp_path / folder / "dataset.json").read_text())
        for k, entry in enumerate(meta["labels"]):
            entry[1] = 2 if k == 3 else k % 2
        meta["class_names"] = ["cat", "dog"]
        (tmp_path / folder / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(
        ValueError, match=r"vae-sd/dataset.json: item 3 \(00000/img-mean-std-00000003.npy\) has label 2, outside 0..1"
    ):
        ImageLatentDataset(tmp_path)
    meta["class_names"].append("eel")
    (tmp_path / "vae-sd" / "dataset.json").write_text(json.dumps(meta))
    data = ImageLatentDataset(tmp_path)
    assert (data.num_classes, data.max_label) == (3, 2)


# --- ResumableSampler --------------------------------------------------------------------------------


def take(sampler, count):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def test_sampler_epochs_are_permutations_seeded_by_seed_and_epoch():
    sampler = ResumableSampler(dataset_len=10, batch_size=5, seed=1)
    stream = take(sampler, 30)
    for epoch in range(3):
        assert sorted(stream[10 * epoch : 10 * epoch + 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # each epoch reshuffles
    assert take(ResumableSampler(10, 5, seed=1), 30) == stream
    assert take(ResumableSampler(10, 5, seed=2), 30) != stream


def test_sampler_resume_continues_the_same_stream():
    full = take(ResumableSampler(dataset_len=7, batch_size=4, seed=3), 40)
    for steps in (1, 2, 5):  # a run stopped after `steps` optimizer steps restarts here
        resumed = take(ResumableSampler(7, 4, seed=3, start_index=steps * 4), 40 - 4 * steps)
        assert resumed == full[4 * steps :]


def test_sampler_ranks_split_each_global_batch():
    global_batch = 6
    single = take(ResumableSampler(11, global_batch, seed=0), 60)
    ranks = [take(ResumableSampler(11, global_batch, seed=0, rank=r, world_size=3), 20) for r in range(3)]
    for step in range(10):
        together = [i for r in range(3) for i in ranks[r][2 * step : 2 * step + 2]]
        assert together == single[global_batch * step : global_batch * (step + 1)]
    # Resuming on 2 ranks after 4 steps on 3 continues the very same global stream.
    resumed = [
        take(ResumableSampler(11, global_batch, seed=0, rank=r, world_size=2, start_index=24), 3) for r in (0, 1)
    ]
    assert resumed[0] + resumed[1] == single[24:30]
    with pytest.raises(ValueError, match="not divisible"):
        ResumableSampler(11, 5, world_size=2)


def test_loader_with_resumed_sampler_yields_the_same_items(tmp_path):
    write_official_layout(tmp_path)
    with pytest.warns(UserWarning, match="approximation"):
        data = ImageLatentDataset(tmp_path, flip=True, max_items=5)  # 10 items incl. mirrors
    assert len(data) == 10

    def batches(start_index, count):
        sampler = ResumableSampler(len(data), batch_size=4, seed=7, start_index=start_index)
        loader = iter(torch.utils.data.DataLoader(data, batch_size=sampler.local_batch_size, sampler=sampler))
        return [next(loader) for _ in range(count)]

    full, resumed = batches(0, 5), batches(8, 3)
    for a, b in zip(full[2:], resumed):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
