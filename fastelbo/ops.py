"""The fused ops as torch.autograd.Function classes over the compiled kernels.

Each Function calls one compiled op forward (torch.ops.fastelbo.reparameterize_kl,
torch.ops.fastelbo.gaussian_recon_loss) and one backward op; the dispatcher picks the CPU or CUDA
kernel. Arguments are validated in the compiled ops, before any kernel runs. Most users call
`fastelbo.reparameterize_kl` and `fastelbo.gaussian_recon_loss`, which map the reduction names to
the codes below and call `.apply`.
"""
import torch

from ._extension import _C  # noqa: F401  (registers torch.ops.fastelbo)

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
    per_sample = mu[0].numel() if free_bits > 0 else 0
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


@torch.library.register_fake("fastelbo::gaussian_recon_loss")
def _gaussian_recon_loss_fake(x_hat, x, reduction, save_grad_unit):
    torch._check(x_hat.dim() >= 1, lambda: "gaussian_recon_loss: x_hat must have a batch dimension")
    _check_same_device("gaussian_recon_loss", "x", x, "x_hat", x_hat)
    grad_unit = (torch.empty_like(x_hat, memory_format=torch.contiguous_format)
                 if save_grad_unit else x_hat.new_empty((0,)))
    return _reduced_loss_like(x_hat, reduction), grad_unit


@torch.library.register_fake("fastelbo::gaussian_recon_loss_backward")
def _gaussian_recon_loss_backward_fake(grad_loss, x_hat, x, reduction, need_grad_x_hat, need_grad_x):
    def grad(needed):
        return (torch.empty_like(x_hat, memory_format=torch.contiguous_format)
                if needed else x_hat.new_empty((0,)))
    return grad(need_grad_x_hat), grad(need_grad_x)



class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on the first-order gradients whose own backward raises.

    Its inputs also include the tensors the gradients depend on (the op's inputs and incoming
    gradients), so that the node sits on every path from the gradients back to them: both
    `g.sum().backward()` and `torch.autograd.grad(g.sum(), mu)` reach the error instead of
    silently treating the gradients as constants.
    """

    @staticmethod
    def forward(ctx, name, num_grads, *tensors):
        ctx.name = name
        return tensors[:num_grads]

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(
            f"fastelbo: double backward (differentiating the gradients of {ctx.name}) is not "
            "supported; use fastelbo.reference for higher-order gradients"
        )


def _refuse_double_backward(name, grads, depends_on):
    """First-order gradients are exact; a graph built over them (create_graph=True) would be
    silently wrong, so it is routed through _RefuseDoubleBackward instead."""
    if not torch.is_grad_enabled():  # the usual case: backward without create_graph
        return grads
    present = [g for g in grads if g is not None]
    connected = [t for t in depends_on if isinstance(t, torch.Tensor) and t.requires_grad]
    wrapped = iter(_RefuseDoubleBackward.apply(name, len(present), *present, *connected))
    return tuple(next(wrapped) if g is not None else None for g in grads)


class ReparameterizeKL(torch.autograd.Function):
    """z = mu + exp(logvar / 2) * eps and the reduced Gaussian KL, in one fused op.

    apply(mu, logvar, eps, generator, num_samples, reduction_code, free_bits) -> (z, kl).
    The backward regenerates eps from the (seed, offset) the forward used (rng_state), so eps is
    never stored.
    """

    @staticmethod
    def forward(ctx, mu, logvar, eps, generator, num_samples, reduction, free_bits):
        z, kl, rng_state, kl_position_mean = _ops.reparameterize_kl(
            mu, logvar, eps, generator, num_samples, reduction, free_bits
        )
        ctx.save_for_backward(mu, logvar, eps, rng_state, kl_position_mean)
        ctx.num_samples = num_samples
        ctx.reduction = reduction
        ctx.free_bits = free_bits
        # An unused output (z or kl) gets None instead of a tensor of zeros: no wasted pass.
        ctx.set_materialize_grads(False)
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        mu, logvar, eps, rng_state, kl_position_mean = ctx.saved_tensors
        grad_mu, grad_logvar = _ops.reparameterize_kl_backward(
            grad_z, grad_kl, mu, logvar, eps, rng_state, kl_position_mean,
            ctx.num_samples, ctx.reduction, ctx.free_bits,
        )
        grad_mu, grad_logvar = _refuse_double_backward(
            "reparameterize_kl", (grad_mu, grad_logvar), (mu, logvar, grad_z, grad_kl))
        return grad_mu, grad_logvar, None, None, None, None, None


class GaussianReconLoss(torch.autograd.Function):
    """The reduced squared-error reconstruction loss 1/2 ||x_hat - x||^2, in one fused op.

    apply(x_hat, x, reduction_code, save_grad_unit) -> loss.
    save_grad_unit (CPU only; `gaussian_recon_loss` decides): the forward pass also writes
    scale * (x_hat - x), the gradient for an incoming gradient of exactly 1, and the backward of
    the usual `loss.backward()` hands it back with no pass over memory. It costs one
    x_hat-sized buffer held from forward to backward.
    """

    @staticmethod
    def forward(ctx, x_hat, x, reduction, save_grad_unit):
        loss, grad_unit = _ops.gaussian_recon_loss(x_hat, x, reduction, save_grad_unit)
        ctx.reduction = reduction
        ctx.has_grad_unit = save_grad_unit
        if save_grad_unit:
            ctx.save_for_backward(x_hat, x, grad_unit)
        else:
            ctx.save_for_backward(x_hat, x)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        need_x_hat, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        saved = ctx.saved_tensors
        x_hat, x = saved[0], saved[1]
        # Reading grad_loss on the CPU costs no device sync: it is one number there.
        if ctx.has_grad_unit and grad_loss.numel() == 1 and grad_loss.item() == 1.0:
            grad_x_hat = saved[2]
            grad_x = -grad_x_hat if need_x else None
        else:
            grad_x_hat, grad_x = _ops.gaussian_recon_loss_backward(
                grad_loss, x_hat, x, ctx.reduction, need_x_hat, need_x
            )
            grad_x = grad_x if need_x else None
        grad_x_hat = grad_x_hat if need_x_hat else None
        grad_x_hat, grad_x = _refuse_double_backward(
            "gaussian_recon_loss", (grad_x_hat, grad_x), (x_hat, x, grad_loss))
        return grad_x_hat, grad_x, None, None
