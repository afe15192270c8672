"""The Makefile's set-up steps (`make install`, which `make test` and `make demo` run first) are
redone when their record is stale, not only when a source is newer than a stamp: a changed
dependency list reinstalls, a missing extension rebuilds. Checked with `make -n` (print, run
nothing) on a copy of the Makefile next to stand-in files."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(tree, *args):
    result = subprocess.run(["make", "-n", "-C", str(tree), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def tree(tmp_path):
    """A set-up that is complete and current: venv, deps stamp holding the list, build stamp newer
    than the sources, the built extension."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for name in ("csrc/ops.cpp", "setup.py", "pyproject.toml", ".venv/bin/python", "fastelbo/_C.abi3.so"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    deps = subprocess.run(["make", "-s", "-C", str(tmp_path), "--eval", "print-deps: ; @echo $(DEPS)", "print-deps"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert "torch==" in deps
    (tmp_path / ".venv/.fastelbo-deps").write_text(deps + "\n")
    (tmp_path / ".venv/.fastelbo-build").write_text("")
    old = 1_000_000_000
    for name in ("Makefile", "csrc/ops.cpp", "setup.py", "pyproject.toml", ".venv/bin/python"):
        os.utime(tmp_path / name, (old, old))
    os.utime(tmp_path / ".venv/.fastelbo-deps", (old + 10, old + 10))
    os.utime(tmp_path / ".venv/.fastelbo-build", (old + 20, old + 20))
    return tmp_path


def test_a_current_setup_is_left_alone(tree):
    assert "Nothing to be done" in make(tree, "install")


def test_a_changed_dependency_list_reinstalls_and_rebuilds(tree):
    out = make(tree, "install", "TORCH_VERSION=2.0.0")
    assert "install --quiet torch==2.0.0" in out
    assert "install --no-build-isolation" in out


def test_a_missing_extension_is_built_again(tree):
    (tree / "fastelbo/_C.abi3.so").unlink()
    out = make(tree, "install")
    assert "install --no-build-isolation" in out
    assert "torch==" not in out  # the dependencies are current


def test_a_newer_source_rebuilds(tree):
    os.utime(tree / "csrc/ops.cpp", None)  # now
    out = make(tree, "install")
    assert "install --no-build-isolation" in out and "torch==" not in out
