"""The public functional API (re-exported as fastelbo.reparameterize_kl / gaussian_recon_loss).

Reductions (both functions; dim 0 is the batch, every other dim is summed within a sample):
  "none"      -> per-sample losses, shape (B,)
  "sum"       -> the sum over everything
  "batchmean" -> sum / B (default): the ELBO convention, so `rec + beta * kl` is the beta-VAE
                 objective with no hidden rescaling
  "mean"      -> sum / numel (torch.nn.functional.mse_loss's convention)
An empty batch gives the reduction's identity (0, or an empty (0,) vector for "none").

Dtypes: float32, float64, float16, bfloat16, computed in float32 (float64 for float64). z and
gradients come back in the input dtype; losses in float32 for float16/bfloat16 inputs, else in the
input dtype.
"""
import numbers
import os

import torch

from .ops import REDUCTIONS

# The overloads themselves (one attribute lookup less per call than the packets).
_reparameterize_kl = torch.ops.fastelbo.reparameterize_kl.default
_gaussian_recon_loss = torch.ops.fastelbo.gaussian_recon_loss.default


# Whether gaussian_recon_loss's forward also writes the x_hat gradient for an incoming gradient of
# 1 when x_hat requires grad, so that the usual loss.backward() costs no pass over memory (the
# gradient buffer is then allocated in the forward instead of the backward). Off with
# FASTELBO_GRAD_IN_FORWARD=0 in the environment at import: the backward then reads x_hat and x
# again (the memory floor of DESIGN.md section 3), e.g. to time one way against the other.
_GRAD_IN_FORWARD = os.environ.get("FASTELBO_GRAD_IN_FORWARD", "1") != "0"


def _describe(value):
    """A number for an error message: its repr, or for an integer past 64 bits its size (str()
    of a huge int is a wall of digits, and refuses past 4300 of them)."""
    if isinstance(value, numbers.Integral) and abs(int(value)) >= 2**64:
        return f"an integer of {int(value).bit_length()} bits"
    return repr(value)


def _as_float(value, owner, name, rule):
    """float(value) for a real number, a ValueError naming the argument where it is past the doubles."""
    try:
        return float(value)
    except OverflowError:  # an int or Fraction beyond the doubles
        raise ValueError(f"{owner}: {name} must be {rule}, got {_describe(value)}") from None


def _reduction_code(reduction, function):
    code = REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    if code is None:
        raise ValueError(
            f"{function}: reduction must be one of 'none', 'sum', 'mean', 'batchmean', got {reduction!r}"
        )
    return code


def _check_tensor(value, name, function):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{function}: {name} must be a torch.Tensor, got {type(value).__name__}")
    # The kernels read dense memory. Without this check a sparse tensor fails in the dispatcher
    # ("Could not run ... with arguments from the 'SparseCPU' backend") and a nested one inside
    # torch ("NestedTensorImpl doesn't support sizes"), neither naming the argument.
    if value.is_nested:
        raise TypeError(f"{function}: {name} must be a dense (strided) tensor, got a nested tensor")
    if value.layout != torch.strided:
        raise TypeError(f"{function}: {name} must be a dense (strided) tensor, got layout {value.layout} "
                        f"(.to_dense() converts it)")


def reparameterize_kl(mu, logvar, *, reduction="batchmean", free_bits=0.0, num_samples=1,
                      generator=None, eps=None):
    """Reparameterized sample and Gaussian KL of q(z|x) = N(mu, diag(exp(logvar))) against N(0, I).

    Returns (z, kl):
      z  = mu + exp(logvar / 2) * eps, eps ~ N(0, 1) drawn inside the kernel (never stored: the
           backward regenerates it). Shape mu.shape, or (num_samples, *mu.shape) for num_samples > 1
           (independent draws; kl does not depend on them).
      kl = 1/2 sum(mu^2 + exp(logvar) - 1 - logvar), reduced as `reduction` says.

    Args:
      mu, logvar: same shape (B, ...), same floating dtype and device.
      reduction: "none" | "sum" | "mean" | "batchmean" (default), see the module docstring.
      free_bits: lam >= 0 nats (Kingma et al. 2016). With lam > 0 each latent position's batch-mean
        KL kbar_j is floored at lam: the loss is sum_j max(kbar_j, lam) for "batchmean", B times
        that for "sum", and that over the per-sample size for "mean"; positions below or at the
        floor (or with a NaN kbar_j) get no KL gradient. Not defined for "none" (ValueError).
      num_samples: K >= 1 draws of z in one call.
      generator: a torch.Generator on the inputs' device; default: torch's default generator, so
        torch.manual_seed(s) reproduces every draw bit for bit (and torch.utils.checkpoint, which
        restores only the default generators, reruns a segment with the same eps).
      eps: optional tensor of z's shape and mu's dtype used instead of drawing (validation,
        gradcheck). It is not differentiated: it must not require grad.

    Raises TypeError (non-floating or mismatched dtypes, sparse or nested tensors), ValueError (shapes, reduction,
    num_samples < 1, free_bits < 0, free_bits with "none"), RuntimeError (different devices),
    all before any kernel runs.
    """
    code = _reduction_code(reduction, "reparameterize_kl")
    _check_tensor(mu, "mu", "reparameterize_kl")
    _check_tensor(logvar, "logvar", "reparameterize_kl")
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"reparameterize_kl: num_samples must be an int, got {num_samples!r}")
    # (Counts and floors beyond what the op's int64 / double arguments hold; the rest is the op's to refuse.)
    if num_samples >= 2**63:
        raise ValueError(f"reparameterize_kl: num_samples must be below 2**63, got {_describe(num_samples)}")
    if num_samples < -2**63:
        raise ValueError(f"reparameterize_kl: num_samples must be >= 1, got {_describe(num_samples)}")
    if isinstance(free_bits, bool) or not isinstance(free_bits, numbers.Real):
        raise TypeError(f"reparameterize_kl: free_bits must be a real number, got {free_bits!r}")
    free_bits = _as_float(free_bits, "reparameterize_kl", "free_bits", "a finite number >= 0")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"reparameterize_kl: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if eps is not None:
        _check_tensor(eps, "eps", "reparameterize_kl")  # (an eps that requires grad: the op refuses it)
    z, kl, _rng_state, _kl_position_mean = _reparameterize_kl(mu, logvar, eps, generator, int(num_samples), code,
                                                             free_bits)
    return z, kl


def gaussian_recon_loss(x_hat, x, *, reduction="batchmean"):
    """Squared-error reconstruction loss 1/2 ||x_hat - x||^2 per sample (the negative
    log-likelihood of a unit-variance Gaussian decoder, constants dropped), reduced as
    `reduction` says. x_hat and x: same shape (B, ...), dtype and device. Gradients flow to x_hat,
    and to x when it requires grad.
    """
    code = _reduction_code(reduction, "gaussian_recon_loss")
    _check_tensor(x_hat, "x_hat", "gaussian_recon_loss")
    _check_tensor(x, "x", "gaussian_recon_loss")
    # The forward prepares the gradient of the usual loss.backward() (incoming gradient 1) in the
    # same pass; the backward hands it back, or turns it into the gradient for another incoming
    # gradient (csrc/autograd.cpp, gaussian_recon_loss_finish_grad_). On a GPU only when x needs
    # no gradient: the backward would compute both gradients from x_hat and x anyway, and the
    # prepared one would be wasted. Not under torch.compile, which traces the plain backward op.
    save_grad_unit = (
        _GRAD_IN_FORWARD
        and code != REDUCTIONS["none"]
        and x_hat.requires_grad
        and (x_hat.device.type == "cpu" or (x_hat.device.type == "cuda" and not x.requires_grad))
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )
    loss, _grad_unit = _gaussian_recon_loss(x_hat, x, code, save_grad_unit)
    return loss
