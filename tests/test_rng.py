"""The random numbers of fastelbo.reparameterize_kl (README, API: `generator`).

eps drawn inside the kernel: its distribution (moments, tails, a Kolmogorov-Smirnov check against
the normal CDF) and independence, with bounds from the standard errors (5 sigma); the backward
regenerating the forward's eps; reproducibility with torch.manual_seed and generator=; results
independent of the thread count.
"""
import math

import pytest
import torch

import fastelbo
from fastelbo import reference

from conftest import (
    REDUCTIONS,
    assert_close_fp64,
    default_rng_state,
    random_grad_outputs,
    recon_inputs,
    run_with_grads,
    sample_inputs,
    stable_seed,
)

SIGMAS = 5.0  # every statistical bound below: 5 standard errors
N_SAMPLES = 1 << 22  # ~4.2 million draws per distribution check


def draw_eps(shape, dtype, device, num_samples=1, generator=None):
    """eps as drawn by the kernel: with mu = 0 and logvar = 0, z = 0 + exp(0) * eps = eps exactly."""
    mu = torch.zeros(shape, dtype=dtype, device=device)
    z, _ = fastelbo.reparameterize_kl(mu, torch.zeros_like(mu), num_samples=num_samples,
                                      generator=generator, reduction="sum")
    return z


def correlation(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_eps_moments_tails_and_cdf(device, dtype):
    torch.manual_seed(1234)
    x = draw_eps((64, N_SAMPLES // 64), dtype, device).double().flatten()
    n = x.numel()
    assert torch.isfinite(x).all()

    mean = x.mean().item()
    centered = x - mean
    var = (centered**2).mean().item()
    skew = ((centered**3).mean() / var**1.5).item()
    kurt = ((centered**4).mean() / var**2).item()
    # standard errors of the sample moments of N(0, 1)
    assert abs(mean) < SIGMAS * math.sqrt(1 / n), mean
    assert abs(var - 1) < SIGMAS * math.sqrt(2 / n), var
    assert abs(skew) < SIGMAS * math.sqrt(6 / n), skew
    assert abs(kurt - 3) < SIGMAS * math.sqrt(24 / n), kurt

    # tail frequencies, binomial standard errors
    for t in (1.0, 2.0, 3.0, 4.0):
        p = math.erfc(t / math.sqrt(2))  # P(|N(0,1)| > t)
        freq = (x.abs() > t).double().mean().item()
        assert abs(freq - p) < SIGMAS * math.sqrt(p * (1 - p) / n), (t, freq, p)

    # Kolmogorov-Smirnov: sqrt(n) * D < 2.75 has probability 1 - 6e-7 under the null hypothesis
    s = x.sort().values
    cdf = torch.special.ndtr(s)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=s.device)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert math.sqrt(n) * d < 2.75, d


def test_eps_independence(device):
    """Correlation ~0 (5 standard errors, 1/sqrt(n)) between elements at lags 1..5 (inside and
    across Box-Muller pairs and Philox groups), between their squares (dependence that a zero
    correlation would miss), between the K draws of num_samples, and between consecutive calls."""
    torch.manual_seed(99)
    n = 1 << 20
    z = draw_eps((4, n // 4), torch.float32, device, num_samples=3).double()
    bound = SIGMAS / math.sqrt(n)
    x = z[0].flatten()
    for lag in range(1, 6):
        assert abs(correlation(x[:-lag], x[lag:])) < bound, lag
        assert abs(correlation(x[:-lag] ** 2, x[lag:] ** 2)) < bound, lag
    # same element, different draw k
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert abs(correlation(z[a].flatten(), z[b].flatten())) < bound, (a, b)
        assert abs(correlation(z[a].flatten() ** 2, z[b].flatten() ** 2)) < bound, (a, b)
    # same element, next row (the counter runs over the whole tensor, not per row)
    rows = z[0]
    assert abs(correlation(rows[:-1].flatten(), rows[1:].flatten())) < SIGMAS / math.sqrt(rows[1:].numel())
    # consecutive calls
    z2 = draw_eps((4, n // 4), torch.float32, device, num_samples=3).double()
    assert abs(correlation(z[0].flatten(), z2[0].flatten())) < bound
    # each draw k is itself standard normal
    for k in range(3):
        assert abs(z[k].mean().item()) < SIGMAS / math.sqrt(n)
        assert abs(z[k].var().item() - 1) < SIGMAS * math.sqrt(2 / n)


def test_philox_known_answers():
    """Philox4x32-10 against the Random123 known-answer vectors (kat_vectors)."""
    philox = fastelbo._C.philox4x32_10
    assert philox([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert philox([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_eps_is_philox_box_muller_of_seed_offset_index(device):
    """The normal of element i of draw k depends only on (seed, offset + k, i)
    through Philox4x32-10 and Box-Muller (counter layout in csrc/elbo_math.h), so the CPU and CUDA
    kernels can agree. Recomputed here in float64 from the rng_state the op returns."""
    mu = torch.zeros(3, 7, dtype=torch.float64, device=device)
    torch.manual_seed(7)
    z, _, rng_state, _ = torch.ops.fastelbo.reparameterize_kl(mu, torch.zeros_like(mu), None, None, 2, 1, 0.0)
    seed, offset = (int(v) & 0xFFFFFFFFFFFFFFFF for v in rng_state.cpu().tolist())
    tag = 0xE1B05EED
    philox = fastelbo._C.philox4x32_10
    expected = torch.empty(2, 21, dtype=torch.float64)
    for k in range(2):
        stream = offset + k
        for group in range(6):
            bits = philox([group & 0xFFFFFFFF, group >> 32, stream & 0xFFFFFFFF,
                           ((stream >> 32) & 0xFFFFFFFF) ^ tag], [seed & 0xFFFFFFFF, seed >> 32])
            u = [b * 2.0**-32 + 2.0**-33 for b in bits]
            normals = []
            for pair in range(2):
                radius = math.sqrt(-2 * math.log(u[2 * pair]))
                angle = 2 * math.pi * u[2 * pair + 1]
                normals += [radius * math.cos(angle), radius * math.sin(angle)]
            for lane in range(4):
                if 4 * group + lane < 21:
                    expected[k, 4 * group + lane] = normals[lane]
    torch.testing.assert_close(z.cpu().reshape(2, 21), expected, rtol=1e-12, atol=1e-12)


# ---- the backward regenerates the forward's eps -------------------------------------------------

@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("shape", [(5, 7), (3, 16389)], ids=["5x7", "3x16389"])
def test_backward_regenerates_forward_eps(device, shape, reduction, num_samples):
    """With eps drawn inside, the gradients equal the float64 reference's with eps recovered from
    z as (z - mu) / std. (3, 16389): rows span several CPU tasks and do not start on a Philox
    group boundary."""
    seed = stable_seed("regen", shape, reduction, num_samples)
    mu, logvar = sample_inputs(shape, torch.float64, device, seed=seed, with_eps=False)
    torch.manual_seed(seed)
    z, kl = fastelbo.reparameterize_kl(mu, logvar, reduction=reduction, num_samples=num_samples)
    grad_outputs = random_grad_outputs((z, kl), reduction, seed=seed + 1)
    grads = torch.autograd.grad((z, kl), (mu, logvar), grad_outputs)

    eps = ((z.detach() - mu.detach()) / torch.exp(0.5 * logvar.detach()))
    assert eps.abs().max() < 7 and eps.std() > 0.5  # a real draw, not zeros
    f = lambda m, lv: reference.reparameterize_kl(m, lv, reduction=reduction, num_samples=num_samples, eps=eps)
    (z_ref, kl_ref), grads_ref = run_with_grads(f, (mu, logvar), grad_outputs)
    torch.testing.assert_close(z.detach(), z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl.detach(), kl_ref, rtol=1e-12, atol=1e-12)
    for name, g, g_ref in zip(("mu", "logvar"), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad of {name}: {m}")


def test_backward_uses_its_own_forward_state(device):
    """Two forwards, then their backwards in reverse order: each regenerates its own eps, not the
    generator's current state."""
    mu, logvar = sample_inputs((4, 9), torch.float64, device, seed=5, with_eps=False)
    zs = [fastelbo.reparameterize_kl(mu, logvar, reduction="sum")[0] for _ in range(2)]
    assert not torch.equal(zs[0], zs[1])
    torch.rand(10)  # the default generator moves on
    for z in reversed(zs):
        g_z = torch.ones_like(z)
        grad_mu, grad_logvar = torch.autograd.grad(z, (mu, logvar), g_z)
        eps = (z.detach() - mu.detach()) / torch.exp(0.5 * logvar.detach())
        torch.testing.assert_close(grad_mu, g_z, rtol=0, atol=0)
        torch.testing.assert_close(grad_logvar, 0.5 * (z.detach() - mu.detach()), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_logvar, 0.5 * torch.exp(0.5 * logvar.detach()) * eps,
                                   rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_recomputes_the_same_draw(device, use_reentrant):
    """torch.utils.checkpoint reruns the encoder -> sample -> decoder segment in the backward. It
    restores the default generator first (preserve_rng_state), so the rerun draws the eps of the
    first run: values and gradients equal those of the plain step bit for bit. Without that
    restore the rerun draws anew and the gradients change (so this test sees a redraw)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    encoder = torch.nn.Linear(6, 2 * 4).to(device)
    decoder = torch.nn.Linear(4, 6).to(device)
    params = [*encoder.parameters(), *decoder.parameters()]
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1)).to(device)

    def segment(x):
        mu, logvar = encoder(x).chunk(2, dim=1)
        z, kl = fastelbo.reparameterize_kl(mu, logvar)
        return fastelbo.gaussian_recon_loss(decoder(z), x) + kl

    def step(mode):
        for p in params:
            p.grad = None
        torch.manual_seed(3)
        inputs = x.clone().requires_grad_(use_reentrant)  # the reentrant form needs an input with grad
        if mode == "plain":
            loss = segment(inputs)
        else:
            loss = checkpoint(segment, inputs, use_reentrant=use_reentrant,
                              preserve_rng_state=(mode == "checkpoint"))
        loss.backward()
        return [loss.detach(), *(p.grad.clone() for p in params)]

    plain, checkpointed, unrestored = step("plain"), step("checkpoint"), step("no-rng-restore")
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)
    assert torch.equal(plain[0], unrestored[0])  # the first run is the same draw ...
    assert not torch.equal(plain[1], unrestored[1])  # ... the rerun without the restore is not

# ---- reproducibility ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
def test_manual_seed_reproduces_bit_for_bit(device, dtype, cpu_code_path):
    mu, logvar = sample_inputs((6, 11), dtype, device, seed=3, with_eps=False)
    results = []
    for _ in range(2):
        torch.manual_seed(2024)
        z1, kl1 = fastelbo.reparameterize_kl(mu, logvar, reduction="none")
        z2, _ = fastelbo.reparameterize_kl(mu, logvar, reduction="none", num_samples=3)
        grads = torch.autograd.grad((z1.float().sum() + z2.float().sum() + kl1.sum()), (mu, logvar))
        results.append((z1, kl1, z2, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # consecutive calls draw different eps (nearly every element differs)
    z1, z2 = results[0][0], results[0][2]
    assert (z1 != z2[0]).float().mean() > 0.9
    assert (z2[0] != z2[1]).float().mean() > 0.9 and (z2[1] != z2[2]).float().mean() > 0.9
    torch.manual_seed(2025)
    z3, _ = fastelbo.reparameterize_kl(mu, logvar)
    assert (z3 != z1).float().mean() > 0.9


def test_calls_advance_the_default_generator(device):
    mu = torch.zeros(2, 5, device=device)
    state = default_rng_state(device)
    fastelbo.reparameterize_kl(mu, mu)
    after = default_rng_state(device)
    assert not torch.equal(state, after)


def test_generator_argument_is_used(device):
    mu, logvar = sample_inputs((5, 13), torch.float32, device, seed=4, with_eps=False)
    torch.manual_seed(0)
    default_state = default_rng_state(device)

    def with_generator(seed):
        g = torch.Generator(device=device).manual_seed(seed)
        state = g.get_state()
        z, kl = fastelbo.reparameterize_kl(mu, logvar, generator=g)
        assert not torch.equal(g.get_state(), state), "generator= was not advanced"
        grads = torch.autograd.grad((z.sum() + kl), (mu, logvar))
        return z, grads

    z_a, grads_a = with_generator(11)
    z_b, grads_b = with_generator(11)
    z_c, _ = with_generator(12)
    assert torch.equal(z_a, z_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert (z_a != z_c).float().mean() > 0.9
    # the default generator was not touched
    after = default_rng_state(device)
    assert torch.equal(default_state, after)
    # a call on the default generator draws something else
    z_default, _ = fastelbo.reparameterize_kl(mu, logvar)
    assert (z_default != z_a).float().mean() > 0.9


def assert_same_bits_under_threads(run):
    """run() -> a list of tensors, the same bits under 1, 2 and 3 threads (the caller's
    restore_num_threads fixture puts the thread count back)."""
    results = {}
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results[threads] = run()
    for threads in (2, 3):
        for i, (a, b) in enumerate(zip(results[1], results[threads])):
            assert torch.equal(a, b), f"result {i} differs between 1 and {threads} threads"


def test_thread_count_independence(device, restore_num_threads, cpu_code_path):
    """Bit-identical z, kl, gradients and recon loss under 1, 2 and 3 threads, at a size with
    several 16384-element tasks per row (the CPU kernels' chunks) and above the 32768-element
    parallel threshold."""
    shape = (4, 40000)
    mu, logvar = sample_inputs(shape, torch.float32, device, seed=8, with_eps=False)
    x_hat, x = recon_inputs(shape, torch.float32, device, seed=9, x_grad=True)

    def run():
        out = []
        for reduction in REDUCTIONS:
            torch.manual_seed(31)
            z, kl = fastelbo.reparameterize_kl(mu, logvar, reduction=reduction, num_samples=2)
            g_out = random_grad_outputs((z, kl), reduction, seed=1)
            out += [z, kl, *torch.autograd.grad((z, kl), (mu, logvar), g_out)]
            rec = fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)
            out += [rec, *torch.autograd.grad(rec, (x_hat, x), random_grad_outputs((rec,), reduction, seed=2))]
            if reduction != "none":
                out += list(torch.autograd.grad(fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction),
                                                (x_hat, x)))
                torch.manual_seed(32)
                z, kl = fastelbo.reparameterize_kl(mu, logvar, reduction=reduction, free_bits=0.6)
                out += [z, kl, *torch.autograd.grad((z.sum() + kl), (mu, logvar))]
        return out

    assert_same_bits_under_threads(run)


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_short_samples_over_several_tasks(device, restore_num_threads, reduction, cpu_code_path):
    """(3000, 7) float32: on the CPU short samples are grouped into tasks of whole samples (2340 per
    task here: three tasks, so several threads). Per-sample KL and recon, z and the gradients
    agree with float64 math on the same eps, and are bit-identical under 1, 2 and 3 threads."""
    shape = (3000, 7)
    mu, logvar = sample_inputs(shape, torch.float32, device, seed=14, with_eps=False)
    x_hat, x = recon_inputs(shape, torch.float32, device, seed=15)

    def run():
        torch.manual_seed(16)
        z, kl = fastelbo.reparameterize_kl(mu, logvar, reduction=reduction, num_samples=2)
        rec = fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)
        g_out = random_grad_outputs((z, kl), reduction, seed=17)
        g_rec = random_grad_outputs((rec,), reduction, seed=18)[0]
        grads = torch.autograd.grad((z, kl, rec), (mu, logvar, x_hat), (*g_out, g_rec))
        return [z, kl, rec, *grads], g_out, g_rec

    assert_same_bits_under_threads(lambda: run()[0])

    (z, kl, rec, g_mu, g_logvar, g_x_hat), g_out, g_rec = run()
    eps = (z.detach().double() - mu.detach().double()) / torch.exp(0.5 * logvar.detach().double())

    def reference_in(dtype):
        """The plain-PyTorch functions on `dtype` copies of the inputs, with the kernel's eps."""
        f = lambda m, lv, xh: (*reference.reparameterize_kl(m, lv, reduction=reduction, num_samples=2,
                                                            eps=eps.to(dtype)),
                               reference.gaussian_recon_loss(xh, x.detach().to(dtype), reduction=reduction))
        return run_with_grads(f, (mu, logvar, x_hat), (*g_out, g_rec), dtype=dtype)

    (_, kl_same, rec_same), grads_same = reference_in(torch.float32)
    (_, kl64, rec64), grads64 = reference_in(torch.float64)
    for name, got, same, want in (("kl", kl, kl_same, kl64), ("rec", rec, rec_same, rec64),
                                  ("grad_mu", g_mu, grads_same[0], grads64[0]),
                                  ("grad_logvar", g_logvar, grads_same[1], grads64[1]),
                                  ("grad_x_hat", g_x_hat, grads_same[2], grads64[2])):
        assert_close_fp64(got, same, want, name)


def test_free_bits_over_several_row_blocks(device, restore_num_threads, cpu_code_path):
    """(5000, 7), free bits, two draws: on the CPU the per-position batch sums run in 3 blocks of
    1667 samples, each block's short rows sampled as one run, on several threads. kl, z and the
    gradients are bit-identical under 1, 2 and 3 threads, and agree with float64 math on the same
    eps; the floor floors some positions and not others."""
    shape, free_bits = (5000, 7), 0.8
    mu, logvar = sample_inputs(shape, torch.float32, device, seed=19, with_eps=False, requires_grad=False)
    # position j's mean KL is about (s_j^2 + 0.65) / 2 with mu's scale s_j = j / 3: the first
    # three positions fall below the floor
    mu = (mu * torch.arange(shape[1], device=device) / 3).requires_grad_()
    logvar.requires_grad_()

    def run():
        torch.manual_seed(20)
        z, kl = fastelbo.reparameterize_kl(mu, logvar, reduction="batchmean", num_samples=2, free_bits=free_bits)
        g_z = random_grad_outputs((z,), "none", seed=21)[0]
        return [z, kl, *torch.autograd.grad((z, kl), (mu, logvar), (g_z, torch.tensor(1.3, device=device)))], g_z

    assert_same_bits_under_threads(lambda: run()[0])

    (z, kl, g_mu, g_logvar), g_z = run()
    m, lv = (t.detach().double() for t in (mu, logvar))
    eps = (z.detach().double() - m) / torch.exp(0.5 * lv)
    kl_element = 0.5 * (m * m + torch.expm1(lv) - lv)
    floored = (kl_element.mean(dim=0) < free_bits)
    assert 0 < floored.sum() < shape[1], "the floor should floor some positions and not others"

    def reference_in(dtype):
        """The plain-PyTorch function on `dtype` copies of the inputs, with the kernel's eps."""
        f = lambda m_, lv_: reference.reparameterize_kl(m_, lv_, reduction="batchmean", num_samples=2,
                                                        eps=eps.to(dtype), free_bits=free_bits)
        return run_with_grads(f, (mu, logvar), (g_z, torch.tensor(1.3, device=device)), dtype=dtype)

    (z_same, kl_same), (g_mu_same, g_logvar_same) = reference_in(torch.float32)
    (z64, kl64), (g_mu64, g_logvar64) = reference_in(torch.float64)
    for name, got, same, want in (("z", z, z_same, z64), ("kl", kl, kl_same, kl64),
                                  ("grad_mu", g_mu, g_mu_same, g_mu64),
                                  ("grad_logvar", g_logvar, g_logvar_same, g_logvar64)):
        assert_close_fp64(got, same, want, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
def test_elements_do_not_depend_on_reduction_or_batch_cut(device, dtype, cpu_code_path):
    """z and the per-element gradients of one draw are bit-identical whatever the reduction (the
    CPU kernels cut the work per sample for "none" and free bits, per tensor otherwise) and however
    the same elements are split into samples ((8, 37) against (1, 296) and (37, 8)): an element's
    value depends on (seed, offset, index) and its inputs, never on where a block of work starts."""
    mu, logvar = sample_inputs((8, 37), dtype, device, seed=12, with_eps=False)
    logvar = (3 * logvar).detach().requires_grad_()  # wide std range: exp's vector and scalar forms disagree somewhere
    g_z = torch.randn(mu.shape, generator=torch.Generator().manual_seed(13)).to(device, dtype)

    def run(shape, reduction, **kwargs):
        m = mu.detach().reshape(shape).requires_grad_()
        lv = logvar.detach().reshape(shape).requires_grad_()
        torch.manual_seed(77)
        z, _ = fastelbo.reparameterize_kl(m, lv, reduction=reduction, **kwargs)
        grads = torch.autograd.grad(z, (m, lv), g_z.reshape(shape))
        return [t.reshape(-1) for t in (z, *grads)]

    want = run((8, 37), "none")
    cases = [((8, 37), r, {}) for r in ("sum", "mean", "batchmean")]
    cases += [((8, 37), "sum", {"free_bits": 0.1}), ((1, 296), "sum", {}), ((1, 296), "none", {}),
              ((37, 8), "batchmean", {})]
    for shape, reduction, kwargs in cases:
        for name, a, b in zip(("z", "grad_mu", "grad_logvar"), want, run(shape, reduction, **kwargs)):
            assert torch.equal(a, b), f"{name} of {shape} {reduction} {kwargs} differs from (8, 37) none"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_draws_are_the_float32_draws_rounded(device, dtype, cpu_code_path):
    """16-bit inputs are computed in float32 with the same stream: after the same seed, z is the
    float32 op's z on the upcast inputs rounded to the 16-bit type (to within one unit in its last
    place: an FMA may round once where a multiply and an add round twice), and the float32 KL is
    that op's KL (summation order aside). Ties the 16-bit draws to the checked float32 ones."""
    mu, logvar = sample_inputs((6, 37), dtype, device, seed=21, with_eps=False, requires_grad=False)
    for num_samples in (1, 3):
        torch.manual_seed(99)
        z, kl = fastelbo.reparameterize_kl(mu, logvar, num_samples=num_samples, reduction="sum")
        torch.manual_seed(99)
        z32, kl32 = fastelbo.reparameterize_kl(mu.float(), logvar.float(), num_samples=num_samples, reduction="sum")
        assert z.dtype == dtype and kl.dtype == torch.float32
        want = z32.to(dtype).float()
        one_ulp = torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).smallest_normal)
        assert ((z.float() - want).abs() <= one_ulp).all(), f"K={num_samples}: z is not the float32 draw rounded"
        torch.testing.assert_close(kl, kl32, rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(1, 1), (5, 23), (3, 70), (2, 16389)])
def test_float32_normals_match_float64_stream(shape, cpu_code_path):
    """The float32 CPU normals (vectorized Box-Muller where AVX2 is available, including partial
    batches of Philox groups at row ends) are the float64 normals of the same (seed, offset) to
    float32 accuracy: same counter layout, lanes and transform. eps is read back through the
    backward op: with mu = logvar = 0, grad_z = 1 and no KL gradient, grad_logvar = eps / 2."""
    rng_state = torch.tensor([0x1234_5678_9ABC_DEF0 - 2**63, 977], dtype=torch.int64)
    eps = {}
    for dtype in (torch.float32, torch.float64):
        zeros = torch.zeros(shape, dtype=dtype)
        _, grad_logvar = torch.ops.fastelbo.reparameterize_kl_backward(
            torch.ones(shape, dtype=dtype), None, zeros, zeros, None, rng_state,
            torch.empty(0, dtype=dtype), 1, 1, 0.0)
        eps[dtype] = 2 * grad_logvar
    torch.testing.assert_close(eps[torch.float32].double(), eps[torch.float64], rtol=2e-6, atol=2e-6)


# ---- calls from several Python threads ---------------------------------------------------------------

def test_concurrent_calls_from_python_threads(device):
    """Ops called from several Python threads at once (the ops run without the GIL; the CPU buffer
    cache and the generators are shared): steps on their own generators give the serial results bit
    for bit, and calls on the default generator each take a (seed, offset) of their own, the same
    set that as many serial calls take."""
    import threading

    def step(seed):
        g = torch.Generator(device=device).manual_seed(seed)
        mu, logvar, x = (torch.randn(8, 200_000, generator=g, device=device) for _ in range(3))
        mu.requires_grad_()
        logvar.requires_grad_()
        z, kl = fastelbo.reparameterize_kl(mu, logvar, generator=g, reduction="none")
        rec = fastelbo.gaussian_recon_loss(0.5 * z, x, reduction="none")
        (rec + kl).sum().backward()
        return [t.detach() for t in (z, kl, rec, mu.grad, logvar.grad)]

    def run_threads(target, count):
        threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    serial = {seed: step(seed) for seed in range(4)}
    concurrent = {}
    errors = []

    def stepper(seed):
        try:
            for _ in range(2):
                concurrent[seed] = step(seed)
        except Exception as error:  # noqa: BLE001  (reported by the main thread)
            errors.append(error)

    run_threads(stepper, 4)
    assert not errors, errors
    for seed in serial:
        for name, a, b in zip(("z", "kl", "rec", "grad_mu", "grad_logvar"), serial[seed], concurrent[seed]):
            assert torch.equal(a, b), f"{name} of the step seeded {seed} differs from the serial run"

    zeros = torch.zeros(4, 1000, device=device)
    states = []

    def drawer(_):
        for _ in range(50):
            _, _, rng_state, _ = torch.ops.fastelbo.reparameterize_kl(zeros, zeros, None, None, 1, 1, 0.0)
            states.append(tuple(rng_state.cpu().tolist()))

    torch.manual_seed(0)
    run_threads(drawer, 8)
    torch.manual_seed(0)
    want = [tuple(torch.ops.fastelbo.reparameterize_kl(zeros, zeros, None, None, 1, 1, 0.0)[2].cpu().tolist())
            for _ in range(400)]
    assert len(states) == 400 and len(set(want)) == 400
    assert sorted(states) == sorted(want)
