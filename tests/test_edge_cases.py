"""Edge cases of both public functions: non-contiguous inputs, inputs never modified, empty
batches, NaN/Inf propagation, fp16 with a large logvar, and every output element written
(poisoned CPU allocations)."""
import pytest
import torch

import fastelbo
from fastelbo import reference

from conftest import (
    DTYPES,
    REDUCTIONS,
    assert_close_fp64,
    compare_three_ways,
    dtype_id,
    loss_dtype,
    random_grad_outputs,
    recon_inputs,
    run_with_grads,
    sample_inputs,
    stable_seed,
)


def reparam(reduction, **kw):
    return lambda mu, logvar, eps: fastelbo.reparameterize_kl(mu, logvar, reduction=reduction, eps=eps, **kw)


def recon(reduction):
    return lambda x_hat, x: fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)


def assert_all_equal(xs, ys, what=""):
    assert len(xs) == len(ys)
    for i, (a, b) in enumerate(zip(xs, ys)):
        if a is None or b is None:
            assert a is None and b is None, f"{what} {i}"
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what} {i}"
        assert torch.equal(a, b), f"{what} {i} differs"


# ---- non-contiguous inputs --------------------------------------------------------------------

def non_contiguous_views(t, kind):
    """A non-contiguous tensor equal to t."""
    if kind == "transposed":
        return t.detach().transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t.detach()
        return big[..., ::2]
    if kind == "channels_last":
        return t.detach().contiguous(memory_format=torch.channels_last)
    if kind == "expanded_batch":  # stride 0 along the batch: every sample is the same
        return t.detach()[:1].expand_as(t)
    raise ValueError(kind)


KINDS = ["transposed", "sliced", "channels_last", "expanded_batch"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_non_contiguous_inputs(device, reduction, dtype, kind):
    shape = (3, 4, 5, 6)
    seed = stable_seed("nc", reduction, dtype, kind)
    mu, logvar, eps = sample_inputs(shape, dtype, device, seed=seed, num_samples=2)
    x_hat, x = recon_inputs(shape, dtype, device, seed=seed + 1, x_grad=True)
    if kind == "expanded_batch":
        mu, logvar, x_hat, x = (t.detach()[:1].expand_as(t).contiguous().requires_grad_() for t in (mu, logvar, x_hat, x))
        eps = eps[:, :1].expand_as(eps).contiguous()
    views = [non_contiguous_views(t, kind).requires_grad_(t.requires_grad) for t in (mu, logvar, x_hat, x)]
    if kind == "expanded_batch":  # eps is (K, B, ...): expand along its batch dim, 1
        eps_view = eps[:, :1].expand_as(eps)
    else:
        eps_view = non_contiguous_views(eps, "transposed" if kind == "channels_last" else kind)
    assert not all(t.is_contiguous() for t in views + [eps_view])

    f = reparam(reduction, num_samples=2)
    z, kl = f(mu.detach(), logvar.detach(), eps)
    g_out = random_grad_outputs((z, kl), reduction, seed=seed + 2)
    # non-contiguous grad_outputs too
    g_out_nc = [non_contiguous_views(g, "transposed") if g.dim() > 1 else g for g in g_out]
    outs_c, grads_c = run_with_grads(f, (mu, logvar, eps), g_out)
    outs_nc, grads_nc = run_with_grads(f, (views[0], views[1], eps_view), g_out_nc)
    assert_all_equal(outs_c, outs_nc, "reparameterize_kl output")
    assert_all_equal(grads_c, grads_nc, "reparameterize_kl grad")

    loss = recon(reduction)(x_hat.detach(), x.detach())
    for g in (random_grad_outputs((loss,), reduction, seed=seed + 3), [torch.ones_like(loss)]):
        outs_c, grads_c = run_with_grads(recon(reduction), (x_hat, x), g)
        outs_nc, grads_nc = run_with_grads(recon(reduction), (views[2], views[3]), g)
        if kind == "channels_last":
            # Read in place and summed in memory order (csrc/ops.cpp, recon_operands): the same
            # gradients, the losses to within float32 rounding of a different summation order.
            torch.testing.assert_close(outs_nc[0], outs_c[0], rtol=1e-6, atol=0)
        else:
            assert_all_equal(outs_c, outs_nc, "recon output")
        assert_all_equal(grads_c, grads_nc, "recon grad")



def test_chunked_moments_are_copied_once_per_step(device):
    """mu and logvar as the two halves of an encoder's moments (chunked along dim 1, the
    latent-diffusion convention; non-contiguous): the forward copies each to contiguous memory
    once and keeps the copies, so the backward copies nothing (it copied both again before)."""
    moments = torch.randn(8, 2 * 16, 4, 4, device=device, requires_grad=True)
    mu, logvar = moments.chunk(2, dim=1)
    assert not mu.is_contiguous()

    def latent_copies(prof):
        return [e.name for e in prof.events()
                if e.name in ("aten::contiguous", "aten::clone") and [8, 16, 4, 4] in e.input_shapes]

    grad_z = torch.randn(8, 16, 4, 4, device=device)
    torch.manual_seed(5)
    with torch.profiler.profile(record_shapes=True) as forward:
        z, kl = fastelbo.reparameterize_kl(mu, logvar)
    with torch.profiler.profile(record_shapes=True) as backward:
        torch.autograd.backward((z, kl), (grad_z, torch.tensor(0.5, device=device)))
    assert latent_copies(forward) == ["aten::contiguous", "aten::clone"] * 2
    assert latent_copies(backward) == []
    # the values and gradients of contiguous inputs, bit for bit (the same draw after the same seed)
    leaves = [t.detach().contiguous().requires_grad_() for t in (mu, logvar)]
    torch.manual_seed(5)
    z_c, kl_c = fastelbo.reparameterize_kl(*leaves)
    torch.autograd.backward((z_c, kl_c), (grad_z, torch.tensor(0.5, device=device)))
    assert torch.equal(z, z_c) and torch.equal(kl, kl_c)
    assert torch.equal(moments.grad, torch.cat([leaves[0].grad, leaves[1].grad], dim=1))


@pytest.mark.parametrize("which", ["mu", "logvar", "eps"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "transposed"])
def test_input_modified_in_place_before_backward_is_refused(device, which, contiguous):
    """Autograd's check that a saved input was not modified in place before the backward holds
    for every input of the sample+KL op, also when the op works on a contiguous copy of it."""
    def make(seed):
        t = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed)).to(device)
        return t if contiguous else t.t().contiguous().t()

    mu, logvar, eps = make(1).requires_grad_(), make(2).requires_grad_(), make(3)
    z, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps)
    with torch.no_grad():
        {"mu": mu, "logvar": logvar, "eps": eps}[which].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (z.sum() + kl).backward()

# ---- inputs never modified ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inputs_not_modified(device, reduction, dtype):
    seed = stable_seed("untouched", reduction, dtype)
    mu, logvar, eps = sample_inputs((4, 3, 5), dtype, device, seed=seed, num_samples=2)
    x_hat, x = recon_inputs((4, 15), dtype, device, seed=seed + 1, x_grad=True)
    free_bits = 0.3 if reduction != "none" else 0.0
    tensors = [mu, logvar, eps, x_hat, x]
    saved = [t.detach().clone() for t in tensors]

    for use_eps in (True, False):
        z, kl = fastelbo.reparameterize_kl(mu, logvar, reduction=reduction, num_samples=2,
                                           eps=eps if use_eps else None, free_bits=free_bits)
        g_out = random_grad_outputs((z, kl), reduction, seed=seed)
        g_saved = [g.clone() for g in g_out]
        torch.autograd.grad((z, kl), (mu, logvar), g_out)
        assert_all_equal(g_out, g_saved, "grad_output")
        assert_all_equal([t.detach() for t in tensors], saved, "input")

    for grad in ("random", "one"):
        loss = fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)
        g_out = random_grad_outputs((loss,), reduction, seed=seed) if grad == "random" else [torch.ones_like(loss)]
        g_saved = [g.clone() for g in g_out]
        torch.autograd.grad(loss, (x_hat, x), g_out)
        assert_all_equal(g_out, g_saved, "grad_output")
        assert_all_equal([t.detach() for t in tensors], saved, "input")


# ---- many short samples, reduction "none" ---------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(40000, 1), (12000, 3), (5000, 7)], ids=["40000x1", "12000x3", "5000x7"])
def test_many_short_samples_reduction_none(device, shape, dtype):
    """Samples of 1, 3 and 7 elements, enough of them for several CPU tasks, reduction "none": the
    CPU samples a task's samples as one run and splits the sums per sample (SampleSums), and the
    recon backward looks each element's incoming gradient up by its sample. Per-sample losses and
    the gradients for random weights (two draws of z), both ops, against float64 math."""
    seed = stable_seed("short-none", shape, dtype)
    mu, logvar, eps = sample_inputs(shape, dtype, device, seed=seed, num_samples=2)
    fused_kl = reparam("none", num_samples=2)
    reference_kl = lambda m, lv, e: reference.reparameterize_kl(m, lv, reduction="none", eps=e, num_samples=2)
    weights = random_grad_outputs(fused_kl(mu.detach(), logvar.detach(), eps), "none", seed=seed + 1)
    compare_three_ways(fused_kl, reference_kl, (mu, logvar, eps), weights, ("mu", "logvar", "eps"))
    x_hat, x = recon_inputs(shape, dtype, device, seed=seed + 2, x_grad=True)
    reference_rec = lambda xh, xv: reference.gaussian_recon_loss(xh, xv, reduction="none")
    weights = random_grad_outputs((recon("none")(x_hat.detach(), x),), "none", seed=seed + 3)
    compare_three_ways(recon("none"), reference_rec, (x_hat, x), weights, ("x_hat", "x"))


# ---- empty batches --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 5), (0, 3, 4), (3, 0)], ids=["0x5", "0x3x4", "3x0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(device, reduction, dtype, shape):
    """The reduction's identity: 0 for sum/mean/batchmean (not NaN from 0/0), per-sample zeros
    for "none" (shape (B,)); gradients of the inputs' shape; nothing drawn from the generator."""
    mu = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
    logvar = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
    expected_loss_shape = (shape[0],) if reduction == "none" else ()
    generator_state = torch.cuda.get_rng_state if device == "cuda" else torch.get_rng_state
    for num_samples, free_bits in ((1, 0.0), (2, 0.0), (1, 0.5)):
        if free_bits and reduction == "none":
            continue
        state = generator_state()
        z, kl = fastelbo.reparameterize_kl(mu, logvar, reduction=reduction, num_samples=num_samples,
                                           free_bits=free_bits)
        assert torch.equal(generator_state(), state), "an empty batch drew from the generator"
        assert z.shape == ((num_samples, *shape) if num_samples > 1 else shape) and z.dtype == dtype
        assert kl.shape == expected_loss_shape and kl.dtype == loss_dtype(dtype)
        assert torch.equal(kl, torch.zeros_like(kl))
        grad_mu, grad_logvar = torch.autograd.grad((z.float().sum() + kl.float().sum()), (mu, logvar))
        assert grad_mu.shape == shape and grad_mu.dtype == dtype
        assert grad_logvar.shape == shape and grad_logvar.dtype == dtype

    x_hat = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
    x = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
    loss = fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)
    assert loss.shape == expected_loss_shape and loss.dtype == loss_dtype(dtype)
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in (torch.ones_like(loss), 0.5 * torch.ones_like(loss)):
        g_x_hat, g_x = torch.autograd.grad(loss, (x_hat, x), g, retain_graph=True)
        assert g_x_hat.shape == shape and g_x.shape == shape and g_x_hat.dtype == dtype


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_empty_batch(device, reduction):
    """The oracle agrees with the fused ops on an empty batch."""
    mu = torch.zeros(0, 5, device=device)
    _, kl = fastelbo.reparameterize_kl(mu, mu, reduction=reduction)
    _, kl_ref = reference.reparameterize_kl(mu, mu, reduction=reduction)
    assert kl_ref.shape == kl.shape and torch.equal(kl_ref, kl)
    loss_ref = reference.gaussian_recon_loss(mu, mu, reduction=reduction)
    assert torch.equal(loss_ref, fastelbo.gaussian_recon_loss(mu, mu, reduction=reduction))


# ---- NaN / Inf propagate ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("where", ["mu", "logvar"])
def test_nan_propagates_reparameterize_kl(device, dtype, where):
    mu, logvar, eps = sample_inputs((3, 5), dtype, device, seed=stable_seed("nan", dtype, where))
    with torch.no_grad():
        (mu if where == "mu" else logvar)[1, 2] = float("nan")
    z, kl_none = fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction="none")
    assert torch.isnan(z[1, 2])
    z_ok = torch.ones_like(z, dtype=torch.bool)
    z_ok[1, 2] = False
    assert torch.isfinite(z[z_ok]).all()
    assert torch.isnan(kl_none[1]) and torch.isfinite(kl_none[[0, 2]]).all()
    for reduction in ("sum", "mean", "batchmean"):
        assert torch.isnan(fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction=reduction)[1])
        # free bits: max(NaN, lam) must stay NaN
        assert torch.isnan(fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction=reduction, free_bits=0.1)[1])
    # the draw inside too
    z_drawn, _ = fastelbo.reparameterize_kl(mu, logvar, reduction="sum")
    assert torch.isnan(z_drawn[1, 2])
    # gradients at that position
    grad_mu, grad_logvar = torch.autograd.grad(kl_none.sum() + z.float().sum(), (mu, logvar))
    assert torch.isnan(grad_logvar[1, 2]) or torch.isnan(grad_mu[1, 2])


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
@pytest.mark.parametrize("where", ["mu", "logvar"])
def test_nan_under_free_bits_matches_the_reference(device, reduction, where):
    """A NaN in one latent element under free bits makes its position's batch-mean KL NaN: the
    loss is NaN, and that position gets no KL gradient in any sample, in the kernels as in the
    reference (a NaN is not above the floor). Every gradient, NaN or not, equals the
    reference's."""
    mu, logvar, eps = sample_inputs((4, 5), torch.float64, device, seed=stable_seed("nan-fb", where, reduction),
                                    num_samples=2)
    with torch.no_grad():
        (mu if where == "mu" else logvar)[1, 2] = float("nan")
    weights = torch.randn((2, 4, 5), generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    grads = {}
    for name, fn in (("fused", fastelbo.reparameterize_kl), ("reference", reference.reparameterize_kl)):
        z, kl = fn(mu, logvar, eps=eps, reduction=reduction, free_bits=0.1, num_samples=2)
        assert torch.isnan(kl)
        grads[name] = torch.autograd.grad((z * weights).sum() + kl, (mu, logvar))
    for got, want, name in zip(grads["fused"], grads["reference"], ("grad_mu", "grad_logvar")):
        torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m: f"{name}: {m}")
        outside = torch.ones_like(got, dtype=torch.bool)
        outside[1, 2] = False
        assert torch.isfinite(got[outside]).all(), f"{name}: the NaN reached other elements"


# (logvar where exp(logvar) overflows, logvar where exp(logvar / 2) does too) per dtype
OVERFLOWING_LOGVAR = {torch.float32: (100.0, 200.0), torch.float64: (750.0, 1500.0)}


@pytest.mark.parametrize("dtype", list(OVERFLOWING_LOGVAR), ids=dtype_id)
@pytest.mark.parametrize("used", ["z", "kl"])
def test_an_unused_output_adds_no_term_to_the_gradients(device, dtype, used):
    """With only z used, the gradients have no KL term, rather than 0 times it, which is NaN where
    mu is infinite or exp(logvar) overflows; with only the KL used, no z term (0 times an
    overflowed exp(logvar / 2) is NaN too). As in the reference: autograd skips an unused branch."""
    big, huge = OVERFLOWING_LOGVAR[dtype]
    mu = torch.tensor([[0.5, float("inf"), 1.0, -2.0]], dtype=dtype, device=device)
    logvar = torch.tensor([[big, 0.0, huge, 0.3]], dtype=dtype, device=device)
    eps = torch.tensor([[0.7, -1.1, 0.4, 1.5]], dtype=dtype, device=device)
    grads = {}
    for name, fn in (("fused", fastelbo.reparameterize_kl), ("reference", reference.reparameterize_kl)):
        m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        z, kl = fn(m, lv, eps=eps, reduction="sum")
        grads[name] = torch.autograd.grad(z.sum() if used == "z" else kl, (m, lv))
    for got, want, which in zip(grads["fused"], grads["reference"], ("grad_mu", "grad_logvar")):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, equal_nan=True, msg=lambda m: f"{which}: {m}")
        assert not torch.isnan(got).any(), f"{which}: {got}"


def test_backward_reads_a_strided_rng_state(device):
    """The backward op gets the forward's (seed, offset) as a tensor; a strided view of the same two
    values (as a traced graph may pass) regenerates the same eps."""
    ops = torch.ops.fastelbo
    mu, logvar = sample_inputs((4, 9), torch.float32, device, seed=stable_seed("strided-rng"), requires_grad=False,
                               with_eps=False)
    z, _, rng_state, position_mean = ops.reparameterize_kl(mu, logvar, None, None, 1, 1, 0.0)
    strided = torch.stack([rng_state, torch.zeros_like(rng_state)], dim=1)[:, 0]
    assert not strided.is_contiguous() and torch.equal(strided, rng_state)
    grad_z = torch.ones_like(z)
    want = ops.reparameterize_kl_backward(grad_z, None, mu, logvar, None, rng_state, position_mean, 1, 1, 0.0)
    got = ops.reparameterize_kl_backward(grad_z, None, mu, logvar, None, strided, position_mean, 1, 1, 0.0)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_inf_propagates_reparameterize_kl(device, dtype):
    mu, logvar, eps = sample_inputs((3, 5), dtype, device, seed=stable_seed("inf", dtype), requires_grad=False)
    # KL -> +inf as |mu| -> inf or logvar -> -inf. (logvar = +inf gives exp(inf) - inf = NaN in
    # the formula, in the reference too: only non-finite is required there.)
    mu[0, 0] = float("-inf")
    logvar[1, 1] = float("-inf")
    _, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction="none")
    assert kl[0].item() == float("inf") and kl[1].item() == float("inf") and torch.isfinite(kl[2:]).all()
    for reduction in ("sum", "mean", "batchmean"):
        _, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction=reduction)
        assert kl.item() == float("inf")
        # free bits: an infinite batch mean stays infinite (compensated sums must not make it NaN)
        _, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction=reduction, free_bits=0.1)
        assert kl.item() == float("inf")
    logvar[2, 2] = float("inf")
    _, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction="none")
    assert not torch.isfinite(kl[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("where", ["x_hat", "x"])
def test_nan_propagates_gaussian_recon_loss(device, dtype, where):
    x_hat, x = recon_inputs((3, 5), dtype, device, seed=stable_seed("nanrec", dtype, where), x_grad=True)
    with torch.no_grad():
        (x_hat if where == "x_hat" else x)[2, 4] = float("nan")
    loss = fastelbo.gaussian_recon_loss(x_hat, x, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[:2]).all()
    for reduction in ("sum", "mean", "batchmean"):
        loss_r = fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)
        assert torch.isnan(loss_r)
        for g in (1.0, 0.5):
            g_x_hat, g_x = torch.autograd.grad(loss_r, (x_hat, x), torch.tensor(g, device=device, dtype=loss_r.dtype),
                                               retain_graph=True)
            assert torch.isnan(g_x_hat[2, 4]) and torch.isnan(g_x[2, 4])
            assert torch.isfinite(g_x_hat[:2]).all() and torch.isfinite(g_x[:2]).all()
    x_hat2, x2 = recon_inputs((3, 5), dtype, device, x_grad=False)
    x2[0, 0] = float("inf")
    assert fastelbo.gaussian_recon_loss(x_hat2, x2, reduction="sum").item() == float("inf")


# ---- fp16 with a large logvar ---------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fp16_large_logvar(device, reduction):
    """logvar = 20 in fp16: exp(20) = 4.9e8 overflows fp16 (max 65504) but the KL, computed and
    returned in float32, is finite and matches float64 math. z = mu + exp(10) eps stays finite for
    |eps| <= 2 (it would overflow fp16 for |eps| > 2.97), so eps is given, in [-2, 2]."""
    g = torch.Generator().manual_seed(20)
    mu = (torch.randn(4, 6, generator=g)).half().to(device)
    logvar = torch.full((4, 6), 20.0, dtype=torch.float16, device=device)
    logvar[1] = torch.linspace(15, 20, 6, dtype=torch.float16)
    eps = (torch.rand(4, 6, generator=g) * 4 - 2).half().to(device)
    z, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction=reduction)
    assert kl.dtype == torch.float32 and torch.isfinite(kl).all()
    assert z.dtype == torch.float16 and torch.isfinite(z).all()
    z_same, kl_same = reference.reparameterize_kl(mu, logvar, eps=eps, reduction=reduction)
    z64, kl64 = reference.reparameterize_kl(mu.double(), logvar.double(), eps=eps.double(), reduction=reduction)
    assert_close_fp64(kl, kl_same, kl64, "kl")
    assert_close_fp64(z, z_same, z64, "z")


# ---- every output element is written --------------------------------------------------------------

def every_output(shape, dtype, seed, reductions=REDUCTIONS):
    """Every output of every compiled op (and of the public functions' backward, including the
    CPU grad == 1 path), over reductions, num_samples, free_bits, eps given or drawn, and each
    subset of incoming gradients / needed gradients."""
    ops = torch.ops.fastelbo
    outs = []
    for num_samples in (1, 2):
        mu, logvar, eps = sample_inputs(shape, dtype, "cpu", seed=seed, num_samples=num_samples,
                                        requires_grad=False)
        for reduction in reductions:
            code = fastelbo.ops.REDUCTIONS[reduction]
            for free_bits in ((0.0,) if reduction == "none" else (0.0, 0.4)):
                for e in (eps, None):
                    torch.manual_seed(seed)
                    z, kl, rng, kpm = ops.reparameterize_kl(mu, logvar, e, None, num_samples, code, free_bits)
                    assert kpm.numel() == (mu[0].numel() if free_bits > 0 else 0)
                    outs += [z, kl, rng, kpm]
                    g_z, g_kl = random_grad_outputs((z, kl), reduction, seed=seed + 1)
                    for grads in ((g_z, g_kl), (None, g_kl), (g_z, None)):
                        outs += list(ops.reparameterize_kl_backward(*grads, mu, logvar, e, rng, kpm,
                                                                    num_samples, code, free_bits))
    x_hat, x = recon_inputs(shape, dtype, "cpu", seed=seed + 7, x_hat_grad=True, x_grad=True)
    for reduction in reductions:
        code = fastelbo.ops.REDUCTIONS[reduction]
        for save_grad_unit in (False, True):
            outs += list(ops.gaussian_recon_loss(x_hat.detach(), x.detach(), code, save_grad_unit))
        loss = outs[-2]
        g_out = random_grad_outputs((loss,), reduction, seed=seed + 8)[0]
        for need in ((True, False), (False, True), (True, True)):
            outs += list(ops.gaussian_recon_loss_backward(g_out, x_hat.detach(), x.detach(), code, *need))
        for requires in ((True, False), (True, True), (False, True)):
            inputs = (x_hat.detach().requires_grad_(requires[0]), x.detach().requires_grad_(requires[1]))
            scalar = (lambda a, b: recon(reduction)(a, b).sum()) if reduction == "none" else recon(reduction)
            _, grads = run_with_grads(scalar, inputs)  # incoming gradient exactly 1
            outs += [g for g in grads if g is not None]
    return outs


@pytest.mark.parametrize(
    "shape, dtype",
    [(s, d) for s in [(3, 7), (2, 3, 5)] for d in DTYPES]
    # rows over several CPU tasks (the kernels are templates: one dtype exercises the cut)
    + [((2, 16389), torch.float32)],
    ids=[f"{s}-{dtype_id(d)}" for s in ["3x7", "2x3x5"] for d in DTYPES] + ["2x16389-float32"],
)
def test_every_output_written(junk_fill, shape, dtype, cpu_code_path):
    """CPU only (the junk fill is a CPU allocator flag), on the vector paths and on the portable
    scalar code. Every output is computed twice: with new CPU allocations junk-filled (NaN for
    float32 outputs, other garbage for the other dtypes) and without; an element a kernel forgets
    to write would hold junk in one run and not the other. The values themselves are checked
    against float64 math by the other tests."""
    seed = stable_seed("junk", shape, dtype)
    # at the large size, one unreduced and one reduced case keep the test fast
    reductions = REDUCTIONS if shape[-1] < 1000 else ("none", "mean")
    junk_fill(False)
    clean = every_output(shape, dtype, seed, reductions)
    junk_fill(True)
    probe = torch.empty(1024)
    assert torch.isnan(probe).all(), "the junk fill is not active"
    poisoned = every_output(shape, dtype, seed, reductions)
    assert len(clean) == len(poisoned)
    for i, (a, b) in enumerate(zip(clean, poisoned)):
        assert not torch.isnan(b).any(), f"output {i} ({tuple(b.shape)}, {b.dtype}) has NaN: unwritten elements"
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b), f"output {i} ({tuple(b.shape)}, {b.dtype}) depends on the allocation's contents"


def test_empty_batch_junk_filled(junk_fill):
    """The identity 0 is written, not left as junk."""
    for reduction in ("sum", "mean", "batchmean"):
        for shape in ((0, 4), (3, 0)):
            mu = torch.zeros(shape)
            assert fastelbo.reparameterize_kl(mu, mu, reduction=reduction)[1].item() == 0.0
            assert fastelbo.reparameterize_kl(mu, mu, reduction=reduction, free_bits=0.5)[1].item() == 0.0
            assert fastelbo.gaussian_recon_loss(mu, mu, reduction=reduction).item() == 0.0
    mu = torch.zeros(3, 0)
    assert torch.equal(fastelbo.reparameterize_kl(mu, mu, reduction="none")[1], torch.zeros(3))
    assert torch.equal(fastelbo.gaussian_recon_loss(mu, mu, reduction="none"), torch.zeros(3))


@pytest.mark.parametrize("limit_mb, expect_kept_mib", [("0", 0), ("5", 4), (None, 16), ("1GB", 16), ("-5", 16)],
                         ids=["disabled", "5MB", "default", "not-a-number", "negative"])
def test_cpu_cache_limit_from_the_environment(limit_mb, expect_kept_mib):
    """FASTELBO_CPU_CACHE_MB caps the bytes the CPU output cache keeps while unused (0 disables
    it; default 1024): four freed 4 MiB gradients leave 0, one (5 MB fits one) or all four
    cached. A value that is not a whole number >= 0 is reported, and the default kept. Run in a
    fresh process, since the limit is read once."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, fastelbo\n"
        "from fastelbo import _C\n"
        "x = torch.zeros(1, 2**20)\n"
        "one = torch.tensor(1.0)\n"
        "grads = [torch.ops.fastelbo.gaussian_recon_loss_backward(one, x, x, 1, True, False)[0] for _ in range(4)]\n"
        "del grads\n"
        "print(_C._cpu_cache_bytes())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTELBO_CPU_CACHE_MB"}
    if limit_mb is not None:
        env["FASTELBO_CPU_CACHE_MB"] = limit_mb
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) == expect_kept_mib * 2**20
    reported = f"FASTELBO_CPU_CACHE_MB={limit_mb} is not a whole number" in out.stderr
    assert reported == (limit_mb in ("1GB", "-5")), out.stderr


def test_cpu_buffer_cache_reuses_and_empties():
    """Large CPU outputs come back to fastelbo's buffer cache when freed and are reused; values stay
    correct on reused (dirty) buffers, and empty_cpu_cache() releases them."""
    from fastelbo import _C
    fastelbo.empty_cpu_cache()
    assert _C._cpu_cache_bytes() == 0
    x_hat = torch.randn(4, 100000, requires_grad=True)  # 1.6 MB gradient: cached size class
    x = torch.randn(4, 100000)
    for _ in range(2):
        loss = fastelbo.gaussian_recon_loss(x_hat, x * 2.0, reduction="sum")
        loss.backward()
        expected = x_hat.detach() - x * 2.0
        torch.testing.assert_close(x_hat.grad, expected, rtol=0, atol=0)
        x_hat.grad = None  # frees the gradient buffer into the cache
        assert _C._cpu_cache_bytes() > 0
        x = torch.randn(4, 100000)
    fastelbo.empty_cpu_cache()
    assert _C._cpu_cache_bytes() == 0


@pytest.mark.parametrize("name", ["cuda_clusters", "cuda_one_block", "cuda_large_blocks", "cuda_spread"])
def test_cuda_switches_read_the_environment(name):
    """FASTELBO_CUDA_CLUSTERS=0 turns the CUDA small-grid cluster reduction off, and
    FASTELBO_CUDA_ONE_BLOCK=0 the one-block shape of the smallest reductions, and
    FASTELBO_CUDA_LARGE_BLOCKS=0 the large blocks of the memory-bound grids, and
    FASTELBO_CUDA_SPREAD=0 the spreading of tall-batch and many-draw problems over more threads;
    anything else (or
    nothing) leaves them on, and the setters return the previous setting. Any build, any machine:
    the switches are read on the host (tests/test_cuda.py checks both settings on a GPU)."""
    import os
    import subprocess
    import sys
    variable, getter, setter = f"FASTELBO_{name.upper()}", f"_{name}_enabled", f"_set_{name}"
    code = (f"import fastelbo; c = fastelbo._C; "
            f"print(c.{getter}(), c.{setter}(True), c.{setter}(False), c.{getter}())")
    for value, want in (("0", ["False", "False", "True", "False"]), ("1", ["True", "True", "True", "False"]),
                        (None, ["True", "True", "True", "False"])):
        env = {k: v for k, v in os.environ.items() if k != variable}
        if value is not None:
            env[variable] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-4:] == want, (value, out.stdout)


def test_cpu_vector_path_switch():
    """_set_cpu_vector_paths(False) really sends the CPU kernels down the portable scalar code
    (what aarch64 and x86 without AVX2 run), and returns the previous setting. Where the processor
    is x86-64 with AVX2, float32 normals of the two paths differ in the last bits of some elements
    (SLEEF's vector log and sincos against libm's) and agree to float32 rounding; elsewhere there
    is no vector path, so the switch changes nothing."""
    import platform
    _C = fastelbo._C
    zeros = torch.zeros(64, 4096)

    def draw():
        torch.manual_seed(5)
        z, _ = fastelbo.reparameterize_kl(zeros, zeros)  # z = eps
        return z

    assert _C._cpu_vector_paths_enabled()
    vector = draw()
    assert _C._set_cpu_vector_paths(False) is True
    try:
        assert not _C._cpu_vector_paths_enabled()
        portable = draw()
    finally:
        assert _C._set_cpu_vector_paths(True) is False
    assert torch.equal(draw(), vector)
    has_avx2 = (platform.machine().lower() in ("x86_64", "amd64")
                and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
    if has_avx2:
        differ = (vector != portable).sum().item()
        assert 0 < differ < vector.numel() // 10, differ
        torch.testing.assert_close(vector, portable, rtol=3e-6, atol=3e-6)
    else:
        assert torch.equal(vector, portable)
