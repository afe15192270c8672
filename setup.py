"""Builds fastelbo._C: the CPU kernels always, the CUDA kernels when they can be compiled.

Environment:
  FASTELBO_CUDA=auto|1|0   auto (default): build csrc/cuda when torch is a CUDA build and nvcc is
                           found; 1: require it (fail otherwise); 0: CPU only.
  TORCH_CUDA_ARCH_LIST     the GPU architectures; default "8.0;9.0" when no GPU is visible, else
                           torch's choice (the visible cards).
  FASTELBO_DEBUG=1         -O0 -g instead of -O3.
  CUDA_HOME                the toolkit folder (bin/nvcc, lib64/); found automatically otherwise.
  MAX_JOBS                 parallel compile jobs (ninja).
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The folder holding bin/nvcc and lib64/. `which nvcc` may find a wrapper script, from which
    torch would guess a CUDA_HOME without lib64/libcudart, so look for the real toolkit."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isdir(os.path.join(home, "lib64")):
            return os.path.realpath(home)
    return None


def _nvidia_wheel_includes():
    """Headers that torch's CUDA headers include (cublas_v2.h, cusparse.h, ...) live in the nvidia
    wheels torch depends on, not in every system toolkit."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


mode = os.environ.get("FASTELBO_CUDA", "auto").lower()
if mode not in ("auto", "1", "0"):
    sys.exit(f"FASTELBO_CUDA must be auto, 1 or 0, got {mode!r}")
cuda_home = _find_cuda_home() if mode != "0" else None
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402  (after CUDA_HOME is set)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = mode != "0" and torch.version.cuda is not None and cuda_home is not None
if mode == "1" and not with_cuda:
    sys.exit(
        "FASTELBO_CUDA=1 but the CUDA kernels cannot be built: "
        f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit found: {cuda_home!r}"
    )
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

debug = os.environ.get("FASTELBO_DEBUG", "0") == "1"
opt = ["-O0", "-g"] if debug else ["-O3"]
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
# OpenMP: at::parallel_for runs its loop through `#pragma omp parallel` in a header, so the
# extension itself must be compiled with -fopenmp or the CPU kernels run on one thread.
# -Wno-psabi: the CPU kernels pass 32-byte SIMD vectors between inline functions, which GCC
# warns about when AVX is off (a note about calling conventions, irrelevant for inline code).
# -fno-trapping-math: fastelbo never unmasks floating-point exceptions, and without the flag GCC
# may not turn a float comparison into a select (it might trap), which kept the per-element KL
# loops scalar (csrc/elbo_math.h, expm1_logvar). Values are unchanged: no reassociation.
extra = {"cxx": opt + ["-fopenmp", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]}
define_macros = []
include_dirs = [os.path.join(ROOT, "csrc")]
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extra["nvcc"] = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
    define_macros.append(("FASTELBO_WITH_CUDA", None))
    include_dirs += _nvidia_wheel_includes()
    Extension = CUDAExtension
else:
    Extension = CppExtension

print(
    f"fastelbo build: cuda={'yes' if with_cuda else 'no'} (FASTELBO_CUDA={mode}, "
    f"CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}), "
    f"torch {torch.__version__}, {'debug' if debug else 'release'}",
    flush=True,
)

setup(
    packages=find_packages(include=["fastelbo", "fastelbo.*"]),
    ext_modules=[
        Extension(
            "fastelbo._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
