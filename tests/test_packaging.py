"""The source distribution carries everything the extension is compiled from.

`pip install fastelbo` from an sdist, and `python -m build`, compile the extension from the
sdist's files, not from the repository: a header left out of it breaks every such build while
every in-tree build (`make install`, `pip install -e .`) still works.
"""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (git ls-files) to know which files the sdist must carry")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line]


def test_sdist_carries_every_extension_source(tmp_path):
    tracked = _tracked_files()
    # Built from a copy of the tracked files, so that the checkout gets no egg-info or dist folder.
    tree = tmp_path / "tree"
    for name in tracked:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    dist = tmp_path / "dist"
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=tree,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (archive,) = dist.glob("fastelbo-*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = [name for name in tracked if name.startswith("csrc/")]
    assert any(name.endswith(".h") for name in sources) and any(name.endswith(".cu") for name in sources)
    missing = sorted(set(sources + ["setup.py", "pyproject.toml", "README.md"]) - shipped)
    assert not missing, f"the sdist lacks {missing}"
