"""The suite runs on a bare clone: its reference data ships with the repository and no test reads outside it."""

import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import TESTDATA

ROOT = Path(__file__).resolve().parents[1]


def test_reference_data_ships_with_the_repository(testdata):
    assert testdata.resolve().is_relative_to(ROOT)
    files = sorted(p.name for p in testdata.iterdir() if p.name != "README.md")
    assert "repa_sit_reference_tiny.pt" in files
    # Every file says where it came from.
    readme = (testdata / "README.md").read_text()
    undocumented = [name for name in files if f"`{name}`" not in readme]
    assert not undocumented, f"add a line on the origin of {undocumented} to {testdata / 'README.md'}"
    # A .gitignore rule (the repository ignores data/ folders) would silently leave them out of a commit.
    if shutil.which("git") and (ROOT / ".git").exists():
        paths = [str(testdata / name) for name in files]
        ignored = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
        assert ignored.stdout == "", f"git ignores {ignored.stdout.split()}"


# Ways a test could reach beyond the clone: the folder beside it, absolute machine paths, home-dir caches.
OUTSIDE = re.compile(r"\.\./|ROOT\.parent|parents\[[2-9]\]|[\"']/(work|home|root|data|mnt)/|expanduser|Path\.home")


def test_no_test_reads_outside_the_clone():
    hits = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name == Path(__file__).name:
            continue  # the pattern above names what it looks for
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.name}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)
    assert TESTDATA.resolve().is_relative_to(ROOT)
