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


def write_official_layout(root: Path, n=N, flipped=False, seed=0):
    """A data folder written by hand the way the official tools lay it out (no project code involved).
    Returns (images (n, H, W, 3) uint8, moments (n, 8, h, w) float32, labels (n,))."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    moments = rng.normal(size=(n, 8, SIZE // 8, SIZE // 8)).astype(np.float32)
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
    with pytest.raises(ValueError, match=r"img-mean-std-00000005.npy is float32 \(4, 2, 2\), expected"):
        ImageLatentDataset(tmp_path)
    np.save(tmp_path / "vae-sd" / "00000" / "img-mean-std-00000005.npy", moments[5])
    PIL.Image.new("RGB", (SIZE, 2 * SIZE)).save(tmp_path / "images" / "00000" / "img00000003.png")
    data = ImageLatentDataset(tmp_path)  # item 3 is not read at start; it fails when it is loaded
    with pytest.raises(ValueError, match=r"img00000003.png is \(3, 32, 16\), the first image is \(3, 16, 16\)"):
        data[3]


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
