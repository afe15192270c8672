"""fastelbo.gaussian_recon_loss against float64 math (fastelbo.reference on float64 copies).

Values and gradients for every reduction x dtype x shape, with a grad_output that is not 1 and with
the exact 1.0 of loss.backward() (the CPU op hands back a gradient prepared in the forward pass
then), for x_hat and/or x requiring grad; output dtypes and shapes; gradcheck in float64.
"""
import math

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
    stable_seed,
)

SHAPES = [(1, 1), (3, 7), (5, 17, 3), (2, 4, 5, 3), (16, 33)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
# which of (x_hat, x) require grad
REQUIRES = {"x_hat": (True, False), "x": (False, True), "both": (True, True)}


def fused(reduction):
    return lambda x_hat, x: fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)


def ref(reduction):
    return lambda x_hat, x: reference.gaussian_recon_loss(x_hat, x, reduction=reduction)


@pytest.mark.parametrize("requires", list(REQUIRES))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_values_and_grads_random_grad_output(device, reduction, dtype, shape, requires):
    """grad_output is not 1: random per-sample weights for "none", a random scalar otherwise."""
    seed = stable_seed("rec", reduction, dtype, shape)
    x_hat_grad, x_grad = REQUIRES[requires]
    x_hat, x = recon_inputs(shape, dtype, device, seed=seed, x_hat_grad=x_hat_grad, x_grad=x_grad)
    loss = fused(reduction)(x_hat.detach(), x.detach())
    grad_output = random_grad_outputs((loss,), reduction, seed=seed + 1)
    outs, grads = compare_three_ways(fused(reduction), ref(reduction), (x_hat, x), grad_output, ("x_hat", "x"))
    assert (grads[0] is not None) == x_hat_grad and (grads[1] is not None) == x_grad


@pytest.mark.parametrize("requires", list(REQUIRES))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_values_and_grads_loss_backward(device, reduction, dtype, shape, requires):
    """loss.backward() (incoming gradient exactly 1.0: the CPU fast path when x_hat requires
    grad), checked through .grad of the leaves. For "none" the per-sample vector is summed."""
    seed = stable_seed("rec1", reduction, dtype, shape)
    x_hat_grad, x_grad = REQUIRES[requires]
    x_hat, x = recon_inputs(shape, dtype, device, seed=seed, x_hat_grad=x_hat_grad, x_grad=x_grad)

    def scalar(fn):
        return (lambda a, b: fn(a, b).sum()) if reduction == "none" else fn

    compare_three_ways(scalar(fused(reduction)), scalar(ref(reduction)), (x_hat, x), None, ("x_hat", "x"))
    # literally loss.backward(), gradients in .grad, equal to the autograd.grad path
    _, grads = run_with_grads(scalar(fused(reduction)), (x_hat, x))
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x_hat, x)]
    scalar(fused(reduction))(*leaves).backward()
    for leaf, g in zip(leaves, grads):
        if leaf.requires_grad:
            assert leaf.grad is not None and torch.equal(leaf.grad, g)
        else:
            assert leaf.grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_loss_backward_twice_and_grad_modified_in_place(device, reduction, dtype):
    """The grad == 1 fast path hands back a buffer prepared in the forward: backward twice on a
    retained graph accumulates twice that gradient, and zeroing .grad in place (an optimizer's
    zero_grad(set_to_none=False)) between the two must not corrupt the second backward."""
    x_hat, x = recon_inputs((4, 9), dtype, device, seed=stable_seed("twice", reduction, dtype), x_grad=True)
    _, (g_x_hat, g_x) = run_with_grads(fused(reduction), (x_hat, x))
    loss = fused(reduction)(x_hat, x)
    loss.backward(retain_graph=True)
    assert torch.equal(x_hat.grad, g_x_hat) and torch.equal(x.grad, g_x)
    loss.backward(retain_graph=True)
    assert torch.equal(x_hat.grad, g_x_hat + g_x_hat) and torch.equal(x.grad, g_x + g_x)
    x_hat.grad.zero_()
    x.grad.zero_()
    loss.backward()
    assert torch.equal(x_hat.grad, g_x_hat) and torch.equal(x.grad, g_x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("second_weight", [1.0, 3.0])
def test_gradient_handed_out_under_retain_graph_stays_put(device, second_weight, dtype):
    """A gradient returned by a backward that retains the graph belongs to the caller: a later
    backward of the same graph (incoming gradient 1, or another one, finishing the prepared buffer
    in place) must not change it, and the caller editing it in place must not break that later
    backward."""
    x_hat, x = recon_inputs((4, 9), dtype, device, seed=stable_seed("retained", second_weight, dtype))
    want_first, = torch.autograd.grad(fastelbo.gaussian_recon_loss(x_hat, x), x_hat)
    loss = fastelbo.gaussian_recon_loss(x_hat, x)
    first, = torch.autograd.grad(loss, x_hat, retain_graph=True)
    assert torch.equal(first, want_first)
    kept = first.clone()
    second, = torch.autograd.grad(loss, x_hat, torch.tensor(second_weight, device=device))
    assert torch.equal(first, kept), "a later backward changed a gradient already handed out"
    assert torch.allclose(second.double(), second_weight * kept.double(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    # the caller's in-place edit of a handed-out gradient (e.g. in a hook)
    loss = fastelbo.gaussian_recon_loss(x_hat, x)
    first, = torch.autograd.grad(loss, x_hat, retain_graph=True)
    first.mul_(0)
    second, = torch.autograd.grad(loss, x_hat)
    assert torch.equal(second, want_first)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_output_dtypes_and_shapes(device, reduction, dtype):
    x_hat, x = recon_inputs((4, 3, 5), dtype, device, x_grad=True)
    loss = fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)
    assert loss.dtype == loss_dtype(dtype) and loss.device == x_hat.device
    assert loss.shape == ((4,) if reduction == "none" else ())
    for grad_output in (torch.ones_like(loss), 0.5 * torch.ones_like(loss)):
        g_x_hat, g_x = torch.autograd.grad(loss, (x_hat, x), grad_output, retain_graph=True)
        assert g_x_hat.dtype == dtype and g_x_hat.shape == x_hat.shape
        assert g_x.dtype == dtype and g_x.shape == x.shape
    assert fastelbo.gaussian_recon_loss(x_hat, x).shape == ()  # default: batchmean


def test_default_reduction_is_batchmean(device):
    x_hat, x = recon_inputs((4, 6), torch.float64, device)
    assert torch.equal(fastelbo.gaussian_recon_loss(x_hat, x),
                       fastelbo.gaussian_recon_loss(x_hat, x, reduction="batchmean"))
    expected = 0.5 * ((x_hat.detach() - x) ** 2).sum() / 4
    torch.testing.assert_close(fastelbo.gaussian_recon_loss(x_hat, x), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_and_fused_follow_the_formula_by_hand(device, reduction):
    """Pins the reference (and the fused op) to DESIGN.md section 1 with nothing shared: per-sample
    1/2 sum (x_hat - x)^2 in plain Python, reduced (mean: over all elements), and its x_hat
    gradient (x_hat - x) times the reduction's scale."""
    rows_hat = [[0.5, -1.25, 2.0, 0.0, 3.5], [1.0, 1.0, -0.75, 0.25, -2.0], [0.0, 0.125, 4.0, -1.0, 0.5]]
    rows = [[1.5, -1.0, 0.5, 0.0, -0.5], [-1.0, 2.25, 0.0, 0.25, 1.0], [0.375, 0.0, 3.0, 2.0, -0.5]]
    B, D = len(rows), len(rows[0])
    per_sample = [0.5 * sum((a - b) ** 2 for a, b in zip(r_hat, r)) for r_hat, r in zip(rows_hat, rows)]
    want, scale = {"none": (per_sample, 1.0), "sum": (sum(per_sample), 1.0),
                   "batchmean": (sum(per_sample) / B, 1.0 / B), "mean": (sum(per_sample) / (B * D), 1.0 / (B * D))}[reduction]
    want_grad = torch.tensor([[(a - b) * scale for a, b in zip(r_hat, r)] for r_hat, r in zip(rows_hat, rows)],
                             dtype=torch.float64)
    for fn in (reference.gaussian_recon_loss, fastelbo.gaussian_recon_loss):
        x_hat = torch.tensor(rows_hat, dtype=torch.float64, device=device, requires_grad=True)
        x = torch.tensor(rows, dtype=torch.float64, device=device)
        loss = fn(x_hat, x, reduction=reduction)
        torch.testing.assert_close(loss.detach().cpu(), torch.tensor(want, dtype=torch.float64), rtol=1e-15, atol=0)
        grad, = torch.autograd.grad(loss.sum(), x_hat)
        torch.testing.assert_close(grad.cpu(), want_grad, rtol=1e-15, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(device, reduction):
    x_hat, x = recon_inputs((3, 5), torch.float64, device, seed=stable_seed("gc", reduction), x_grad=True)
    assert torch.autograd.gradcheck(fused(reduction), (x_hat, x))
    # only x requires grad
    assert torch.autograd.gradcheck(fused(reduction), (x_hat.detach(), x))


LARGE_SHAPE = (3, 16389)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_large_rows_grads(device, reduction, dtype):
    """Gradients at rows spanning several CPU tasks, both through the op and the grad == 1 path."""
    seed = stable_seed("large", reduction, dtype)
    x_hat, x = recon_inputs(LARGE_SHAPE, dtype, device, seed=seed, x_grad=True)
    loss = fused(reduction)(x_hat.detach(), x.detach())
    for grad_output in (random_grad_outputs((loss,), reduction, seed=seed + 1),
                        [torch.ones_like(loss)]):
        _, grads = run_with_grads(fused(reduction), (x_hat, x), grad_output)
        _, grads_same = run_with_grads(ref(reduction), (x_hat, x), grad_output)
        _, grads64 = run_with_grads(ref(reduction), (x_hat, x), [g.double() for g in grad_output],
                                    dtype=torch.float64)
        for i, name in enumerate(("x_hat", "x")):
            assert_close_fp64(grads[i], grads_same[i], grads64[i], f"grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_large_rows_loss_accuracy(device, dtype):
    """The reduced loss at rows spanning several CPU tasks, on fresh random inputs (4 draws, every
    reduction), judged like every other value: within 2x the same-dtype plain-PyTorch error."""
    failures = []
    for seed in range(4):
        x_hat, x = recon_inputs(LARGE_SHAPE, dtype, device, seed=seed, x_hat_grad=False)
        for reduction in REDUCTIONS:
            loss = fused(reduction)(x_hat, x)
            loss_same = ref(reduction)(x_hat, x)
            loss64 = ref(reduction)(x_hat.double(), x.double())
            try:
                assert_close_fp64(loss, loss_same, loss64, f"loss seed={seed} {reduction}")
            except AssertionError as error:
                failures.append(str(error).splitlines()[0])
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=dtype_id)
def test_recon_sum_accuracy_one_large_term(device, dtype):
    """Minimal deterministic case of the summation error: one sample whose first term is ~2^24
    followed by 16383 terms of exactly 0.5 (x_hat - x = 1). Sequential float32 accumulation rounds
    every `2^24 + 0.5` back to 2^24 in the lane holding the big term; torch.sum is exact."""
    n = 16384
    x_hat = torch.ones(1, n, dtype=dtype)
    x_hat[0, 0] = 5792.0  # 0.5 * 5792^2 = 16773632, just below 2^24
    x_hat = x_hat.to(device)
    x = torch.zeros(1, n, dtype=dtype, device=device)
    loss = fused("sum")(x_hat, x)
    loss_same = ref("sum")(x_hat, x)
    loss64 = ref("sum")(x_hat.double(), x.double())
    assert loss64.item() == 0.5 * 5792.0**2 + 0.5 * (n - 1)
    assert_close_fp64(loss, loss_same, loss64, "loss")


# Past 128K elements: the CUDA forward leaves its one-block shapes for a grid of blocks whose
# partial sums the last block to finish adds (a ticket); odd row lengths leave tails everywhere.
MULTI_BLOCK_SHAPES = [(4, 100003), (2, 150001)]


@pytest.mark.parametrize("shape", MULTI_BLOCK_SHAPES, ids=["x".join(map(str, s)) for s in MULTI_BLOCK_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_multi_block_values_and_grads(device, reduction, dtype, shape):
    """Values and gradients (x_hat and x) at sizes that take several blocks, with a grad_output
    that is not 1."""
    seed = stable_seed("multi-block", reduction, dtype, shape)
    x_hat, x = recon_inputs(shape, dtype, device, seed=seed, x_grad=True)
    loss = fused(reduction)(x_hat.detach(), x.detach())
    grad_output = random_grad_outputs((loss,), reduction, seed=seed + 1)
    compare_three_ways(fused(reduction), ref(reduction), (x_hat, x), grad_output, ("x_hat", "x"))


def test_recon_sum_accuracy_many_equal_terms(device):
    """Millions of equal terms (x_hat - x = 0.4472: about 0.1 each), like the KL's test of the
    same name: added one after another in float32 their sum drifts (each rounding has the same
    sign). Whole-tensor sums over short samples and per-sample sums over long rows, judged like
    every other value: within 2x the same-dtype plain-PyTorch error."""
    failures = []
    short_samples, long_rows = ("sum", "mean"), ("none", "batchmean")
    for (B, D), reductions in (((2**22, 1), short_samples), ((2**20, 4), short_samples), ((2, 2**21), long_rows)):
        x_hat = torch.full((B, D), 0.4472, device=device)
        x = torch.zeros((B, D), device=device)
        x_hat64, x64 = x_hat.double(), x.double()
        for reduction in reductions:
            loss = fused(reduction)(x_hat, x)
            loss_same = ref(reduction)(x_hat, x)
            loss64 = ref(reduction)(x_hat64, x64)
            try:
                assert_close_fp64(loss, loss_same, loss64, f"loss ({B}, {D}) {reduction}")
            except AssertionError as error:
                failures.append(str(error).splitlines()[0])
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("weight", [1.0, 3.0], ids=["loss.backward()", "scaled"])
def test_loss_step_runs_no_fill_or_copy_over_the_data(device, weight):
    """A training step through both ops does no x_hat-sized fill, zero or copy besides the fused
    kernels: autograd must not materialize a zero gradient for the recon op's grad_unit output (it
    did once, costing a pass over x_hat per step), nor copy the gradient it hands over (the
    prepared buffer, finished in place when the incoming gradient is not 1)."""
    x_hat = torch.randn(64, 300, device=device, requires_grad=True)
    x = torch.randn(64, 300, device=device)
    mu = torch.randn(64, 20, device=device, requires_grad=True)
    logvar = torch.randn(64, 20, device=device, requires_grad=True)

    def step():
        x_hat.grad = mu.grad = logvar.grad = None
        z, kl = fastelbo.reparameterize_kl(mu, logvar)
        (weight * (fastelbo.gaussian_recon_loss(x_hat, x) + kl + z.sum())).backward()

    step()
    with torch.profiler.profile(record_shapes=True) as prof:
        step()
    suspects = ("aten::fill_", "aten::zero_", "aten::zeros", "aten::copy_", "aten::clone")
    big = [(e.name, e.input_shapes) for e in prof.events()
           if e.name in suspects and any(len(s) > 0 and s[0] * (s[1] if len(s) > 1 else 1) >= x_hat.numel()
                                         for s in e.input_shapes if isinstance(s, list))]
    assert not big, f"x_hat-sized fills or copies in a loss step: {big}"
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("x_grad", [False, True])
def test_16bit_gradients_are_the_float_values_rounded_once(device, dtype, x_grad, cpu_code_path):
    """16-bit gradients are the float32 values grad_rec * (x_hat - x) rounded once to the dtype,
    bit for bit, for every element wherever it sits in a block (1037 elements: partial vectors and
    blocks), including differences that overflow the dtype, land among its subnormals or are NaN.
    (The CPU kernels convert 16-bit data in bulk; this pins that conversion to IEEE rounding.)"""
    g = torch.Generator().manual_seed(40)
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).smallest_normal
    x_hat = torch.randn(1037, generator=g) * torch.tensor([1.0, 1e-3, 100.0]).repeat(346)[:1037]
    x_hat[::97] = big  # x_hat - x overflows the dtype where x is negative
    x_hat[5::89] = tiny * 0.75  # differences among the subnormals
    x_hat[7] = float("nan")
    x = torch.randn(1037, generator=g)
    x[5::89] = tiny * 0.25
    x[::97] = -big
    x_hat = x_hat.to(device, dtype).reshape(1, 1037).requires_grad_()
    x = x.to(device, dtype).reshape(1, 1037).requires_grad_(x_grad)
    loss = fastelbo.gaussian_recon_loss(x_hat, x, reduction="sum")
    grads = torch.autograd.grad(loss * 0.75, (x_hat, x) if x_grad else (x_hat,))
    diff = x_hat.detach().float() - x.detach().float()
    want = (0.75 * diff).to(dtype)
    got = grads[0]
    same = (got == want) | (got.isnan() & want.isnan())
    assert same.all(), f"{(~same).sum().item()} elements differ, first at {(~same).nonzero()[0].tolist()}"
    assert got.isinf().any() and ((got != 0) & (got.abs() < torch.finfo(dtype).smallest_normal)).any()
    if x_grad:
        assert (grads[1] == -want).logical_or(want.isnan() & grads[1].isnan()).all()


# ---- memory layouts --------------------------------------------------------------------------------
# Layouts the kernels read in place (csrc/ops.cpp, recon_operands): x_hat and x dense, laid out
# alike, with the batch outermost. (shape, make the layout from a contiguous tensor)
def _permuted(t):
    return t.transpose(1, 2).contiguous().transpose(1, 2)


IN_PLACE_LAYOUTS = {
    "channels_last": ((4, 3, 5, 6), lambda t: t.contiguous(memory_format=torch.channels_last)),
    "channels_last_3d": ((3, 2, 3, 4, 5), lambda t: t.contiguous(memory_format=torch.channels_last_3d)),
    "permuted": ((4, 5, 7), _permuted),
    "batch_of_one": ((1, 6, 5), _permuted),
}
COPY_SUSPECTS = ("aten::clone", "aten::copy_", "aten::contiguous")


def _data_sized_copies_in(fn, numel):
    """Copy ops on tensors of at least `numel` elements that fn runs (the (B,) incoming gradient
    of "none" may be made contiguous; that is not a pass over the data)."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return [(e.name, e.input_shapes) for e in prof.events()
            if e.name in COPY_SUSPECTS and any(isinstance(s, list) and len(s) > 0 and math.prod(s) >= numel
                                              for s in e.input_shapes)]


@pytest.mark.parametrize("layout", list(IN_PLACE_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dense_layouts_are_read_in_place(device, reduction, dtype, layout):
    """channels_last and other dense batch-outermost layouts shared by x_hat and x: values and
    gradients against float64 math, gradients in x_hat's layout (as autograd's AccumulateGrad
    wants them: no copy into .grad either), the same gradient values as for contiguous copies of
    the inputs, and no copy of either input inside the ops (forward and backward)."""
    shape, make = IN_PLACE_LAYOUTS[layout]
    x_hat, x = (make(t) for t in recon_inputs(shape, dtype, device, seed=stable_seed("lay", reduction, dtype, layout)))
    assert x_hat.stride() == x.stride() and (not x_hat.is_contiguous() or shape[0] == 1)
    loss = fused(reduction)(x_hat.detach(), x.detach())
    grad_output = random_grad_outputs((loss,), reduction, seed=3)
    leaves = (x_hat.detach().requires_grad_(), x.detach().requires_grad_())
    _, grads = compare_three_ways(fused(reduction), ref(reduction), leaves, grad_output, ("x_hat", "x"))
    for g in grads:
        assert g.stride() == x_hat.stride()

    _, grads_contiguous = run_with_grads(fused(reduction), tuple(t.contiguous() for t in leaves), grad_output)
    for g, g_c in zip(grads, grads_contiguous):
        assert torch.equal(g, g_c)  # elementwise: the layout changes no gradient value

    def step():  # loss.backward(), the CPU's prepared-gradient path included
        a, b = (t.detach().requires_grad_() for t in leaves)
        fused(reduction)(a, b).sum().backward()
        assert a.grad.stride() == x_hat.stride() and b.grad.stride() == x_hat.stride()

    step()
    assert _data_sized_copies_in(step, x_hat.numel()) == []


@pytest.mark.parametrize("case", ["x_contiguous", "x_expanded", "batch_inner"])
def test_other_layouts_are_copied(device, case, monkeypatch):
    """x in another layout than a channels_last x_hat (contiguous data against a conv decoder's
    output), or an expanded (stride-0) x: x is copied into x_hat's layout and the gradients come in
    x_hat's layout. A batch dim that is not outermost in memory: both are copied to contiguous
    memory and the gradients are contiguous. The profiler sees the copies (which shows the
    in-place test above can fail); values and gradients are right either way."""
    x_hat, x = recon_inputs((4, 3, 5, 6), torch.float32, device, seed=stable_seed("copy", case), x_grad=True)
    if case == "x_contiguous":
        x_hat = x_hat.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    elif case == "x_expanded":
        x = x[:1].detach().expand_as(x_hat)
    else:
        x_hat, x = (t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(t.requires_grad)
                    for t in (x_hat, x))
    _, grads = compare_three_ways(fused("sum"), ref("sum"), (x_hat, x), None, ("x_hat", "x"))
    want_strides = x_hat.contiguous().stride() if case == "batch_inner" else x_hat.stride()
    assert all(g.stride() == want_strides for g in grads if g is not None)

    def step():  # x_hat alone requires grad (x's gradient would be copied into x's layout by autograd)
        (2.0 * fused("sum")(x_hat.detach().requires_grad_(), x.detach())).backward()

    for grad_in_forward in (True, False):
        monkeypatch.setattr(fastelbo.functional, "_GRAD_IN_FORWARD", grad_in_forward)
        copies = _data_sized_copies_in(step, x_hat.numel())
        assert copies != []
        if case != "batch_inner":
            # x alone (contiguous + clone + copy_ count as one pass): copied once in the forward,
            # and again in the backward unless the forward prepared the gradient (float32: the
            # backward then never reads x, also for an incoming gradient other than 1)
            assert [name for name, _ in copies].count("aten::copy_") == (1 if grad_in_forward else 2)


# ---- the gradient prepared in the forward ---------------------------------------------------------
# When x_hat requires grad, gaussian_recon_loss's forward also writes grad_unit, the x_hat gradient
# for an incoming gradient of 1, and the backward hands it back (CPU, which sees the 1) or runs
# gaussian_recon_loss_finish_grad_ on it (which, on a GPU, returns at once on the device when the
# incoming gradient is 1, else overwrites the buffer). csrc/autograd.cpp picks the path.
_ops = torch.ops.fastelbo
FINISH_LAYOUTS = {
    "3x7": ((3, 7), lambda t: t),
    "16x33": ((16, 33), lambda t: t),
    "8x1030": ((8, 1030), lambda t: t),
    # More chunks than one wave of GPU threads has (135168): every unrolled load of the finish
    # kernels' grid-stride loop is taken, and n % 4 = n % 8 = 3 leaves a tail.
    "3x600001": ((3, 600001), lambda t: t),
    "channels_last": ((4, 3, 5, 6), lambda t: t.contiguous(memory_format=torch.channels_last)),
}


@pytest.mark.parametrize("layout", list(FINISH_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_finish_grad_op(device, reduction, dtype, layout):
    """grad_unit is, bit for bit, the backward op's x_hat gradient for an incoming gradient of 1.
    finish_grad_ leaves the buffer alone for 1 (one filled with NaN stays NaN: no pass over
    memory). For any other incoming gradient g it multiplies a float32/float64 buffer by g, every
    element (one holding 2 * grad_unit becomes exactly 2g * grad_unit), and overwrites every
    element of a 16-bit one (NaN before) with the backward op's gradient, bit for bit."""
    shape, make = FINISH_LAYOUTS[layout]
    x_hat, x = (make(t.detach()) for t in recon_inputs(shape, dtype, device, seed=stable_seed("fin", reduction, dtype, layout)))
    code = fastelbo.ops.REDUCTIONS[reduction]
    _, grad_unit = _ops.gaussian_recon_loss(x_hat, x, code, True)
    assert grad_unit.stride() == x_hat.stride()
    one = torch.ones((), dtype=loss_dtype(dtype), device=device)
    want_unit, _ = _ops.gaussian_recon_loss_backward(one, x_hat, x, code, True, False)
    assert torch.equal(grad_unit, want_unit)
    _ops.gaussian_recon_loss_finish_grad_(grad_unit, one, x_hat, x, code)
    assert torch.equal(grad_unit, want_unit)
    untouched = torch.full_like(grad_unit, float("nan"))
    _ops.gaussian_recon_loss_finish_grad_(untouched, one, x_hat, x, code)
    assert untouched.isnan().all()
    scales = dtype in (torch.float32, torch.float64)
    for value in (2.5, -0.3, 0.0, 1.0 + 2.0**-20):
        grad_loss = torch.tensor(value, dtype=loss_dtype(dtype), device=device)
        plain, _ = _ops.gaussian_recon_loss_backward(grad_loss, x_hat, x, code, True, False)
        if scales:
            got = grad_unit * 2  # exact: a power of two
            _ops.gaussian_recon_loss_finish_grad_(got, grad_loss, x_hat, x, code)
            assert torch.equal(got, grad_unit * 2 * grad_loss.to(dtype)), f"incoming gradient {value}"
            got /= 2
            torch.testing.assert_close(got, plain, rtol=2 * torch.finfo(dtype).eps, atol=0)
        else:
            got = torch.full_like(grad_unit, float("nan"))
            _ops.gaussian_recon_loss_finish_grad_(got, grad_loss, x_hat, x, code)
            assert torch.equal(got, plain), f"incoming gradient {value}"
        assert got.stride() == plain.stride()


def test_finish_grad_refuses_bad_arguments(device):
    x_hat, x = (t.detach() for t in recon_inputs((4, 3, 5, 6), torch.float32, device))
    one = torch.ones((), device=device)
    good = torch.empty_like(x_hat)
    finish = _ops.gaussian_recon_loss_finish_grad_
    with pytest.raises(ValueError, match="reduction 'none' is not supported"):
        finish(good, torch.ones(4, device=device), x_hat, x, 0)
    with pytest.raises(ValueError, match="grad_unit"):
        finish(torch.empty(4, 90, device=device), one, x_hat, x, 1)
    with pytest.raises(TypeError, match="grad_unit"):
        finish(good.double(), one, x_hat, x, 1)
    with pytest.raises(ValueError, match="grad_unit must have the layout"):  # x_hat is read in place
        finish(good, one, *(t.contiguous(memory_format=torch.channels_last) for t in (x_hat, x)), 1)
    with pytest.raises(ValueError, match="one element"):
        finish(good, torch.ones(2, device=device), x_hat, x, 1)


BACKWARD_PATHS = {
    # case: (the backward ops it runs on the CPU, on CUDA); one list per backward call
    "loss.backward()": ([[]], [["finish_grad_"]]),
    "scaled": ([["finish_grad_"]], [["finish_grad_"]]),
    # retain_graph: the buffer must stay as the forward wrote it (a later backward reads it again);
    # the second backward frees the graph, so it may finish the buffer
    "retain_graph": ([["backward"], ["finish_grad_"]], [["backward"], ["finish_grad_"]]),
    "x_requires_grad": ([[]], [["backward"]]),
    "x_requires_grad_scaled": ([["backward"]], [["backward"]]),
    "none": ([["backward"]], [["backward"]]),
    "switched_off": ([["backward"]], [["backward"]]),
}


def _recon_backward_ops_in(fn):
    """The recon backward ops fn runs (the profiler sees the dispatcher calls), short names."""
    with torch.profiler.profile() as prof:
        fn()
    names = {"fastelbo::gaussian_recon_loss_backward": "backward",
             "fastelbo::gaussian_recon_loss_finish_grad_": "finish_grad_"}
    return sorted({names[e.name] for e in prof.events() if e.name in names})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", list(BACKWARD_PATHS))
def test_backward_path_and_gradients(device, case, dtype, monkeypatch):
    """Which backward runs, and the gradients each path gives, bit for bit: the plain backward
    op's (the forward not preparing the gradient: FASTELBO_GRAD_IN_FORWARD=0), or, where a
    float32 buffer is finished for an incoming gradient w != 1, w times the prepared gradient."""
    reduction = "none" if case == "none" else "batchmean"
    x_grad = case.startswith("x_requires_grad")
    weight = 1.0 if case in ("loss.backward()", "x_requires_grad") else 3.0
    backward_calls = 2 if case == "retain_graph" else 1
    leaves = recon_inputs((8, 3, 5, 7), dtype, device, seed=stable_seed("paths", case, dtype), x_grad=x_grad)

    def run(grad_in_forward, w, calls):
        """x_hat.grad and x.grad after `calls` backward passes of w * loss, and the ops each ran."""
        monkeypatch.setattr(fastelbo.functional, "_GRAD_IN_FORWARD", grad_in_forward)
        x_hat, x = (t.detach().requires_grad_(t.requires_grad) for t in leaves)
        loss = fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction).sum()
        ops_ran = [_recon_backward_ops_in(lambda: (w * loss).backward(retain_graph=call + 1 < calls))
                   for call in range(calls)]
        return (x_hat.grad, x.grad), ops_ran

    (plain, plain_x), plain_ops = run(False, weight, 1)
    assert plain_ops == [["backward"]]
    (unit, _), _ = run(False, 1.0, 1)
    got, ops_ran = run(case != "switched_off", weight, backward_calls)
    assert ops_ran == BACKWARD_PATHS[case][0 if device == "cpu" else 1]
    # each backward's x_hat gradient, by the path it took, accumulated in order
    scaled = unit * torch.tensor(weight, dtype=dtype, device=device)
    parts = [scaled if ops == ["finish_grad_"] and dtype == torch.float32 else plain for ops in ops_ran]
    want = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    assert torch.equal(got[0], want)
    assert got[0].stride() == plain.stride()
    assert (got[1] is None) == (plain_x is None)
    if plain_x is not None:
        assert torch.equal(got[1], plain_x)
    # the scaled buffer is within the last bits of the plain gradient
    torch.testing.assert_close(scaled, plain, rtol=2 * torch.finfo(dtype).eps, atol=0)
    assert torch.isfinite(got[0]).all()
