"""The compiled ops, torch.ops.fastelbo.*, and their fake implementations.

Four ops: reparameterize_kl and gaussian_recon_loss (forward), reparameterize_kl_backward and
gaussian_recon_loss_backward. The dispatcher picks the CPU or CUDA kernel; arguments are validated
in the compiled ops, before any kernel runs. Autograd is compiled too: the two forward ops have an
Autograd-key kernel (csrc/autograd.cpp), a C++ torch::autograd::Function each, whose backward calls
the backward op and refuses double backward with a clear RuntimeError. So calling the forward op on
tensors that require grad records the backward; no Python runs in the backward pass.

Most users call `fastelbo.reparameterize_kl` and `fastelbo.gaussian_recon_loss`, which map the
reduction names to the codes below.
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
