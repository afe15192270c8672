"""nn.Modules over the fused loss: `VAE` (encoder + decoder + loss) and `ELBOLoss` (the loss alone).

Both compute the (beta-)VAE objective of the README with a unit-variance Gaussian decoder:

    loss = recon + beta * kl,   recon = 1/2 ||x_hat - x||^2,   kl = KL(N(mu, exp(logvar)) || N(0, I))

each term reduced as `reduction` says ("batchmean" by default: the per-sample sum averaged over the
batch, so `loss` is the negative ELBO per data point when beta = 1).

`backend="fused"` (default) runs fastelbo's fused kernels; `backend="reference"` runs the same math
in plain PyTorch (fastelbo.reference), e.g. to compare the two on the same model, and refuses the
same mismatched shapes (ValueError) where plain PyTorch would broadcast them. With the reference
backend eps is drawn with torch.randn instead of fastelbo's Philox stream, so the two backends draw
different samples from the same seed.
"""
import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import functional, reference

BACKENDS = {"fused": functional, "reference": reference}
_REDUCTIONS = ("none", "sum", "mean", "batchmean")


class ELBOOutput(NamedTuple):
    """What `ELBOLoss` returns: the objective and its two terms (same reduction for all three)."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


class VAEOutput(NamedTuple):
    """What `VAE.forward` returns.

    loss = recon + beta * kl (reduced); x_hat = decoder(z); z the latent that was decoded (a sample
    in training mode, mu otherwise); mu and logvar the encoder's posterior parameters.
    """

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    x_hat: torch.Tensor
    z: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


def _check_options(beta, reduction, free_bits, backend, owner):
    """The functional API's rules for the options a module stores, checked when it is built rather
    than at its first call: TypeError for a non-number, ValueError for a bad value."""
    for name, value in (("beta", beta), ("free_bits", free_bits)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
        if not math.isfinite(functional._as_float(value, owner, name, "finite")):
            raise ValueError(f"{owner}: {name} must be finite, got {value!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{owner}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if free_bits < 0:
        raise ValueError(f"{owner}: free_bits must be a number >= 0, got {free_bits!r}")
    if free_bits > 0 and reduction == "none":
        raise ValueError(f"{owner}: free_bits > 0 is not defined for reduction 'none'")
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be one of {tuple(BACKENDS)}, got {backend!r}")


def _shape_str(shape):
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _check_same_shape(function, name, t, ref_name, ref_shape):
    """The fused ops refuse operands of different shapes before any kernel runs (csrc/ops.cpp,
    check_same_shape; the same message here). fastelbo.reference does not validate, and plain
    PyTorch broadcasts: a decoder output of (8, 1, 64) against x of (8, 64) would give a loss over
    (8, 8, 64) pairs. The modules check the reference backend's operands so that both backends
    accept the same calls. (The fused backend is not checked twice: its op does it.)"""
    if tuple(t.shape) != tuple(ref_shape):
        raise ValueError(f"{function}: {name} and {ref_name} must have the same shape, got {name} "
                         f"{_shape_str(t.shape)} and {ref_name} {_shape_str(ref_shape)}")


class ELBOLoss(nn.Module):
    """The (beta-)VAE loss alone, for your own training loop.

    The sample has to be drawn before the decoder runs, so the loss comes in two calls:
    `sample(mu, logvar) -> (z, kl)` draws z = mu + exp(logvar / 2) * eps and the reduced KL in one
    fused op, and `forward(x_hat, x, kl) -> ELBOOutput(loss, recon, kl)` adds the reconstruction
    term: loss = recon + beta * kl.

    Args:
      beta: weight of the KL term (1.0: the negative ELBO).
      reduction: "batchmean" (default), "sum", "mean" or "none" (per-sample losses), for both terms.
      free_bits: floor in nats on each latent position's batch-mean KL (0 = off), see
        fastelbo.reparameterize_kl.
      backend: "fused" (fastelbo's kernels, default) or "reference" (plain PyTorch).

    Example::

        elbo = fastelbo.ELBOLoss(beta=0.5)
        mu, logvar = encoder(x)
        z, kl = elbo.sample(mu, logvar)
        out = elbo(decoder(z), x, kl)      # ELBOOutput(loss, recon, kl)
        out.loss.backward()
    """

    def __init__(self, beta=1.0, reduction="batchmean", free_bits=0.0, *, backend="fused"):
        super().__init__()
        _check_options(beta, reduction, free_bits, backend, "ELBOLoss")
        self.beta = float(beta)
        self.reduction = reduction
        self.free_bits = float(free_bits)
        self.backend = backend

    @property
    def _functions(self):
        return BACKENDS[self.backend]

    def sample(self, mu, logvar, *, generator: Optional[torch.Generator] = None, eps=None):
        """(z, kl): the reparameterized sample and the reduced KL (see fastelbo.reparameterize_kl).

        eps: optional tensor of mu's shape used instead of drawing; eps=torch.zeros_like(mu) gives
        z = mu exactly (the posterior mean) without touching the random stream, wherever
        exp(logvar / 2) is finite (z = mu + std * 0 is NaN where it overflows: logvar > 177 in
        float32, where the KL is infinite anyway; the reference does the same).
        """
        if self.backend == "reference":
            _check_same_shape("reparameterize_kl", "logvar", logvar, "mu", mu.shape)
            if eps is not None:  # one draw: z has mu's shape
                _check_same_shape("reparameterize_kl", "eps", eps, "z", mu.shape)
        return self._functions.reparameterize_kl(
            mu, logvar, reduction=self.reduction, free_bits=self.free_bits,
            generator=generator, eps=eps,
        )

    def forward(self, x_hat, x, kl) -> ELBOOutput:
        """ELBOOutput(loss=recon + beta * kl, recon, kl) with recon = 1/2 ||x_hat - x||^2, reduced."""
        if self.backend == "reference":
            _check_same_shape("gaussian_recon_loss", "x", x, "x_hat", x_hat.shape)
        recon = self._functions.gaussian_recon_loss(x_hat, x, reduction=self.reduction)
        return ELBOOutput(recon + self.beta * kl, recon, kl)

    def extra_repr(self):
        return (f"beta={self.beta}, reduction={self.reduction!r}, free_bits={self.free_bits}, "
                f"backend={self.backend!r}")


class VAE(nn.Module):
    """A Gaussian VAE around your encoder and decoder, with the fused loss.

    encoder(x) returns either a pair (mu, logvar) or one tensor whose dim 1 holds mu then logvar
    (the latent-diffusion convention: it is split in half along dim 1, so dim 1 must be even).
    decoder(z) returns x_hat of x's shape.

    forward(x) draws z = mu + exp(logvar / 2) * eps with the fused sample+KL op, decodes it and
    returns VAEOutput(loss, recon, kl, x_hat, z, mu, logvar), loss = recon + beta * kl. In eval mode
    (or with forward(x, sample=False)) it decodes z = mu instead and draws nothing; kl is still the
    KL of the posterior.

    Args:
      encoder, decoder: nn.Modules (or callables) as above.
      beta, reduction, free_bits, backend: as for ELBOLoss (the VAE's `loss_fn`).

    Example::

        encoder = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 2 * 8))  # mu | logvar
        decoder = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 64))
        vae = fastelbo.VAE(encoder, decoder, beta=1.0)
        out = vae(x)                       # x: (B, 64)
        out.loss.backward()                # out.recon, out.kl, out.x_hat, out.z are there too
    """

    def __init__(self, encoder, decoder, *, beta=1.0, reduction="batchmean", free_bits=0.0,
                 backend="fused"):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.loss_fn = ELBOLoss(beta, reduction, free_bits, backend=backend)

    # The loss options live on loss_fn; these make `vae.beta = 0.5` (e.g. KL annealing) work.
    @property
    def beta(self):
        return self.loss_fn.beta

    @beta.setter
    def beta(self, value):
        _check_options(value, self.loss_fn.reduction, self.loss_fn.free_bits, self.loss_fn.backend, "VAE")
        self.loss_fn.beta = float(value)

    @property
    def reduction(self):
        return self.loss_fn.reduction

    @property
    def free_bits(self):
        return self.loss_fn.free_bits

    @property
    def backend(self):
        return self.loss_fn.backend

    def encode(self, x):
        """(mu, logvar) of q(z|x), from either encoder convention."""
        out = self.encoder(x)
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise ValueError(f"VAE: the encoder returned {len(out)} values; expected (mu, logvar) "
                                 "or one tensor holding both along dim 1")
            return out[0], out[1]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"VAE: the encoder must return (mu, logvar) or a tensor, got {type(out).__name__}")
        if out.dim() < 2 or out.shape[1] % 2 != 0:
            raise ValueError(
                "VAE: an encoder that returns one tensor must hold mu and logvar along dim 1, "
                f"so dim 1 must be even; got shape {tuple(out.shape)}"
            )
        mu, logvar = out.chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x, *, sample: Optional[bool] = None, generator: Optional[torch.Generator] = None) -> VAEOutput:
        """VAEOutput(loss, recon, kl, x_hat, z, mu, logvar).

        sample: draw z from q(z|x) (True) or decode z = mu (False); default: self.training.
        generator: torch.Generator for the draw (default: torch's default generator).
        """
        if sample is None:
            sample = self.training
        mu, logvar = self.encode(x)
        # z = mu through the same op (eps = 0): exact for finite exp(logvar / 2), draws nothing, and
        # keeps kl's gradients.
        eps = None if sample else torch.zeros_like(mu)
        z, kl = self.loss_fn.sample(mu, logvar, generator=generator, eps=eps)
        x_hat = self.decoder(z)
        loss, recon, kl = self.loss_fn(x_hat, x, kl)
        return VAEOutput(loss, recon, kl, x_hat, z, mu, logvar)
