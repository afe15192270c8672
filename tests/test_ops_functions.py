"""fastelbo.ops.ReparameterizeKL and GaussianReconLoss: the fused ops as torch.autograd.Function
subclasses (README, API). They must give exactly the values and gradients of the
functional API (same kernels), on every device, pass gradcheck in float64, work under torch.func
(grad, and vmap of grad: per-example gradients), and refuse double backward with a clear error
when gradients are differentiated."""
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
    """A backward that builds a graph (create_graph=True) gives the exact gradients; differentiating
    them raises, naming the problem, instead of treating them as constants."""
    mu, logvar = _leaf((3, 4), 1, device), _leaf((3, 4), 2, device)
    z, kl = ReparameterizeKL.apply(mu, logvar, None, None, 1, REDUCTIONS["sum"], 0.0)
    (grad_mu,) = torch.autograd.grad(kl, mu, create_graph=True)
    torch.testing.assert_close(grad_mu, mu.detach(), rtol=0, atol=0)  # d/dmu of sum(kl) = mu
    with pytest.raises(RuntimeError, match="double backward.*ReparameterizeKL"):
        grad_mu.sum().backward()
    with pytest.raises(RuntimeError, match="double backward.*ReparameterizeKL"):
        torch.autograd.grad(torch.autograd.grad(z.sum(), logvar, create_graph=True)[0].sum(), mu)
    x_hat, x = _leaf((3, 4), 3, device), _leaf((3, 4), 4, device)
    loss = GaussianReconLoss.apply(x_hat, x, REDUCTIONS["sum"])
    (grad_x_hat,) = torch.autograd.grad(loss, x_hat, create_graph=True)
    torch.testing.assert_close(grad_x_hat, (x_hat - x).detach(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="double backward.*GaussianReconLoss"):
        torch.autograd.grad(grad_x_hat.sum(), x)


# vmap runs the ops through torch's per-example fallback, which warns that it is slow: expected here.
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_torch_func_grad_and_per_example_gradients(device):
    """torch.func.grad and vmap(grad) (per-example gradients) through the Functions: the gradients
    autograd gives, example by example; grad of grad raises the double-backward error."""
    from torch.func import grad, vmap

    code = REDUCTIONS["sum"]
    x_hat, x = (_leaf((5, 7), seed, device).detach() for seed in (1, 2))
    mu, logvar = (_leaf((5, 3), seed, device).detach() for seed in (3, 4))
    eps = _leaf((5, 3), 5, device).detach()

    def loss(xh, xv, m, lv, e):  # one example: add the batch dim of 1 the ops need
        z, kl = ReparameterizeKL.apply(m[None], lv[None], e[None], None, 1, code, 0.0)
        return GaussianReconLoss.apply(xh[None], xv[None], code) + kl + 0.5 * (z * z).sum()

    per_example = vmap(grad(loss, argnums=(0, 2, 3)))(x_hat, x, mu, logvar, eps)
    for i in range(5):
        leaves = [t[i].clone().requires_grad_() for t in (x_hat, mu, logvar)]
        want = torch.autograd.grad(loss(leaves[0], x[i], leaves[1], leaves[2], eps[i]), leaves)
        for name, got, w in zip(("x_hat", "mu", "logvar"), per_example, want):
            torch.testing.assert_close(got[i], w, rtol=1e-6, atol=1e-6, msg=lambda m: f"example {i}, {name}: {m}")
    with pytest.raises(RuntimeError, match="double backward.*GaussianReconLoss"):
        grad(lambda a: grad(lambda b: GaussianReconLoss.apply(b, x, code))(a).sum())(x_hat)


def test_functional_api_is_refused_by_torch_func(device):
    """The functional API's autograd is a C++ torch::autograd::Function, which torch.func refuses
    with its own error (the README says so and points to the Functions above instead)."""
    from torch.func import grad

    x_hat, x = (_leaf((3, 4), seed, device).detach() for seed in (1, 2))
    mu, logvar = (_leaf((3, 2), seed, device).detach() for seed in (3, 4))
    with pytest.raises(RuntimeError, match="C\\+\\+ torch::autograd::Function"):
        grad(lambda a: fastelbo.gaussian_recon_loss(a, x))(x_hat)
    with pytest.raises(RuntimeError, match="C\\+\\+ torch::autograd::Function"):
        grad(lambda m: fastelbo.reparameterize_kl(m, logvar, eps=torch.zeros_like(m))[1])(mu)
