"""Training data in the official REPA layout, and a sampler that makes resumed runs see the same stream.

A data folder holds images/ (uint8 PNGs) and vae-sd/ (SD-VAE posterior moments), each with its
dataset.json of labels (see preprocessing/layout.py; either may be a .zip). Folders made by the official
preprocessing load here and ours load there. An item is a tuple
    image  (3, H, W) uint8            the clean image, for the frozen REPA encoder
    x      (2C, H/8, W/8) float32     VAE posterior mean stacked on its std (raw: sample it and multiply
                                      by 0.18215 in the training step), or in pixel space (latents=False)
                                      the image as (3, H, W) float32 in [-1, 1]
    label  () int64
"""

import io
import os
import warnings

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset, Sampler

from preprocessing import layout


class ImageLatentDataset(Dataset):
    """Images, VAE moments (or pixels) and labels of a data folder; checked for consistency at start.

    flip=True doubles the length: item i + len/2 is the mirror of item i (EDM's xflip), so that the flip
    is decided by the sampler's deterministic index stream instead of worker RNG. Mirrored items use
    the stored moments of the mirrored image (vae-sd-flip/, written by `encode --flip`) when present;
    otherwise the stored moments are mirrored along W, which only approximates them (the VAE is not
    exactly flip-equivariant), and a warning says so.
    """

    def __init__(
        self,
        data_dir: str,
        latents: bool = True,  # False: pixel space, x is the image in [-1, 1] and vae-sd/ is not read
        flip: bool = False,  # append the horizontally mirrored copy of every item
        images_name: str = "images",  # sub-folder (or .zip) names inside data_dir
        latents_name: str = "vae-sd",
        max_items: int | None = None,  # only the first N items (debugging, tests)
    ):
        self.data_dir = os.fspath(data_dir)
        self.latents = latents
        self.images = self._open(images_name)
        image_names = self.images.names(layout.IMAGE_EXTENSIONS | {".npy"})
        self._image_meta = layout.read_dataset_json(self.images)
        if latents:
            self.moments = self._open(latents_name)
            latent_names = self.moments.names({layout.LATENT_EXTENSION})
            self._pair(image_names, latent_names)
            label_source, label_meta, keys = self.moments, layout.read_dataset_json(self.moments), latent_names
        else:
            self.moments = None
            label_source, label_meta, keys = self.images, self._image_meta, image_names
        if not image_names:
            raise ValueError(f"{self.images.path} holds no images")
        self.labels, self.class_names = self._read_labels(label_source, label_meta, keys, image_names)
        if max_items is not None:
            image_names, keys, self.labels = image_names[:max_items], keys[:max_items], self.labels[:max_items]

        # Fixed-width numpy string arrays, not lists: DataLoader workers forked from this process then
        # share the pages instead of copying them as Python refcounts change (1.28M names for ImageNet).
        self.image_names = np.array(image_names)
        self.latent_names = np.array(keys) if latents else None
        self.num_items = len(image_names)
        self.flip = flip
        self.flipped_moments = self._open_flipped(latents_name) if (flip and latents) else None
        # Shapes from the first item; every item is checked against them as it loads (cheap).
        self.image_shape = self.x_shape = None
        self.image_shape = tuple(self._load_image(0).shape)
        self.x_shape = tuple(self._load_x(0, False).shape) if latents else self.image_shape
        self._check_shapes()

    # --- Consistency checks at start ---------------------------------------------------------------

    def _open(self, name: str) -> layout.FileStore:
        store = layout.open_store(self.data_dir, name)
        if store is None:
            raise FileNotFoundError(f"{self.data_dir} has neither {name}/ nor {name}.zip")
        return store

    def _pair(self, image_names: list[str], latent_names: list[str]) -> None:
        """Image k must go with latent k: same count, and the same item index in both names."""
        image_ids = [layout.name_index(n) for n in image_names]
        latent_ids = [layout.name_index(n) for n in latent_names]
        if image_ids == latent_ids and None not in image_ids:
            return
        if (None in image_ids or None in latent_ids) and len(image_names) == len(latent_names):
            return  # names without an index (not made by the official tools): pair by sorted order, as they do
        missing = sorted(set(image_ids) - set(latent_ids) - {None})[:5]
        extra = sorted(set(latent_ids) - set(image_ids) - {None})[:5]
        raise ValueError(
            f"{self.images.path} has {len(image_names)} images but {self.moments.path} has "
            f"{len(latent_names)} latents, or their names do not pair up (image k must go with latent k, "
            f"e.g. 00000/img00000007.png with 00000/img-mean-std-00000007.npy): items without a latent "
            f"{missing}, latents without an image {extra}; rerun `encode` for this images folder"
        )

    def _read_labels(self, store, meta, keys: list[str], image_names: list[str]):
        """Labels as one int64 array (no per-item JSON later), cross-checked against images/dataset.json."""
        where = store.describe(layout.DATASET_JSON)
        if meta is None:
            raise FileNotFoundError(f"{where} is missing; it holds the labels")
        by_name = layout.labels_by_name(meta, where)
        if by_name is None:
            # "labels": null is what the official tools write for an unlabelled source: one class.
            warnings.warn(f"{where} has no labels; every item gets label 0", stacklevel=3)
            return np.zeros(len(keys), np.int64), None
        unlabelled = [k for k in keys if k not in by_name]
        if unlabelled:
            raise ValueError(f"{where} has no label for {len(unlabelled)} files, e.g. {unlabelled[:3]}")
        if len(by_name) > len(keys):
            absent = sorted(set(by_name) - set(keys))
            raise ValueError(
                f"{where} lists {len(absent)} files that are not there, e.g. {absent[:3]} "
                "(an interrupted preprocessing run? rerun the same command to finish it)"
            )
        labels = np.array([by_name[k] for k in keys], dtype=np.int64)
        if labels.min() < 0:
            raise ValueError(f"{where}: negative label {labels.min()}")
        image_labels = layout.labels_by_name(self._image_meta, self.images.describe(layout.DATASET_JSON))
        if store is not self.images and image_labels is not None:
            for k, (name, label) in enumerate(zip(image_names, labels)):
                if name in image_labels and image_labels[name] != label:
                    raise ValueError(
                        f"label mismatch for item {k}: {self.images.describe(layout.DATASET_JSON)} says "
                        f"{image_labels[name]} for {name}, {where} says {label} for {keys[k]}"
                    )
        return labels, meta.get("class_names")

    def _open_flipped(self, latents_name: str) -> layout.FileStore | None:
        store = layout.open_store(self.data_dir, latents_name + "-flip")
        if store is None:
            warnings.warn(
                f"{self.data_dir} has no {latents_name}-flip/: mirrored items use the stored moments mirrored "
                "along W, an approximation; run `dataset_tools.py encode --flip` for exact ones",
                stacklevel=3,
            )
            return None
        names = store.names({layout.LATENT_EXTENSION})
        if names[: self.num_items] != self.latent_names.tolist():
            raise ValueError(f"{store.path} does not hold the same files as {self.moments.path}")
        return store

    def _check_shapes(self) -> None:
        channels, height, width = self.image_shape
        if channels != 3:
            raise ValueError(f"{self.images.describe(self.image_names[0])} has {channels} channels, expected 3")
        if self.latents:
            c, h, w = self.x_shape
            if c % 2 or height % h or width % w or height // h != width // w:
                raise ValueError(
                    f"{self.moments.describe(self.latent_names[0])} is {self.x_shape}, not (2C, H/f, W/f) "
                    f"of a {self.image_shape} image (mean and std of a VAE latent)"
                )
        # The last item too: a folder where two resolutions got mixed fails now, not mid-training.
        self._load_image(self.num_items - 1)
        if self.latents:
            self._load_x(self.num_items - 1, False)

    # --- Loading -----------------------------------------------------------------------------------

    def _load_image(self, k: int) -> np.ndarray:
        """(3, H, W) uint8 of item k."""
        name = str(self.image_names[k])
        data = self.images.read(name)
        if layout.extension(name) == ".npy":
            image = np.load(io.BytesIO(data))
            image = image.reshape(-1, *image.shape[-2:])
        else:
            with PIL.Image.open(io.BytesIO(data)) as pil_image:
                image = np.asarray(pil_image)
            image = image.reshape(*image.shape[:2], -1).transpose(2, 0, 1)  # (H, W[, C]) -> (C, H, W)
        if self.image_shape is not None and image.shape != self.image_shape:
            raise ValueError(f"{self.images.describe(name)} is {image.shape}, the first image is {self.image_shape}")
        return image

    def _load_x(self, k: int, mirrored: bool) -> np.ndarray:
        """(2C, h, w) float32 moments of item k (of its mirror image when `mirrored`)."""
        store = self.flipped_moments if (mirrored and self.flipped_moments is not None) else self.moments
        name = str(self.latent_names[k])
        moments = np.load(io.BytesIO(store.read(name)))
        if self.x_shape is not None and (moments.shape != self.x_shape or moments.dtype != np.float32):
            raise ValueError(
                f"{store.describe(name)} is {moments.dtype} {moments.shape}, expected float32 {self.x_shape}"
            )
        if mirrored and store is self.moments:
            moments = moments[:, :, ::-1]
        return moments

    def __len__(self) -> int:
        return 2 * self.num_items if self.flip else self.num_items

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        k, mirrored = index % self.num_items, index >= self.num_items
        image = self._load_image(k)
        if mirrored:
            image = image[:, :, ::-1]
        if self.latents:
            x = torch.from_numpy(np.ascontiguousarray(self._load_x(k, mirrored)))
        else:
            x = torch.from_numpy(image.astype(np.float32) / 127.5 - 1)  # [0, 255] -> [-1, 1]
        return torch.from_numpy(np.ascontiguousarray(image)), x, torch.tensor(self.labels[k])

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1


# The official train.py builds `CustomDataset(data_dir)`; same items, so ported scripts keep working.
CustomDataset = ImageLatentDataset


class ResumableSampler(Sampler[int]):
    """Infinite, deterministic stream of dataset indices, split across ranks.

    Global position p (counted in items over all ranks) maps to epoch p // dataset_len and to entry
    p % dataset_len of that epoch's permutation, which is seeded by (seed, epoch) alone. Global batch b
    covers positions [b * batch_size, (b + 1) * batch_size); rank r takes its r-th contiguous slice of
    batch_size // world_size. The stream thus depends only on (seed, position): restart a run that has
    taken `steps` optimizer steps with start_index = steps * batch_size and it continues exactly where it
    stopped, even on a different number of ranks. Use DataLoader(batch_size=sampler.local_batch_size).
    """

    def __init__(
        self, dataset_len: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start_index: int = 0
    ):
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.dataset_len, self.batch_size, self.seed = dataset_len, batch_size, seed
        self.rank, self.world_size, self.start_index = rank, world_size, start_index
        self.local_batch_size = batch_size // world_size
        self._epoch, self._order = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch `epoch`: a permutation of range(dataset_len) from (seed, epoch) only."""
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_len)
            self._epoch = epoch
        return self._order

    def __iter__(self):
        batch = 0
        while True:
            first = self.start_index + batch * self.batch_size + self.rank * self.local_batch_size
            for position in range(first, first + self.local_batch_size):
                epoch, offset = divmod(position, self.dataset_len)
                yield int(self.permutation(epoch)[offset])
            batch += 1
