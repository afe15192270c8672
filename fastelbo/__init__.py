"""fastelbo: the fastest correct Gaussian VAE loss for PyTorch.

Fused C++/CUDA kernels for the reparameterized sample, the Gaussian KL and the squared-error
reconstruction, with their backward passes, behind a drop-in functional API:

    z, kl = fastelbo.reparameterize_kl(mu, logvar)          # z = mu + exp(logvar / 2) * eps
    rec = fastelbo.gaussian_recon_loss(decoder(z), x)
    loss = rec + beta * kl                                   # the (beta-)VAE negative ELBO

`fastelbo.reference` holds the same two functions in plain PyTorch (the validation oracle) and
`fastelbo.ops` the compiled ops behind them (torch.ops.fastelbo.*, whose autograd is a C++
torch::autograd::Function per forward op) and the same ops as torch.autograd.Function subclasses
(ReparameterizeKL, GaussianReconLoss).
"""
from ._extension import _C  # noqa: F401  (loads the kernels: registers torch.ops.fastelbo)
from . import ops, reference
from .functional import gaussian_recon_loss, reparameterize_kl
from .modules import VAE, ELBOLoss, VAEOutput, ELBOOutput

__version__ = "0.1.0"


def empty_cpu_cache():
    """Returns the CPU output buffers fastelbo keeps for reuse to the system (see README, "On the
    CPU"); like torch.cuda.empty_cache(), only unused buffers are affected."""
    _C._empty_cpu_cache()


__all__ = ["reparameterize_kl", "gaussian_recon_loss", "VAE", "ELBOLoss", "VAEOutput", "ELBOOutput", "ops", "reference",
           "empty_cpu_cache", "__version__"]
