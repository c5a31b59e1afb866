"""The Inception network of the ADM evaluator, in PyTorch.

ADM's evaluator (openai/guided-diffusion `evaluations/evaluator.py`) runs TensorFlow's
`classify_image_graph_def.pb` (Inception v3, release 2015-12-05) and reads three tensors from it:
  - `pool_3:0`              (N, 2048)        FID and precision/recall features;
  - `softmax/logits/MatMul` (N, 1008)        pool_3 @ W, *without* the bias, for the Inception Score;
  - `mixed_6/conv:0`        (N, 17, 17, 192) of which the first 7 channels, flattened in NHWC order
                                             (2023 dims), are the sFID features.
torch-fidelity 0.4.0 ships a TF-faithful port of that graph (same weights converted to a state_dict,
TF1-style bilinear resize to 299, `(x - 128) / 128` scaling, TF's average/max pool quirks). This
module builds the network from torch-fidelity's blocks, under the same attribute names so the release
file `weights-inception-2015-12-05-6726825d.pth` loads as is, and returns all three features in one
pass. torch-fidelity's converter maps TF's `mixed_6/conv` to `Mixed_6d.branch1x1`, and the first
branch comes first in the block's channel concat, so `Mixed_6d(x)[:, :7]` is exactly that tensor.
"""

import hashlib
import os
import shutil
import tempfile
import urllib.request
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    BasicConv2d,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE_1,
    InceptionE_2,
)
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

WEIGHTS_URL = URL_INCEPTION_V3
WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# torch.hub convention: the 8 hex digits in the file name start the file's SHA-256.
WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_FLAG = "--inception-weights"

INPUT_SIZE = 299  # the graph resizes every input to 299x299 itself
POOL_DIM = 2048
LOGITS_DIM = 1008  # the 2015 graph's softmax width: ImageNet classes plus unused slots
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023


class InceptionFeatures(NamedTuple):
    pool: torch.Tensor  # (N, 2048) pool_3: FID, precision, recall
    logits: torch.Tensor  # (N, 1008) pool_3 @ W without bias: Inception Score
    spatial: torch.Tensor  # (N, 2023) mixed_6/conv[..., :7] flattened NHWC: sFID


class InceptionV3(nn.Module):
    """TF Inception v3 (2015-12-05) as ported by torch-fidelity; one forward gives every ADM feature.

    Input: uint8 images (N, 3, H, W) in 0..255, any H and W (resized to 299 inside, as the TF graph does).
    Parameter names equal torch-fidelity's, so its release state_dict loads with strict=True.
    """

    def __init__(self):
        super().__init__()
        # Stem: 299 -> 149 -> 147 -> 147 -> 73 -> 73 -> 71 -> 35.
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        # 35x35 blocks (TF: mixed, mixed_1, mixed_2), then the reduction to 17x17 (mixed_3).
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        # 17x17 blocks (TF: mixed_4 .. mixed_7); Mixed_6d is TF's mixed_6, the sFID tap.
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        # Reduction to 8x8 (mixed_8), two 8x8 blocks (mixed_9, mixed_10), global average (pool_3).
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE_1(1280)
        self.Mixed_7c = InceptionE_2(2048)
        self.fc = nn.Linear(POOL_DIM, LOGITS_DIM)  # TF's softmax/weights and softmax/biases
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"InceptionV3 expects uint8 images of shape (N, 3, H, W) in 0..255, "
                f"got dtype {images.dtype} and shape {tuple(images.shape)}"
            )
        x = images.to(self.fc.weight.dtype)
        # TF1 ResizeBilinear (align_corners=False, no half-pixel offset), then the graph's scaling.
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
        x = (x - 128) / 128  # (N, 3, 299, 299) in [-1, 1)
        x = self.MaxPool_1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))  # (N, 64, 73, 73)
        x = self.MaxPool_2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        x = self.Mixed_6d(x)  # (N, 768, 17, 17); channels 0..191 are mixed_6/conv (post-ReLU)
        # sFID: ADM takes the NHWC tensor's first 7 channels and flattens (h, w, c), c fastest.
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], SPATIAL_DIM)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))  # (N, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048) pool_3
        # ADM feeds pool_3 through softmax/logits/MatMul only: the bias is not part of its IS logits.
        logits = pool @ self.fc.weight.T  # (N, 1008)
        return InceptionFeatures(pool.float(), logits.float(), spatial.float())


# ----------------------------------------------------------------------------------------------------
# Weights: the release file, found locally (flag, then torch hub cache) or downloaded once.
# ----------------------------------------------------------------------------------------------------


def hub_weights_path() -> Path:
    """Where torch.hub (and so torch-fidelity) caches the release file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_weights(destination: Path, timeout_s: float = 30.0) -> None:
    # A timeout, so that an offline machine fails in seconds rather than hanging on connect.
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=destination.parent, suffix=".part", delete=False) as tmp:
        try:
            with urllib.request.urlopen(WEIGHTS_URL, timeout=timeout_s) as response:
                shutil.copyfileobj(response, tmp)
            tmp.close()
            digest = file_sha256(tmp.name)
            if not digest.startswith(WEIGHTS_SHA256_PREFIX):
                raise OSError(f"downloaded file has SHA-256 {digest}, expected prefix {WEIGHTS_SHA256_PREFIX}")
            os.replace(tmp.name, destination)
        finally:
            if os.path.exists(tmp.name):
                os.remove(tmp.name)


def find_inception_weights(weights_path: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
    """The release weights file: `weights_path` if given, else the torch hub cache, else downloaded there."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{WEIGHTS_FLAG} {path}: no such file (expected {WEIGHTS_FILENAME})")
        return path
    cached = hub_weights_path()
    if cached.is_file():
        return cached
    reason = "downloading is switched off"
    if allow_download:
        print(f"downloading Inception weights {WEIGHTS_URL} -> {cached}")
        try:
            _download_weights(cached)
            return cached
        except OSError as err:  # URLError, timeouts and hash mismatches are all OSErrors
            reason = f"download failed: {err}"
    raise FileNotFoundError(
        f"Inception weights {WEIGHTS_FILENAME} not found in the torch hub cache ({cached.parent}) and {reason}. "
        f"Fetch the file from {WEIGHTS_URL} on a machine with internet access, then pass "
        f"{WEIGHTS_FLAG} PATH or copy it to {cached}."
    )


def load_inception(
    weights_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = True,
) -> InceptionV3:
    """InceptionV3 with torch-fidelity's release weights. Warns loudly if the file is not that release.

    The SHA-256 of the file is kept as `model.weights_sha256` (reference-statistics caches are keyed on it)
    and `model.official_weights` says whether it is the release file.
    """
    path = find_inception_weights(weights_path, allow_download)
    # The release file is a plain dict of tensors: weights_only loading, no arbitrary unpickling.
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = InceptionV3()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"{WEIGHTS_FLAG} {path}: not an Inception state_dict in torch-fidelity's format: {err}"
        ) from err
    model.weights_path = str(path)
    model.weights_sha256 = file_sha256(path)
    model.official_weights = model.weights_sha256.startswith(WEIGHTS_SHA256_PREFIX)
    if not model.official_weights:
        warnings.warn(
            f"\n{'!' * 100}\nInception weights {path} are NOT torch-fidelity's release file {WEIGHTS_FILENAME} "
            f"(SHA-256 {model.weights_sha256[:16]}..., expected {WEIGHTS_SHA256_PREFIX}...).\n"
            f"FID, sFID, IS, precision and recall computed with them are NOT comparable to ADM's numbers.\n"
            f"{'!' * 100}",
            stacklevel=2,
        )
    return model.to(device)
