"""Shared fixtures and helpers of fastelbo's test suite.

- `device`: every test that takes it runs on "cpu" and, when a GPU is present, on "cuda".
- DTYPES / TOLERANCES: the dtypes under test and each one's relative slack.
- `sample_inputs` / `recon_inputs`: fresh random inputs (seeded per test, so failures reproduce).
- `assert_close_fp64`: the flash-attention style check for every dtype: the fused result's error
  against fastelbo.reference run on float64 copies must be at most twice the error of
  fastelbo.reference run in the same dtype, plus a few units of the dtype's eps relative to the
  largest reference value (never an absolute slack: small outputs are checked as strictly as
  large ones).
- `run_with_grads`: runs a function on detached leaf copies and returns outputs and gradients.
"""
import zlib

import pytest
import torch

import fastelbo  # noqa: F401  (registers torch.ops.fastelbo)

CUDA_SKIP_REASON = "torch.cuda.is_available() is False: no CUDA device on this machine"

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def default_rng_state(device):
    """The state of torch's default generator of `device` (what the ops draw from by default)."""
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def requires_cuda(test):
    """A test that needs a CUDA device: skipped without one, and marked `cuda`, so that `-m cuda`
    (scripts/gpu_check.sh's core-cuda step) selects it on a GPU machine."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)(test))


REDUCTIONS = ["none", "sum", "mean", "batchmean"]

# (dtype, rtol): the slack allowed ON TOP OF twice the error of the plain-PyTorch reference in the
# same dtype, as a fraction of the largest float64 reference value, keyed by the dtype of the
# compared tensor (z and gradients come in the input dtype, losses in float32 for half inputs).
# Relative, not absolute: an absolute slack of one eps left every output below ~eps unchecked
# (bfloat16 gradients with reduction="mean", scaled by 1/numel, could lose their whole KL term).
# Two units of the dtype's eps for the half types, eight for float32 (a kernel summing in another
# fixed order than the reference leans mostly on the same-dtype error term, not on this). float64
# has no higher-precision oracle here (the reference in float64 *is* the oracle, so the same-dtype
# error is 0): its slack is the budget for a different summation order over up to a few thousand
# sequential float64 additions (~1e4 eps), still some 60000 times below what float32 arithmetic
# anywhere in the kernel would cost.
DTYPE_TOLERANCES = [
    (torch.float64, 2e-12),
    (torch.float32, 8 * torch.finfo(torch.float32).eps),
    (torch.bfloat16, 2 * torch.finfo(torch.bfloat16).eps),
    (torch.float16, 2 * torch.finfo(torch.float16).eps),
]
TOLERANCES = dict(DTYPE_TOLERANCES)
DTYPES = [dtype for dtype, _ in DTYPE_TOLERANCES]
HALF_DTYPES = (torch.float16, torch.bfloat16)


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def loss_dtype(dtype):
    """README, API: losses in float32 for fp16/bf16 inputs, else the input dtype."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def stable_seed(*parts):
    """A deterministic seed from a test's parameters (fresh inputs per case, reproducible)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def z_shape(shape, num_samples):
    return (num_samples, *shape) if num_samples > 1 else tuple(shape)


def sample_inputs(shape, dtype, device, *, seed=0, num_samples=1, requires_grad=True,
                  logvar_scale=1.0, with_eps=True):
    """mu ~ N(0, 1), logvar ~ N(0, logvar_scale^2) of `shape`, and eps ~ N(0, 1) of z's shape.

    Drawn in float64 on the CPU from their own generator (so the same case gives the same values on
    every device and leaves the default generator alone), then rounded to `dtype`.
    """
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    logvar = torch.randn(shape, generator=g, dtype=torch.float64) * logvar_scale
    eps = torch.randn(z_shape(shape, num_samples), generator=g, dtype=torch.float64)
    mu = mu.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    logvar = logvar.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    eps = eps.to(device=device, dtype=dtype)
    return (mu, logvar, eps) if with_eps else (mu, logvar)


def recon_inputs(shape, dtype, device, *, seed=0, x_hat_grad=True, x_grad=False):
    g = torch.Generator().manual_seed(seed)
    x_hat = torch.randn(shape, generator=g, dtype=torch.float64)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return (x_hat.to(device=device, dtype=dtype).requires_grad_(x_hat_grad),
            x.to(device=device, dtype=dtype).requires_grad_(x_grad))


def random_grad_outputs(outputs, reductions, *, seed=0):
    """A grad_output that is not 1 for each output: random weights for per-element / per-sample
    outputs, a random scalar (not 1) for reduced losses."""
    g = torch.Generator().manual_seed(seed)
    grads = []
    for out in outputs:
        if out.dim() == 0:
            value = 0.25 + 1.5 * torch.rand((), generator=g, dtype=torch.float64)
            grads.append(value.to(device=out.device, dtype=out.dtype))
        else:
            grads.append(torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype))
    return grads


def detached_leaf(t, dtype=None):
    out = t.detach().clone()
    if dtype is not None:
        out = out.to(dtype)
    return out.requires_grad_(t.requires_grad)


def run_with_grads(fn, inputs, grad_outputs=None, *, dtype=None):
    """Runs fn on fresh leaf copies of `inputs` (cast to `dtype` if given) and returns
    (outputs, grads): grads[i] is the gradient of inputs[i] (None if it does not require grad).
    grad_outputs (cast like the outputs) default to None: ones for scalar outputs."""
    leaves = [detached_leaf(t, dtype) if isinstance(t, torch.Tensor) else t for t in inputs]
    outs = fn(*leaves)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads_iter = iter(())
    if wrt:
        if grad_outputs is not None:
            grad_outputs = [g.to(o.dtype) for g, o in zip(grad_outputs, outs)]
        grads_iter = iter(torch.autograd.grad(outs, wrt, grad_outputs, allow_unused=True))
    grads = [next(grads_iter) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]
    return [o.detach() for o in outs], grads


def max_abs(t):
    return t.abs().max().item() if t.numel() else 0.0


def assert_close_fp64(actual, ref_same, ref64, name="", *, check_dtype=True):
    """Flash-attention style: max|actual - ref64| <= 2 max|ref_same - ref64| + rtol max|ref64|.

    actual: the fused result; ref_same: fastelbo.reference in the same dtype; ref64: fastelbo.reference
    on float64 copies. Shapes must match; dtypes of actual and ref_same too (check_dtype). No
    absolute slack: where both references are all zero, the result must be exactly zero."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert ref_same.shape == ref64.shape
    if check_dtype:
        assert actual.dtype == ref_same.dtype, f"{name}: dtype {actual.dtype} != reference {ref_same.dtype}"
    a, s, r = (t.detach().to("cpu", torch.float64) for t in (actual, ref_same, ref64))
    assert torch.isfinite(r).all(), f"{name}: the float64 reference is not finite"
    assert not torch.isnan(a).any(), f"{name}: NaN in the fused result"
    if a.numel() == 0:
        return
    rtol = TOLERANCES[actual.dtype]
    err = max_abs(a - r)
    ref_err = max_abs(s - r)
    bound = 2 * ref_err + rtol * max_abs(r)
    assert err <= bound, (
        f"{name} ({actual.dtype}): max error vs float64 reference {err:.3e} > bound {bound:.3e} "
        f"(plain-PyTorch error in the same dtype {ref_err:.3e}, max |ref| {max_abs(r):.3e})"
    )


def compare_three_ways(fused_fn, ref_fn, inputs, grad_outputs, names):
    """Runs fused_fn on `inputs`, ref_fn on same-dtype copies and ref_fn on float64 copies, with the
    same grad_outputs, and checks every output and every input gradient with assert_close_fp64.
    Returns (fused outputs, fused grads)."""
    outs, grads = run_with_grads(fused_fn, inputs, grad_outputs)
    outs_same, grads_same = run_with_grads(ref_fn, inputs, grad_outputs)
    grad_outputs64 = None if grad_outputs is None else [g.double() for g in grad_outputs]
    outs64, grads64 = run_with_grads(ref_fn, inputs, grad_outputs64, dtype=torch.float64)
    assert len(outs) == len(outs_same) == len(outs64), "the fused and reference functions return different outputs"
    for i, (o, s, r) in enumerate(zip(outs, outs_same, outs64)):
        assert_close_fp64(o, s, r, f"output {i}")
    for name, inp, g, s, r in zip(names, inputs, grads, grads_same, grads64):
        if isinstance(inp, torch.Tensor) and inp.requires_grad:
            assert g is not None, f"no gradient for {name}"
            assert g.dtype == inp.dtype, f"grad of {name}: dtype {g.dtype} != input dtype {inp.dtype}"
            assert_close_fp64(g, s, r, f"grad of {name}")
    return outs, grads


@pytest.fixture
def restore_num_threads():
    saved = torch.get_num_threads()
    yield saved
    torch.set_num_threads(saved)


@pytest.fixture
def junk_fill():
    """Turns on, for the rest of the test, the filling of new CPU allocations with a junk pattern
    (NaN for float32; torch's FLAGS_caffe2_cpu_allocator_do_junk_fill), so that an output element
    a kernel forgets to write shows up. Yields the setter (junk_fill(False) turns it off again);
    always off after the test."""
    setter = fastelbo._C._set_cpu_allocator_junk_fill
    setter(True)
    try:
        yield setter
    finally:
        setter(False)


@pytest.fixture(params=["vector", "portable"])
def cpu_code_path(request):
    """Runs a test twice: with the CPU kernels' x86-64 vector paths allowed (AVX2, F16C: taken where
    the processor has them) and with the portable scalar code forced, which is all that processors
    without AVX2 and other architectures (aarch64) run, so that the test suite checks it here too.
    Yields the path's name; the setting is restored after the test. No effect on CUDA, so a CUDA
    case runs once (the "portable" twin is skipped)."""
    callspec = getattr(request.node, "callspec", None)
    if request.param == "portable" and callspec is not None and callspec.params.get("device") == "cuda":
        pytest.skip("the CPU code path does not apply to CUDA: the 'vector' twin runs this case")
    previous = fastelbo._C._set_cpu_vector_paths(request.param == "vector")
    try:
        yield request.param
    finally:
        fastelbo._C._set_cpu_vector_paths(previous)
