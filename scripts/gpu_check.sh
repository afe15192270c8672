#!/usr/bin/env bash
# One check of fastelbo's CUDA kernels on a machine with a GPU (no network needed):
#   build      setup.py build_ext --inplace with the CUDA kernels (FASTELBO_CUDA=1), for the visible GPU's arch
#   cpu-import `import fastelbo` and a CPU op with no GPU visible (the CUDA build must not need one)
#   cluster-smoke  one small step with and without the sm_90 cluster reduction (short limit); if it
#              fails, the later steps run with FASTELBO_CUDA_CLUSTERS=0 and without the cluster tests
#   cuda-tests tests/test_cuda.py (everything but the slow test)
#   core-cuda  the CUDA cases of the rest of the suite (tests/ -m cuda)
#   bench      python -m fastelbo bench on CUDA: mnist-mlp, ldm-ae-256, large; fp32 and bf16
#   memcheck   compute-sanitizer --tool memcheck on a small driver that runs every kernel variant
#   racecheck  compute-sanitizer --tool racecheck on the same driver
#   slow       the > 2^31-element test
#   (the steps above check correctness and time the issue's targets; the optional A/B and shape
#   steps below come after them, so that when the budget runs short, they are the ones skipped)
#   bench-one-block  the fastelbo provider at mnist-mlp and (8, 12288, 256), with the defaults and
#              then with FASTELBO_CUDA_ONE_BLOCK=0: the sample+KL forward's 640 and 512 chunks run as
#              one block, then as a small grid of 5 and 4 blocks (A/B of the one-block shape)
#   bench-large-blocks  the fastelbo provider at ldm-ae-256, (8, 49152, 1024) and large, with the
#              defaults and then with FASTELBO_CUDA_LARGE_BLOCKS=0: the memory-bound grids past the
#              small sizes run in blocks of up to 512 threads, then of 128 (A/B of large_block_grid)
#   shapes     scripts/cuda_shapes_step.py: tall batches of short samples and many draws; the sample+KL
#              step with free bits, the batch split over more blocks (default) against
#              FASTELBO_CUDA_SPREAD=0 and plain PyTorch; reduction="none" and num_samples up
#              to 50 against plain PyTorch
#   bench-ticket  the fastelbo provider again at mnist-mlp and ldm-ae-256 with FASTELBO_CUDA_CLUSTERS=0:
#              small grids reduce through the global ticket instead of a thread-block cluster (A/B)
#   bench-plain-backward  the fastelbo provider again at every size with FASTELBO_GRAD_IN_FORWARD=0:
#              the recon forward does not prepare the x_hat gradient and the backward reads x_hat
#              and x again (A/B of gaussian_recon_loss_finish_grad_)
#   bench-compile  fastelbo bench with the torch.compile provider too (mnist-mlp, ldm-ae-256; fp32,
#              forward+backward): compilation is slow, so it runs after everything else
#   abi-probe  (only when GPU_CHECK_STEPS names it) scripts/abi_probe.py: the image's C++ toolchain,
#              and whether a TORCH_CHECK message with a streamed number crashes extensions built
#              with it (see that script; fastelbo's messages no longer stream numbers)
#   sweep      (only on request) where a small step's kernel time goes: the fastelbo provider, fp32
#              fwd+bwd, from 8K to 25M data elements; the summary tabulates each kernel's time per
#              step against the bytes the step moves (fixed cost and per-byte cost read off)
#   ncu        (only on request) Nsight Compute on one mnist-mlp and one ldm-ae-256 step after
#              warm-up: speed of light, launch statistics, occupancy, warp stalls (ncu.txt)
#              e.g. GPU_CHECK_STEPS="sweep ncu" bash scripts/gpu_check.sh (about 2.5 minutes)
# Every step runs under `timeout` (pytest steps are stopped with SIGINT, so that they still print
# their summary and write their junit XML) and within an overall budget (GPU_CHECK_BUDGET seconds,
# default 470: the whole script stays under 8 minutes on an H100); a step starts only while at
# least half its limit is left (a step cut short would only time out and lose its output), and a
# failing step does not stop the others. GPU_CHECK_STEPS picks steps (e.g. "build cuda-tests bench";
# default: all of them, in the order above); the build always runs.
# $OUT (default ./gpu_out) is refreshed after every step, so that a run stopped from outside still
# leaves what it did: summary.txt (the step table so far; at the end, the whole summary, which is
# also printed, with the short table of each step's status and the test and sanitizer results
# again last), bench.json and bench-compile.json (once written), logs.tgz with every step's log and
# every bench's JSON, and on request sweep.json and ncu.txt. At most 6 files: the device tool brings
# back at most 8.
#
# Run from the repository root:  bash scripts/gpu_check.sh
# Environment: PYTHON (default python3), OUT, GPU_CHECK_BUDGET, GPU_CHECK_STEPS, MAX_JOBS (default 16),
#              BENCH_ARGS (extra arguments for fastelbo bench, e.g. "--time-per-case 1").
set -u
set -o pipefail

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d)  # packed into $OUT/logs.tgz at the end
BUDGET=${GPU_CHECK_BUDGET:-470}
WANTED=" ${GPU_CHECK_STEPS:-all} "
WANTED=${WANTED//,/ }
START=$(date +%s)
export PYTHONUNBUFFERED=1
# The in-place build is imported from the repository root, also by scripts run from elsewhere
# (the sanitizer driver lives in the log folder).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

STEPS=()
STATUS=()
SECONDS_TAKEN=()

remaining() { echo $((BUDGET - ($(date +%s) - START))); }
# wanted NAME: whether GPU_CHECK_STEPS asks for step NAME (the build always runs).
wanted() { [[ "$WANTED" == *" all "* || "$WANTED" == *" $1 "* || "$1" == build ]]; }

# step_table: each step's status so far, one line each (the short table printed last).
step_table() {
  printf '%-20s %-32s %s\n' step status seconds
  for i in "${!STEPS[@]}"; do
    printf '%-20s %-32s %s\n' "${STEPS[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}"
  done
}

# test_results: the pytest steps' result lines and the sanitizers' summary lines (memcheck prints
# "ERROR SUMMARY: ...", racecheck "RACECHECK SUMMARY: ...").
test_results() {
  for name in cuda-tests core-cuda slow; do
    [[ -f "$LOGS/$name.log" ]] && echo "$name: $(grep -E '[0-9]+ (passed|failed|error)' "$LOGS/$name.log" | tail -n 1)"
  done
  for tool in memcheck racecheck; do
    [[ -f "$LOGS/$tool.log" ]] && echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOGS/$tool.log" | tail -n 1)"
  done
  [[ "${FASTELBO_CUDA_CLUSTERS:-1}" == 0 ]] &&
    echo "NOTE: FASTELBO_CUDA_CLUSTERS=0 after cluster-smoke: the steps after it ran without clusters and without the cluster tests"
  return 0
}

# save_out: copies what there is so far into $OUT, under the same names each time (summary.txt,
# bench.json, bench-compile.json, logs.tgz; sweep.json and ncu.txt when asked for), after every step
# and at the end: a run stopped from outside, or a hung summary, still leaves its status and logs.
# Only these few files: the device tool brings back at most 8, and logs.tgz holds every bench JSON.
save_out() {
  [[ -f "$LOGS/summary.txt" ]] && cp "$LOGS/summary.txt" "$OUT/summary.txt"
  [[ -f "$LOGS/bench/bench.json" ]] && cp "$LOGS/bench/bench.json" "$OUT/bench.json"
  [[ -f "$LOGS/bench-compile/bench.json" ]] && cp "$LOGS/bench-compile/bench.json" "$OUT/bench-compile.json"
  [[ -f "$LOGS/sweep/bench.json" ]] && cp "$LOGS/sweep/bench.json" "$OUT/sweep.json"
  [[ -f "$LOGS/ncu.log" ]] && cp "$LOGS/ncu.log" "$OUT/ncu.txt"
  # packed beside $LOGS, then moved: $OUT never holds a half-written archive for long
  tar -czf "$LOGS.tgz" -C "$LOGS" . && mv -f "$LOGS.tgz" "$OUT/logs.tgz"
}

# run_step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under timeout (the smaller of LIMIT and the
# time left in the budget), output to $LOGS/NAME.log, and records ok / FAIL(rc) / TIMEOUT / SKIPPED.
# The timeout stops COMMAND with ${STOP_SIGNAL:-TERM}, then SIGKILL 15 s later. A step (but the
# build) starts only while at least half its LIMIT is left in the budget: each limit is at least
# about 1.5 times the step's time on an H100, and a step cut much shorter would only time out and
# lose its output, while the steps after it (shorter ones) might still fit.
run_step() {
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0  # not asked for (GPU_CHECK_STEPS)
  local left
  left=$(remaining)
  if [[ "$name" != build ]] && ((left < limit / 2)); then
    ((left < 0)) && left=0
    STEPS+=("$name"); STATUS+=("SKIPPED (${left}s of budget left)"); SECONDS_TAKEN+=(0)
    echo "=== $name: skipped, ${left}s of the budget of ${BUDGET}s left, under half its limit of ${limit}s"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout -s "${STOP_SIGNAL:-TERM}" --kill-after=15 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0))
  local status
  if ((rc == 0)); then
    status="ok"
  elif ((rc == 124 || rc == 137)); then
    status="TIMEOUT after ${limit}s"
  else
    status="FAIL (exit $rc)"
  fi
  STEPS+=("$name"); STATUS+=("$status"); SECONDS_TAKEN+=("$took")
  echo "    $status in ${took}s; last lines of $LOGS/$name.log:"
  tail -n 8 "$LOGS/$name.log" | sed 's/^/    | /'
  { echo "fastelbo gpu_check: in progress, $(($(date +%s) - START))s so far"; step_table; test_results; } > "$LOGS/summary.txt"
  save_out
}

# run_pytest NAME LIMIT PYTEST_ARGS...: a pytest step. Stopped at its limit with SIGINT, so that
# pytest still prints its summary (which tests ran, the slowest 25) and writes its junit XML; a
# test stuck for 60 s has every thread's stack dumped into the log (faulthandler).
run_pytest() {
  local name=$1 limit=$2
  shift 2
  STOP_SIGNAL=INT run_step "$name" "$limit" "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider \
    -o faulthandler_timeout=60 --durations=25 --junitxml="$LOGS/$name.xml" "$@"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  command -v nvcc && nvcc --version | tail -n 2
} > "$LOGS/machine.log" 2>&1
cat "$LOGS/machine.log"

ARCH=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
ARCH=${ARCH:-9.0}

# ---- build --------------------------------------------------------------------------------------
# In place (fastelbo/_C*.so next to the sources, imported from the repository root): setup.py
# build_ext --inplace, which skips pip's metadata steps; should that fail, pip install -e
# (DESIGN.md section 6) gets a second try.
# shellcheck disable=SC2016  # $PYTHON expands in the inner shell, from the environment
run_step build 240 env FASTELBO_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="$ARCH" PYTHON="$PYTHON" \
  bash -c '"$PYTHON" setup.py build_ext --inplace ||
    { echo "build_ext --inplace failed; trying pip install -e ."; "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .; }'

run_step cpu-import 60 env CUDA_VISIBLE_DEVICES="" "$PYTHON" -c "
import torch, fastelbo
assert fastelbo._C.built_with_cuda, 'the extension was built without its CUDA kernels'
assert not torch.cuda.is_available()
z, kl = fastelbo.reparameterize_kl(torch.zeros(2, 3), torch.zeros(2, 3))
print('import fastelbo without a visible GPU: ok, built_with_cuda =', fastelbo._C.built_with_cuda, kl.item())
"

# ---- cluster smoke test ---------------------------------------------------------------------------
# The thread-block-cluster reduction (sm_90) is the newest CUDA code. One mnist-size step with
# clusters and one with the ticket, under a short limit: should the cluster path fail or hang,
# every later step runs with FASTELBO_CUDA_CLUSTERS=0 and skips the cluster tests, so that one
# bug there does not spend the whole GPU budget on timeouts. The summary says so.
cat > "$LOGS/cluster_smoke.py" << 'EOF'
import torch, fastelbo
C = fastelbo._C
print("cluster capacity:", C._cuda_cluster_capacity(torch.cuda.current_device()))
g = torch.Generator().manual_seed(0)
mu, logvar, eps = (torch.randn(128, 20, generator=g).cuda() for _ in range(3))
x_hat, x = (torch.randn(128, 784, generator=g).cuda() for _ in range(2))
values = {}
for clusters in (True, False):
    C._set_cuda_clusters(clusters)
    _, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction="sum")
    rec = fastelbo.gaussian_recon_loss(x_hat, x, reduction="sum")
    torch.cuda.synchronize()
    values[clusters] = (kl.item(), rec.item())
m, lv = mu.double(), logvar.double()
want = ((0.5 * (m * m + lv.exp() - 1 - lv)).sum().item(), (0.5 * (x_hat.double() - x.double()) ** 2).sum().item())
print("cluster", values[True], "ticket", values[False], "float64", want)
assert values[True] == values[False], "cluster and ticket reductions differ"
assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(values[True], want)), "not the float64 sums"
EOF
CLUSTER_TESTS_OFF=()
run_step cluster-smoke 45 "$PYTHON" "$LOGS/cluster_smoke.py"
if wanted cluster-smoke && [[ "${STATUS[-1]}" != ok ]]; then
  export FASTELBO_CUDA_CLUSTERS=0
  CLUSTER_TESTS_OFF=(-k "not cluster")
  echo "    cluster-smoke did not pass: FASTELBO_CUDA_CLUSTERS=0 and no cluster tests from here on"
fi

# ---- tests ----------------------------------------------------------------------------------------
# pytest-xdist, where installed, spreads the tests over 8 processes (they share the one GPU), each
# with 2 CPU threads (OMP_NUM_THREADS): 8 workers with torch's default thread count would
# oversubscribe the machine's 16 cores.
PARALLEL=()
"$PYTHON" -c "import xdist" 2> /dev/null && PARALLEL=(-n 8)
# (1196 tests, 86 s for 764 of them on the last H100 run)
OMP_NUM_THREADS=2 run_pytest cuda-tests 220 ${PARALLEL[@]+"${PARALLEL[@]}"} tests/test_cuda.py -m "not slow" \
  ${CLUSTER_TESTS_OFF[@]+"${CLUSTER_TESTS_OFF[@]}"}
# The CUDA twins of every other test (the `device` fixture's "cuda" parameter).
OMP_NUM_THREADS=2 run_pytest core-cuda 180 ${PARALLEL[@]+"${PARALLEL[@]}"} tests -m "cuda and not slow" \
  --ignore=tests/test_cuda.py

# ---- benchmark ------------------------------------------------------------------------------------
if ! "$PYTHON" -c "import tqdm" 2> /dev/null; then
  # fastelbo bench draws a progress bar with tqdm, which the GPU image may lack: a silent stand-in.
  mkdir -p "$LOGS/shim"
  cat > "$LOGS/shim/tqdm.py" << 'EOF'
"""Stand-in for tqdm (not installed here; see scripts/gpu_check.sh): no progress bar."""
import sys


class tqdm:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass

    @staticmethod
    def write(message, file=None, **kwargs):
        print(message, file=file or sys.stdout)
EOF
  export PYTHONPATH="$LOGS/shim${PYTHONPATH:+:$PYTHONPATH}"
fi
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
run_step bench 150 "$PYTHON" -m fastelbo bench --devices cuda --sizes mnist-mlp ldm-ae-256 large \
  --dtypes fp32,bf16 --no-compile --no-plot --no-progress --time-per-case 0.3 --out "$LOGS/bench" ${BENCH_ARGS:-}

# ---- compute-sanitizer ----------------------------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer)
if [[ -z "$SANITIZER" ]]; then
  for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
    [[ -x "$candidate" ]] && SANITIZER=$candidate && break
  done
fi
cat > "$LOGS/sanitizer_driver.py" << 'EOF'
"""Every kernel variant once, on small inputs (multi-block grids, ragged tails, unaligned views)."""
import torch

import fastelbo

ops = torch.ops.fastelbo
torch.manual_seed(0)


def unaligned(t):
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def every_variant():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        one_dtype(dtype)


def one_dtype(dtype):
    # flat forward: 1, 1 and 9 blocks, then a big grid (ticket) of 313 large blocks of 256 threads
    for shape in ((3, 5), (64, 20), (4, 1030), (16, 20001)):
        mu = torch.randn(shape, device="cuda", dtype=dtype)
        logvar = 0.5 * torch.randn(shape, device="cuda", dtype=dtype)
        for m, lv in ((mu, logvar), (unaligned(mu), unaligned(logvar))):
            for reduction, free_bits in ((0, 0.0), (1, 0.0), (3, 0.3)):
                # several draws: over 2 and 4 lanes on the small latents, per chunk (flat) or per
                # window ("none", short rows) (7 draws only there, to keep racecheck within its limit)
                for k in ((1, 2, 7) if m.numel() < 10000 else (1, 2)):
                    z, kl, rng, pm = ops.reparameterize_kl(m, lv, None, None, k, reduction, free_bits)
                    grad_z, grad_kl = torch.randn_like(z), torch.ones_like(kl)
                    ops.reparameterize_kl_backward(grad_z, grad_kl, m, lv, None, rng, pm, k, reduction, free_bits)
                    ops.reparameterize_kl_backward(None, grad_kl, m, lv, z, rng, pm, k, reduction, free_bits)
    # tall batches: free bits with the batch split over 5 and 2 blocks per tile of positions (10
    # and 3 with 2 draws, each sample's shared by 2 lanes), and "none" with several short samples
    # per warp
    for shape in ((600, 20), (700, 3)):
        mu = torch.randn(shape, device="cuda", dtype=dtype)
        logvar = 0.5 * torch.randn(shape, device="cuda", dtype=dtype)
        for m, lv in ((mu, logvar), (unaligned(mu), unaligned(logvar))):
            for k in (1, 2):
                for reduction, free_bits in ((3, 0.3), (0, 0.0)):
                    z, kl, rng, pm = ops.reparameterize_kl(m, lv, None, None, k, reduction, free_bits)
                    ops.reparameterize_kl_backward(torch.randn_like(z), torch.ones_like(kl), m, lv, None, rng, pm, k,
                                                   reduction, free_bits)
        for xh, xv in ((mu, logvar), (unaligned(mu), unaligned(logvar))):
            ops.gaussian_recon_loss(xh, xv, 0, True)
    # many draws on a small latent: 32 lanes per chunk; with free bits, 32 lanes per sample
    mu = torch.randn(64, 20, device="cuda", dtype=dtype)
    for free_bits in (0.0, 0.3):
        z, kl, rng, pm = ops.reparameterize_kl(mu, 0.5 * mu, None, None, 50, 3, free_bits)
        ops.reparameterize_kl_backward(torch.randn_like(z), torch.ones_like(kl), mu, 0.5 * mu, None, rng, pm, 50, 3,
                                       free_bits)
    # (8, 300): one block (float, 16-bit); (8, 3001): a 16-block small grid (a cluster on sm_90);
    # (8, 80001): a big grid (ticket) of large blocks, 512 threads (float32, float64) or 256 (16-bit).
    for size in (300, 3001, 80001):
        x_hat = torch.randn(8, size, device="cuda", dtype=dtype)
        x = torch.randn(8, size, device="cuda", dtype=dtype)
        for xh, xv in ((x_hat, x), (unaligned(x_hat), unaligned(x)), (x_hat[:, :size - 1], x[:, :size - 1])):
            for reduction in range(4):
                loss, grad_unit = ops.gaussian_recon_loss(xh, xv, reduction, True)
                ops.gaussian_recon_loss_backward(torch.ones_like(loss), xh, xv, reduction, True, True)
                if reduction != 0:  # the in-place backward, skipping (1) and overwriting (2)
                    for value in (1.0, 2.0):
                        ops.gaussian_recon_loss_finish_grad_(grad_unit, torch.full_like(loss, value), xh, xv,
                                                             reduction)
    # channels_last x_hat: read in place, with x in the same layout or copied into it
    x_hat = torch.randn(4, 3, 9, 7, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    for xv in (torch.randn_like(x_hat), torch.randn_like(x_hat).contiguous()):
        for reduction in range(4):
            loss, _ = ops.gaussian_recon_loss(x_hat, xv, reduction, True)
            ops.gaussian_recon_loss_backward(torch.ones_like(loss), x_hat, xv, reduction, True, True)


# Small grids once as thread-block clusters (sm_90) and once through the ticket; only through the
# ticket under FASTELBO_CUDA_CLUSTERS=0 (set by this script when cluster-smoke did not pass).
cluster_settings = (True, False) if fastelbo._C._cuda_clusters_enabled() else (False,)
for clusters in cluster_settings:
    fastelbo._C._set_cuda_clusters(clusters)
    every_variant()
torch.cuda.synchronize()
print("sanitizer driver: every kernel variant ran; cluster reductions enabled:", cluster_settings)
EOF
if [[ -n "$SANITIZER" ]]; then
  # limits: 7 s and 30 s on the last H100 run, before the driver ran about 1.8 times as many kernels
  run_step memcheck 75 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 3 \
    "$PYTHON" "$LOGS/sanitizer_driver.py"
  run_step racecheck 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool racecheck --error-exitcode 3 \
    "$PYTHON" "$LOGS/sanitizer_driver.py"
else
  for tool in memcheck racecheck; do
    wanted "$tool" && { STEPS+=("$tool"); STATUS+=("SKIPPED (no compute-sanitizer)"); SECONDS_TAKEN+=(0); }
  done
fi

# ---- the slow test -------------------------------------------------------------------------------
run_pytest slow 90 tests/test_cuda.py -m slow

# ---- optional: A/B benchmarks, shapes, torch.compile --------------------------------------------
# After every correctness step and the main bench, so that a short budget skips these first; the
# newest A/B steps first, torch.compile (slow to compile) last. Skipping one of these (or of the
# on-request steps after them) for the budget does not fail the run.
FIRST_OPTIONAL=${#STEPS[@]}
# ab_bench NAME LIMIT VARIABLE SIZE...: an A/B step. The fastelbo provider (fp32 and bf16,
# forward+backward) at SIZE..., with the defaults into $LOGS/NAME/on, then with VARIABLE=0 into
# $LOGS/NAME/off; the summary prints the two side by side.
ab_bench() {
  local name=$1 limit=$2 variable=$3
  shift 3
  # shellcheck disable=SC2086
  local bench=("$PYTHON" -m fastelbo bench --devices cuda --sizes "$@" --dtypes fp32,bf16 --providers fastelbo
    --modes fwd+bwd --no-compile --no-plot --no-progress --time-per-case 0.3 ${BENCH_ARGS:-})
  run_step "$name" "$limit" bash -c '"${@:2}" --out "$0/on" && env "$1=0" "${@:2}" --out "$0/off"' \
    "$LOGS/$name" "$variable" "${bench[@]}"
}
ab_bench bench-one-block 60 FASTELBO_CUDA_ONE_BLOCK mnist-mlp 8,12288,256
ab_bench bench-large-blocks 75 FASTELBO_CUDA_LARGE_BLOCKS ldm-ae-256 8,49152,1024 large
run_step shapes 90 "$PYTHON" scripts/cuda_shapes_step.py --reps 10

# shellcheck disable=SC2086
run_step bench-ticket 60 env FASTELBO_CUDA_CLUSTERS=0 "$PYTHON" -m fastelbo bench --devices cuda \
  --sizes mnist-mlp ldm-ae-256 --dtypes fp32,bf16 --providers fastelbo --modes fwd+bwd --no-compile --no-plot \
  --no-progress --time-per-case 0.3 --out "$LOGS/bench-ticket" ${BENCH_ARGS:-}

# shellcheck disable=SC2086
run_step bench-plain-backward 60 env FASTELBO_GRAD_IN_FORWARD=0 "$PYTHON" -m fastelbo bench --devices cuda \
  --sizes mnist-mlp ldm-ae-256 large --dtypes fp32,bf16 --providers fastelbo --modes fwd+bwd --no-compile \
  --no-plot --no-progress --time-per-case 0.3 --out "$LOGS/bench-plain-backward" ${BENCH_ARGS:-}

# torch.compile on the GPU (31 s on the last H100 run)
run_step bench-compile 90 "$PYTHON" -m fastelbo bench --devices cuda --sizes mnist-mlp ldm-ae-256 --dtypes fp32 \
  --modes fwd+bwd --no-plot --no-progress --time-per-case 0.3 --out "$LOGS/bench-compile"

# ---- the toolchain probe (on request: its compile takes budget that bench-compile needs) -----------
if [[ "$WANTED" == *" abi-probe "* ]]; then
  run_step abi-probe 120 "$PYTHON" scripts/abi_probe.py
fi

# ---- where a small step's kernel time goes (on request) ---------------------------------------------
# (B, D, Z): mnist-mlp, then B = 8 with Z = D / 48 (ldm-ae-256's ratio) from 8K to 25M data elements.
if [[ "$WANTED" == *" sweep "* ]]; then
  run_step sweep 90 "$PYTHON" -m fastelbo bench --devices cuda --dtypes fp32 --providers fastelbo --modes fwd+bwd \
    --sizes mnist-mlp 8,1024,32 8,12288,256 8,49152,1024 ldm-ae-256 8,786432,16384 8,3145728,65536 \
    --no-compile --no-plot --no-progress --time-per-case 0.1 --out "$LOGS/sweep"
fi
if [[ "$WANTED" == *" ncu "* ]]; then
  cat > "$LOGS/ncu_step.py" << 'EOF'
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
  NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2> /dev/null)
  if [[ -n "$NCU" ]]; then
    run_step ncu 100 "$NCU" --profile-from-start off --kernel-name regex:"reparam|recon" --section SpeedOfLight \
      --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
      "$PYTHON" "$LOGS/ncu_step.py"
  else
    STEPS+=(ncu); STATUS+=("SKIPPED (no ncu)"); SECONDS_TAKEN+=(0)
  fi
fi

# ---- summary --------------------------------------------------------------------------------------
{
  echo
  echo "fastelbo gpu_check: $(($(date +%s) - START))s in all; logs in $OUT/logs.tgz"
  sed -n '/^name, memory/{n;p;q}' "$LOGS/machine.log"  # the GPU line of nvidia-smi
  step_table
  test_results
  [[ -f "$LOGS/cluster-smoke.log" ]] && tail -n 2 "$LOGS/cluster-smoke.log" | cut -c 1-300 | sed 's/^/cluster-smoke: /'
  for name in cuda-tests core-cuda slow; do
    [[ -f "$LOGS/$name.log" ]] && grep -E '^(FAILED|ERROR) ' "$LOGS/$name.log" | head -n 40 | cut -c 1-300 | sed "s/^/$name: /"
  done
  [[ -f "$LOGS/abi-probe.log" ]] && sed 's/^/abi-probe: /' "$LOGS/abi-probe.log"
  [[ -f "$LOGS/shapes.log" ]] && sed 's/^/shapes: /' "$LOGS/shapes.log" | cut -c 1-200
  [[ -f "$LOGS/bench-compile.log" ]] && grep -E "^cuda " "$LOGS/bench-compile.log" | sed 's/^/bench-compile: /'
  [[ -f "$LOGS/ncu.log" ]] && grep -E "^  [a-z_]+.*\(|Duration|SM Active Cycles|Registers Per|Achieved Occupancy|Block Size|Grid Size|Warp Cycles Per Issued" \
    "$LOGS/ncu.log" | head -n 120 | sed 's/^/ncu: /'
  # The bench tables, into a file of their own (read again below for the targets); under a timeout,
  # since the script imports torch and fastelbo and queries the GPU.
  timeout -k 5 60 "$PYTHON" - "$LOGS/bench/bench.json" "$LOGS/bench-ticket/bench.json" "$LOGS/bench-plain-backward/bench.json" \
    "$LOGS/sweep/bench.json" "$LOGS/bench-one-block/off/bench.json" "$LOGS/bench-one-block/on/bench.json" \
    "$LOGS/bench-large-blocks/off/bench.json" "$LOGS/bench-large-blocks/on/bench.json" \
    > "$LOGS/bench-summary.txt" 2>&1 << 'EOF'
import json
import os
import re
import sys


def short_kernel_name(name):
    """'void fastelbo::cuda::(anonymous namespace)::recon_backward_kernel<float>(...)' -> 'recon_backward_kernel';
    torch's elementwise kernels by their functor ('CUDAFunctor_add', 'FillFunctor')."""
    match = re.search(r"\w+Functor\w*", name) or re.search(r"\w+_kernel\b", name)
    return match.group(0) if match else name[:40]


def load_json(path, label):
    """The JSON a bench step wrote, or None (and a line saying why) when it wrote none."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        print(f"{label}: no results ({error})")
        return None


def kernel_breakdown(row):
    """'recon_forward_flat_kernel 3.5, ...': the row's kernel time per step by kernel."""
    return ", ".join(f"{short_kernel_name(name)} {us:.1f}" for name, us in (row.get("kernel_time_us_by_name") or {}).items())


def sweep_table(path):
    """Each kernel's time per step at each sweep size, against the bytes the step moves."""
    sweep = load_json(path, "sweep")
    if sweep is None:
        return
    machine = sweep["meta"]["machine"]
    copy = sweep["meta"]["copy_bandwidth"]["cuda"]["GBps"]
    rows = [r for r in sweep["results"] if r["provider"] == "fastelbo"]
    per_row = []
    for r in rows:
        by_name = {}
        for name, us in (r.get("kernel_time_us_by_name") or {}).items():
            by_name[short_kernel_name(name)] = by_name.get(short_kernel_name(name), 0.0) + us
        per_row.append(by_name)
    names = sorted({n for by_name in per_row for n in by_name}, key=lambda n: -sum(b.get(n, 0.0) for b in per_row))
    print(f"sweep (fp32 fwd+bwd, GPU {machine.get('gpu')}, copy {copy:.0f} GB/s, sources "
          f"{machine.get('fastelbo_source_digest')}): kernel us per step; moved = (8N + 3M) s bytes")
    print(f"{'B,D,Z':>16} {'N':>8} {'M':>9} {'moved MB':>8} {'at copy us':>10} {'all us':>7} "
          + " ".join(f"{n[:27]:>27}" for n in names))
    for r, by_name in zip(rows, per_row):
        moved = (8 * r["N"] + 3 * r["M"]) * r["element_bytes"]
        shape = f"{r['B']},{r['D']},{r['Z']}"
        print(f"{shape:>16} {r['N']:8d} {r['M']:9d} {moved / 1e6:8.2f} {moved / copy / 1e3:10.2f} "
              f"{r.get('kernel_time_us') or float('nan'):7.1f} "
              + " ".join(f"{by_name.get(n, float('nan')):27.2f}" for n in names))


if os.path.exists(sys.argv[4]):
    sweep_table(sys.argv[4])
data = load_json(sys.argv[1], "bench")
if data is None:
    sys.exit(0)
copy = data["meta"].get("copy_bandwidth", {}).get("cuda", {}).get("GBps") or float("nan")
machine = data["meta"]["machine"]
# The source digest names the code that ran; the git line above may not (a copy's .git can be older
# than its files). Locally: python -c "from fastelbo.bench import source_digest; print(source_digest('.'))"
print(f"sources {machine.get('fastelbo_source_digest')} (git {machine.get('fastelbo_git_commit')})")
print(f"bench (fwd+bwd, GPU {machine.get('gpu')}, copy {copy:.0f} GB/s): kernel us = summed "
      "device time per loss step; ours = fastelbo kernels per step")
print(f"{'size':<11} {'dtype':<5} {'floor us':>8} {'kernel us':>9} {'x floor':>7} {'ours':>4} {'ours us':>7} "
      f"{'all':>4} {'eager us':>8} {'step us':>8} {'x eager':>7}  target")
rows = [r for r in data["results"] if r["mode"] == "fwd+bwd"]
eager = {(r["size"], r["dtype"]): r for r in rows if r["provider"] == "eager"}
for r in rows:
    if r["provider"] != "fastelbo":
        continue
    kernel = r.get("kernel_time_us")
    ours = sum(v for k, v in (r.get("kernel_names") or {}).items() if "fastelbo" in k)
    ours_us = sum(v for k, v in (r.get("kernel_time_us_by_name") or {}).items() if "fastelbo" in k)
    ratio = kernel / r["floor_us"] if kernel else float("nan")
    e = eager.get((r["size"], r["dtype"]))
    target = {"large": f"kernel <= 1.15x floor: {'met' if ratio <= 1.15 else 'MISSED'}",
              "ldm-ae-256": (f"fp32 kernel <= 12 us: {'met' if kernel and kernel <= 12 else 'MISSED'}"
                             if r["dtype"] == "fp32" else ""),
              "mnist-mlp": f"<= 4 kernels, <= 8 us: {'met' if ours <= 4 and kernel and kernel <= 8 else 'MISSED'}"
              }.get(r["size"], "")
    print(f"{r['size']:<11} {r['dtype']:<5} {r['floor_us']:8.1f} {kernel or float('nan'):9.1f} {ratio:7.2f} "
          f"{ours:4.0f} {ours_us:7.1f} {r.get('kernels_per_step') or 0:4.0f} "
          f"{(e or {}).get('kernel_time_us') or float('nan'):8.1f} {r['median_us']:8.1f} "
          f"{r.get('speedup_vs_eager') or float('nan'):7.2f}  {target}")
print("kernel us per step by kernel (fastelbo, fwd+bwd):")
for r in rows:
    if r["provider"] == "fastelbo":
        print(f"  {r['size']:<11} {r['dtype']:<5} {kernel_breakdown(r)}")
for item in data.get("refused", []) + data.get("errors", []):
    print("bench problem:", item)
with_defaults = {(r["size"], r["dtype"]): r for r in rows if r["provider"] == "fastelbo"}


def compare(path, label, what, baseline_path=None):
    """The fastelbo rows of an A/B bench step next to the main bench's, or next to those of the
    step's own run with the defaults (baseline_path)."""
    other = load_json(path, label)
    if other is None:
        return
    baseline = with_defaults
    if baseline_path is not None:
        base = load_json(baseline_path, label + " (defaults)")
        if base is None:
            return
        baseline = {(r["size"], r["dtype"]): r for r in base["results"]
                    if r["provider"] == "fastelbo" and r["mode"] == "fwd+bwd"}
    source = "the same step" if baseline_path else "the main bench"
    print(f"{label}: {what}, fwd+bwd (with the defaults, from {source}, in parentheses):")
    for r in other["results"]:
        if r["provider"] != "fastelbo" or r["mode"] != "fwd+bwd":
            continue
        c = baseline.get((r["size"], r["dtype"]), {})
        print(f"  {r['size']:<11} {r['dtype']:<5} kernel us {r.get('kernel_time_us') or float('nan'):.1f} "
              f"({c.get('kernel_time_us') or float('nan'):.1f}), step us {r['median_us']:.1f} "
              f"({c.get('median_us') or float('nan'):.1f}): {kernel_breakdown(r)}")


try:
    import torch
    import fastelbo
    capacity = fastelbo._C._cuda_cluster_capacity(torch.cuda.current_device())
except Exception as error:  # no GPU, or a build without CUDA
    capacity = f"unknown ({error})"
print(f"thread-block clusters for small grids (largest cluster per float32 forward kernel): {capacity}")
compare(sys.argv[2], "bench-ticket", "FASTELBO_CUDA_CLUSTERS=0, small grids reduce through the ticket")
compare(sys.argv[3], "bench-plain-backward",
        "FASTELBO_GRAD_IN_FORWARD=0, the recon backward reads x_hat and x again")
compare(sys.argv[5], "bench-one-block",
        "FASTELBO_CUDA_ONE_BLOCK=0, the smallest reductions run as a small grid instead of one block", sys.argv[6])
compare(sys.argv[7], "bench-large-blocks",
        "FASTELBO_CUDA_LARGE_BLOCKS=0, the memory-bound grids run in blocks of 128 threads instead of up to 512",
        sys.argv[8])
EOF
  rc=$?
  cat "$LOGS/bench-summary.txt"
  ((rc == 124 || rc == 137)) && echo "bench summary: stopped after 60 s (its output so far is above)"
  # Last, so that the end of the output (all a device tool may bring back) holds them: the bench
  # targets, each step's status, the tests' and sanitizers' results (failing tests are listed above).
  echo
  echo "---- fastelbo gpu_check: $(($(date +%s) - START))s in all; bench targets, steps, tests, sanitizers"
  grep -E '^size |: (met|MISSED)$' "$LOGS/bench-summary.txt"
  step_table
  test_results
} 2>&1 | tee "$LOGS/summary.txt"

save_out
rm -rf "$LOGS"

# Exit 1 when a step failed or timed out, or a correctness step or the main bench was skipped; the
# optional steps at the end are skipped whenever the budget runs short, which is no failure.
for i in "${!STATUS[@]}"; do
  [[ "${STATUS[$i]}" == ok ]] && continue
  ((i >= FIRST_OPTIONAL)) && [[ "${STATUS[$i]}" == SKIPPED* ]] && continue
  exit 1
done
exit 0
