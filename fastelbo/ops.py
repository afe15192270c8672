"""The compiled ops, torch.ops.fastelbo.*, and their fake implementations.

Five ops: reparameterize_kl and gaussian_recon_loss (forward), reparameterize_kl_backward and
gaussian_recon_loss_backward, and gaussian_recon_loss_finish_grad_, the reconstruction's backward
when its forward already wrote the gradient for an incoming gradient of 1 (csrc/ops.cpp). The
dispatcher picks the CPU or CUDA kernel; arguments are validated in the compiled ops, before any
kernel runs. Autograd is compiled too: the two forward ops have an
Autograd-key kernel (csrc/autograd.cpp), a C++ torch::autograd::Function each, whose backward calls
the backward op and refuses double backward with a clear RuntimeError. So calling the forward op on
tensors that require grad records the backward; no Python runs in the backward pass.

Most users call `fastelbo.reparameterize_kl` and `fastelbo.gaussian_recon_loss`, which map the
reduction names to the codes below and call the forward ops directly. `ReparameterizeKL` and
`GaussianReconLoss` at the end of this module are the same fused ops as torch.autograd.Function
subclasses, for code that works with Functions (README, "API").
"""
import math

import torch
from torch._prims_common import make_contiguous_strides_for

from ._extension import _C  # (importing it registers torch.ops.fastelbo)

_ops = torch.ops.fastelbo

# Reduction codes of the compiled ops (csrc/elbo_math.h, enum Reduction).
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2, "batchmean": 3}
_NONE = REDUCTIONS["none"]


# ---- Fake (shape-only) implementations, for torch.compile, FakeTensor and opcheck ------------
# They mirror the output shapes and dtypes of csrc/ops.cpp (allocate_reparameterize_kl,
# allocate_recon_loss); argument errors are raised by the compiled ops themselves at run time.

def _loss_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_same_device(op, name, t, ref_name, ref):
    torch._check(
        t.device == ref.device,
        lambda: f"{op}: {name} and {ref_name} must be on the same device, got {name} on "
                f"{t.device} and {ref_name} on {ref.device}",
    )


def _reduced_loss_like(t, reduction):
    shape = (t.shape[0],) if reduction == _NONE else ()
    return t.new_empty(shape, dtype=_loss_dtype(t.dtype))


@torch.library.register_fake("fastelbo::reparameterize_kl")
def _reparameterize_kl_fake(mu, logvar, eps, generator, num_samples, reduction, free_bits):
    torch._check(mu.dim() >= 1, lambda: "reparameterize_kl: mu must have a batch dimension")
    _check_same_device("reparameterize_kl", "logvar", logvar, "mu", mu)
    if eps is not None:
        _check_same_device("reparameterize_kl", "eps", eps, "mu", mu)
    z_shape = (num_samples, *mu.shape) if num_samples > 1 else mu.shape
    per_sample = math.prod(mu.shape[1:]) if free_bits > 0 else 0  # (mu[0] does not exist when B = 0)
    return (
        mu.new_empty(z_shape),
        _reduced_loss_like(mu, reduction),
        mu.new_empty((2,), dtype=torch.int64),
        mu.new_empty((per_sample,), dtype=_loss_dtype(mu.dtype)),
    )


@torch.library.register_fake("fastelbo::reparameterize_kl_backward")
def _reparameterize_kl_backward_fake(grad_z, grad_kl, mu, logvar, eps, rng_state,
                                     kl_position_mean, num_samples, reduction, free_bits):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), torch.empty_like(
        logvar, memory_format=torch.contiguous_format)


def _recon_grad_strides(x_hat):
    """The strides of the reconstruction gradients, as csrc/ops.cpp's recon_operands picks them:
    x_hat's own when x_hat is dense with the batch outermost (e.g. channels_last), which the
    kernels then read in place; else contiguous ones."""
    if x_hat.is_contiguous():  # the usual case (and every empty tensor), without guards on the sizes
        return x_hat.stride()
    dims = sorted(((st, n) for n, st in zip(x_hat.shape, x_hat.stride()) if n != 1),
                  key=lambda dim: dim[0])  # innermost first; ties keep their order, as in C++
    expected = 1
    dense = True
    for st, n in dims:
        dense = dense and st == expected
        expected *= n
    if dense and (x_hat.shape[0] == 1 or x_hat.stride(0) * x_hat.shape[0] == x_hat.numel()):
        return x_hat.stride()
    return make_contiguous_strides_for(x_hat.shape)


def _recon_grad_like(x_hat):
    return x_hat.new_empty_strided(x_hat.shape, _recon_grad_strides(x_hat))


@torch.library.register_fake("fastelbo::gaussian_recon_loss")
def _gaussian_recon_loss_fake(x_hat, x, reduction, save_grad_unit):
    torch._check(x_hat.dim() >= 1, lambda: "gaussian_recon_loss: x_hat must have a batch dimension")
    _check_same_device("gaussian_recon_loss", "x", x, "x_hat", x_hat)
    grad_unit = _recon_grad_like(x_hat) if save_grad_unit else x_hat.new_empty((0,))
    return _reduced_loss_like(x_hat, reduction), grad_unit


@torch.library.register_fake("fastelbo::gaussian_recon_loss_backward")
def _gaussian_recon_loss_backward_fake(grad_loss, x_hat, x, reduction, need_grad_x_hat, need_grad_x):
    def grad(needed):
        return _recon_grad_like(x_hat) if needed else x_hat.new_empty((0,))
    return grad(need_grad_x_hat), grad(need_grad_x)


@torch.library.register_fake("fastelbo::gaussian_recon_loss_finish_grad_")
def _gaussian_recon_loss_finish_grad_fake(grad_unit, grad_loss, x_hat, x, reduction):
    return None  # writes into grad_unit, returns nothing


# ---- The fused ops as torch.autograd.Function subclasses ------------------------------------
# Same kernels, values and gradients as fastelbo.reparameterize_kl / gaussian_recon_loss, with the
# backward in Python: the forward ops run inside Function.forward (grad mode off there, so their
# compiled autograd records nothing) and backward calls the backward ops. Written in the
# setup_context style with generate_vmap_rule, so that torch.func transforms take them
# (torch.func.grad, and vmap through torch's per-example fallback for the ops), which they refuse
# for the functional API's C++ autograd. Double backward: when a backward builds a graph
# (create_graph=True, as torch.func.grad always does) its gradients pass through
# _RefuseDoubleBackward, which raises only if they are differentiated again; the gradients are
# exact, but a second differentiation would treat them as constants, a silently wrong answer.


_COMPUTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _autocast_promoted(*tensors):
    """Under torch.autocast for the tensors' device: the floating ones cast to the widest floating
    dtype among them, as the compiled ops' autocast kernels do (csrc/autocast.cpp). The Functions
    do it before they apply, so that what they save for backward is what their forward used.
    Otherwise (and for None) the tensors as they are; also when one of them has a floating dtype
    the kernels do not compute (float8, which torch cannot promote): the op then raises its own
    TypeError naming it, as under autocast of the compiled ops."""
    present = [t for t in tensors if t is not None and t.is_floating_point()]
    if not present or not torch.is_autocast_enabled(present[0].device.type):
        return tensors
    if any(t.dtype not in _COMPUTED_DTYPES for t in present):
        return tensors
    widest = present[0].dtype
    for t in present[1:]:
        widest = torch.promote_types(widest, t.dtype)
    return tuple(t.to(widest) if t is not None and t.is_floating_point() else t for t in tensors)


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on a first-order gradient whose own backward raises. The tensors the gradient
    depends on are inputs too, so the node lies on every path from the gradient back to them."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, name, *depends_on):
        return grad.view_as(grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[1]

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise RuntimeError(
            f"fastelbo: double backward (differentiating the gradients of {ctx.name}) is not "
            "supported; use fastelbo.reference for higher-order gradients")


def _first_order(name, grads, *depends_on):
    """The gradients, routed through _RefuseDoubleBackward when the backward builds a graph."""
    if not torch.is_grad_enabled():  # the usual backward: nothing will differentiate them
        return grads
    deps = [t for t in depends_on if isinstance(t, torch.Tensor)]
    return tuple(g if g is None else _RefuseDoubleBackward.apply(g, name, *deps) for g in grads)


class _ReparameterizeKLFunction(torch.autograd.Function):
    """The sample+KL op with all four of its outputs (z, kl, rng_state, kl_position_mean): in the
    setup_context style, what backward needs from the forward must be an output."""

    generate_vmap_rule = True

    @staticmethod
    def forward(mu, logvar, eps, generator, num_samples, reduction, free_bits):
        return _ops.reparameterize_kl(mu, logvar, eps, generator, num_samples, reduction, free_bits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        mu, logvar, eps, _generator, num_samples, reduction, free_bits = inputs
        _z, _kl, rng_state, kl_position_mean = output
        ctx.save_for_backward(mu, logvar, eps, rng_state, kl_position_mean)
        ctx.num_samples, ctx.reduction, ctx.free_bits = num_samples, reduction, free_bits
        ctx.mark_non_differentiable(rng_state, kl_position_mean)
        ctx.set_materialize_grads(False)  # an unused output gets None, not a tensor of zeros

    @staticmethod
    def backward(ctx, grad_z, grad_kl, _grad_rng_state=None, _grad_position_mean=None):
        if grad_z is None and grad_kl is None:
            return (None,) * 7
        mu, logvar, eps, rng_state, kl_position_mean = ctx.saved_tensors
        grads = _ops.reparameterize_kl_backward(
            grad_z, grad_kl, mu, logvar, eps, rng_state, kl_position_mean,
            ctx.num_samples, ctx.reduction, ctx.free_bits)
        grad_mu, grad_logvar = _first_order("ReparameterizeKL", grads, mu, logvar, grad_z, grad_kl)
        return grad_mu, grad_logvar, None, None, None, None, None


class _GaussianReconLossFunction(torch.autograd.Function):
    """The reconstruction op's loss output with its backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x_hat, x, reduction):
        loss, _ = _ops.gaussian_recon_loss(x_hat, x, reduction, False)
        return loss

    @staticmethod
    def setup_context(ctx, inputs, output):
        x_hat, x, reduction = inputs
        ctx.save_for_backward(x_hat, x)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad_loss):
        x_hat, x = ctx.saved_tensors
        need_x_hat, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grads = _ops.gaussian_recon_loss_backward(grad_loss, x_hat, x, ctx.reduction, need_x_hat, need_x)
        grad_x_hat, grad_x = _first_order("GaussianReconLoss", grads, x_hat, x, grad_loss)
        return (grad_x_hat if need_x_hat else None), (grad_x if need_x else None), None


# The public Functions. Their apply promotes mixed dtypes under autocast first (recorded by
# autograd, as the compiled ops' autocast kernels do, so gradients come back in each input's dtype)
# and then applies the Function above that they derive from: what autograd and torch.func run.


class ReparameterizeKL(_ReparameterizeKLFunction):
    """z = mu + exp(logvar / 2) * eps and the reduced Gaussian KL, in one fused op.

    apply(mu, logvar, eps, generator, num_samples, reduction_code, free_bits) -> (z, kl), with the
    codes of REDUCTIONS. The backward regenerates eps from the (seed, offset) the forward used.
    """

    @classmethod
    def apply(cls, mu, logvar, eps, generator, num_samples, reduction, free_bits):
        # The backward gives eps no gradient: refused, as the op itself refuses it (csrc/autograd.cpp,
        # the same message), since this forward runs the op with grad mode off.
        if eps is not None and eps.requires_grad and torch.is_grad_enabled():
            raise ValueError(_C._eps_requires_grad_message)
        mu, logvar, eps = _autocast_promoted(mu, logvar, eps)
        z, kl, _rng_state, _kl_position_mean = _ReparameterizeKLFunction.apply(
            mu, logvar, eps, generator, num_samples, reduction, free_bits)
        return z, kl


class GaussianReconLoss(_GaussianReconLossFunction):
    """The reduced squared-error reconstruction loss 1/2 ||x_hat - x||^2, in one fused op.

    apply(x_hat, x, reduction_code) -> loss, with the codes of REDUCTIONS.
    """

    @classmethod
    def apply(cls, x_hat, x, reduction):
        x_hat, x = _autocast_promoted(x_hat, x)
        return _GaussianReconLossFunction.apply(x_hat, x, reduction)
