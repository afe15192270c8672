"""Plain-PyTorch implementations of fastelbo's functions: the validation oracle.

Same signatures, output dtypes and, for valid inputs, semantics as fastelbo.reparameterize_kl and
fastelbo.gaussian_recon_loss, written as ordinary differentiable torch code (autograd does the
backward). It does not validate its arguments: mismatched shapes broadcast where the fused ops
raise. When eps is not given it is drawn with torch.randn, so the draws differ from the fused
kernels' Philox stream; pass the same eps to both to compare values and gradients.
"""
import math

import torch

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _compute_dtype(dtype):
    # float32 arithmetic for half types (the kernels' arithmetic), the input dtype otherwise.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_reduction(reduction, function):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{function}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(per_element, reduction):
    """per_element: (B, ...) in the compute dtype -> the reduced loss."""
    batch = per_element.shape[0]
    per_sample = per_element.reshape(batch, math.prod(per_element.shape[1:])).sum(dim=1)
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if per_element.numel() == 0:
        return total  # an empty batch gives the identity, 0 (not 0 / 0)
    if reduction == "batchmean":
        return total / batch
    if reduction == "mean":
        return total / per_element.numel()
    return total


def reparameterize_kl(mu, logvar, *, reduction="batchmean", free_bits=0.0, num_samples=1,
                      generator=None, eps=None):
    """Reference of fastelbo.reparameterize_kl: returns (z, kl)."""
    _check_reduction(reduction, "reparameterize_kl")
    if num_samples < 1:
        raise ValueError(f"reparameterize_kl: num_samples must be >= 1, got {num_samples}")
    if free_bits < 0:
        raise ValueError(f"reparameterize_kl: free_bits must be >= 0, got {free_bits}")
    if free_bits > 0 and reduction == "none":
        raise ValueError("reparameterize_kl: free_bits > 0 is not defined for reduction 'none'")
    compute = _compute_dtype(mu.dtype)
    m, lv = mu.to(compute), logvar.to(compute)
    z_shape = (num_samples, *mu.shape) if num_samples > 1 else tuple(mu.shape)
    if eps is None:
        eps = torch.randn(z_shape, generator=generator, dtype=mu.dtype, device=mu.device)
    std = torch.exp(0.5 * lv)
    z = (m + std * eps.to(compute)).to(mu.dtype)

    kl_element = 0.5 * (m * m + torch.expm1(lv) - lv)
    if free_bits > 0:
        batch = mu.shape[0]
        if mu.numel() == 0:
            return z, kl_element.sum()
        position_mean = kl_element.reshape(batch, math.prod(mu.shape[1:])).mean(dim=0)  # kbar_j
        # max(kbar_j, lam), its gradient flowing only where kbar_j > lam: not at a tie, nor where
        # kbar_j is NaN (whose value stays NaN). (torch.clamp(min=) gives the same values, but its
        # gradient at a tie differs between torch versions: 1 in older ones, 0 in 2.14.)
        above = position_mean > free_bits
        floored = torch.where(above, position_mean, position_mean.detach().clamp(min=free_bits)).sum()
        scale = {"batchmean": 1.0, "sum": float(batch), "mean": batch / mu.numel()}[reduction]
        return z, floored * scale
    return z, _reduce(kl_element, reduction)


def gaussian_recon_loss(x_hat, x, *, reduction="batchmean"):
    """Reference of fastelbo.gaussian_recon_loss: 1/2 ||x_hat - x||^2 per sample, reduced."""
    _check_reduction(reduction, "gaussian_recon_loss")
    compute = _compute_dtype(x_hat.dtype)
    diff = x_hat.to(compute) - x.to(compute)
    return _reduce(0.5 * diff * diff, reduction)
