"""fastelbo.ops.ReparameterizeKL and GaussianReconLoss: the fused ops as torch.autograd.Function
subclasses (DESIGN.md section 2). They must give exactly the values and gradients of the
functional API (same kernels), on every device, pass gradcheck in float64, and refuse double
backward (create_graph=True) with a clear error."""
import pytest
import torch

import fastelbo
from fastelbo.ops import REDUCTIONS, GaussianReconLoss, ReparameterizeKL


def test_they_are_autograd_functions():
    assert issubclass(ReparameterizeKL, torch.autograd.Function)
    assert issubclass(GaussianReconLoss, torch.autograd.Function)


def _leaf(shape, seed, device, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("reduction,free_bits", [("none", 0.0), ("sum", 0.0), ("batchmean", 0.0), ("mean", 0.2)])
def test_reparameterize_kl_function_matches_functional(device, reduction, free_bits, num_samples):
    shape = (6, 9)
    z_shape = (num_samples, *shape) if num_samples > 1 else shape
    eps = _leaf(z_shape, 3, device).detach()
    weights = _leaf(z_shape, 4, device).detach()
    results = []
    for use_function in (True, False):
        mu, logvar = _leaf(shape, 1, device), _leaf(shape, 2, device, scale=0.5)
        if use_function:
            z, kl = ReparameterizeKL.apply(mu, logvar, eps, None, num_samples, REDUCTIONS[reduction], free_bits)
        else:
            z, kl = fastelbo.reparameterize_kl(mu, logvar, reduction=reduction, free_bits=free_bits,
                                               num_samples=num_samples, eps=eps)
        ((z * weights).sum() + 1.7 * kl.sum()).backward()
        results.append((z, kl, mu.grad, logvar.grad))
    for name, a, b in zip(("z", "kl", "grad_mu", "grad_logvar"), *results):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_gaussian_recon_loss_function_matches_functional(device, reduction):
    results = []
    for use_function in (True, False):
        x_hat, x = _leaf((5, 3, 7), 1, device), _leaf((5, 3, 7), 2, device)
        if use_function:
            loss = GaussianReconLoss.apply(x_hat, x, REDUCTIONS[reduction])
        else:
            loss = fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)
        (loss * torch.arange(1, loss.numel() + 1, device=device).reshape(loss.shape)).sum().backward()
        results.append((loss, x_hat.grad, x.grad))
    for name, a, b in zip(("loss", "grad_x_hat", "grad_x"), *results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_gradcheck_float64(device):
    mu, logvar = _leaf((3, 4), 1, device, torch.float64), _leaf((3, 4), 2, device, torch.float64, 0.5)
    eps = _leaf((3, 4), 3, device, torch.float64).detach()
    assert torch.autograd.gradcheck(
        lambda m, lv: ReparameterizeKL.apply(m, lv, eps, None, 1, REDUCTIONS["batchmean"], 0.0), (mu, logvar))
    x_hat, x = _leaf((3, 5), 4, device, torch.float64), _leaf((3, 5), 5, device, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: GaussianReconLoss.apply(a, b, REDUCTIONS["none"]), (x_hat, x))


def test_double_backward_raises(device):
    """Asking for a differentiable gradient (create_graph=True) raises, naming the problem, instead
    of handing back gradients that a second differentiation would treat as constants."""
    mu, logvar = _leaf((3, 4), 1, device), _leaf((3, 4), 2, device)
    z, kl = ReparameterizeKL.apply(mu, logvar, None, None, 1, REDUCTIONS["sum"], 0.0)
    with pytest.raises(RuntimeError, match="double backward.*ReparameterizeKL"):
        torch.autograd.grad(kl, mu, create_graph=True)
    x_hat, x = _leaf((3, 4), 3, device), _leaf((3, 4), 4, device)
    loss = GaussianReconLoss.apply(x_hat, x, REDUCTIONS["sum"])
    with pytest.raises(RuntimeError, match="double backward.*GaussianReconLoss"):
        torch.autograd.grad(loss, x_hat, create_graph=True)
