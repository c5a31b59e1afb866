import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Reference data produced by the official implementation (origins in tests/data/README.md). It lives in
# the repository, so that the suite passes on a bare clone; tests read nothing from outside it.
TESTDATA = ROOT / "tests" / "data"

# Tests never reach a hub: loading code must work (or fail clearly) offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def testdata():
    if not TESTDATA.is_dir():
        pytest.fail(f"reference data folder {TESTDATA} is missing (it is part of the repository)")
    return TESTDATA


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The synthetic demo set at 32 px: 4 classes x 6 images, pixel space (read-only for tests)."""
    out = tmp_path_factory.mktemp("data") / "demo"
    cmd = [sys.executable, "-m", "demo", "data", "--out", str(out), "--per-class", "6"]
    cmd += ["--num-classes", "4", "--resolution", "32"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A randomly initialised AutoencoderKL with sd-vae-ft-mse's config keys and 4 levels (factor 8),
    at small widths; saved like a hub folder so `--vae=PATH` loads it."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    # Random init leaves logvar near 0; spread it so mean/std swaps or wrong exponents would show.
    with torch.no_grad():
        vae.quant_conv.bias[4:] = torch.linspace(-3, 2, 4)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return str(path), vae.eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module, restored afterwards. On the shared 2-core test machine, tiny
    ops with 2 threads wait at every barrier for a descheduled thread (Inception ran 15x, tiny convolutions
    400x slower than on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """Random Inception weights in the release file's format: a plain dict of tensors, no BN counters."""
    from evaluations.inception import WEIGHTS_FILENAME, InceptionV3

    torch.manual_seed(0)
    state = {k: v for k, v in InceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    for key, value in state.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
        elif key.endswith(("running_mean", "bn.bias")):
            value.uniform_(-0.1, 0.1)
    path = tmp_path_factory.mktemp("weights") / WEIGHTS_FILENAME
    torch.save(state, path)
    return path


@pytest.fixture
def recorder(monkeypatch):
    """recorder() -> a fresh tests.test_train_loop.Recorder for the next run (the previous one stops recording)."""
    from tests.test_train_loop import Recorder

    made = []

    def make(**kwargs):
        if made:
            made[-1].close()
        made.append(Recorder(monkeypatch, **kwargs))
        return made[-1]

    yield make
    if made:
        made[-1].close()
