"""fastelbo.reparameterize_kl against float64 math (fastelbo.reference on float64 copies).

Values and gradients for every reduction x dtype x shape, with eps given (pass eps=) so that the
fused op and the reference use the same draw; output dtypes and shapes; num_samples; free_bits;
gradcheck in float64; the reference itself against the formulas of DESIGN.md section 1, written
out element by element in plain Python.
"""
import math

import pytest
import torch

import fastelbo
from fastelbo import reference

from conftest import (
    DTYPES,
    assert_close_fp64,
    REDUCTIONS,
    compare_three_ways,
    dtype_id,
    loss_dtype,
    random_grad_outputs,
    run_with_grads,
    sample_inputs,
    stable_seed,
    z_shape,
)

SHAPES = [(1, 1), (3, 7), (5, 17, 3), (2, 4, 5, 3), (16, 33)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def fused(reduction, **kwargs):
    return lambda mu, logvar, eps: fastelbo.reparameterize_kl(mu, logvar, reduction=reduction, eps=eps, **kwargs)


def ref(reduction, **kwargs):
    return lambda mu, logvar, eps: reference.reparameterize_kl(mu, logvar, reduction=reduction, eps=eps, **kwargs)


def only(index, fn):
    return lambda *args: fn(*args)[index]


# ---- the formulas, by hand ------------------------------------------------------------------------
# Every other value test compares with fastelbo.reference; this one pins the reference (and the
# fused op) to DESIGN.md section 1 with nothing shared: Python floats and loops over a (B, Z) list.
HAND_MU = [[0.0, 1.5, -0.25, 2.0], [0.5, -1.0, 0.0, 0.75], [-2.0, 0.125, 1.0, 0.0]]
HAND_LOGVAR = [[math.log(2.0), 0.0, -1.5, 0.3], [-0.2, 2.5, 0.0, -3.0], [1.0, -0.05, 0.6, -0.7]]


def _hand_kl(reduction, free_bits=0.0):
    """kl_ij = 1/2 (mu^2 + exp(logvar) - 1 - logvar), reduced; free bits: sum_j max(kbar_j, lam)
    for batchmean, times B for sum, divided by the per-sample size for mean."""
    kl = [[0.5 * (m * m + math.exp(lv) - 1.0 - lv) for m, lv in zip(mus, lvs)] for mus, lvs in zip(HAND_MU, HAND_LOGVAR)]
    B, Z = len(kl), len(kl[0])
    if free_bits > 0:
        floored = sum(max(sum(kl[i][j] for i in range(B)) / B, free_bits) for j in range(Z))
        return {"batchmean": floored, "sum": B * floored, "mean": floored / Z}[reduction]
    per_sample = [sum(row) for row in kl]
    return {"none": per_sample, "sum": sum(per_sample), "batchmean": sum(per_sample) / B,
            "mean": sum(per_sample) / (B * Z)}[reduction]


# floor 0.4: the batch-mean KLs of the four positions are 0.88, 1.99, 0.33 and 1.14, so one is floored
@pytest.mark.parametrize("free_bits", [0.0, 0.4], ids=["plain", "free-bits"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_and_fused_kl_follow_the_formula_by_hand(device, reduction, free_bits):
    if free_bits and reduction == "none":
        pytest.skip("free bits are not defined for reduction 'none'")
    mu = torch.tensor(HAND_MU, dtype=torch.float64, device=device)
    logvar = torch.tensor(HAND_LOGVAR, dtype=torch.float64, device=device)
    eps = torch.linspace(-1.5, 1.5, mu.numel(), dtype=torch.float64, device=device).reshape(mu.shape)
    want_z = torch.tensor([[m + math.exp(lv / 2) * e for m, lv, e in zip(*rows)]
                           for rows in zip(HAND_MU, HAND_LOGVAR, eps.tolist())], dtype=torch.float64)
    want_kl = torch.tensor(_hand_kl(reduction, free_bits), dtype=torch.float64)
    for fn in (reference.reparameterize_kl, fastelbo.reparameterize_kl):
        z, kl = fn(mu, logvar, eps=eps, reduction=reduction, free_bits=free_bits)
        torch.testing.assert_close(z.cpu(), want_z, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(kl.cpu(), want_kl, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_values_and_grads_random_grad_output(device, reduction, dtype, shape):
    """z and kl both feed the loss, with grad_outputs that are not 1 (random per-element weights for
    z, random per-sample weights for "none", a random scalar otherwise)."""
    seed = stable_seed("rkl", reduction, dtype, shape)
    mu, logvar, eps = sample_inputs(shape, dtype, device, seed=seed)
    z, kl = fused(reduction)(mu.detach(), logvar.detach(), eps)
    grad_outputs = random_grad_outputs((z, kl), reduction, seed=seed + 1)
    assert grad_outputs[1].dim() == (1 if reduction == "none" else 0)
    compare_three_ways(fused(reduction), ref(reduction), (mu, logvar, eps), grad_outputs,
                       ("mu", "logvar", "eps"))


@pytest.mark.parametrize("shape", SHAPES[:4], ids=SHAPE_IDS[:4])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_only_backward_grad_one(device, reduction, dtype, shape):
    """Only kl is used (z gets no gradient: grad_z is None inside), with the exact incoming
    gradient 1 of loss.backward() (per-sample ones for "none")."""
    mu, logvar, eps = sample_inputs(shape, dtype, device, seed=stable_seed("kl1", reduction, dtype, shape))
    if reduction == "none":
        f, r = (lambda *a: fused(reduction)(*a)[1].sum()), (lambda *a: ref(reduction)(*a)[1].sum())
    else:
        f, r = only(1, fused(reduction)), only(1, ref(reduction))
    compare_three_ways(f, r, (mu, logvar, eps), None, ("mu", "logvar", "eps"))

    # and literally through loss.backward()
    mu2, logvar2 = (t.detach().clone().requires_grad_() for t in (mu, logvar))
    out = f(mu2, logvar2, eps)
    out.backward()
    _, grads = run_with_grads(f, (mu, logvar, eps))
    torch.testing.assert_close(mu2.grad, grads[0], rtol=0, atol=0)
    torch.testing.assert_close(logvar2.grad, grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES[:4], ids=SHAPE_IDS[:4])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_z_only_backward(device, dtype, shape):
    """Only z is used (kl gets no gradient: grad_kl is None inside)."""
    mu, logvar, eps = sample_inputs(shape, dtype, device, seed=stable_seed("z", dtype, shape))
    grad_z = random_grad_outputs((eps,), "none", seed=stable_seed("gz", dtype, shape))
    compare_three_ways(only(0, fused("sum")), only(0, ref("sum")), (mu, logvar, eps), grad_z,
                       ("mu", "logvar", "eps"))


@pytest.mark.parametrize("num_samples", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_output_dtypes_and_shapes(device, reduction, dtype, num_samples):
    shape = (4, 3, 5)
    mu, logvar = sample_inputs(shape, dtype, device, with_eps=False)
    z, kl = fastelbo.reparameterize_kl(mu, logvar, reduction=reduction, num_samples=num_samples)
    assert z.dtype == dtype and z.device == mu.device
    assert z.shape == z_shape(shape, num_samples)
    assert kl.dtype == loss_dtype(dtype) and kl.device == mu.device
    assert kl.shape == ((4,) if reduction == "none" else ())
    grad_mu, grad_logvar = torch.autograd.grad((z.float().sum() + kl.float().sum()), (mu, logvar))
    assert grad_mu.dtype == dtype and grad_mu.shape == mu.shape
    assert grad_logvar.dtype == dtype and grad_logvar.shape == logvar.shape


@pytest.mark.parametrize("num_samples", [2, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_num_samples_values_and_grads(device, reduction, dtype, num_samples):
    shape = (3, 5, 2)
    seed = stable_seed("K", reduction, dtype, num_samples)
    mu, logvar, eps = sample_inputs(shape, dtype, device, seed=seed, num_samples=num_samples)
    f, r = fused(reduction, num_samples=num_samples), ref(reduction, num_samples=num_samples)
    z, kl = f(mu.detach(), logvar.detach(), eps)
    assert z.shape == (num_samples, *shape)
    grad_outputs = random_grad_outputs((z, kl), reduction, seed=seed + 1)
    compare_three_ways(f, r, (mu, logvar, eps), grad_outputs, ("mu", "logvar", "eps"))


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_16bit_logvar_grad_when_mu_dwarfs_std(device, dtype, num_samples):
    """DESIGN.md section 1: the backward regenerates eps instead of recovering it as (z - mu) / std,
    which cancels in 16 bits when |mu| >> std. Here |mu| ~ 100 and std ~ exp(-6) = 0.0025: the
    16-bit z mostly rounds to mu itself, so a recovered eps would be 0 or a whole ulp of mu over
    std. Only z feeds the loss, with random per-element weights (the KL's logvar gradient, about
    -1/2, would hide the z part, about 1e-3); the gradients against float64 math on the same eps."""
    seed = stable_seed("mu>>std", dtype, num_samples)
    mu, logvar, eps = sample_inputs((8, 16), torch.float64, device, seed=seed, num_samples=num_samples,
                                    requires_grad=False)
    mu = (mu + 100 * mu.sign()).to(dtype).requires_grad_()
    logvar = (0.5 * logvar - 12).to(dtype).requires_grad_()
    eps = eps.to(dtype)
    f, r = only(0, fused("sum", num_samples=num_samples)), only(0, ref("sum", num_samples=num_samples))
    z = f(mu.detach(), logvar.detach(), eps)
    # the case this test is about: most z equal mu in the dtype
    assert (z == mu.detach()).float().mean() > 0.5
    grad_z = random_grad_outputs((z,), "none", seed=seed + 1)
    compare_three_ways(f, r, (mu, logvar, eps), grad_z, ("mu", "logvar", "eps"))


def free_bits_between(mu, logvar):
    """A free-bits floor lam strictly between two position means kbar_j, far from every kbar_j
    (away from the kink of max(kbar_j, lam)), so that some positions are above and some below."""
    m, lv = mu.detach().double().cpu(), logvar.detach().double().cpu()
    kl = 0.5 * (m * m + torch.expm1(lv) - lv)
    kbar = kl.reshape(kl.shape[0], -1).mean(0).sort().values
    gaps = kbar[1:] - kbar[:-1]
    middle = slice(len(gaps) // 4, max(len(gaps) // 4 + 1, 3 * len(gaps) // 4))
    i = int(torch.argmax(gaps[middle])) + middle.start
    lam = float(0.5 * (kbar[i] + kbar[i + 1]))
    assert (kbar < lam).any() and (kbar > lam).any()
    return lam, float(gaps[i] / 2)


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
@pytest.mark.parametrize("shape", [(8, 6), (4, 3, 5)], ids=["8x6", "4x3x5"])
def test_free_bits_values_and_grads(device, shape, reduction, dtype, num_samples):
    seed = stable_seed("fb", shape, reduction, dtype, num_samples)
    mu, logvar, eps = sample_inputs(shape, dtype, device, seed=seed, num_samples=num_samples)
    lam, margin = free_bits_between(mu, logvar)
    # away from the kink: the reference and the kernels agree on which side each position is
    assert margin > 1e-2 * lam
    f = fused(reduction, free_bits=lam, num_samples=num_samples)
    r = ref(reduction, free_bits=lam, num_samples=num_samples)
    z, kl = f(mu.detach(), logvar.detach(), eps)
    grad_outputs = random_grad_outputs((z, kl), reduction, seed=seed + 1)
    compare_three_ways(f, r, (mu, logvar, eps), grad_outputs, ("mu", "logvar", "eps"))

    # The floor changes the value: the floored loss is larger than the plain one.
    _, kl_plain = fused(reduction, num_samples=num_samples)(mu.detach(), logvar.detach(), eps)
    assert kl.item() > kl_plain.item()

    # KL-only gradient (z unused, so no z gradient can hide it): against float64 math, and exactly
    # zero at the positions whose batch-mean KL is below the floor.
    _, grads = run_with_grads(only(1, f), (mu, logvar, eps))
    _, grads_same = run_with_grads(only(1, r), (mu, logvar, eps))
    _, grads64 = run_with_grads(only(1, r), (mu, logvar, eps), dtype=torch.float64)
    m, lv = mu.detach().double(), logvar.detach().double()
    kbar = (0.5 * (m * m + torch.expm1(lv) - lv)).mean(0)
    below = (kbar < lam).expand_as(mu)
    for name, g, g_same, g64 in zip(("mu", "logvar"), grads, grads_same, grads64):
        assert_close_fp64(g, g_same, g64, f"KL-only grad of {name}")
        assert torch.equal(g[below], torch.zeros_like(g[below]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_free_bits_tie_passes_no_gradient_like_the_reference(device, reduction, dtype):
    """A position whose batch-mean KL equals the floor exactly gets no KL gradient, in the kernels
    and in the reference (whatever torch.clamp's rule at a tie in the installed torch); above it
    the plain gradient."""
    # kl element 1/2 (mu^2 + e^0 - 1 - 0) = mu^2 / 2: column 0 exactly at the floor 0.5 (mu = 1),
    # column 1 above it (mu = 2), column 2 below (mu = 0)
    mu = torch.tensor([[1.0, 2.0, 0.0]] * 4, dtype=dtype, device=device)
    logvar = torch.zeros_like(mu)
    eps = torch.zeros_like(mu)
    grads = {}
    for name, f in (("fused", fastelbo.reparameterize_kl), ("reference", reference.reparameterize_kl)):
        m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        _, kl = f(m, lv, reduction=reduction, free_bits=0.5, eps=eps)
        kl.backward()
        grads[name] = (m.grad, lv.grad)
    for got, want in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    mu_grad = grads["fused"][0]
    assert torch.equal(mu_grad[:, 0], torch.zeros_like(mu_grad[:, 0]))  # the tie
    assert bool((mu_grad[:, 1] > 0).all())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(device, reduction):
    mu, logvar, eps = sample_inputs((3, 4), torch.float64, device, seed=stable_seed("gc", reduction))
    assert torch.autograd.gradcheck(fused(reduction), (mu, logvar, eps))


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_gradcheck_num_samples_and_free_bits(device, reduction):
    mu, logvar, eps = sample_inputs((4, 2, 3), torch.float64, device, seed=stable_seed("gcK", reduction),
                                    num_samples=3)
    lam, margin = free_bits_between(mu, logvar)
    # gradcheck perturbs inputs by 1e-6: kbar_j moves by ~1e-6, far less than the margin.
    assert margin > 1e-3
    f = fused(reduction, num_samples=3, free_bits=lam)
    assert torch.autograd.gradcheck(f, (mu, logvar, eps))
    assert torch.autograd.gradcheck(fused(reduction, num_samples=3), (mu, logvar, eps))



# Rows longer than one CPU task (16384 elements), of odd length (tasks start mid Philox group).
LARGE_SHAPE = (3, 16389)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_large_rows_z_and_grads(device, reduction, dtype):
    """z and the gradients (elementwise) at rows spanning several CPU tasks."""
    seed = stable_seed("large", reduction, dtype)
    mu, logvar, eps = sample_inputs(LARGE_SHAPE, dtype, device, seed=seed)
    f, r = fused(reduction), ref(reduction)
    z, kl = f(mu.detach(), logvar.detach(), eps)
    grad_outputs = random_grad_outputs((z, kl), reduction, seed=seed + 1)
    outs, grads = run_with_grads(f, (mu, logvar, eps), grad_outputs)
    outs_same, grads_same = run_with_grads(r, (mu, logvar, eps), grad_outputs)
    outs64, grads64 = run_with_grads(r, (mu, logvar, eps), [g.double() for g in grad_outputs],
                                     dtype=torch.float64)
    assert_close_fp64(outs[0], outs_same[0], outs64[0], "z")
    for i, name in enumerate(("mu", "logvar")):
        assert_close_fp64(grads[i], grads_same[i], grads64[i], f"grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_large_rows_kl_accuracy(device, dtype):
    """The reduced KL at rows spanning several CPU tasks, on fresh random inputs (4 draws, every
    reduction), judged like every other value: within 2x the same-dtype plain-PyTorch error."""
    failures = []
    for seed in range(4):
        mu, logvar, eps = sample_inputs(LARGE_SHAPE, dtype, device, seed=seed, requires_grad=False)
        for reduction in REDUCTIONS:
            kl = fused(reduction)(mu, logvar, eps)[1]
            kl_same = ref(reduction)(mu, logvar, eps)[1]
            kl64 = ref(reduction)(mu.double(), logvar.double(), eps.double())[1]
            try:
                assert_close_fp64(kl, kl_same, kl64, f"kl seed={seed} {reduction}")
            except AssertionError as error:
                failures.append(str(error).splitlines()[0])
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("free_bits", [0.0, 0.05], ids=["plain", "free-bits"])
def test_kl_sum_accuracy_many_equal_terms(device, free_bits):
    """Millions of equal KL terms (about 0.1 each): added one after another in float32 their sum
    drifts (each rounding has the same sign). Free bits' per-position batch sums lost 1% at
    B = 2^20 that way on the CPU, and the CPU's whole-tensor sum of 256 pieces 1.8e-6; on CUDA a
    float32 simulation of the free-bits kernel's old order gave 2e-6 at 2^22. Cascaded (CPU) or
    compensated and paired (CUDA), they are judged like every other value: within 2x the
    same-dtype plain-PyTorch error."""
    failures = []
    for B, D in ((2**22, 1), (2**20, 4)):
        mu = torch.full((B, D), 0.4472, device=device)
        zeros = torch.zeros((B, D), device=device)
        for reduction in ("sum", "batchmean"):
            kl = fused(reduction, free_bits=free_bits)(mu, zeros, zeros)[1]
            kl_same = ref(reduction, free_bits=free_bits)(mu, zeros, zeros)[1]
            kl64 = ref(reduction, free_bits=free_bits)(mu.double(), zeros.double(), zeros.double())[1]
            try:
                assert_close_fp64(kl, kl_same, kl64, f"kl ({B}, {D}) {reduction}")
            except AssertionError as error:
                failures.append(str(error).splitlines()[0])
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=dtype_id)
def test_kl_sum_accuracy_one_large_term(device, dtype):
    """Minimal deterministic case of the summation error: one sample whose first KL term is ~2^24
    followed by 16383 terms of exactly 0.5 (mu = 1, logvar = 0). Sequential float32 accumulation
    rounds every `2^24 + 0.5` back to 2^24 and loses 8191.5; torch.sum (cascade) is exact."""
    n = 16384
    mu = torch.ones(1, n, dtype=dtype)
    mu[0, 0] = 5792.0  # kl = 0.5 * 5792^2 = 16773632, just below 2^24
    mu = mu.to(device)
    logvar = torch.zeros(1, n, dtype=dtype, device=device)
    eps = torch.zeros(1, n, dtype=dtype, device=device)
    kl = fused("sum")(mu, logvar, eps)[1]
    kl_same = ref("sum")(mu, logvar, eps)[1]
    kl64 = ref("sum")(mu.double(), logvar.double(), eps.double())[1]
    assert kl64.item() == 0.5 * 5792.0**2 + 0.5 * (n - 1)
    assert_close_fp64(kl, kl_same, kl64, "kl")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_kl_relative_accuracy_near_collapse(device, dtype, cpu_code_path):
    """A collapsed posterior (mu = 0, logvar near 0) has a KL of about logvar^2 / 2 per element.
    Computed as expm1(logvar) - logvar in float32, the subtraction cancels the leading logvar and
    leaves only its last bits: relative errors of 0.1 at |logvar| ~ 1e-6 (the plain-PyTorch
    float32 formula has the same flaw, so the 2x-reference rule of the other tests cannot see it).
    Per-sample KLs of one element each ("none", D = 1) against float64 math on the same inputs,
    within a few float32 units, from |logvar| = 1e-6 up to the series' edge at 1/2. (float64
    inputs are left out: there expm1 - logvar keeps a relative error of ~1e-16 / |logvar|.)"""
    gen = torch.Generator().manual_seed(stable_seed("collapse", dtype))
    magnitude = torch.logspace(-6, math.log10(0.499), 4096, dtype=torch.float64)
    sign = torch.where(torch.rand(4096, generator=gen) < 0.5, -1.0, 1.0).double()
    logvar = (sign * magnitude).to(dtype).reshape(-1, 1)
    logvar = logvar[logvar != 0].reshape(-1, 1)  # float16 rounds the smallest to 0, where kl is 0
    mu = torch.zeros_like(logvar)
    eps = torch.zeros_like(logvar)
    kl = fused("none")(mu.to(device), logvar.to(device), eps.to(device))[1].cpu()
    lv = logvar.double().reshape(-1)
    want = 0.5 * (torch.expm1(lv) - lv)
    relative = ((kl.double() - want).abs() / want).max().item()
    allowed = 4 * torch.finfo(torch.float32).eps
    assert relative <= allowed, f"max relative error {relative:.3g} > {allowed:.3g}"
