"""What the GPU compiler makes of csrc/elbo_math.h's normal generator (nvcc -ptx: no GPU needed).

At small sizes the sampling kernels wait on one thread's dependent chain: Philox, two logs, two
sines and cosines, two square roots (benches/RESULTS.md, "Where the small steps' kernel time
goes"). CUDA's sincosf carries a slow path for huge arguments (Payne-Hanek reduction through local
memory) behind a branch, and that branch kept the compiler from interleaving the two Box-Muller
pairs. box_muller4 tells the compiler that its angle, in (0, 2 pi], never takes that path; these
tests check that the path is gone from the generated code. A CUDA release that tests its argument
differently would leave the path in place (the results stay right; only the speed is lost): the
canary below, a plain sincosf, then shows whether the test itself still sees the path.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The slow paths of CUDA's sincosf and sincos: taken when |x| >= 105615 (0f47CE4780 in PTX) or
# |x| >= 2^31 (0d41E0000000000000), they reduce the argument with a table walk through local memory.
SLOW_PATH_THRESHOLD = {"float": "0f47CE4780", "double": "0d41E0000000000000"}

NORMALS_PROBE = r"""
#include "elbo_math.h"
__global__ void normals(uint64_t seed, uint64_t stream, ACC* out) {
  const uint64_t group = blockIdx.x * blockDim.x + threadIdx.x;
  const fastelbo::math::Normal4<ACC> n = fastelbo::math::normal_group<ACC>(seed, stream, group);
  for (int l = 0; l < 4; ++l) out[4 * group + l] = n.v[l];
}
"""

PLAIN_SINCOS_CANARY = r"""
__global__ void plain_sincos(const ACC* angle, ACC* out) {
  ACC s, c;
  sincos(angle[threadIdx.x], &s, &c);
  out[2 * threadIdx.x] = s;
  out[2 * threadIdx.x + 1] = c;
}
"""


def _nvcc():
    candidates = [shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return candidate
    pytest.skip("needs nvcc (the CUDA toolkit) to look at the generated code")


def _ptx(tmp_path, name, source, acc):
    path = tmp_path / f"{name}_{acc}.cu"
    path.write_text(f"#define ACC {acc}\n" + source)
    out = path.with_suffix(".ptx")
    result = subprocess.run([_nvcc(), "-O3", "-ptx", "-arch=sm_90", f"-I{ROOT / 'csrc'}", "-o", str(out), str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out.read_text()


ACC_TYPES = ["float", "double"]


@pytest.mark.parametrize("acc", ACC_TYPES)
def test_plain_sincos_has_the_slow_path(tmp_path, acc):
    """The canary: without the assumption, sincos's slow path and its local memory are there."""
    ptx = _ptx(tmp_path, "canary", PLAIN_SINCOS_CANARY, acc)
    assert SLOW_PATH_THRESHOLD[acc] in ptx
    assert ".local" in ptx


@pytest.mark.parametrize("acc", ACC_TYPES)
def test_normal_generator_has_no_sincos_slow_path(tmp_path, acc):
    ptx = _ptx(tmp_path, "normals", NORMALS_PROBE, acc)
    suffix = {"float": "f32", "double": "f64"}[acc]
    assert f"sqrt.rn.{suffix}" in ptx, "the probe did not compile the generator"
    assert SLOW_PATH_THRESHOLD[acc] not in ptx, "sincos's slow-path test is back in the normal generator"
    assert ".local" not in ptx, "the normal generator uses local memory"
