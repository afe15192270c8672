"""CUDA-specific checks of the fused kernels (csrc/cuda/), beyond the device-parametrized suite.

- one (seed, offset) gives the same eps on the CPU and on CUDA (every forward kernel shape: flat,
  rows for "none", columns for free bits; odd sample sizes; several draws), and the CUDA backward
  regenerates it;
- CPU and CUDA kernels agree on values and gradients (eps given), including unaligned inputs,
  stride-0 incoming gradients and odd sizes; values are judged against float64 math with
  conftest.assert_close_fp64 (the error of plain PyTorch in the same dtype sets the bound);
- a captured CUDA graph of a whole forward+backward step replays like eager after re-seeding,
  and its replays draw anew;
- bit-identical results over repeated runs (deterministic in-kernel reductions), also for
  per-sample sums cut into many tiles;
- every output element written (outputs land in memory poisoned with NaN), also with many draws,
  unaligned inputs and each CUDA switch off;
- concurrent launches on two streams (separate reduction tickets);
- small grids: sm_90 gets the thread-block-cluster reduction, which gives the bits of the ticket
  path (also in a captured graph);
- at most 4 kernel launches per loss step;
- a tensor of more than 2^31 elements (slow; run by scripts/gpu_check.sh);
- a non-default device, and generator=.

Skipped, with the reason, where there is no GPU or fastelbo was built without its CUDA kernels.
"""
import math

import pytest
import torch

import fastelbo
from fastelbo import reference

from conftest import CUDA_SKIP_REASON, HALF_DTYPES, assert_close_fp64, run_with_grads

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON),
    pytest.mark.skipif(
        not fastelbo._C.built_with_cuda,
        reason="fastelbo was built without its CUDA kernels (FASTELBO_CUDA=0 or no nvcc at build time)",
    ),
]

ops = torch.ops.fastelbo
RED = {"none": 0, "sum": 1, "mean": 2, "batchmean": 3}


@pytest.fixture(autouse=True)
def spread_on():
    """The tall free-bits cases below are there to run the split kernel: the split is on (its
    default) whatever FASTELBO_CUDA_SPREAD says; test_free_bits_split_switch_keeps_the_values
    covers the other setting."""
    previous = fastelbo._C._set_cuda_spread(True)
    yield
    fastelbo._C._set_cuda_spread(previous)
# Same-dtype agreement of two implementations of the same formulas (FMA contraction and libm
# differences on CUDA, summation order), per compared dtype: (atol, rtol). Only for comparing two
# runs with each other (CPU and CUDA regenerating the same draws, a switch on and off) where the
# sums come in another order; what the values must be is judged by assert_close_fp64.
AGREE = {
    torch.float64: (1e-12, 1e-11),
    torch.float32: (1e-5, 2e-5),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}


def assert_agree(actual, expected, name=""):
    atol, rtol = AGREE[expected.dtype]
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def randn(shape, dtype=torch.float32, device="cuda", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _kl_position_mean(mu, logvar):
    """Each latent position's batch-mean KL, the op's kl_position_mean (free bits only), computed as
    fastelbo.reference computes the KL (in float32 for 16-bit inputs, like the op)."""
    compute = torch.float32 if mu.dtype in HALF_DTYPES else mu.dtype
    m, lv = mu.to(compute), logvar.to(compute)
    return (0.5 * (m * m + torch.expm1(lv) - lv)).reshape(mu.shape[0], -1).mean(0)


def _sample_kl_references(mu, logvar, eps, reduction, free_bits, num_samples, grad_z=None, grad_kl=None):
    """fastelbo.reference's z, kl, kl_position_mean (empty without free bits, as the op's) and, for
    incoming gradients grad_z and grad_kl, grad_mu and grad_logvar, each as the pair (in the
    inputs' dtype, on float64 copies) that assert_close_fp64 takes after the fused result."""
    with_grads = grad_z is not None and grad_kl is not None
    inputs = [mu.detach().requires_grad_(with_grads), logvar.detach().requires_grad_(with_grads), eps]

    def fn(m, lv, e):
        return reference.reparameterize_kl(m, lv, eps=e, reduction=reduction, free_bits=free_bits,
                                           num_samples=num_samples)

    refs = {}
    for dtype in (None, torch.float64):
        (z, kl), (gm, glv, _) = run_with_grads(fn, inputs, [grad_z, grad_kl] if with_grads else None, dtype=dtype)
        m, lv = (t if dtype is None else t.to(dtype) for t in (mu, logvar))
        values = dict(z=z, kl=kl, kl_position_mean=_kl_position_mean(m, lv) if free_bits > 0 else kl.new_empty(0))
        if with_grads:
            values.update(grad_mu=gm, grad_logvar=glv)
        for name, value in values.items():
            refs.setdefault(name, []).append(value)
    return refs


def _recon_references(x_hat, x, reduction, grad=None):
    """fastelbo.reference's loss, grad_unit (the x_hat gradient for an incoming gradient of ones,
    what the forward prepares) and, for an incoming gradient `grad`, grad_x_hat and grad_x, each as
    the pair (in the inputs' dtype, on float64 copies) that assert_close_fp64 takes."""
    inputs = [x_hat.detach().requires_grad_(), x.detach().requires_grad_()]

    def fn(xh, xv):
        return reference.gaussian_recon_loss(xh, xv, reduction=reduction)

    ones = torch.ones((x.shape[0],) if reduction == "none" else (), device=x.device)
    refs = {}
    for dtype in (None, torch.float64):
        (loss,), (unit, _) = run_with_grads(fn, inputs, [ones], dtype=dtype)
        values = dict(loss=loss, grad_unit=unit)
        if grad is not None:
            _, (values["grad_x_hat"], values["grad_x"]) = run_with_grads(fn, inputs, [grad], dtype=dtype)
        for name, value in values.items():
            refs.setdefault(name, []).append(value)
    return refs


def assert_like_references(results, refs, names, what):
    """results[name] (a fused op's output) against the pair refs[name] with assert_close_fp64; an
    output the op left empty (the prepared gradient when not asked for) must be empty."""
    for name in names:
        actual, (ref_same, ref64) = results[name], refs[name]
        if actual.numel() == 0 and ref64.numel() != 0:
            assert name == "grad_unit", f"{name}, {what}: empty"
            continue
        assert_close_fp64(actual, ref_same, ref64, f"{name}, {what}")


def _drawn_eps(seed, shape, num_samples, dtype, rng_state):
    """The eps that a forward drew right after torch.manual_seed(seed): the same op on mu = logvar
    = 0 draws z = 0 + 1 * eps exactly (in float32 for 16-bit inputs, whose draws are float32
    values). rng_state: the forward's; the draw here must have used the same (seed, offset)."""
    zeros = torch.zeros(shape, dtype=torch.float32 if dtype in HALF_DTYPES else dtype, device="cuda")
    torch.manual_seed(seed)
    eps, _, rng, _ = ops.reparameterize_kl(zeros, zeros, None, None, num_samples, RED["sum"], 0.0)
    assert torch.equal(rng, rng_state), "not the forward's (seed, offset)"
    return eps


def eps_from_cpu(rng_state, shape, num_samples, dtype=torch.float32):
    """The eps of (seed, offset) = rng_state, computed by the CPU kernel: the backward with mu = 0,
    logvar = 0, grad_z one-hot in draw k gives grad_logvar = eps_k / 2 (exactly)."""
    mu = torch.zeros(shape, dtype=dtype)
    z_shape = (num_samples, *shape) if num_samples > 1 else tuple(shape)
    draws = []
    for k in range(num_samples):
        grad_z = torch.zeros(z_shape, dtype=dtype)
        if num_samples > 1:
            grad_z[k] = 1
        else:
            grad_z.fill_(1)
        _, grad_logvar = ops.reparameterize_kl_backward(
            grad_z, None, mu, mu, None, rng_state.cpu(), torch.empty(0, dtype=dtype), num_samples, RED["sum"], 0.0)
        draws.append(2 * grad_logvar)
    return torch.stack(draws) if num_samples > 1 else draws[0]


# ---- one (seed, offset), one eps on both devices ---------------------------------------------

@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("kernel", ["flat", "rows", "columns"])
@pytest.mark.parametrize("shape", [(4, 8), (5, 7), (3, 1001), (2, 3, 5, 7), (9, 16389), (600, 20), (700, 3)],
                         ids=["4x8", "5x7", "3x1001", "2x3x5x7", "9x16389", "600x20", "700x3"])
def test_forward_eps_matches_cpu(shape, kernel, num_samples):
    """mu = 0, logvar = 0: z = eps exactly. Each forward kernel shape (flat for "sum", rows for
    "none", columns for free bits: its split over the batch at 600x20 and 700x3), including sample
    sizes that are not a multiple of 4 (windows straddling Philox groups), draws the eps the CPU
    kernel computes for the same (seed, offset)."""
    reduction, free_bits = {"flat": ("sum", 0.0), "rows": ("none", 0.0), "columns": ("batchmean", 0.5)}[kernel]
    mu = torch.zeros(shape, device="cuda")
    z, kl, rng_state, _ = ops.reparameterize_kl(mu, mu, None, None, num_samples, RED[reduction], free_bits)
    assert rng_state.device.type == "cuda" and rng_state.dtype == torch.int64
    expected = eps_from_cpu(rng_state, shape, num_samples)
    torch.testing.assert_close(z.cpu(), expected, atol=1e-6, rtol=1e-6)
    assert 0.5 < z.std().item() < 2.0  # not a constant


def test_backward_eps_matches_cpu_for_one_seed():
    """A chosen (seed, offset), no forward: grad_z = 1, grad_kl None, mu = 0, logvar = 0 gives
    grad_logvar = eps / 2 on both devices (the issue's CPU-vs-CUDA check, 1e-6 relative)."""
    shape = (7, 1029)
    rng_state = torch.tensor([0x1234_5678_9ABC_DEF0 - 2**63, 12], dtype=torch.int64)
    results = {}
    for device in ("cpu", "cuda"):
        mu = torch.zeros(shape, device=device)
        _, grad_logvar = ops.reparameterize_kl_backward(
            torch.ones(shape, device=device), None, mu, mu, None, rng_state.to(device),
            torch.empty(0, device=device), 1, RED["sum"], 0.0)
        results[device] = grad_logvar.cpu()
    torch.testing.assert_close(results["cuda"], results["cpu"], atol=1e-6, rtol=1e-6)
    assert results["cpu"].std().item() > 0.25


@pytest.mark.parametrize("num_samples", [1, 2])
@pytest.mark.parametrize("shape", [(6, 20), (3, 13)], ids=["6x20", "3x13"])
def test_cuda_backward_regenerates_cuda_forward_eps(shape, num_samples):
    mu = torch.zeros(shape, device="cuda")
    z, _, rng_state, _ = ops.reparameterize_kl(mu, mu, None, None, num_samples, RED["sum"], 0.0)
    for k in range(num_samples):
        grad_z = torch.zeros_like(z)
        if num_samples > 1:
            grad_z[k] = 1
        else:
            grad_z.fill_(1)
        _, grad_logvar = ops.reparameterize_kl_backward(
            grad_z, None, mu, mu, None, rng_state, torch.empty(0, device="cuda"), num_samples, RED["sum"], 0.0)
        eps = z[k] if num_samples > 1 else z
        torch.testing.assert_close(2 * grad_logvar, eps, atol=0, rtol=0)


def test_eps_given_writes_zero_rng_state():
    mu = randn((4, 9))
    out = ops.reparameterize_kl(mu, mu, randn((4, 9), seed=1), None, 1, RED["sum"], 0.0)
    assert out[2].tolist() == [0, 0]


# ---- CPU and CUDA kernels agree (eps given) ---------------------------------------------------

def _offset_view(t, offset):
    """The same values in a tensor whose data starts `offset` elements into its storage (not
    16-byte aligned for offset 1): exercises the scalar paths."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


CASES = [
    # (shape, reduction, free_bits, num_samples)
    ((128, 20), "batchmean", 0.0, 1),
    ((128, 20), "none", 0.0, 1),
    ((128, 20), "sum", 0.1, 1),
    ((5, 7), "mean", 0.0, 3),
    ((5, 7), "none", 0.0, 2),
    ((5, 7), "sum", 0.4, 2),
    ((3, 16389), "batchmean", 0.0, 1),
    ((3, 16389), "none", 0.0, 1),
    ((3, 16389), "batchmean", 0.6, 1),
    ((70, 4096), "sum", 0.0, 1),
    ((2, 300000), "none", 0.0, 1),
    ((1500, 6), "none", 0.0, 1),
    ((1, 1), "sum", 0.0, 1),
    # tall batches, where the free-bits forward splits the batch over more blocks
    ((4096, 20), "batchmean", 0.1, 1),
    ((1000, 37), "sum", 0.4, 2),
    ((20000, 3), "mean", 0.05, 1),
    # "none" on short samples: several samples per warp (up to 16 windows of 4), then the rows kernel
    ((20000, 3), "none", 0.0, 1),
    ((3000, 64), "none", 0.0, 2),
    ((3000, 65), "none", 0.0, 1),
    # many draws on a small latent: the draws over lanes (32 lanes, 4 with a ragged last chunk)
    ((128, 20), "batchmean", 0.0, 50),
    ((33, 29), "sum", 0.0, 7),
    # and for "none" on short samples: 4 lanes per window (a sample of 5 windows on 8 lanes, and
    # one of 29 positions, 8 windows straddling Philox groups)
    ((128, 20), "none", 0.0, 50),
    ((33, 29), "none", 0.0, 7),
    # and for free bits: 32 lanes per sample, the batch's 4096 items split over 64 blocks
    ((128, 20), "batchmean", 0.1, 50),
]


# (That these cases take the draws kernels and both columns kernels is host-side grid arithmetic,
# checked without a GPU: tests/test_cuda_grid.py, test_cuda_cases_take_*.)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "offset1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("shape,reduction,free_bits,num_samples", CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{c[1]}-fb{c[2]}-K{c[3]}" for c in CASES])
def test_reparameterize_kl_cuda_matches_cpu(shape, reduction, free_bits, num_samples, dtype, aligned):
    z_shape = (num_samples, *shape) if num_samples > 1 else shape
    mu = randn(shape, dtype, "cpu", seed=1)
    logvar = randn(shape, dtype, "cpu", seed=2, scale=0.7)
    eps = randn(z_shape, dtype, "cpu", seed=3)
    grad_z = randn(z_shape, dtype, "cpu", seed=4)
    grad_kl = (randn((shape[0],), torch.float32, "cpu", seed=5) if reduction == "none"
               else torch.tensor(1.7, dtype=torch.float32))
    outs = {}
    for device in ("cpu", "cuda"):
        args = [t.to(device) for t in (mu, logvar, eps, grad_z, grad_kl)]
        if device == "cuda" and not aligned:
            args = [_offset_view(t, 1) for t in args]
        m, lv, e, gz, gk = args
        z, kl, rng, pm = ops.reparameterize_kl(m, lv, e, None, num_samples, RED[reduction], free_bits)
        gm, glv = ops.reparameterize_kl_backward(gz, gk, m, lv, e, rng, pm, num_samples, RED[reduction], free_bits)
        outs[device] = dict(z=z, kl=kl, kl_position_mean=pm, grad_mu=gm, grad_logvar=glv)
    # Both devices' values against float64 math: each within the bound plain PyTorch in the same
    # dtype sets (so they agree with each other to that bound too).
    refs = _sample_kl_references(mu, logvar, eps, reduction, free_bits, num_samples, grad_z, grad_kl)
    for device, results in outs.items():
        assert_like_references(results, refs, results, device)


@pytest.mark.parametrize("save_grad_unit", [False, True])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "offset1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("shape", [(128, 784), (8, 3, 17, 19), (3, 300007), (2000, 5), (1, 3), (4096, 12), (3000, 64)],
                         ids=["128x784", "8x3x17x19", "3x300007", "2000x5", "1x3", "4096x12", "3000x64"])
def test_gaussian_recon_cuda_matches_cpu(shape, reduction, dtype, aligned, save_grad_unit):
    x_hat = randn(shape, dtype, "cpu", seed=1)
    x = randn(shape, dtype, "cpu", seed=2)
    grad = (randn((shape[0],), torch.float32, "cpu", seed=3) if reduction == "none"
            else torch.tensor(0.8, dtype=torch.float32))
    outs = {}
    for device in ("cpu", "cuda"):
        args = [t.to(device) for t in (x_hat, x, grad)]
        if device == "cuda" and not aligned:
            args = [_offset_view(t, 1) for t in args]
        xh, xv, g = args
        loss, grad_unit = ops.gaussian_recon_loss(xh, xv, RED[reduction], save_grad_unit)
        gxh, gx = ops.gaussian_recon_loss_backward(g, xh, xv, RED[reduction], True, True)
        outs[device] = dict(loss=loss, grad_unit=grad_unit, grad_x_hat=gxh, grad_x=gx)
    refs = _recon_references(x_hat, x, reduction, grad)
    for device, results in outs.items():
        assert results["grad_unit"].numel() == (x.numel() if save_grad_unit else 0), device
        assert_like_references(results, refs, results, device)



# reduction="none" with few samples cuts each sample into tiles; the last block adds each sample's
# tile sums with a group of 32, 16, 8, 4, 2 or 1 threads per sample, depending on the batch
# (finish_rows in csrc/cuda/cuda_common.cuh). One shape per group size, each with several tiles.
MANY_TILES_SHAPES = [(1, 2**20), (6, 9000), (12, 5000), (24, 4000), (40, 3000), (100, 2000), (500, 1100)]


@pytest.mark.parametrize("shape", MANY_TILES_SHAPES, ids=["x".join(map(str, s)) for s in MANY_TILES_SHAPES])
def test_per_sample_sums_over_many_tiles(shape):
    """The per-sample KL and reconstruction losses of both rows kernels agree with float64 math
    (as the CPU's do), for every size of the thread group that adds a sample's tiles, and repeat
    bit for bit."""
    mu, logvar, eps = randn(shape, seed=1), randn(shape, seed=2, scale=0.7), randn(shape, seed=3)
    x_hat, x = randn(shape, seed=4), randn(shape, seed=5)
    results = {}
    for device in ("cpu", "cuda", "cuda"):
        m, lv, e, xh, xv = (t.to(device) for t in (mu, logvar, eps, x_hat, x))
        kl = ops.reparameterize_kl(m, lv, e, None, 1, RED["none"], 0.0)[1]
        rec = ops.gaussian_recon_loss(xh, xv, RED["none"], False)[0]
        if device in results:
            assert torch.equal(kl, results[device][0]) and torch.equal(rec, results[device][1])
        results[device] = (kl, rec)
    refs = {**_sample_kl_references(mu, logvar, eps, "none", 0.0, 1), **_recon_references(x_hat, x, "none")}
    for device, (kl, rec) in results.items():
        assert_like_references(dict(kl=kl, loss=rec), refs, ("kl", "loss"), device)

@pytest.mark.parametrize("num_samples", [1, 8])
def test_stride_zero_incoming_gradients(num_samples):
    """z.sum() and kl.sum() hand the backward stride-0 (expanded) gradients; they are read in
    place (no copy kernel) and must give what dense gradients give (8 draws: over lanes)."""
    mu, logvar = (randn((6, 33), seed=s).requires_grad_() for s in range(2))
    eps = randn((num_samples, 6, 33) if num_samples > 1 else (6, 33), seed=2)
    x_hat, x = randn((6, 50), seed=5).requires_grad_(), randn((6, 50), seed=6)
    z, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction="none", num_samples=num_samples)
    rec = fastelbo.gaussian_recon_loss(x_hat, x, reduction="none")
    (z.sum() + kl.sum() + rec.sum()).backward()
    mu2, logvar2, x_hat2 = (t.detach().clone().requires_grad_() for t in (mu, logvar, x_hat))
    z2, kl2 = fastelbo.reparameterize_kl(mu2, logvar2, eps=eps, reduction="none", num_samples=num_samples)
    rec2 = fastelbo.gaussian_recon_loss(x_hat2, x, reduction="none")
    torch.autograd.backward((z2, kl2, rec2), (torch.ones_like(z2), torch.ones_like(kl2), torch.ones_like(rec2)))
    for a, b in ((mu.grad, mu2.grad), (logvar.grad, logvar2.grad), (x_hat.grad, x_hat2.grad)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("grad_dtype", [torch.float64, torch.bfloat16])
def test_incoming_gradient_of_another_dtype(grad_dtype):
    """The incoming gradients are read in their own dtype on the device (no conversion kernel)."""
    mu, logvar, eps = (randn((4, 12), seed=s) for s in range(3))
    for reduction in ("none", "sum"):
        gk = randn((4,), grad_dtype, seed=9) if reduction == "none" else torch.tensor(1.25, dtype=grad_dtype, device="cuda")
        _, _, rng, pm = ops.reparameterize_kl(mu, logvar, eps, None, 1, RED[reduction], 0.0)
        got = ops.reparameterize_kl_backward(None, gk, mu, logvar, eps, rng, pm, 1, RED[reduction], 0.0)
        want = ops.reparameterize_kl_backward(None, gk.float(), mu, logvar, eps, rng, pm, 1, RED[reduction], 0.0)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        gx = ops.gaussian_recon_loss_backward(gk, mu, logvar, RED[reduction], True, False)[0]
        gx32 = ops.gaussian_recon_loss_backward(gk.float(), mu, logvar, RED[reduction], True, False)[0]
        torch.testing.assert_close(gx, gx32, atol=0, rtol=0)


# ---- CUDA graphs ----------------------------------------------------------------------------

def _loss_step(mu, logvar, x_hat, x, w, free_bits=0.0, num_samples=1):
    z, kl = fastelbo.reparameterize_kl(mu, logvar, free_bits=free_bits, num_samples=num_samples)
    rec = fastelbo.gaussian_recon_loss(x_hat, x)
    loss = rec + kl + (z * w).sum()
    grads = torch.autograd.grad(loss, (mu, logvar, x_hat))
    return (z.detach(), kl.detach(), rec.detach(), *grads)


@pytest.mark.parametrize("free_bits,num_samples", [(0.0, 1), (0.3, 2)], ids=["plain", "freebits-K2"])
def test_cuda_graph_replay_matches_eager_and_redraws(free_bits, num_samples):
    B, D, Z = 64, 3000, 257  # several blocks per kernel: the reduction tickets are exercised
    mu, logvar = randn((B, Z), seed=1).requires_grad_(), randn((B, Z), seed=2, scale=0.5).requires_grad_()
    x_hat, x = randn((B, D), seed=3).requires_grad_(), randn((B, D), seed=4)
    w = randn((num_samples, B, Z) if num_samples > 1 else (B, Z), seed=5)

    def step():
        return _loss_step(mu, logvar, x_hat, x, w, free_bits, num_samples)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    torch.manual_seed(1234)
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append([t.clone() for t in static_out])
    torch.manual_seed(1234)
    eager = [step() for _ in range(3)]
    torch.cuda.synchronize()
    for r, e in zip(replays, eager):
        for a, b in zip(r, e):
            assert torch.equal(a, b), "graph replay differs from eager after the same manual_seed"
    assert not torch.equal(replays[0][0], replays[1][0]), "two replays drew the same eps"
    assert not torch.equal(replays[1][0], replays[2][0])
    assert not torch.equal(replays[0][4], replays[1][4])  # grad_logvar follows the draw


# ---- determinism, poisoned outputs, streams ----------------------------------------------------

def _full_step_outputs(seed, shapes, dtype, reduction, free_bits):
    (B, Z), (_, D) = shapes
    mu = randn((B, Z), dtype, seed=1).requires_grad_()
    logvar = randn((B, Z), dtype, seed=2, scale=0.5).requires_grad_()
    x_hat, x = randn((B, D), dtype, seed=3).requires_grad_(), randn((B, D), dtype, seed=4)
    g = torch.Generator(device="cuda").manual_seed(seed)
    z, kl = fastelbo.reparameterize_kl(mu, logvar, reduction=reduction, free_bits=free_bits, generator=g)
    rec = fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)
    weights = randn(z.shape, dtype, seed=6)
    torch.autograd.backward((z, kl, rec), (weights, torch.ones_like(kl) * 0.7, torch.ones_like(rec) * 1.3))
    return [t.detach() for t in (z, kl, rec, mu.grad, logvar.grad, x_hat.grad)]


RUN_CASES = [("sum", 0.0), ("none", 0.0), ("batchmean", 0.2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("reduction,free_bits", RUN_CASES, ids=[f"{r}-fb{f}" for r, f in RUN_CASES])
@pytest.mark.parametrize("shapes", [((48, 5003), (48, 40001)), ((4096, 20), (4096, 30))], ids=["wide", "tall"])
def test_bit_identical_over_runs(reduction, free_bits, dtype, shapes):
    """Wide samples: many blocks, ragged tails. A tall batch: the free-bits forward split over
    many blocks, whose last block adds the splits' sums."""
    first = _full_step_outputs(7, shapes, dtype, reduction, free_bits)
    for _ in range(3):
        again = _full_step_outputs(7, shapes, dtype, reduction, free_bits)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "results changed between identical runs"


def _poison_cuda_cache():
    """Fill the caching allocator's free blocks (large and small pools) with all-ones bytes, which
    read as NaN in every floating dtype (float64, float32, float16, bfloat16; a float32 NaN would
    read as a finite float64 and as 0 in every other bfloat16): outputs allocated next reuse them,
    so an element a kernel forgets to write stays NaN."""
    held = [torch.full((nbytes,), 0xFF, dtype=torch.uint8, device="cuda")
            for nbytes, count in ((2**26, 4), (2**18, 64), (256, 256)) for _ in range(count)]
    assert torch.isnan(held[0][:8].view(torch.float64)).all() and torch.isnan(held[-1].view(torch.bfloat16)).all()
    del held


POISON_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", POISON_DTYPES, ids=[str(d).removeprefix("torch.") for d in POISON_DTYPES])
@pytest.mark.parametrize("reduction,free_bits", RUN_CASES + [("mean", 0.0)], ids=[f"{r}-fb{f}" for r, f in RUN_CASES + [("mean", 0.0)]])
@pytest.mark.parametrize("shapes", [((128, 20), (128, 784)), ((33, 4097), (33, 20001)), ((3, 5), (3, 7)),
                                    ((4096, 21), (4096, 30))],
                         ids=["mnist", "ragged", "tiny", "tall"])
def test_every_output_element_written(shapes, reduction, free_bits, dtype):
    """Every output lands in memory poisoned with NaN and comes back NaN-free: the forward ops
    (drawn and given eps, one and two draws), the sample+KL backward with each incoming gradient
    alone and both, and the recon backward and in-place finish at an incoming gradient other than 1
    (the finish of a 16-bit buffer recomputes every element from x_hat and x)."""
    (B, Z), data_shape = shapes
    _assert_every_output_written((B, Z), data_shape, dtype, reduction, free_bits,
                                 draws=((1, False), (2, False), (2, True)))


def _assert_every_output_written(latent_shape, data_shape, dtype, reduction, free_bits, draws, place=lambda t: t):
    """The body of the poisoned-output tests. draws: (num_samples, given_eps) pairs; place(t): the
    tensor every input (and incoming gradient) is read from, e.g. an unaligned copy."""
    mu, logvar = (place(randn(latent_shape, dtype, seed=s, scale=c)) for s, c in ((1, 1.0), (2, 0.5)))
    x_hat, x = (place(randn(data_shape, dtype, seed=s)) for s in (3, 4))
    code = RED[reduction]

    def assert_written(**outputs):
        for name, t in outputs.items():
            assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"

    for num_samples, given_eps in draws:
        z_shape = (num_samples, *latent_shape) if num_samples > 1 else latent_shape
        eps = place(randn(z_shape, dtype, seed=5)) if given_eps else None
        torch.cuda.synchronize()
        _poison_cuda_cache()
        z, kl, rng, pm = ops.reparameterize_kl(mu, logvar, eps, None, num_samples, code, free_bits)
        assert_written(z=z, kl=kl, kl_position_mean=pm)
        assert pm.numel() == (math.prod(latent_shape[1:]) if free_bits > 0 else 0)  # (an empty one proves nothing)
        grad_z, grad_kl = place(randn(z.shape, dtype, seed=6)), place(randn(kl.shape, kl.dtype, seed=7))
        for which, (gz, gk) in {"both": (grad_z, grad_kl), "z": (grad_z, None), "kl": (None, grad_kl)}.items():
            _poison_cuda_cache()
            gm, glv = ops.reparameterize_kl_backward(gz, gk, mu, logvar, eps, rng, pm, num_samples, code, free_bits)
            assert_written(**{f"grad_mu ({which}, K={num_samples})": gm, f"grad_logvar ({which}, K={num_samples})": glv})
    for save in (False, True):
        _poison_cuda_cache()
        loss, grad_unit = ops.gaussian_recon_loss(x_hat, x, code, save)
        assert_written(loss=loss, grad_unit=grad_unit)
        grad_loss = place(randn(loss.shape, loss.dtype, seed=8))
        _poison_cuda_cache()
        gxh, gx = ops.gaussian_recon_loss_backward(grad_loss, x_hat, x, code, True, True)
        assert_written(grad_x_hat=gxh, grad_x=gx)
    if dtype in (torch.float16, torch.bfloat16) and reduction != "none":
        unit = torch.full_like(x_hat, float("nan"))  # the recomputed buffer's old contents must not survive
        ops.gaussian_recon_loss_finish_grad_(unit, torch.tensor(0.7, device="cuda"), x_hat, x, code)
        assert_written(finished=unit)


# The CUDA A/B switches (fastelbo._C._set_cuda_*, each on by default): each one off takes other
# kernels or grids (a small grid instead of one block, 128-thread blocks, the ticket instead of a
# cluster, unsplit columns and one lane per chunk's draws), which must write every output too.
CUDA_SWITCHES = [None, "_set_cuda_one_block", "_set_cuda_large_blocks", "_set_cuda_clusters", "_set_cuda_spread"]

# (latent shape, data shape, draws) whose kernels those switches change: mnist with K = 50 (draws
# over 32 lanes; "none": 4 lanes per window; free bits: 32 lanes per sample), a one-block latent, a
# tall free-bits batch (split over blocks), short "none" rows (several samples per warp), and past
# the small-grid limits (large blocks).
POISON_MORE_CASES = [
    ((128, 20), (128, 784), ((1, False), (50, False), (50, True))),
    ((3, 5), (1, 7), ((1, False), (2, True))),
    ((4096, 21), (4096, 30), ((1, False), (2, False))),
    ((20000, 3), (20000, 5), ((1, False), (7, False))),
    ((64, 513), (16, 8193), ((1, False), (2, False))),
]


@pytest.mark.parametrize("switch_off", CUDA_SWITCHES, ids=["defaults"] + [s.removeprefix("_set_cuda_") + "-off"
                                                                         for s in CUDA_SWITCHES[1:]])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "offset1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("reduction,free_bits", RUN_CASES, ids=[f"{r}-fb{f}" for r, f in RUN_CASES])
def test_every_output_element_written_with_many_draws_unaligned_and_switched(reduction, free_bits, dtype, aligned,
                                                                              switch_off):
    """test_every_output_element_written's checks with many draws (K = 50 on mnist's latent),
    inputs and incoming gradients that start one element into their storage (the scalar paths),
    and each CUDA switch off in turn (set back afterwards)."""
    place = (lambda t: t) if aligned else (lambda t: _offset_view(t, 1))
    previous = getattr(fastelbo._C, switch_off)(False) if switch_off else None
    try:
        for latent_shape, data_shape, draws in POISON_MORE_CASES:
            _assert_every_output_written(latent_shape, data_shape, dtype, reduction, free_bits, draws, place)
    finally:
        if switch_off:
            getattr(fastelbo._C, switch_off)(previous)


def test_concurrent_streams_get_separate_tickets():
    """Two streams running the reduced ops at the same time (each reduction ticket counter is per
    stream): both get the results of a serial run."""
    a = [randn((64, 100003), seed=s) for s in (1, 2)]
    b = [randn((64, 100003), seed=s) for s in (3, 4)]
    want_a = ops.gaussian_recon_loss(a[0], a[1], RED["sum"], False)[0]
    want_b = ops.gaussian_recon_loss(b[0], b[1], RED["sum"], False)[0]
    want_kl = ops.reparameterize_kl(a[0], b[0], a[1], None, 1, RED["sum"], 0.0)[1]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    got = {0: [], 1: []}
    for _ in range(20):
        with torch.cuda.stream(streams[0]):
            got[0].append(ops.gaussian_recon_loss(a[0], a[1], RED["sum"], False)[0])
            got[0].append(ops.reparameterize_kl(a[0], b[0], a[1], None, 1, RED["sum"], 0.0)[1])
        with torch.cuda.stream(streams[1]):
            got[1].append(ops.gaussian_recon_loss(b[0], b[1], RED["sum"], False)[0])
            got[1].append(ops.reparameterize_kl(a[0], b[0], a[1], None, 1, RED["sum"], 0.0)[1])
    torch.cuda.synchronize()
    for i in range(0, 40, 2):
        assert torch.equal(got[0][i], want_a) and torch.equal(got[1][i], want_b)
        assert torch.equal(got[0][i + 1], want_kl) and torch.equal(got[1][i + 1], want_kl)


def _cuda_kernel_names(fn):
    fn()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_ops_launch_one_kernel_each():
    """The four ops called directly: exactly 4 device activities in all (no memset, fill, copy or
    separate reduction kernel next to them), for each forward kernel shape."""
    B, D, Z = 128, 784, 20
    mu, logvar = randn((B, Z), seed=1), randn((B, Z), seed=2)
    x_hat, x = randn((B, D), seed=3), randn((B, D), seed=4)
    for reduction, free_bits in (("batchmean", 0.0), ("none", 0.0), ("sum", 0.5)):
        code = RED[reduction]
        grad_z = randn((B, Z), seed=5)
        grad_loss = torch.ones(B if reduction == "none" else (), device="cuda")

        def step():
            z, kl, rng, pm = ops.reparameterize_kl(mu, logvar, None, None, 1, code, free_bits)
            ops.gaussian_recon_loss(x_hat, x, code, False)
            ops.gaussian_recon_loss_backward(grad_loss, x_hat, x, code, True, False)
            ops.reparameterize_kl_backward(grad_z, grad_loss, mu, logvar, None, rng, pm, 1, code, free_bits)

        names = _cuda_kernel_names(step)
        assert len(names) == 4 and all("fastelbo" in n for n in names), f"{reduction}: {names}"


def test_at_most_four_kernels_per_step():
    """Forward + backward of the sample+KL and the reconstruction through autograd: 4 fastelbo
    kernels (the rest is autograd's own: the loss sum and its seed gradient)."""
    B, D, Z = 128, 784, 20
    mu, logvar = randn((B, Z), seed=1).requires_grad_(), randn((B, Z), seed=2).requires_grad_()
    x_hat, x = randn((B, D), seed=3).requires_grad_(), randn((B, D), seed=4)
    grad_z = randn((B, Z), seed=5)

    def step():
        z, kl = fastelbo.reparameterize_kl(mu, logvar)
        rec = fastelbo.gaussian_recon_loss(x_hat, x)
        torch.autograd.backward((rec + kl, z), (None, grad_z))

    names = _cuda_kernel_names(step)
    ours = [n for n in names if "fastelbo" in n]
    assert len(ours) == 4, f"expected 4 fastelbo kernels, got {ours} (all: {names})"


@pytest.mark.parametrize("reduction", list(RED))
def test_empty_batch_runs_no_kernel_and_draws_nothing(reduction):
    """An empty batch gets the reduction's identity without a fastelbo kernel (torch fills the
    zeros) and leaves the CUDA generator where it was: the four ops called directly, also with
    free bits."""
    code = RED[reduction]
    free_bits = 0.0 if reduction == "none" else 0.5
    mu, x_hat = torch.zeros((0, 20), device="cuda"), torch.zeros((0, 3, 8), device="cuda")
    grad_loss = torch.ones((0,) if reduction == "none" else (), device="cuda")
    state = torch.cuda.get_rng_state()

    def step():
        z, kl, rng, pm = ops.reparameterize_kl(mu, mu, None, None, 2, code, free_bits)
        ops.reparameterize_kl_backward(z, grad_loss, mu, mu, None, rng, pm, 2, code, free_bits)
        ops.gaussian_recon_loss(x_hat, x_hat, code, reduction != "none")
        ops.gaussian_recon_loss_backward(grad_loss, x_hat, x_hat, code, True, True)

    names = _cuda_kernel_names(step)
    assert not [n for n in names if "fastelbo" in n], names
    assert torch.equal(torch.cuda.get_rng_state(), state), "an empty batch drew from the generator"


@pytest.mark.parametrize("weight", [1.0, 3.0], ids=["loss.backward()", "scaled"])
def test_loss_step_never_waits_for_the_device(weight):
    """A training step (forward, loss.backward()) makes no host-device sync: torch's sync debug
    mode raises on any (e.g. reading the incoming gradient of the recon op on the host to see
    whether it is 1, which the backward decides on the device instead)."""
    B, D, Z = 16, 300, 20
    mu, logvar = randn((B, Z), seed=1).requires_grad_(), randn((B, Z), seed=2).requires_grad_()
    x_hat, x = randn((B, D), seed=3).requires_grad_(), randn((B, D), seed=4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z, kl = fastelbo.reparameterize_kl(mu, logvar)
        rec = fastelbo.gaussian_recon_loss(x_hat, x)
        (weight * (rec + kl + z.sum())).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = weight * (x_hat - x).detach() / B
    torch.testing.assert_close(x_hat.grad, want, rtol=1e-6, atol=0)


# ---- small grids: one Hopper thread-block cluster instead of the ticket ----------------------

def _restoring_switch(setter):
    """A fixture that turns the A/B switch `setter` (fastelbo._C._set_cuda_...) on, its default, for
    the test and puts it back as it was afterwards."""
    @pytest.fixture
    def restore():
        previous = getattr(fastelbo._C, setter)(True)
        yield
        getattr(fastelbo._C, setter)(previous)
    return restore


restore_cluster_switch = _restoring_switch("_set_cuda_clusters")
restore_one_block_switch = _restoring_switch("_set_cuda_one_block")
restore_large_blocks_switch = _restoring_switch("_set_cuda_large_blocks")


def _both_ways(setter, outputs):
    """{True: outputs(), False: outputs()}, with the switch `setter` on, then off."""
    results = {}
    for on in (True, False):
        getattr(fastelbo._C, setter)(on)
        results[on] = outputs()
    return results


def _check_both_ways(results, same_bits, refs, what):
    """The outputs named in same_bits are the same bits with the switch on and off, and both
    settings' outputs named in refs are within assert_close_fp64's bound of float64 math."""
    for name in same_bits:
        assert torch.equal(results[True][name], results[False][name]), f"{name}: differs with {what} off"
    for on, r in results.items():
        assert_like_references(r, refs, refs, f"{what} {'on' if on else 'off'}")


def _small_grid_references(results, mu, logvar, x_hat, x, reduction, num_samples):
    """The references of _small_grid_outputs' values: z for the eps it drew, kl, kl_position_mean
    (empty), loss and the prepared gradient."""
    eps = _drawn_eps(SMALL_GRID_SEED, mu.shape, num_samples, mu.dtype, results["rng_state"])
    return {**_sample_kl_references(mu, logvar, eps, reduction, 0.0, num_samples),
            **_recon_references(x_hat, x, reduction)}


def test_hopper_gpus_get_the_cluster_reduction():
    """On sm_90 and newer both float32 forward reductions can run as one 16-block (non-portable)
    or at least 8-block cluster (gpu_check builds for the visible card); before sm_90, never."""
    capacity = fastelbo._C._cuda_cluster_capacity(torch.cuda.current_device())
    assert set(capacity) == {"gaussian_recon_loss", "reparameterize_kl"}
    if torch.cuda.get_device_capability()[0] >= 9:
        assert all(v >= 8 for v in capacity.values()), capacity
    else:
        assert all(v == 0 for v in capacity.values()), capacity


SMALL_GRID_SEED = 11


def _small_grid_outputs(mu, logvar, x_hat, x, code, num_samples):
    torch.manual_seed(SMALL_GRID_SEED)
    z, kl, rng, pm = ops.reparameterize_kl(mu, logvar, None, None, num_samples, code, 0.0)
    loss, grad_unit = ops.gaussian_recon_loss(x_hat, x, code, True)
    assert grad_unit.shape == x_hat.shape, "the prepared gradient was asked for"  # (the checks skip an empty one)
    return dict(z=z, kl=kl, rng_state=rng, kl_position_mean=pm, loss=loss, grad_unit=grad_unit)


# (latent shape, data shape), in float32: one block (up to 1024 chunks of 4 elements; mnist's
# latent, tiny), clusters of 9 to 16 blocks (mnist's data; odd sizes: 9 and 12 blocks; at the
# limit: 16) and, last, one just past the small-grid limit of each op (ticket either way). With 2
# draws the latent runs as the draws kernel (2 lanes per chunk): mnist's as a cluster of 10
# blocks, the tiny one as one block, the others through the ticket.
SMALL_GRIDS = [((128, 20), (128, 784)), ((3, 5), (3, 7)), ((13, 333), (6, 1001)), ((64, 512), (16, 8192)),
               ((64, 513), (16, 8193))]


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "offset1"])
@pytest.mark.parametrize("num_samples", [1, 2])
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("shapes", SMALL_GRIDS, ids=["mnist", "tiny", "odd", "at-limit", "past-limit"])
def test_cluster_and_ticket_reductions_give_the_same_bits(restore_cluster_switch, shapes, dtype, reduction,
                                                          num_samples, aligned):
    """Both ways of combining the per-block sums add the same values in the same order: the same
    bits (on GPUs without clusters both runs take the ticket). Values against float64 math."""
    (B, Z), data_shape = shapes
    mu, logvar = randn((B, Z), dtype, seed=1), randn((B, Z), dtype, seed=2, scale=0.6)
    x_hat, x = randn(data_shape, dtype, seed=3), randn(data_shape, dtype, seed=4)
    if not aligned:
        mu, logvar, x_hat, x = (_offset_view(t, 1) for t in (mu, logvar, x_hat, x))
    code = RED[reduction]
    results = _both_ways("_set_cuda_clusters",
                         lambda: _small_grid_outputs(mu, logvar, x_hat, x, code, num_samples))
    refs = _small_grid_references(results[True], mu, logvar, x_hat, x, reduction, num_samples)
    _check_both_ways(results, ("z", "kl", "rng_state", "loss", "grad_unit"), refs, "clusters (the ticket instead)")


# (latent shape, data shape) that run as one block (float32: up to 1024 chunks of 4 elements).
ONE_BLOCK_SIZES = [((128, 20), (3, 100)), ((64, 64), (2, 2048)), ((3, 5), (1, 7))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shapes", ONE_BLOCK_SIZES, ids=["mnist-latent", "at-limit", "tiny"])
def test_one_block_switch_keeps_the_values(restore_one_block_switch, shapes, dtype):
    """FASTELBO_CUDA_ONE_BLOCK=0 (_set_cuda_one_block(False)) gives the smallest reductions the
    small-grid shape: z, the RNG state and the prepared gradient are the same bits (they do not
    depend on the grid), and both shapes' sums agree with float64 math."""
    (B, Z), data_shape = shapes
    mu, logvar = randn((B, Z), dtype, seed=1), randn((B, Z), dtype, seed=2, scale=0.6)
    x_hat, x = randn(data_shape, dtype, seed=3), randn(data_shape, dtype, seed=4)
    code = RED["sum"]
    results = _both_ways("_set_cuda_one_block", lambda: _small_grid_outputs(mu, logvar, x_hat, x, code, 1))
    refs = _small_grid_references(results[True], mu, logvar, x_hat, x, "sum", 1)
    _check_both_ways(results, ("z", "rng_state", "grad_unit"), refs, "one block")


# (latent shape, data shape) past the small-grid limits, in float32: the large-block grids of 128,
# 256 and 512 threads (large_block_grid in csrc/cuda/cuda_common.cuh; both in chunks of 4
# elements). The last one takes the sample+KL kernels round the grid-stride loop and every
# unrolled load of the reconstruction's.
LARGE_BLOCK_SIZES = [((64, 513), (16, 8193)), ((64, 5000), (4, 100003)), ((8, 90001), (3, 600001))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shapes", LARGE_BLOCK_SIZES, ids=["128-threads", "256-threads", "512-threads"])
def test_large_blocks_switch_keeps_the_values(restore_large_blocks_switch, shapes, dtype):
    """FASTELBO_CUDA_LARGE_BLOCKS=0 (_set_cuda_large_blocks(False)) gives the memory-bound grids
    blocks of 128 threads: z, the RNG state, the prepared gradient and both ops' backward gradients
    (the recon's plain, scaled in place and recomputed) are the same bits (no grid-dependent sum in
    them), and both shapes' sums agree with float64 math."""
    (B, Z), data_shape = shapes
    mu, logvar = randn((B, Z), dtype, seed=1), randn((B, Z), dtype, seed=2, scale=0.6)
    x_hat, x = randn(data_shape, dtype, seed=3), randn(data_shape, dtype, seed=4)
    grad_z = randn((B, Z), dtype, seed=5)
    code = RED["batchmean"]
    grad = torch.tensor(2.5, device="cuda")

    def outputs():
        out = _small_grid_outputs(mu, logvar, x_hat, x, code, 1)
        out["grad_mu"], out["grad_logvar"] = ops.reparameterize_kl_backward(
            grad_z, grad, mu, logvar, None, out["rng_state"], out["kl_position_mean"], 1, code, 0.0)
        out["grad_x_hat"], out["grad_x"] = ops.gaussian_recon_loss_backward(grad, x_hat, x, code, True, True)
        out["finished"] = out["grad_unit"].clone()
        ops.gaussian_recon_loss_finish_grad_(out["finished"], grad, x_hat, x, code)
        return out

    results = _both_ways("_set_cuda_large_blocks", outputs)
    eps = _drawn_eps(SMALL_GRID_SEED, (B, Z), 1, dtype, results[True]["rng_state"])
    refs = {**_sample_kl_references(mu, logvar, eps, "batchmean", 0.0, 1, grad_z, grad),
            **_recon_references(x_hat, x, "batchmean", grad)}
    refs["finished"] = refs["grad_x_hat"]  # the prepared gradient scaled by the incoming 2.5
    _check_both_ways(results, ("z", "rng_state", "grad_mu", "grad_logvar", "grad_unit", "grad_x_hat", "grad_x",
                               "finished"), refs, "large blocks")


# The seed _sample_kl_step draws after, and its incoming KL gradient.
STEP_SEED = 13
STEP_GRAD_KL = 1.7


def _sample_kl_step_references(results, mu, logvar, grad_z, num_samples, free_bits):
    """The references of every value of a _sample_kl_step, for the eps it drew."""
    eps = _drawn_eps(STEP_SEED, mu.shape, num_samples, mu.dtype, results["rng_state"])
    return _sample_kl_references(mu, logvar, eps, "batchmean", free_bits, num_samples, grad_z,
                                 torch.tensor(STEP_GRAD_KL, device=mu.device))


def _sample_kl_step(mu, logvar, grad_z, num_samples, free_bits):
    """The sample+KL forward ("batchmean", drawn after torch.manual_seed(STEP_SEED)) and its backward
    for grad_z and an incoming KL gradient of STEP_GRAD_KL."""
    code = RED["batchmean"]
    torch.manual_seed(STEP_SEED)
    z, kl, rng, pm = ops.reparameterize_kl(mu, logvar, None, None, num_samples, code, free_bits)
    grad_kl = torch.tensor(STEP_GRAD_KL, device=mu.device)
    gm, glv = ops.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, None, rng, pm, num_samples, code, free_bits)
    return dict(z=z, kl=kl, rng_state=rng, kl_position_mean=pm, grad_mu=gm, grad_logvar=glv)


# (batch, positions) whose free-bits forward is split over more blocks (tests/test_cuda_grid.py):
# 32 splits of 20 positions, 128 of 3 (one window per block), 8 of 37 (a ragged last window);
# with several draws, each sample's draws shared by 2 lanes; and many draws on small batches,
# (128, 20) with K = 50 (32 lanes per sample) and (1000, 37) with K = 7 (4 lanes).
FREE_BITS_SPLIT_SHAPES = [(4096, 20), (2**16, 3), (1000, 37)]
FREE_BITS_SPLIT_CASES = ([(shape, k) for shape in FREE_BITS_SPLIT_SHAPES for k in (1, 2)]
                         + [((128, 20), 50), ((1000, 37), 7)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shape,num_samples", FREE_BITS_SPLIT_CASES,
                         ids=[f"{b}x{d}-K{k}" for (b, d), k in FREE_BITS_SPLIT_CASES])
def test_free_bits_split_switch_keeps_the_values(shape, dtype, num_samples):
    """FASTELBO_CUDA_SPREAD=0 (_set_cuda_spread(False)) gives each block of positions the whole
    batch again, a lane drawing all of a sample's draws. z and the RNG state are the same bits;
    so are the gradients where the backward takes at most 2 lanes per chunk, else they agree to
    rounding (no position's batch mean is within rounding of the floor: mu's scale grows along
    the positions, so some are floored and some not). Both ways' z, per-position means, floored
    loss and gradients are within assert_close_fp64's bound of float64 math."""
    B, D = shape
    free_bits = 0.5
    grid = fastelbo._C._cuda_free_bits_grid(B, D, num_samples)
    assert grid["row_splits"] > 1 and (num_samples == 1 or grid["draw_lanes"] > 1), grid
    mu = randn((B, D), dtype, seed=1) * torch.linspace(0.1, 2.0, D, device="cuda").to(dtype)
    logvar = randn((B, D), dtype, seed=2, scale=0.6)
    grad_z = randn((num_samples, B, D) if num_samples > 1 else (B, D), dtype, seed=5)
    results = _both_ways("_set_cuda_spread", lambda: _sample_kl_step(mu, logvar, grad_z, num_samples, free_bits))
    for name in ("z", "rng_state"):
        assert torch.equal(results[True][name], results[False][name]), f"{name}: differs with the split off"
    for name in ("grad_mu", "grad_logvar"):
        if fastelbo._C._cuda_draw_lanes(B * D, num_samples) <= 2:  # the backward adds the same terms in order
            assert torch.equal(results[True][name], results[False][name]), f"{name}: differs with the split off"
        else:  # the backward's draws over lanes add the K terms in another order (test_spread_switch_keeps_the_draws)
            assert_agree(results[True][name], results[False][name], name)
    refs = _sample_kl_step_references(results[True], mu, logvar, grad_z, num_samples, free_bits)
    want_mean = refs["kl_position_mean"][1]
    assert (want_mean < free_bits).any() and (want_mean > free_bits).any()
    for on, r in results.items():
        assert_like_references(r, refs, refs, f"split {'on' if on else 'off'}")


# (latent shape, data shape) with short samples, which reduction "none" runs several to a warp:
# 1 and 16 windows per latent sample; data of 5 elements (element by element) and of 3 and 16
# vector windows (float32; 16-bit: fewer).
SHORT_ROW_SHAPES = [((20000, 3), (20000, 5)), ((3000, 64), (3000, 64)), ((128, 20), (4096, 12))]


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "offset1"])
@pytest.mark.parametrize("num_samples", [1, 2, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shapes", SHORT_ROW_SHAPES, ids=["1-window", "16-windows", "mnist-latent"])
def test_spread_switch_keeps_the_bits_of_short_rows(shapes, dtype, num_samples, aligned):
    """reduction="none" on short samples: the short-rows kernels give every per-sample sum, z and
    the prepared gradient the bits the rows kernels give (FASTELBO_CUDA_SPREAD=0), also with the
    draws of a window shared by several lanes."""
    (B, Z), data_shape = shapes
    if num_samples > 1:
        assert fastelbo._C._cuda_short_rows_lanes(B, Z, num_samples)["draw_lanes"] > 1
    mu, logvar = randn((B, Z), dtype, seed=1), randn((B, Z), dtype, seed=2, scale=0.6)
    x_hat, x = randn(data_shape, dtype, seed=3), randn(data_shape, dtype, seed=4)
    if not aligned:
        mu, logvar, x_hat, x = (_offset_view(t, 1) for t in (mu, logvar, x_hat, x))

    def outputs():
        torch.manual_seed(17)
        z, kl, rng, _ = ops.reparameterize_kl(mu, logvar, None, None, num_samples, RED["none"], 0.0)
        loss, grad_unit = ops.gaussian_recon_loss(x_hat, x, RED["none"], True)
        return dict(z=z, kl=kl, rng_state=rng, loss=loss, grad_unit=grad_unit)

    results = _both_ways("_set_cuda_spread", outputs)
    for name in results[True]:
        assert torch.equal(results[True][name], results[False][name]), f"{name}: differs with the spread off"


# (latent shape, draws) that spread their draws over lanes: 32 lanes of ~2 draws, 8 lanes of 2,
# 2 lanes at 3 draws (one lane takes two, the other one).
DRAW_LANE_CASES = [((128, 20), 50), ((1024, 64), 16), ((7, 13), 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shape,num_samples", DRAW_LANE_CASES, ids=[f"{s[0]}x{s[1]}-K{k}" for s, k in DRAW_LANE_CASES])
def test_spread_switch_keeps_the_draws(shape, num_samples, dtype):
    """FASTELBO_CUDA_SPREAD=0 (_set_cuda_spread(False)) gives each thread its chunk's draws one
    after another again: z and the RNG state are the same bits (the same draws); z, the KL and the
    gradients (their K terms now added in another order) are within assert_close_fp64's bound of
    float64 math for those draws, and the gradients agree with the CPU's, which regenerates the
    draws from the same (seed, offset)."""
    assert fastelbo._C._cuda_draw_lanes(shape[0] * shape[1], num_samples) > 1
    mu, logvar = randn(shape, dtype, seed=1), randn(shape, dtype, seed=2, scale=0.6)
    grad_z = randn((num_samples, *shape), dtype, seed=5)
    results = _both_ways("_set_cuda_spread", lambda: _sample_kl_step(mu, logvar, grad_z, num_samples, 0.0))
    for name in ("z", "rng_state"):
        assert torch.equal(results[True][name], results[False][name]), f"{name}: differs with the spread off"
    refs = _sample_kl_step_references(results[True], mu, logvar, grad_z, num_samples, 0.0)
    # The CPU regenerates the same draws from the same (seed, offset).
    rng = results[True]["rng_state"].cpu()
    cpu_grads = ops.reparameterize_kl_backward(grad_z.cpu(), torch.tensor(STEP_GRAD_KL), mu.cpu(), logvar.cpu(), None,
                                               rng, torch.empty(0), num_samples, RED["batchmean"], 0.0)
    for on, r in results.items():
        assert_like_references(r, refs, refs, f"spread {'on' if on else 'off'}")
        assert_agree(r["grad_mu"], cpu_grads[0], f"grad_mu, spread {on}")
        assert_agree(r["grad_logvar"], cpu_grads[1], f"grad_logvar, spread {on}")


def test_cluster_reduction_in_a_cuda_graph(restore_cluster_switch):
    """A captured mnist-size step (small grids: one block for the latent, a cluster on Hopper for
    the data) replays to the eager values."""
    mu, logvar = randn((128, 20), seed=1), randn((128, 20), seed=2, scale=0.6)
    x_hat, x = randn((128, 784), seed=3), randn((128, 784), seed=4)
    eps = randn((128, 20), seed=5)
    want = (ops.reparameterize_kl(mu, logvar, eps, None, 1, RED["batchmean"], 0.0)[1],
            ops.gaussian_recon_loss(x_hat, x, RED["batchmean"], False)[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        ops.gaussian_recon_loss(x_hat, x, RED["batchmean"], False)  # warm-up off the graph
        with torch.cuda.graph(graph, stream=stream):
            got = (ops.reparameterize_kl(mu, logvar, eps, None, 1, RED["batchmean"], 0.0)[1],
                   ops.gaussian_recon_loss(x_hat, x, RED["batchmean"], False)[0])
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        got[0].fill_(float("nan"))
        got[1].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- > 2^31 elements ------------------------------------------------------------------------

def _chunks(n, size=2**27):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@pytest.mark.slow
def test_more_than_2_31_elements():
    """bf16 tensors of 2^31 + 1 elements (4 GiB each; about 22 GiB at the peak): 64-bit indexing
    in every kernel, checked at the end of the tensor and in the reductions."""
    need = 24 * 2**30
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs about {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    shape = (3, 715827883)  # 2^31 + 1 elements, odd sample size
    n = shape[0] * shape[1]
    assert n > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    x_hat = torch.empty(shape, dtype=torch.bfloat16, device="cuda").uniform_(-1, 1, generator=g)
    x = torch.empty(shape, dtype=torch.bfloat16, device="cuda").uniform_(-1, 1, generator=g)
    flat_xh, flat_x = x_hat.view(-1), x.view(-1)
    per_sample = torch.zeros(shape[0], dtype=torch.float64)
    for b in range(shape[0]):
        for sl in _chunks(shape[1]):
            d = x_hat[b, sl].double() - x[b, sl].double()
            per_sample[b] += 0.5 * (d * d).sum().item()
    loss_sum = ops.gaussian_recon_loss(x_hat, x, RED["sum"], False)[0]
    loss_none = ops.gaussian_recon_loss(x_hat, x, RED["none"], False)[0]
    torch.testing.assert_close(loss_sum.double().cpu(), per_sample.sum(), rtol=1e-4, atol=0)
    torch.testing.assert_close(loss_none.double().cpu(), per_sample, rtol=1e-4, atol=0)
    grad_x_hat, _ = ops.gaussian_recon_loss_backward(torch.tensor(1.0, device="cuda"), x_hat, x, RED["sum"], True, False)
    for sl in (slice(0, 2**20), slice(2**31 - 2**20, n)):  # both ends, the tail past 2^31
        want = (flat_xh[sl].float() - flat_x[sl].float()).to(torch.bfloat16)
        assert torch.equal(grad_x_hat.view(-1)[sl], want)
    del grad_x_hat, loss_sum, loss_none

    mu, logvar = x_hat, x.mul_(0.5)  # reuse the memory: mu in [-1, 1], logvar in [-0.5, 0.5]
    kl_want = 0.0
    for sl in _chunks(n):
        m, lv = mu.view(-1)[sl].double(), logvar.view(-1)[sl].double()
        kl_want += 0.5 * (m * m + torch.expm1(lv) - lv).sum().item()
    z, kl, rng, pm = ops.reparameterize_kl(mu, logvar, None, None, 1, RED["sum"], 0.0)
    torch.testing.assert_close(kl.double().cpu(), torch.tensor(kl_want, dtype=torch.float64), rtol=1e-4, atol=0)
    tail = slice(n - 2**22, n)
    eps_tail = (z.view(-1)[tail].float() - mu.view(-1)[tail].float()) / torch.exp(0.5 * logvar.view(-1)[tail].float())
    assert abs(eps_tail.mean().item()) < 0.01 and abs(eps_tail.std().item() - 1) < 0.02
    del z
    grad_mu, grad_logvar = ops.reparameterize_kl_backward(None, torch.tensor(1.0, device="cuda"), mu, logvar, None,
                                                          rng, pm, 1, RED["sum"], 0.0)
    for sl in (slice(0, 2**20), tail):
        assert torch.equal(grad_mu.view(-1)[sl], mu.view(-1)[sl])
        want = (0.5 * torch.expm1(logvar.view(-1)[sl].float())).to(torch.bfloat16)
        torch.testing.assert_close(grad_logvar.view(-1)[sl], want, atol=0, rtol=1e-2)


# ---- devices and generators -----------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 GPUs")
def test_non_default_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (device guard, that
    device's stream and generator) and give what cuda:0 gives."""
    torch.cuda.set_device(0)
    results = []
    for device in ("cuda:0", "cuda:1"):
        mu = randn((16, 300), device=device, seed=1).requires_grad_()
        logvar = randn((16, 300), device=device, seed=2).requires_grad_()
        x_hat, x = randn((16, 999), device=device, seed=3).requires_grad_(), randn((16, 999), device=device, seed=4)
        g = torch.Generator(device=device).manual_seed(11)
        z, kl = fastelbo.reparameterize_kl(mu, logvar, generator=g, reduction="none")
        rec = fastelbo.gaussian_recon_loss(x_hat, x)
        (rec + kl.sum() + z.pow(2).sum()).backward()
        assert z.device == torch.device(device) and kl.device == torch.device(device)
        results.append([t.detach().cpu() for t in (z, kl, rec, mu.grad, logvar.grad, x_hat.grad)])
    assert torch.cuda.current_device() == 0
    for a, b in zip(*results):
        assert torch.equal(a, b)
    mu = randn((4, 4), device="cuda:1")
    with pytest.raises(RuntimeError, match="generator"):
        fastelbo.reparameterize_kl(mu, mu, generator=torch.Generator(device="cuda:0"))


def test_generator_argument():
    mu, logvar = randn((8, 77), seed=1), randn((8, 77), seed=2)
    torch.manual_seed(0)
    state = torch.cuda.get_rng_state()
    z1, _ = fastelbo.reparameterize_kl(mu, logvar, generator=torch.Generator(device="cuda").manual_seed(42))
    z2, _ = fastelbo.reparameterize_kl(mu, logvar, generator=torch.Generator(device="cuda").manual_seed(42))
    assert torch.equal(torch.cuda.get_rng_state(), state), "generator= must leave the default generator alone"
    assert torch.equal(z1, z2)
    z3, _ = fastelbo.reparameterize_kl(mu, logvar, generator=torch.Generator(device="cuda").manual_seed(43))
    assert not torch.equal(z1, z3)
    z4, _ = fastelbo.reparameterize_kl(mu, logvar)
    assert not torch.equal(torch.cuda.get_rng_state(), state), "the default generator must advance"
    assert not torch.equal(z1, z4)
    with pytest.raises(RuntimeError, match="generator"):
        fastelbo.reparameterize_kl(mu, logvar, generator=torch.Generator())  # a CPU generator


def test_matches_reference_with_same_eps():
    """The fused CUDA ops against fastelbo.reference in float64 on one mid-size case per kernel."""
    for reduction, free_bits in (("batchmean", 0.0), ("none", 0.0), ("sum", 0.25)):
        mu = randn((32, 1001), torch.float64, seed=1).requires_grad_()
        logvar = randn((32, 1001), torch.float64, seed=2, scale=0.5).requires_grad_()
        eps = randn((32, 1001), torch.float64, seed=3)
        z, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction=reduction, free_bits=free_bits)
        z_ref, kl_ref = reference.reparameterize_kl(mu, logvar, eps=eps, reduction=reduction, free_bits=free_bits)
        g = torch.autograd.grad((z * eps).sum() + kl.sum(), (mu, logvar))
        g_ref = torch.autograd.grad((z_ref * eps).sum() + kl_ref.sum(), (mu, logvar))
        # float64 in, so the reference in the same dtype is the float64 one: the bound is
        # assert_close_fp64's float64 slack alone, far below what float32 arithmetic would cost.
        for name, a, b in (("z", z, z_ref), ("kl", kl, kl_ref), ("grad_mu", g[0], g_ref[0]),
                           ("grad_logvar", g[1], g_ref[1])):
            assert_close_fp64(a.detach(), b.detach(), b.detach(), f"{name}, {reduction}, free_bits={free_bits}")
