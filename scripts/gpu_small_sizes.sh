#!/usr/bin/env bash
# Where the kernel time of a small loss step goes (issue 3's small-size targets), on a GPU machine:
#   build   setup.py build_ext --inplace with the CUDA kernels, for the visible GPU's arch
#   sweep   fastelbo bench, fastelbo provider only, fp32 fwd+bwd, at sizes from 8K to 25M data
#           elements: each kernel's time per step against the bytes it moves, so that a fixed cost
#           (launch, latency, reduction tail) and a per-byte cost can be read off
#   ncu     Nsight Compute on one mnist-mlp and one ldm-ae-256 step (after warm-up): speed of light,
#           launch statistics, occupancy and warp stall reasons of each fastelbo kernel
# Leaves in $OUT (default ./gpu_out): sweep.json, sweep.txt (the per-kernel table), ncu.txt, build.log.
# Run from the repository root: bash scripts/gpu_small_sizes.sh   (about 2.5 minutes on an H100)
set -u
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ARCH=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
git rev-parse --short HEAD 2>/dev/null

echo "=== build"
FASTELBO_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${ARCH:-9.0}" \
  timeout 150 "$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log"; exit 1; }

echo "=== sweep"
# (B, D, Z): mnist-mlp, then B = 8 with Z = D / 48 (ldm-ae-256's ratio) from 8K to 25M data elements.
timeout 90 "$PYTHON" -m fastelbo bench --devices cuda --dtypes fp32 --providers fastelbo --modes fwd+bwd \
  --sizes mnist-mlp 8,1024,32 8,12288,256 8,49152,1024 ldm-ae-256 8,786432,16384 8,3145728,65536 \
  --no-compile --no-plot --no-progress --time-per-case 0.1 --out "$OUT/sweep" > "$OUT/sweep.log" 2>&1
tail -n 3 "$OUT/sweep.log"
cp "$OUT/sweep/bench.json" "$OUT/sweep.json" 2>/dev/null && rm -rf "$OUT/sweep"
"$PYTHON" - "$OUT/sweep.json" << 'EOF' | tee "$OUT/sweep.txt"
import json
import re
import sys

data = json.load(open(sys.argv[1]))
copy = data["meta"]["copy_bandwidth"]["cuda"]["GBps"]
machine = data["meta"]["machine"]
print(f"GPU {machine['gpu']}, copy {copy:.0f} GB/s, sources {machine.get('fastelbo_source_digest')}; "
      "us per step per kernel, fp32 fwd+bwd")
names = ["reparam_kl_forward", "reparam_kl_backward", "recon_forward", "recon_scale_grad", "FillFunctor",
         "CUDAFunctor_add"]
print(f"{'B,D,Z':>16} {'N':>8} {'M':>9} {'bytes MB':>8} {'floor us':>8} {'all us':>7} " +
      " ".join(f"{n[:18]:>18}" for n in names))
for r in data["results"]:
    by_name = {}
    for full, us in (r.get("kernel_time_us_by_name") or {}).items():
        key = next((n for n in names if re.search(n, full)), full[:18])
        by_name[key] = by_name.get(key, 0.0) + us
    moved = (8 * r["N"] + 3 * r["M"]) * r["element_bytes"]  # what the step moves, prepared gradient
    shape = f"{r['B']},{r['D']},{r['Z']}"
    print(f"{shape:>16} {r['N']:8d} {r['M']:9d} {moved / 1e6:8.2f} {moved / copy / 1e3:8.2f} "
          f"{r.get('kernel_time_us') or float('nan'):7.1f} " +
          " ".join(f"{by_name.get(n, float('nan')):18.2f}" for n in names))
EOF

echo "=== ncu"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2> /dev/null)
cat > "$OUT/ncu_step.py" << 'EOF'
"""One mnist-mlp and one ldm-ae-256 fp32 loss step under the profiler, after warm-up."""
import torch

import fastelbo


def step(B, D, Z):
    mu = torch.randn(B, Z, device="cuda", requires_grad=True)
    logvar = torch.randn(B, Z, device="cuda", requires_grad=True)
    x_hat = torch.randn(B, D, device="cuda", requires_grad=True)
    x = torch.randn(B, D, device="cuda")
    grad_z = torch.randn(B, Z, device="cuda")

    def once():
        z, kl = fastelbo.reparameterize_kl(mu, logvar)
        rec = fastelbo.gaussian_recon_loss(x_hat, x)
        torch.autograd.backward([rec + kl, z], [None, grad_z])

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    once()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


step(128, 784, 20)
step(8, 196608, 4096)
EOF
if [[ -n "$NCU" ]]; then
  timeout 100 "$NCU" --profile-from-start off --kernel-name regex:"reparam|recon" --section SpeedOfLight \
    --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
    "$PYTHON" "$OUT/ncu_step.py" > "$OUT/ncu.txt" 2>&1
  echo "ncu exit $?; $(grep -c 'Duration' "$OUT/ncu.txt") kernels profiled"
  grep -E "^  [a-z_]+.*\(|Duration|Elapsed Cycles|Registers Per|Achieved Occupancy|Memory Throughput|Block Size|Grid Size|Stall|Warp Cycles Per Issued" "$OUT/ncu.txt" | head -n 120
else
  echo "no ncu on this machine"
fi
