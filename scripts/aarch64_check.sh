#!/usr/bin/env bash
# Builds fastelbo's CPU extension for aarch64 and runs the test suite on it, on an x86-64 Debian
# machine with no ARM hardware: an arm64 Debian root (debootstrap) run under qemu-user, with the
# extension cross-compiled on the host against the aarch64 CPU wheel of torch (under emulation
# the first file had not compiled after seven minutes; cross-compiling all of them takes two).
#
# Why: the CPU kernels have x86-only vector paths (AVX2, F16C); this checks that everything
# else builds and is right where they do not exist (Graviton, the Grace CPU of a GH200).
# Emulated, so timings mean nothing here; only correctness.
#
# Needs root (apt, binfmt_misc, chroot) and network access to Debian and PyPI.
# Usage, from the repository root:  sudo bash scripts/aarch64_check.sh [pytest arguments]
# Environment: WORK (default /tmp/fastelbo-aarch64: the arm64 root and wheels, reused by later
# runs), TORCH_VERSION (default 2.9.1: the newest aarch64 torch on PyPI that is a CPU build; a
# CUDA build needs NVIDIA's aarch64 wheels to import), PYTEST_TIMEOUT (default 3000 s).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${WORK:-/tmp/fastelbo-aarch64}
TORCH_VERSION=${TORCH_VERSION:-2.9.1}
ROOT=$WORK/root
WHEELS=$WORK/wheels
mkdir -p "$WORK" "$WHEELS"

# ---- tools and emulation --------------------------------------------------------------------------
need=()
command -v aarch64-linux-gnu-g++ > /dev/null || need+=(g++-aarch64-linux-gnu)
[[ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ]] || need+=(qemu-user-static)
command -v debootstrap > /dev/null || need+=(debootstrap)
((${#need[@]} == 0)) || apt-get install -y -q "${need[@]}"
[[ -e /proc/sys/fs/binfmt_misc/register ]] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] || cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register

# ---- arm64 root with Python, and the aarch64 wheels ---------------------------------------------------
if [[ ! -x $ROOT/usr/bin/python3 ]]; then
  # g++: torch.compile's tests compile C++ (inductor), here under emulation.
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-dev,libgomp1,g++ \
    bookworm "$ROOT" http://deb.debian.org/debian
fi
TEST_DEPS="numpy pytest pytest-benchmark matplotlib scikit-learn tqdm"  # the Makefile's, less the build tools
platforms=()
for v in 2_17 2_24 2_26 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${v}_aarch64"); done
# torch's own requirements are named by hand: pip download ignores the wheel's platform markers
# and would fetch NVIDIA's x86-only CUDA wheels too.
pip download --quiet --only-binary=:all: "${platforms[@]}" --python-version 3.11 --implementation cp \
  --no-deps -d "$WHEELS" "torch==$TORCH_VERSION"
pip download --quiet --only-binary=:all: "${platforms[@]}" --python-version 3.11 --implementation cp \
  -d "$WHEELS" filelock typing-extensions sympy networkx jinja2 fsspec $TEST_DEPS
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
VENV=/opt/venv
# The arm64 root's processes get a clean environment, not this machine's pip settings.
IN_ROOT=(chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 /bin/bash -c)
mkdir -p "$ROOT/wheels"
cp -u "$WHEELS"/*.whl "$ROOT/wheels/"
"${IN_ROOT[@]}" "[ -x $VENV/bin/python ] || python3 -m venv $VENV"
"${IN_ROOT[@]}" "$VENV/bin/pip install --quiet --no-index --no-deps /wheels/torch-$TORCH_VERSION-*.whl &&
  $VENV/bin/pip install --quiet --no-index --find-links /wheels filelock typing-extensions sympy networkx \
  jinja2 fsspec $TEST_DEPS"

# ---- the tree, cross-compiled -----------------------------------------------------------------------
TREE=$ROOT/fastelbo
rm -rf "$TREE" && mkdir -p "$TREE"
git ls-files -z | (cd "$REPO" && xargs -0 cp --parents -t "$TREE")
TORCH_DIR=$ROOT$VENV/lib/python3.11/site-packages/torch
PYINC=$WORK/python-include  # pyconfig.h includes <aarch64-linux-gnu/python3.11/pyconfig.h>
mkdir -p "$PYINC" && ln -sfn "$ROOT/usr/include/aarch64-linux-gnu" "$PYINC/aarch64-linux-gnu"
OBJ=$WORK/obj
rm -rf "$OBJ" && mkdir -p "$OBJ"
# The flags of setup.py's C++ extension (without CUDA: there is no aarch64 nvcc here).
CXXFLAGS=(-std=c++17 -O3 -fPIC -DNDEBUG -fopenmp -fno-trapping-math -Wall -Wno-unknown-pragmas -Wno-psabi
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
  -I"$TREE/csrc" -I"$TORCH_DIR/include" -I"$TORCH_DIR/include/torch/csrc/api/include"
  -I"$ROOT/usr/include/python3.11" -I"$PYINC")
grep -q "C++20 or later" "$TORCH_DIR/include/ATen/ATen.h" && CXXFLAGS[0]=-std=c++20  # newer torch
pids=()
for src in "$TREE"/csrc/*.cpp "$TREE"/csrc/cpu/*.cpp; do
  aarch64-linux-gnu-g++ "${CXXFLAGS[@]}" -c "$src" -o "$OBJ/$(basename "$(dirname "$src")")_$(basename "$src" .cpp).o" &
  pids+=($!)  # all at once: eight compiles of about 1 GB each
done
for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed compile ends the script
aarch64-linux-gnu-g++ -shared "$OBJ"/*.o -L"$TORCH_DIR/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python -fopenmp \
  -o "$TREE/fastelbo/_C.cpython-311-aarch64-linux-gnu.so"

# ---- run ------------------------------------------------------------------------------------------------
# The whole suite, as `make test` runs it (the CUDA tests skip themselves): about 16 minutes under
# emulation on 2 cores, most of it torch.compile's tests.
"${IN_ROOT[@]}" "cd /fastelbo && PYTHONPATH=/fastelbo timeout ${PYTEST_TIMEOUT:-3000} \
  $VENV/bin/python -m pytest -q -p no:cacheprovider tests $*"
