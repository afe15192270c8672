"""`fastelbo validate`: the fused kernels against fastelbo.reference, on every device present.

For every device x dtype x reduction x shape it runs the fused ops and the reference with the same
inputs and the same eps, forward and backward, and compares both with the float64 reference (the
oracle). Low-precision results are judged against the error that the reference itself makes in the
same dtype (the flash-attention rule):

    fused error <= 2 * (same-dtype reference error) + atol,  atol = k * finfo(out dtype).eps * max(1, |oracle|)

The reduced losses (kl, rec) are sums of non-negative terms that the kernels add in their own fixed
orders, so the worst-case error of those orders is allowed on top: d u |sum|, with u the unit
roundoff (float32 accumulation; float64 for float64 inputs) and d a bound on the number of roundings
a term goes through in any of the kernels (_summation_depth). The table's "fused err" and "ref err"
columns show how the two orders compare.

Besides the usual backward (x requires grad, random incoming gradients) each case also runs the
reconstruction the way training does, with x needing no gradient, for an incoming gradient of
exactly 1 and for the random one (quantities "rec@1", "grad_x_hat@1", "grad_x_hat@g"): on a GPU the
forward then prepares x_hat's gradient, which the backward hands back or rescales.

Then it checks the kernels' own random stream: moments and tails of eps, independence, reproducibility
from a seed, and that the backward regenerates exactly the eps its forward used.

`validate(fused=..., reference_impl=...)` takes the implementations to compare (anything with
`reparameterize_kl` and `gaussian_recon_loss`), and `run` uses the module attributes FUSED and
REFERENCE, so a deliberately broken op can be swapped in to see the validator fail.
"""
import argparse
import functools
import math
import time
from dataclasses import dataclass

import torch

from . import functional, reference
from .cli import (DTYPE_SHORT_NAMES, MAX_SEED, cpu_only_build_note, cuda_kernels_available, default_devices,
                  int_at_least, subcommand_main)

FUSED = functional        # the implementation under test
REFERENCE = reference     # the oracle (run in float64, and in each dtype for the error budget)

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# (label, reduction, free_bits, num_samples)
CASES = (
    ("none", "none", 0.0, 1),
    ("sum", "sum", 0.0, 1),
    ("mean", "mean", 0.0, 1),
    ("batchmean", "batchmean", 0.0, 1),
    ("sum fb=0.6", "sum", 0.6, 1),
    ("batchmean fb=0.6", "batchmean", 0.6, 1),
    ("batchmean K=3", "batchmean", 0.0, 3),
    ("none K=3", "none", 0.0, 3),
    ("sum fb=0.6 K=3", "sum", 0.6, 3),
)
# Shapes, chosen so that on a GPU every launch shape of the CUDA kernels runs (csrc/cuda/): one
# block ((1, 1) to (7, 13)), several samples per warp for "none" (samples of up to 16 windows of 4),
# the rows kernel ((2, 3, 5, 7) and the long rows, tiled), a small grid ((5, 4099), (2, 20001): 2
# chunks per row and 2 threads on the CPU), the memory-bound grid of large blocks, with K = 3 in
# the plain sample+KL kernels ((2, 150001)), and a tall batch of short samples, whose free bits
# forward splits the batch over more blocks ((600, 20)); the draws over lanes take K = 3 on the
# smaller latents.
SHAPES = ((1, 1), (3, 5), (7, 13), (2, 3, 5, 7), (5, 4099), (2, 20001), (2, 150001), (600, 20))
# Memory layouts of (x_hat, x) besides contiguous, checked on a 4-D shape: the recon kernels read a
# channels_last x_hat in place, with x in the same layout or copied into it (csrc/ops.cpp,
# recon_operands). (The gradients' layout is a test matter: .grad always takes its leaf's layout.)
LAYOUTS = ("channels_last", "x_hat channels_last")
LAYOUT_SHAPE = (3, 4, 5, 6)
LAYOUT_REDUCTIONS = ("none", "batchmean")
# atol in units of the output dtype's machine epsilon, times max(1, |oracle|): a few float32/float64
# roundings; half an ulp for float16/bfloat16 outputs (a last-bit rounding difference).
ATOL_EPS = {torch.float64: 8.0, torch.float32: 8.0, torch.float16: 0.5, torch.bfloat16: 0.5}
QUANTITIES = ("z", "kl", "rec", "grad_mu", "grad_logvar", "grad_x_hat", "grad_x",
              "rec@1", "grad_x_hat@1", "grad_x_hat@g")  # @: x needs no gradient (see _run)
LOSSES = ("kl", "rec", "rec@1")  # the reduced sums, which get the summation allowance
SIGMAS = 5.0  # statistical checks: allowed deviation in standard errors (the draws are seeded)
# The backward's regenerated eps against each reduction's forward draws, (label suffix, reduction,
# free_bits), on shapes that take each forward kernel (see SHAPES): one block and a sample of 6
# windows, a sample of 25 windows, a tall batch of 5 windows.
RNG_BACKWARD_CASES = (("", "batchmean", 0.0), (" none", "none", 0.0), (" fb", "sum", 0.6))
RNG_BACKWARD_SHAPES = ((5, 3, 7), (3, 97), (600, 20))


@dataclass
class Row:
    """One line of the report. err/ref_err/allowed: the worst quantity's numbers."""

    device: str
    dtype: str
    check: str
    shape: str
    worst: str
    err: float
    ref_err: float
    allowed: float
    ok: bool
    note: str = ""


def _max_abs(a, b):
    """max |a - b| in float64 (NaN counts as infinitely wrong unless both are NaN at the same place)."""
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    diff = (a - b).abs()
    if bool(torch.isfinite(diff).all()):
        return float(diff.max())
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_inf = torch.isinf(a) & (a == b)
    diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
    return float(torch.nan_to_num(diff, nan=math.inf).max())


def _run(functions, inputs, grads, reduction, free_bits, num_samples):
    """Forward and backward of one implementation; returns {quantity: tensor} (QUANTITIES)."""
    mu, logvar, eps, x_hat, x = (t.detach().clone().requires_grad_(t is not inputs[2]) for t in inputs)
    z, kl = functions.reparameterize_kl(mu, logvar, reduction=reduction, free_bits=free_bits,
                                        num_samples=num_samples, eps=eps)
    rec = functions.gaussian_recon_loss(x_hat, x, reduction=reduction)
    g_z, g_kl, g_rec = grads
    torch.autograd.backward([z, kl, rec], [g_z.to(z.dtype), g_kl.to(kl.dtype), g_rec.to(rec.dtype)])
    out = {"z": z, "kl": kl, "rec": rec, "grad_mu": mu.grad, "grad_logvar": logvar.grad,
           "grad_x_hat": x_hat.grad, "grad_x": x.grad}
    # The training path: x (the data) needs no gradient. The fused recon then takes other branches
    # (functional.gaussian_recon_loss, csrc/autograd.cpp): on a GPU the forward prepares x_hat's
    # gradient for an incoming gradient of 1, and the backward hands it back when the incoming
    # gradient is exactly 1 or rescales it otherwise; on the CPU the backward takes both branches
    # too. Each needs its own forward: one backward frees the prepared gradient.
    for suffix, g in (("@1", torch.ones_like(g_rec)), ("@g", g_rec)):
        x_hat_only = inputs[3].detach().clone().requires_grad_()
        loss = functions.gaussian_recon_loss(x_hat_only, inputs[4].detach(), reduction=reduction)
        loss.backward(g.to(loss.dtype))
        out["grad_x_hat" + suffix] = x_hat_only.grad
        if suffix == "@1":
            out["rec@1"] = loss
    return out


# The reduced losses are sums of non-negative terms, added in a fixed order that differs between
# the reference (torch.sum) and the kernels. A term that goes through d rounded additions on its way
# into the sum is off by a factor within (1 +/- u)^d, so the sum is off by at most about d u |sum|
# (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section 4.2). d, for a sum of m
# terms in a tensor of n elements, counted from the kernels' summation orders:
#  - CPU (csrc/cpu): runs of 16 values then 8 lanes (recon), pairwise blocks of 64 (KL), and
#    cascades of fan-in 16 (16 roundings per 16-fold, 4 per doubling) over the blocks, pieces and
#    rows, and for free bits over the batch, the row blocks and the positions: d <= 4 log2(m) + 72.
#    Reduction "none" over samples of fewer than 64 elements adds each in one run: d <= 63.
#  - CUDA (csrc/cuda): a thread's own grid-stride run (up to 4 chunks of up to 8 elements plus the
#    tail chunk on the small grids, else n / 135168 + 16 elements, 135168 threads being the
#    largest grid; in the rows kernels up to 2 n / 135168 + 16), a block's butterfly (10), the
#    partials in runs of at most 33 (ticket or tiles of a row) and another butterfly (10); the
#    free-bits columns are Kahan-compensated sums (2 u + O(r u^2) for a run of r, counted as 3),
#    then at most 4 n / 135168 + 8 floored positions per thread (18 in the split kernel):
#    d <= 72 + 4 n / 135168.
# Both are within d <= 4 (ceil(log2 m) + L), L = 32 + ceil(n / 32768): about twice the counts
# above, as a margin for a miscount. At validate's largest shape (300002 elements) that is 244 u,
# 1.5e-5 relative in float32: a loss 0.01% off fails (the old allowance, (m - 1) u, let 1.8% pass).
# The rounding of the terms themselves is left to the 2 x reference error + atol rule.
def _summation_depth(terms, numel):
    """A bound on the roundings each of `terms` summed terms goes through, in a tensor of `numel`."""
    longest_run = 32 + math.ceil(numel / 32768)
    return 4 * (math.ceil(math.log2(max(terms, 1))) + longest_run)


def _make_inputs(shape, num_samples, per_sample_loss, seed):
    """float64 CPU inputs and incoming gradients for one case (cast to the dtype under test later).
    per_sample_loss: reduction "none" (incoming loss gradients of shape (B,))."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64)  # noqa: E731
    z_shape = (num_samples, *shape) if num_samples > 1 else shape
    mu = 1.5 * randn(*shape)
    logvar = randn(*shape).clamp(-3, 3)
    eps = randn(*z_shape)
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    x_hat = x + 0.3 * randn(*shape)
    loss_shape = (shape[0],) if per_sample_loss else ()
    grads = (randn(*z_shape), randn(*loss_shape), randn(*loss_shape))
    return (mu, logvar, eps, x_hat, x), grads


def _with_layout(inputs, layout):
    """(mu, logvar, eps, x_hat, x) with x_hat and x in `layout` (see LAYOUTS)."""
    if layout == "contiguous":
        return inputs
    mu, logvar, eps, x_hat, x = inputs
    x_hat = x_hat.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return [mu, logvar, eps, x_hat, x]


def check_case(fused, oracle_impl, device, dtype, label, reduction, free_bits, num_samples, shape, seed,
               layout="contiguous", make_inputs=_make_inputs):
    """Fused vs reference for one (device, dtype, case, shape): a Row. layout: of x_hat and x
    (contiguous, or one of LAYOUTS). make_inputs: _make_inputs, or a cache of it (the inputs
    depend on the shape, the draws, "none" or not and the seed; not on the dtype)."""
    inputs64, grads64 = make_inputs(shape, num_samples, reduction == "none", seed)
    inputs = _with_layout([t.to(device=device, dtype=dtype) for t in inputs64], layout)
    grads = [g.to(device=device, dtype=dtype) for g in grads64]
    # The oracle sees exactly the values the dtype under test can hold.
    oracle = _run(oracle_impl, [t.to("cpu", torch.float64) for t in inputs],
                  [g.to("cpu", torch.float64) for g in grads], reduction, free_bits, num_samples)
    same_dtype = _run(oracle_impl, inputs, grads, reduction, free_bits, num_samples)
    got = _run(fused, inputs, grads, reduction, free_bits, num_samples)

    worst, worst_ratio, ok = None, -1.0, True
    for name in QUANTITIES:
        want = oracle[name]
        if got[name] is None or want is None or same_dtype[name] is None:
            if (got[name] is None) != (want is None):
                return Row(device, _dtype_name(dtype), label, _shape_str(shape), name, math.inf, 0.0, 0.0,
                           False, f"{name}: gradient missing" if got[name] is None else f"{name}: unexpected gradient")
            continue
        out_dtype = same_dtype[name].dtype
        if got[name].dtype != out_dtype:
            return Row(device, _dtype_name(dtype), label, _shape_str(shape), name, math.inf, 0.0, 0.0, False,
                       f"{name}: dtype {got[name].dtype} but the reference gives {out_dtype}")
        err = _max_abs(got[name], want)
        ref_err = _max_abs(same_dtype[name], want)
        largest = float(want.detach().abs().max()) if want.numel() else 0.0
        allowed = 2.0 * ref_err + ATOL_EPS[out_dtype] * torch.finfo(out_dtype).eps * max(1.0, largest)
        if name in LOSSES:  # relative to the sum itself (a per-sample sum for "none"): no floor of 1
            numel = math.prod(shape)
            terms = numel if reduction != "none" else math.prod(shape[1:])
            unit_roundoff = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2
            allowed += _summation_depth(terms, numel) * unit_roundoff * largest
        ratio = err / allowed if allowed > 0 else (0.0 if err == 0 else math.inf)
        if not err <= allowed:
            ok = False
        if ratio > worst_ratio:
            worst, worst_ratio, row_numbers = name, ratio, (err, ref_err, allowed)
    return Row(device, _dtype_name(dtype), label, _shape_str(shape), worst, *row_numbers, ok)


def check_empty(fused, device, dtype):
    """An empty batch gives the reduction's identity (an empty vector for "none") and empty gradients."""
    problems = []
    for label, reduction, free_bits, num_samples in CASES:
        mu = torch.zeros((0, 3), device=device, dtype=dtype, requires_grad=True)
        logvar = torch.zeros((0, 3), device=device, dtype=dtype, requires_grad=True)
        x_hat = torch.zeros((0, 3), device=device, dtype=dtype, requires_grad=True)
        x = torch.zeros((0, 3), device=device, dtype=dtype)
        z, kl = fused.reparameterize_kl(mu, logvar, reduction=reduction, free_bits=free_bits,
                                        num_samples=num_samples)
        rec = fused.gaussian_recon_loss(x_hat, x, reduction=reduction)
        want_z = (num_samples, 0, 3) if num_samples > 1 else (0, 3)
        want_loss = (0,) if reduction == "none" else ()
        if tuple(z.shape) != want_z:
            problems.append(f"{label}: z shape {tuple(z.shape)}")
        for name, loss in (("kl", kl), ("rec", rec)):
            if tuple(loss.shape) != want_loss or (loss.numel() and float(loss.detach()) != 0.0):
                problems.append(f"{label}: {name} = {loss.tolist()}")
        (z.sum() + kl.sum() + rec.sum()).backward()
        for name, t in (("mu", mu), ("logvar", logvar), ("x_hat", x_hat)):
            if t.grad is None or t.grad.shape != t.shape:
                problems.append(f"{label}: grad of {name} missing or misshapen")
    return Row(device, _dtype_name(dtype), "empty batch (all cases)", "(0,3)", "identity", float(len(problems)),
               math.nan, 0.0, not problems, "; ".join(problems)[:200])


# ----------------------------------------------------------------------------------------------
# The kernels' own random stream.

def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _rng_row(device, dtype, check, shape, measured, allowed, note="", worst="sigmas"):
    ok = bool(measured <= allowed)
    return Row(device, _dtype_name(dtype), check, _shape_str(shape), worst, measured, math.nan, allowed, ok, note)


def check_rng(fused, device, seed, dtypes=None):
    """Rows for the fused sampler's random stream on one device, for those of `dtypes` (default:
    all) that a row is about: the stream's statistics and reproducibility are drawn in float32, the
    backward's regenerated eps is checked in float64 and float32, and |mu| >> std in float16 and
    bfloat16 (each row one dtype)."""
    wanted = set(DTYPES.values()) if dtypes is None else set(dtypes)
    rows = []
    f32 = torch.float32
    if f32 in wanted:
        rows += _check_rng_stream(fused, device, seed)
    rows += _check_rng_backward(fused, device, seed, [d for d in (torch.float64, f32) if d in wanted])
    rows += _check_rng_backward_cancelling(fused, device, seed,
                                           [d for d in (torch.float16, torch.bfloat16) if d in wanted])
    return rows


def _check_rng_stream(fused, device, seed):
    """float32 rows: moments, tails and independence of the draws, and their reproducibility."""
    rows = []
    f32 = torch.float32

    # Moments and tails of eps (mu = 0, logvar = 0 gives z = eps), 2 x 2^19 draws.
    shape = (512, 1024)
    zeros = torch.zeros(shape, device=device, dtype=f32)
    z, _ = fused.reparameterize_kl(zeros, zeros, num_samples=2, generator=_generator(device, seed))
    e = z.detach().to("cpu", torch.float64)
    flat = e[0].flatten()
    n = flat.numel()
    mean, var = float(flat.mean()), float(flat.var())
    standardized = (flat - mean) / math.sqrt(var)
    skew, kurt = float((standardized ** 3).mean()), float((standardized ** 4).mean())
    tail = float((flat.abs() > 3).double().mean())
    p3 = math.erfc(3 / math.sqrt(2))
    sigmas = {
        "mean": abs(mean) / math.sqrt(1 / n),
        "var": abs(var - 1) / math.sqrt(2 / n),
        "skew": abs(skew) / math.sqrt(6 / n),
        "kurtosis": abs(kurt - 3) / math.sqrt(24 / n),
        "P(|eps|>3)": abs(tail - p3) / math.sqrt(p3 * (1 - p3) / n),
    }
    name, worst = max(sigmas.items(), key=lambda kv: kv[1])
    rows.append(_rng_row(device, f32, "rng moments+tails", shape, worst, SIGMAS,
                         f"mean {mean:+.4f} var {var:.4f} skew {skew:+.3f} kurt {kurt:.3f}", name))

    # Independence: neighbouring elements, and the K draws of one call.
    lag1 = float((flat[1:] * flat[:-1]).mean()) * math.sqrt(n)
    across = float((e[0].flatten() * e[1].flatten()).mean()) * math.sqrt(n)
    rows.append(_rng_row(device, f32, "rng independence", shape, max(abs(lag1), abs(across)), SIGMAS,
                         f"corr(neighbours) {lag1 / math.sqrt(n):+.5f}, corr(sample 0, 1) {across / math.sqrt(n):+.5f}",
                         "corr sigmas"))

    # Reproducible from a seed (explicit generator and the default one); consecutive draws differ.
    small = torch.zeros((7, 33), device=device, dtype=f32)
    gen = _generator(device, seed)
    a, _ = fused.reparameterize_kl(small, small, generator=gen)
    b, _ = fused.reparameterize_kl(small, small, generator=gen)
    a2, _ = fused.reparameterize_kl(small, small, generator=_generator(device, seed))
    with torch.random.fork_rng(devices=[torch.device(device)] if device != "cpu" else []):
        torch.manual_seed(seed)
        c, _ = fused.reparameterize_kl(small, small)
        torch.manual_seed(seed)
        c2, _ = fused.reparameterize_kl(small, small)
    problems = []
    if not torch.equal(a, a2):
        problems.append("same generator seed gave different eps")
    if not torch.equal(c, c2):
        problems.append("torch.manual_seed did not reproduce the draw")
    if torch.equal(a, b):
        problems.append("consecutive draws were equal")
    rows.append(Row(device, "float32", "rng reproducible", _shape_str(small.shape), "draws", float(len(problems)),
                    math.nan, 0.0, not problems, "; ".join(problems)))
    return rows


def _check_rng_backward(fused, device, seed, dtypes):
    """Rows (float64, float32 in `dtypes`): the backward uses the eps of its own forward."""
    rows = []
    # The backward regenerates the forward's eps: with mu = 0 and logvar = 0, z = eps, so
    # d/dmu = g and d/dlogvar = 1/2 g z exactly. Two forwards run before the two backwards, so a
    # backward that redraws from the generator's current state (not the saved one) shows up. Each
    # reduction's forward draws in its own kernels (on a GPU: one block, the draws over lanes, several
    # samples per warp, the rows and the columns kernels, and the columns split over a tall batch:
    # RNG_BACKWARD_SHAPES), and the one backward must regenerate what each of them drew.
    for dtype in dtypes:
        for k in (1, 3):
            for suffix, reduction, free_bits in RNG_BACKWARD_CASES:
                worst = (-1.0, 0.0, 0.0, "", RNG_BACKWARD_SHAPES[0])  # (err / allowed, err, allowed, name, shape)
                for shape in RNG_BACKWARD_SHAPES:
                    gen = _generator(device, seed + k)
                    runs = []
                    for _ in range(2):
                        mu = torch.zeros(shape, device=device, dtype=dtype, requires_grad=True)
                        logvar = torch.zeros(shape, device=device, dtype=dtype, requires_grad=True)
                        z, _ = fused.reparameterize_kl(mu, logvar, num_samples=k, generator=gen, reduction=reduction,
                                                       free_bits=free_bits)
                        runs.append((mu, logvar, z))
                    for mu, logvar, z in reversed(runs):
                        g = torch.randn(z.shape, generator=_generator(device, seed + 99), device=device, dtype=dtype)
                        z.backward(g)
                        zd, gd = z.detach().double(), g.double()
                        want_mu = gd.sum(0) if k > 1 else gd
                        want_lv = (0.5 * gd * zd).sum(0) if k > 1 else 0.5 * gd * zd
                        tol = 4 * torch.finfo(dtype).eps
                        for name, got, want in (("grad_mu", mu.grad, want_mu), ("grad_logvar", logvar.grad, want_lv)):
                            err = _max_abs(got, want)
                            allowed = tol * max(1.0, float(want.abs().max()))
                            if err / allowed > worst[0]:
                                worst = (err / allowed, err, allowed, name, shape)
                _, err, allowed, name, shape = worst
                label = "rng backward eps" + suffix + (f" K={k}" if k > 1 else "")
                rows.append(Row(device, _dtype_name(dtype), label, _shape_str(shape), name, err, math.nan, allowed,
                                err <= allowed, "" if err <= allowed else "backward did not reuse the forward's eps"))
    return rows


def _check_rng_backward_cancelling(fused, device, seed, dtypes):
    """Rows (float16, bfloat16 in `dtypes`): the backward's eps where (z - mu) / std would cancel."""
    rows = []
    # Same, in half precision with |mu| >> std, where (z - mu) / std would cancel catastrophically:
    # eps comes from a draw with mu = 0, logvar = 0 and the same seed (z = eps in this dtype).
    for dtype in dtypes:
        shape = (9, 31)
        zeros = torch.zeros(shape, device=device, dtype=dtype)
        eps, _ = fused.reparameterize_kl(zeros, zeros, generator=_generator(device, seed + 7))
        mu = (100 + torch.rand(shape, generator=_generator("cpu", seed))).to(device, dtype).requires_grad_()
        logvar = torch.full(shape, -12.0, device=device, dtype=dtype, requires_grad=True)
        z, _ = fused.reparameterize_kl(mu, logvar, generator=_generator(device, seed + 7))
        g = torch.randn(shape, generator=_generator("cpu", seed + 1)).to(device, dtype)
        z.backward(g)
        want = 0.5 * g.double() * torch.exp(0.5 * logvar.detach().double()) * eps.double()
        err_elements = (logvar.grad.double() - want).abs()
        # eps is only known to this dtype's precision: allow 2 ulps of each element, plus one ulp of
        # the smallest normal number for elements near zero.
        allowed_elements = 2 * torch.finfo(dtype).eps * want.abs() + torch.finfo(dtype).tiny
        ratio = float((err_elements / allowed_elements).max())
        rows.append(_rng_row(device, dtype, "rng backward eps |mu|>>std", shape, ratio, 1.0,
                             "" if ratio <= 1 else "logvar gradient does not use the regenerated eps",
                             "err/allowed"))

    return rows


# ----------------------------------------------------------------------------------------------

def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _shape_str(shape):
    return "(" + ",".join(str(s) for s in shape) + ")"


def available_devices():
    """cpu, and cuda where fastelbo's CUDA kernels can run (a GPU and a build with them)."""
    return default_devices()


def validate(*, fused=None, reference_impl=None, devices=None, dtypes=None, cases=None, shapes=None, seed=0,
             rng=True, on_row=None):
    """Runs the checks; returns the list of Rows (check row.ok).

    fused / reference_impl: objects with reparameterize_kl and gaussian_recon_loss (default: the
    module attributes FUSED and REFERENCE). devices, dtypes, cases, shapes: subsets of
    available_devices(), DTYPES.values(), CASES, SHAPES (default: all). rng: also run the random
    stream checks (those of `dtypes`: see check_rng). on_row(row) is called as each row completes.
    """
    fused = FUSED if fused is None else fused
    reference_impl = REFERENCE if reference_impl is None else reference_impl
    devices = available_devices() if devices is None else list(devices)
    dtypes = list(DTYPES.values()) if dtypes is None else list(dtypes)
    cases = CASES if cases is None else tuple(cases)
    shapes = SHAPES if shapes is None else tuple(shapes)
    rows = []
    # Every dtype and case of a shape reads the same float64 inputs: drawn once per validate call.
    make_inputs = functools.lru_cache(maxsize=None)(_make_inputs)

    def add(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    def failed(device, dtype, check, shape, error):
        return Row(device, _dtype_name(dtype), check, _shape_str(shape), "error", math.inf, math.nan, 0.0, False,
                   f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160])

    for device in devices:
        if device != "cpu":
            from ._extension import BUILT_WITH_CUDA
            if not BUILT_WITH_CUDA:
                add(Row(device, "-", "cuda kernels", "-", "-", math.inf, math.nan, 0.0, False,
                        "fastelbo was built without CUDA kernels (rebuild with nvcc present, or pass --device cpu)"))
                continue
        for dtype in dtypes:
            for label, reduction, free_bits, num_samples in cases:
                for index, shape in enumerate(shapes):
                    try:
                        row = check_case(fused, reference_impl, device, dtype, label, reduction, free_bits,
                                         num_samples, shape, seed * 1000 + index, make_inputs=make_inputs)
                    except Exception as error:  # a crash is a failure, reported in the table
                        row = failed(device, dtype, label, shape, error)
                    add(row)
            for layout in LAYOUTS:
                for reduction in LAYOUT_REDUCTIONS:
                    label = f"{reduction} {layout}"
                    try:
                        row = check_case(fused, reference_impl, device, dtype, label, reduction, 0.0, 1,
                                         LAYOUT_SHAPE, seed * 1000 + 500, layout=layout)
                    except Exception as error:
                        row = failed(device, dtype, label, LAYOUT_SHAPE, error)
                    add(row)
            try:
                row = check_empty(fused, device, dtype)
            except Exception as error:
                row = failed(device, dtype, "empty batch (all cases)", (0, 3), error)
            add(row)
        if rng:
            try:
                for row in check_rng(fused, device, seed, dtypes):
                    add(row)
            except Exception as error:
                add(failed(device, torch.float32, "rng", (), error))
    return rows


HEADER = f"{'device':<6} {'dtype':<8} {'check':<30} {'shape':<11} {'worst':<12} {'fused err':>10} {'ref err':>10} {'allowed':>10}  result"


def format_row(row):
    def num(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:10.3g}"

    text = (f"{row.device:<6} {row.dtype:<8} {row.check:<30} {row.shape:<11} {row.worst:<12} "
            f"{num(row.err):>10} {num(row.ref_err):>10} {num(row.allowed):>10}  {'ok' if row.ok else 'FAIL'}")
    if row.note and (not row.ok or row.check.startswith("rng moments")):
        text += f"  {row.note}"
    return text


# ----------------------------------------------------------------------------------------------
# The `fastelbo validate` subcommand.

def _device_choice(value):
    if value not in ("all", "cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be all, cpu or cuda, got {value!r}")
    if value == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda was asked for but torch.cuda.is_available() is False")
    if value == "cuda" and not cuda_kernels_available():
        raise argparse.ArgumentTypeError("cuda was asked for but fastelbo was built without its CUDA kernels "
                                         "(rebuild with nvcc present)")
    return value


def _dtype_choice(value):
    """A dtype name: float32, float64, float16, bfloat16, or fastelbo bench's fp32, fp64, fp16, bf16."""
    name = {short: long for long, short in DTYPE_SHORT_NAMES.items()}.get(value, value)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DTYPES)} (or fp32, fp64, fp16, bf16), got {value!r}")
    return name


def add_arguments(parser):
    parser.add_argument("--device", type=_device_choice, default="all", metavar="{all,cpu,cuda}",
                        help="devices to check (default: all present: cpu, and cuda when available)")
    parser.add_argument("--dtype", action="append", type=_dtype_choice, default=None, metavar="{" + ",".join(DTYPES) + "}",
                        help="dtype to check; repeat for several (default: all four). The rng rows run for the "
                             "dtypes given too: the stream's statistics and reproducibility with float32, its "
                             "regeneration in the backward with float64 and float32, |mu| >> std with float16 "
                             "and bfloat16")
    parser.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--failures-only", action="store_true", help="print only the rows that fail")


def run(args):
    devices = available_devices() if args.device == "all" else [args.device]
    if args.device == "all" and (note := cpu_only_build_note("validate")):
        print(note)
    dtypes = [DTYPES[name] for name in args.dtype] if args.dtype else None
    print(f"fastelbo validate: fused ops vs fastelbo.reference on {', '.join(devices)}; "
          "values and gradients with a shared eps, against the float64 reference;")
    print("allowed = 2 x (the reference's own error in the same dtype) + atol (+ d u |sum| for the losses,")
    print("d bounding the roundings of the kernels' summation orders); @: x needs no gradient, incoming")
    print("gradient 1 or g; rng rows: the statistic vs its limit (sigmas, ratios, counts)")
    print(HEADER)
    start = time.perf_counter()

    def show(row):
        if not args.failures_only or not row.ok:
            print(format_row(row), flush=True)

    rows = validate(devices=devices, dtypes=dtypes, seed=args.seed, on_row=show)
    failures = [row for row in rows if not row.ok]
    print(f"{len(rows)} checks, {len(failures)} failed ({time.perf_counter() - start:.1f} s): "
          + ("FAIL" if failures else "all passed"))
    return 1 if failures else 0


def main(argv=None):
    """`python -m fastelbo.validate ...`: the same as `fastelbo validate ...`."""
    return subcommand_main("validate", argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
