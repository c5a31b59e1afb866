"""Training data in the official REPA layout, and a sampler that makes resumed runs see the same stream.

A data folder holds images/ (uint8 PNGs) and vae-sd/ (SD-VAE posterior moments), each with its
dataset.json of labels (see preprocessing/layout.py; either may be a .zip). Folders made by the official
preprocessing load here and ours load there. An item is a tuple
    image  (3, H, W) uint8            the clean image, for the frozen REPA encoder
    x      (2C, H/8, W/8) float32     VAE posterior mean stacked on its std (raw: sample it and multiply
                                      by 0.18215 in the training step), or in pixel space (latents=False)
                                      the image as (3, H, W) float32 in [-1, 1]
    label  () int64
Text-to-image data (the MS-COCO feature layout, preprocessing/layout.py) loads as CaptionedDataset, whose
items are (image, x, context): the caption tokens (L, D) float32 take the label's place.
"""

import io
import json
import os
import warnings

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset, Sampler

from preprocessing import layout

VAE_FACTOR = layout.VAE_FACTOR  # a latent item goes with an image of exactly 8x its side


def load_npy(data: bytes) -> np.ndarray:
    """The array in .npy file bytes. Never unpickles: an array of Python objects is refused, since loading
    it would run whatever code its pickle names; training data is plain uint8 / float32 arrays."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)  # ValueError for an empty, truncated or non-.npy file
    if version in ((1, 0), (2, 0)):  # what np.save writes; np.load below refuses objects in the others too
        _shape, _fortran, dtype = getattr(np.lib.format, f"read_array_header_{version[0]}_0")(stream)
        if dtype.hasobject:
            raise ValueError(
                f"it holds an array of Python objects (dtype {dtype}), which would have to be unpickled; "
                "refused: store a numeric array (np.save of a float32 / uint8 array)"
            )
    return np.load(io.BytesIO(data), allow_pickle=False)


class ImageLatentDataset(Dataset):
    """Images, VAE moments (or pixels) and labels of a data folder; checked for consistency at start.

    flip=True doubles the length: item i + len/2 is the mirror of item i (EDM's xflip), so that the flip
    is decided by the sampler's deterministic index stream instead of worker RNG. Mirrored items use
    the stored moments of the mirrored image (vae-sd-flip/, written by `encode --flip`) when present;
    otherwise the stored moments are mirrored along W, which only approximates them (the VAE is not
    exactly flip-equivariant), and a warning says so. Cached encoder targets (`dataset_tools.py
    encode-targets --flip`, train.py --target-cache) use the same indices: row N + k holds the tokens of
    item k's image reversed along W, the very tensor item N + k returns.
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
        self.image_shape = self.x_shape = None  # set by the check; every item is checked as it loads (cheap)
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
        class_names = meta.get("class_names")
        if class_names is not None and not isinstance(class_names, list):
            raise ValueError(f'{where}: "class_names" must be a list of names, got {type(class_names).__name__}')
        # Label l names class_names[l]: a label past the list would index nothing (and num_classes, taken
        # from the list, would be too small for the label embedding), so refuse it before training starts.
        bad = labels < 0
        if class_names is not None:
            bad |= labels >= len(class_names)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            allowed = (
                f"0..{len(class_names) - 1} (class_names has {len(class_names)} entries)"
                if class_names is not None
                else ">= 0"
            )
            raise ValueError(
                f"{where}: item {k} ({keys[k]}) has label {labels[k]}, outside {allowed}; {bad.sum()} item(s) in all"
            )
        image_labels = layout.labels_by_name(self._image_meta, self.images.describe(layout.DATASET_JSON))
        if store is not self.images and image_labels is not None:
            for k, (name, label) in enumerate(zip(image_names, labels)):
                if name in image_labels and image_labels[name] != label:
                    raise ValueError(
                        f"label mismatch for item {k}: {self.images.describe(layout.DATASET_JSON)} says "
                        f"{image_labels[name]} for {name}, {where} says {label} for {keys[k]}"
                    )
        return labels, class_names

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
        """Set image_shape and x_shape, which every item is checked against as it loads.

        They are the shapes most of items 0, middle and last share (item 0's on a three-way tie), not item
        0's alone: a bad item 0 is then named itself, instead of the good files that disagree with it. A
        folder where two resolutions got mixed fails here, not mid-training. The shared shapes must be an
        RGB image and the (2C, H/8, W/8) moments of its SD-VAE latent, C being the stored channel count.
        """
        probes = sorted({0, self.num_items // 2, self.num_items - 1})
        images = [tuple(self._load_image(k).shape) for k in probes]
        xs = [tuple(self._load_x(k, False).shape) for k in probes] if self.latents else images
        self.image_shape = max(images, key=images.count)  # max() keeps the first (item 0's) on ties
        self.x_shape = max(xs, key=xs.count)
        for k in probes:  # names the odd file out, if any
            self._load_image(k)
            if self.latents:
                self._load_x(k, False)

        # Every probe now has these shapes, item 0 included: its files stand for the whole folder.
        image_where = self.images.describe(self.image_names[0])
        channels, height, width = self.image_shape
        if channels != 3:
            raise ValueError(f"item 0: {image_where} has {channels} channels, expected 3")
        if not self.latents:
            return
        latent_where = self.moments.describe(self.latent_names[0])
        if height % VAE_FACTOR or width % VAE_FACTOR:
            raise ValueError(
                f"item 0: {image_where} is {width}x{height} px, not a multiple of {VAE_FACTOR}: the SD-VAE "
                f"downsamples by {VAE_FACTOR}, so its latent {latent_where} is floored; convert the images at a "
                f"resolution divisible by {VAE_FACTOR}"
            )
        x = self.x_shape
        expected = (x[0] if x else "2C", height // VAE_FACTOR, width // VAE_FACTOR)
        if len(x) != 3 or x[0] % 2 or x != expected:
            raise ValueError(
                f"item 0: {latent_where} is {x}, not (2C, H/{VAE_FACTOR}, W/{VAE_FACTOR}) = {expected} of its "
                f"{self.image_shape} image {image_where} (mean and std of its SD-VAE latent); rerun `encode`"
            )

    # --- Loading -----------------------------------------------------------------------------------

    def _load_image(self, k: int) -> np.ndarray:
        """(3, H, W) uint8 of item k."""
        name = str(self.image_names[k])
        try:
            data = self.images.read(name)
            if layout.extension(name) == ".npy":
                image = load_npy(data)
                image = image.reshape(-1, *image.shape[-2:])
            else:
                with PIL.Image.open(io.BytesIO(data)) as pil_image:
                    image = np.asarray(pil_image)
                image = image.reshape(*image.shape[:2], -1).transpose(2, 0, 1)  # (H, W[, C]) -> (C, H, W)
        except Exception as err:
            # Decoders raise many types on bad bytes (OSError, SyntaxError, ValueError, struct.error, ...);
            # each gets the file's name and item, so that a bad file mid-run can be found and replaced.
            raise ValueError(
                f"item {k}: cannot read image {self.images.describe(name)} (empty, truncated or corrupt?): "
                f"{type(err).__name__}: {err}; delete it and rerun the same `dataset_tools.py convert` command"
            ) from err
        if self.image_shape is not None and image.shape != self.image_shape:
            raise ValueError(
                f"item {k}: {self.images.describe(name)} is {image.shape}, expected {self.image_shape} like the "
                "other images"
            )
        return image

    def _load_x(self, k: int, mirrored: bool) -> np.ndarray:
        """(2C, h, w) float32 moments of item k (of its mirror image when `mirrored`)."""
        store = self.flipped_moments if (mirrored and self.flipped_moments is not None) else self.moments
        name = str(self.latent_names[k])
        try:
            moments = load_npy(store.read(name))
        except Exception as err:  # as in _load_image: every reason a file cannot be read names it
            raise ValueError(
                f"item {k}: cannot read latent {store.describe(name)} (empty, truncated or not a numeric .npy?): "
                f"{type(err).__name__}: {err}; delete it and rerun the same `dataset_tools.py encode` command"
            ) from err
        if self.x_shape is not None and (moments.shape != self.x_shape or moments.dtype != np.float32):
            raise ValueError(
                f"item {k}: {store.describe(name)} is {moments.dtype} {moments.shape}, expected float32 "
                f"{self.x_shape} like the other latents"
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
        """len(class_names) when dataset.json names them (labels are checked to be below it), else max + 1."""
        return len(self.class_names) if self.class_names else self.max_label + 1

    @property
    def max_label(self) -> int:
        """The largest label of the items: a model needs num_classes > max_label."""
        return int(self.labels.max())


# The official train.py builds `CustomDataset(data_dir)`; same items, so ported scripts keep working.
CustomDataset = ImageLatentDataset


def caption_choice(seed: int, position: int, num_captions: int) -> int:
    """Which caption of its item the draw at stream `position` uses: uniform over the item's captions, as the
    official MSCOCOFeatureDataset draws it, but a function of (seed, position) only, so resumed and
    re-sharded runs draw the same captions."""
    return int(np.random.default_rng([seed, position, 0xCA7]).integers(num_captions))


class CaptionedDataset(Dataset):
    """Text-to-image data of one split of the MS-COCO feature layout (U-ViT's, read by the official REPA).

    Items are (image (3, H, W) uint8, x, context (L, D) float32). x is as in ImageLatentDataset: the VAE
    posterior mean stacked on its *std* (the stored log-variance is clamped to [-30, 20] as the official
    loader does and converted), or in pixel space the image in [-1, 1]. Indexing with (index, position), as
    ResumableSampler(with_position=True) yields, picks the caption by caption_choice(seed, position);
    a plain index takes caption 0. Items whose image failed preprocessing are gaps in the numbering: the
    dataset holds the indices present (self.indices), in order.
    """

    def __init__(self, data_dir: str, split: str = "train", latents: bool = True, seed: int = 0, max_items=None):
        self.data_dir, self.folder = os.fspath(data_dir), os.path.join(os.fspath(data_dir), split)
        if not os.path.isdir(self.folder):
            raise FileNotFoundError(f"{self.folder}: no such split folder (expected DATA/{split}/ of the COCO layout)")
        empty_path = os.path.join(self.data_dir, layout.EMPTY_CONTEXT)
        if not os.path.isfile(empty_path):
            raise FileNotFoundError(f"{empty_path} is missing: the empty caption's tokens (the null condition)")
        with open(empty_path, "rb") as f:
            self.empty_context = load_npy(f.read()).astype(np.float32)
        if self.empty_context.ndim != 2:
            raise ValueError(f"{empty_path} is {self.empty_context.shape}, expected (tokens, width)")
        self.latents, self.seed = latents, seed
        images, moments, counts = layout.scan_coco_split(self.folder)
        indices = sorted(images)
        if not indices:
            raise ValueError(f"{self.folder} holds no images ({{i}}.png)")
        without_caption = [i for i in indices if i not in counts]
        without_moments = [i for i in indices if i not in moments] if latents else []
        if without_caption or without_moments:
            raise ValueError(
                f"{self.folder}: items without caption tokens {without_caption[:5]}, without VAE moments "
                f"{without_moments[:5]} (an interrupted preprocessing run? rerun the same `dataset_tools.py coco` "
                "command; pixel-space training (--pixel-space) needs no moments)"
            )
        self._check_listing(layout.read_captions_json(self.folder), indices, counts)
        if max_items is not None:
            indices = indices[:max_items]
        self.indices = np.array(indices, dtype=np.int64)
        self.num_captions = np.array([counts[i] for i in indices], dtype=np.int64)
        self.image_shape = self.x_shape = None
        image, x, context = self._load(0, 0)
        self.image_shape, self.x_shape = image.shape, x.shape
        if context.shape != self.empty_context.shape:
            raise ValueError(
                f"{self._path(self.indices[0], 0)} is {context.shape} but {empty_path} is {self.empty_context.shape}: "
                "caption tokens and the empty caption must come from the same text encoder"
            )
        if image.shape[0] != 3 or (
            latents and x.shape[1:] != (image.shape[1] // VAE_FACTOR, image.shape[2] // VAE_FACTOR)
        ):
            raise ValueError(f"{self.folder}: item {self.indices[0]} has image {image.shape} and moments {x.shape}")
        meta_path = os.path.join(self.data_dir, layout.TEXT_ENCODER_JSON)
        self.text_encoder = None
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                self.text_encoder = json.load(f)

    def _check_listing(self, listing: dict | None, indices, counts: dict) -> None:
        # captions.json names the caption of every token file: a count that differs means the tokens were made
        # from other captions (a `coco` run of an older version rerun after the annotations changed).
        if listing is None:
            return
        where = os.path.join(self.folder, layout.CAPTIONS_JSON)
        fix = (
            "the caption tokens were not made from these captions; rerun the same `dataset_tools.py coco` command "
            "(it re-encodes changed captions and removes the token files of deleted ones)"
        )
        captions = listing["captions"]
        for index in indices:
            if index >= len(captions):
                raise ValueError(f"{where} lists {len(captions)} items, but {self.folder} holds item {index}: {fix}")
            if len(captions[index]) != counts[index]:
                raise ValueError(
                    f"{where} lists {len(captions[index])} caption(s) of item {index}, but {self.folder} holds "
                    f"{counts[index]} token file(s) {index}_0.npy..{index}_{counts[index] - 1}.npy: {fix}"
                )

    def caption_texts(self) -> list[list[str]] | None:
        """Caption k of item i (indexed by item number, gaps included) as captions.json lists it, checked
        against the token files; None when the split has no captions.json."""
        listing = layout.read_captions_json(self.folder)
        self._check_listing(
            listing, self.indices.tolist(), dict(zip(self.indices.tolist(), self.num_captions.tolist()))
        )
        return None if listing is None else listing["captions"]

    def _path(self, index: int, caption: int | None = None) -> str:
        name = layout.coco_image_name(index) if caption is None else layout.coco_context_name(index, caption)
        return os.path.join(self.folder, name)

    def _read(self, path: str, kind: str):
        try:
            with open(path, "rb") as f:
                data = f.read()
            if kind == "png":
                with PIL.Image.open(io.BytesIO(data)) as pil_image:
                    array = np.asarray(pil_image.convert("RGB"))
                return array.transpose(2, 0, 1)
            return load_npy(data)
        except Exception as err:  # every reason a file cannot be read names it
            raise ValueError(
                f"cannot read {path}: {type(err).__name__}: {err}; delete it and rerun the same "
                "`dataset_tools.py coco` command"
            ) from err

    def _load(self, k: int, caption: int):
        index = int(self.indices[k])
        image = self._read(self._path(index), "png")
        if self.latents:
            mean, logvar = np.split(self._read(os.path.join(self.folder, layout.coco_moments_name(index)), "npy"), 2)
            x = np.concatenate([mean, np.exp(0.5 * np.clip(logvar, -30.0, 20.0))]).astype(np.float32)
        else:
            x = image.astype(np.float32) / 127.5 - 1  # [0, 255] -> [-1, 1]
        context = self._read(self._path(index, caption), "npy").astype(np.float32, copy=False)
        for name, array, shape in (("image", image, self.image_shape), ("moments", x, self.x_shape)):
            if shape is not None and array.shape != shape:
                raise ValueError(f"{self.folder}: item {index}'s {name} is {array.shape}, expected {shape}")
        if context.shape != self.empty_context.shape:
            raise ValueError(f"{self._path(index, caption)} is {context.shape}, expected {self.empty_context.shape}")
        return image, x, context

    def caption_tokens(self, k: int, caption: int) -> np.ndarray:
        """(L, D) float32 tokens of caption `caption` of item k (no image read: for sampling from captions)."""
        path = self._path(int(self.indices[k]), caption)
        context = self._read(path, "npy").astype(np.float32, copy=False)
        if context.shape != self.empty_context.shape:
            raise ValueError(f"{path} is {context.shape}, expected {self.empty_context.shape}")
        return context

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        k, position = item if isinstance(item, tuple) else (item, None)
        if not 0 <= k < len(self):
            raise IndexError(f"item {k} out of range for {len(self)} items")
        n = int(self.num_captions[k])
        caption = 0 if position is None else caption_choice(self.seed, position, n)
        image, x, context = self._load(k, caption)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(x), torch.from_numpy(context)


class ResumableSampler(Sampler[int]):
    """Infinite, deterministic stream of dataset indices, split across ranks.

    Global position p (counted in items over all ranks) maps to epoch p // dataset_len and to entry
    p % dataset_len of that epoch's permutation, which is seeded by (seed, epoch) alone. Global batch b
    covers positions [b * batch_size, (b + 1) * batch_size); rank r takes its r-th contiguous slice of
    batch_size // world_size. The stream thus depends only on (seed, position): restart a run that has
    taken `steps` optimizer steps with start_index = steps * batch_size and it continues exactly where it
    stopped, even on a different number of ranks. Use DataLoader(batch_size=sampler.local_batch_size).
    with_position=True yields (index, position) pairs instead, for datasets whose draw depends on the
    position too (CaptionedDataset: which caption).
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_index: int = 0,
        with_position: bool = False,
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
        self.with_position = with_position
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
                index = int(self.permutation(epoch)[offset])
                yield (index, position) if self.with_position else index
            batch += 1
