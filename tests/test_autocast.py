"""fastelbo under torch.autocast (csrc/autocast.cpp): mixed floating dtypes are promoted to the
widest of them, as torch's promote ops do, instead of raising the TypeError they get outside
autocast; inputs that agree on a dtype are passed through uncast. Results and gradients are those
of the same call made outside autocast on the promoted tensors, bit for bit, and gradients come back
in each input's own dtype.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastelbo
from fastelbo import ops

from conftest import recon_inputs, requires_cuda, sample_inputs

LOW = [torch.bfloat16, torch.float16]
LOW_IDS = ["bfloat16", "float16"]


class CountCasts(TorchDispatchMode):
    """Counts the dtype casts (aten._to_copy) that reach the dispatcher below autograd."""

    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_()


@pytest.mark.parametrize("low", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_recon_promotes_a_mixed_pair(device, low, reduction):
    """A decoder output in 16 bits and float32 data (every mixed-precision VAE step): the loss is
    the float32 call's, x_hat's gradient that call's gradient cast back to x_hat's dtype."""
    x_hat32, x = recon_inputs((4, 37), torch.float32, device, seed=1)
    x_hat = leaf(x_hat32, low)
    with torch.autocast(device, dtype=low):
        loss = fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)
    grad_out = torch.rand(loss.shape, device=device) + 0.5
    (grad,) = torch.autograd.grad(loss, x_hat, grad_out)

    x_hat_promoted = leaf(x_hat, torch.float32)
    want = fastelbo.gaussian_recon_loss(x_hat_promoted, x, reduction=reduction)
    (want_grad,) = torch.autograd.grad(want, x_hat_promoted, grad_out)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, want)
    assert grad.dtype == low
    assert torch.equal(grad, want_grad.to(low))


@pytest.mark.parametrize("low", LOW, ids=LOW_IDS)
def test_same_dtypes_are_not_cast(device, low):
    """Inputs that agree on a 16-bit dtype are read as they are (no cast: half the bytes of
    float32), with the same values as outside autocast; a mixed pair costs exactly one cast."""
    x_hat, x = recon_inputs((3, 20), low, device, seed=2)
    mu, logvar = sample_inputs((3, 5), low, device, seed=3, with_eps=False)
    with torch.autocast(device, dtype=low):
        with CountCasts() as counter:
            loss = fastelbo.gaussian_recon_loss(x_hat, x)
            torch.manual_seed(4)
            z, kl = fastelbo.reparameterize_kl(mu, logvar)
        assert counter.casts == 0
        x32 = x.float()
        with CountCasts() as counter:
            fastelbo.gaussian_recon_loss(x_hat, x32)
        assert counter.casts == 1
    torch.manual_seed(4)
    z_plain, kl_plain = fastelbo.reparameterize_kl(mu, logvar)
    assert z.dtype == low and kl.dtype == torch.float32
    assert torch.equal(loss, fastelbo.gaussian_recon_loss(x_hat, x))
    assert torch.equal(z, z_plain) and torch.equal(kl, kl_plain)


@pytest.mark.parametrize("low", LOW, ids=LOW_IDS)
def test_reparameterize_kl_promotes_mixed_latents(device, low):
    """mu in 16 bits, logvar (and a given eps) in float32: computed in float32 on the promoted
    tensors, the same draw as outside autocast; each gradient in its input's dtype."""
    mu32, logvar, eps = sample_inputs((6, 9), torch.float32, device, seed=5)
    mu = leaf(mu32, low)
    logvar = logvar.detach().requires_grad_()
    for given_eps in (None, eps.detach().to(low)):
        with torch.autocast(device, dtype=low):
            torch.manual_seed(6)
            z, kl = fastelbo.reparameterize_kl(mu, logvar, eps=given_eps)
        g_z = torch.randn(z.shape, device=device)
        grads = torch.autograd.grad((z, kl), (mu, logvar), (g_z, torch.tensor(0.7, device=device)))

        mu_p = leaf(mu, torch.float32)
        torch.manual_seed(6)
        z_want, kl_want = fastelbo.reparameterize_kl(
            mu_p, logvar, eps=None if given_eps is None else given_eps.float())
        want = torch.autograd.grad((z_want, kl_want), (mu_p, logvar), (g_z, torch.tensor(0.7, device=device)))
        assert z.dtype == torch.float32
        assert torch.equal(z, z_want) and torch.equal(kl, kl_want)
        assert grads[0].dtype == low and grads[1].dtype == torch.float32
        assert torch.equal(grads[0], want[0].to(low)) and torch.equal(grads[1], want[1])


def test_mismatched_dtypes_still_raise_outside_autocast(device):
    x_hat, x = recon_inputs((2, 3), torch.float32, device, seed=7)
    with pytest.raises(TypeError, match="same dtype"):
        fastelbo.gaussian_recon_loss(x_hat.bfloat16(), x)
    with pytest.raises(TypeError, match="same dtype"):
        fastelbo.reparameterize_kl(x.bfloat16(), x)
    # CPU autocast does not apply to CUDA tensors (the other way round:
    # test_cuda_autocast_does_not_apply_to_cpu_tensors, a `cuda` test, so that gpu_check.sh runs it)
    if device == "cuda":
        _assert_autocast_leaves_mismatch_alone("cpu", x_hat, x)


def _assert_autocast_leaves_mismatch_alone(autocast_device, x_hat, x):
    """Autocast of a device type other than the tensors' does not promote: the TypeError stays."""
    with torch.autocast(autocast_device, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="same dtype"):
            fastelbo.gaussian_recon_loss(x_hat.bfloat16(), x)
        with pytest.raises(TypeError, match="same dtype"):
            fastelbo.reparameterize_kl(x.bfloat16(), x)


@requires_cuda
def test_cuda_autocast_does_not_apply_to_cpu_tensors():
    x_hat, x = recon_inputs((2, 3), torch.float32, "cpu", seed=7)
    _assert_autocast_leaves_mismatch_alone("cuda", x_hat, x)


@pytest.mark.parametrize("low", LOW, ids=LOW_IDS)
def test_autograd_functions_promote_like_the_functional_api(device, low):
    """fastelbo.ops.ReparameterizeKL / GaussianReconLoss under autocast: the values and gradients of
    the functional API (their backward runs on the tensors the forward used)."""
    code = ops.REDUCTIONS["batchmean"]
    x_hat32, x = recon_inputs((3, 11), torch.float32, device, seed=8)
    mu32, logvar, eps = sample_inputs((3, 4), torch.float32, device, seed=9)

    def run(functions):
        x_hat, mu, lv = leaf(x_hat32, low), leaf(mu32, low), logvar.detach().requires_grad_()
        with torch.autocast(device, dtype=low):
            if functions:
                rec = ops.GaussianReconLoss.apply(x_hat, x, code)
                z, kl = ops.ReparameterizeKL.apply(mu, lv, eps, None, 1, code, 0.0)
            else:
                rec = fastelbo.gaussian_recon_loss(x_hat, x)
                z, kl = fastelbo.reparameterize_kl(mu, lv, eps=eps)
        grads = torch.autograd.grad(rec + kl + z.sum(), (x_hat, mu, lv))
        return (rec, z, kl, *grads)

    for a, b in zip(run(True), run(False)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_compiled_under_autocast(device):
    """torch.compile traces through the autocast kernels (on fake tensors) and gives the eager values."""
    x_hat, x = recon_inputs((4, 10), torch.float32, device, seed=10)
    mu, logvar, eps = sample_inputs((4, 3), torch.float32, device, seed=11)

    def step(x_hat, x, mu, logvar, eps):
        with torch.autocast(device, dtype=torch.bfloat16):
            z, kl = fastelbo.reparameterize_kl(mu.bfloat16(), logvar, eps=eps)
            return fastelbo.gaussian_recon_loss(x_hat.bfloat16(), x) + kl, z

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    args = (x_hat.detach(), x, mu.detach(), logvar.detach(), eps)
    for got, want in zip(compiled(*args), step(*args)):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("low", LOW, ids=LOW_IDS)
def test_vae_module_trains_under_autocast(device, low):
    """fastelbo.VAE with Linear layers under autocast (16-bit activations, float32 data): the step
    runs, every parameter gets a finite gradient, and the loss is the float32 model's to within
    the 16-bit rounding of the activations (posterior mean, so no draw)."""
    torch.manual_seed(12)
    vae = fastelbo.VAE(torch.nn.Linear(16, 8), torch.nn.Linear(4, 16)).to(device).eval()
    x = torch.randn(32, 16, device=device)
    with torch.autocast(device, dtype=low):
        out = vae(x, sample=False)
    assert out.x_hat.dtype == low and out.loss.dtype == torch.float32
    out.loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    want = vae(x, sample=False).loss  # float32 throughout
    # one unit in the last place of the 16-bit format (bfloat16 keeps 8 significant bits, float16
    # 11); the activations' roundings mostly cancel in the sums (seen: 2^-10 .. 2^-14 of the loss)
    rtol = 2.0 ** -8 if low == torch.bfloat16 else 2.0 ** -11
    torch.testing.assert_close(out.loss.detach(), want.detach(), rtol=rtol, atol=0)


def test_under_autocast_argument_errors_come_before_any_cast(device):
    """With inputs of two dtypes the autocast kernels cast one of them; a call that the op will
    refuse anyway (shapes, a dtype the kernels do not compute) raises the op's own error, naming
    the argument, and no cast runs first. (float8 reached torch's promotion, which raised its own
    RuntimeError instead of the documented TypeError.)"""
    x_hat, x = recon_inputs((2, 3), torch.float32, device, seed=9)
    x_hat16, x8 = x_hat.bfloat16(), x.to(torch.float8_e4m3fn)  # (made before counting casts)
    wrong_shape = torch.zeros(2, 4, device=device)
    with torch.autocast(device, dtype=torch.bfloat16), CountCasts() as counter:
        with pytest.raises(ValueError, match=r"x and x_hat must have the same shape"):
            fastelbo.gaussian_recon_loss(x_hat16, wrong_shape)
        with pytest.raises(ValueError, match=r"logvar and mu must have the same shape"):
            fastelbo.reparameterize_kl(x_hat16, wrong_shape)
        with pytest.raises(TypeError, match=r"x must be a float32, float64, float16 or bfloat16 tensor"):
            fastelbo.gaussian_recon_loss(x_hat, x8)
        with pytest.raises(TypeError, match=r"logvar must be a float32, float64, float16 or bfloat16 tensor"):
            fastelbo.reparameterize_kl(x_hat, x8)
        fastelbo.gaussian_recon_loss(x_hat16, x)  # the control: a call that goes through is cast
    assert counter.casts == 1
    # The autograd.Function entry points promote in Python before they apply: float8 is left to
    # the op's TypeError there too.
    with torch.autocast(device, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"x must be a float32, float64, float16 or bfloat16 tensor"):
            ops.GaussianReconLoss.apply(x_hat, x8, ops.REDUCTIONS["sum"])
        with pytest.raises(TypeError, match=r"logvar must be a float32, float64, float16 or bfloat16 tensor"):
            ops.ReparameterizeKL.apply(x_hat, x8, None, None, 1, ops.REDUCTIONS["sum"], 0.0)
