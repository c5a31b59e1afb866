import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Reference data produced by the official implementation; read in place, never copied in.
TESTDATA = ROOT.parent / "shared" / "testdata"

# Tests never reach a hub: loading code must work (or fail clearly) offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def testdata():
    if not TESTDATA.is_dir():
        pytest.fail(f"reference data folder {TESTDATA} is missing (expected ../shared/testdata)")
    return TESTDATA
