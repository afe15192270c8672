"""Probe of the C++ toolchain a GPU image builds extensions with (run by scripts/gpu_check.sh).

On the nvidia-h200 device image (torch 2.11, extensions compiled by /opt/gcc), fastelbo's error
messages that streamed a number (c10::str(..., int64_t)) killed the process with a segmentation
fault, while messages made of strings were raised fine. fastelbo now formats numbers itself
(csrc/fastelbo.h, number_str / shape_str). This script checks the cause on whatever machine runs
it: it prints the compilers and the libstdc++ in use, builds a two-function extension with
torch.utils.cpp_extension.load_inline (the same toolchain as setup.py), and calls each function
in a child process: one raises TORCH_CHECK with a streamed integer, the other with the integer
formatted by std::to_string. Exit status 0 either way: it reports, it does not judge.
"""
import os
import shutil
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <torch/extension.h>
#include <string>

void streamed(int64_t value) { TORCH_CHECK(false, "streamed value ", value); }
void formatted(int64_t value) { TORCH_CHECK(false, "formatted value ", std::to_string(value)); }
"""

CHILD = r"""
import sys
import torch.utils.cpp_extension as ext
module = ext.load_inline("fastelbo_abi_probe", cpp_sources=[sys.argv[2]],
                         functions=["streamed", "formatted"], build_directory=sys.argv[3])
try:
    getattr(module, sys.argv[1])(42)
except RuntimeError as error:
    print("raised RuntimeError:", str(error).splitlines()[0])
"""


def run(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"({error})"


def main():
    import torch

    print("torch", torch.__version__, "| CXX11 ABI", torch._C._GLIBCXX_USE_CXX11_ABI)
    for var in ("CC", "CXX", "LD_LIBRARY_PATH"):
        print(f"{var}={os.environ.get(var, '')}")
    for compiler in (os.environ.get("CXX"), "c++", "g++", "/usr/bin/g++", "/opt/gcc/bin/g++"):
        if compiler and shutil.which(compiler):
            print(compiler, "->", run([compiler, "--version"]).splitlines()[0])
    with open("/proc/self/maps") as maps:
        loaded = sorted({line.split()[-1] for line in maps if "libstdc++" in line or "libgcc_s" in line})
    print("loaded in this python:", ", ".join(loaded) or "none")
    extension = [f for f in os.listdir("fastelbo") if f.startswith("_C") and f.endswith(".so")]
    if extension:
        ldd = run(["ldd", os.path.join("fastelbo", extension[0])])
        print("ldd fastelbo/" + extension[0] + ":",
              "; ".join(line.strip() for line in ldd.splitlines() if "stdc++" in line or "gcc_s" in line))

    build_dir = tempfile.mkdtemp(prefix="abi_probe_")
    for function in ("streamed", "formatted"):
        child = subprocess.run([sys.executable, "-c", CHILD, function, SOURCE, build_dir],
                               capture_output=True, text=True, timeout=300)
        lines = child.stdout.strip().splitlines() or child.stderr.strip().splitlines()[-1:] or [""]
        outcome = f"exit {child.returncode}" if child.returncode >= 0 else f"killed by signal {-child.returncode}"
        print(f"TORCH_CHECK with a {function} int64: {outcome}; {lines[-1][:200]}")


if __name__ == "__main__":
    main()
