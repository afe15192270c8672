"""fastelbo.VAE and fastelbo.ELBOLoss: the modules equal the hand-written composition of the
functional ops (on the CPU and, where there is a GPU, on CUDA), both backends refuse the same
mismatched shapes, and a VAE trained with them on the 8x8 digits learns, fused and reference alike."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import fastelbo
from fastelbo import reference

from conftest import default_rng_state


def make_vae(*, in_dim=12, latent=3, beta=1.0, reduction="batchmean", free_bits=0.0, backend="fused", seed=0,
             device="cpu"):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(in_dim, 16), nn.Tanh(), nn.Linear(16, 2 * latent))
    decoder = nn.Sequential(nn.Linear(latent, 16), nn.Tanh(), nn.Linear(16, in_dim))
    vae = fastelbo.VAE(encoder, decoder, beta=beta, reduction=reduction, free_bits=free_bits, backend=backend)
    return vae.to(device)


def param_grads(module):
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_vae_equals_functional_composition(device, reduction):
    vae = make_vae(beta=0.7, reduction=reduction, device=device)
    x = torch.rand(5, 12, device=device)
    torch.manual_seed(123)
    out = vae(x)
    out.loss.sum().backward()
    module_grads = param_grads(vae)

    # The same computation written out by hand; torch.manual_seed reproduces fastelbo's eps.
    twin = copy.deepcopy(vae)
    twin.zero_grad()
    torch.manual_seed(123)
    mu, logvar = twin.encoder(x).chunk(2, dim=1)
    z, kl = fastelbo.reparameterize_kl(mu, logvar, reduction=reduction)
    x_hat = twin.decoder(z)
    rec = fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)
    loss = rec + 0.7 * kl
    loss.sum().backward()

    torch.testing.assert_close(out.z, z, rtol=0, atol=0)
    torch.testing.assert_close(out.x_hat, x_hat, rtol=0, atol=0)
    torch.testing.assert_close(out.mu, mu, rtol=0, atol=0)
    torch.testing.assert_close(out.logvar, logvar, rtol=0, atol=0)
    torch.testing.assert_close(out.kl, kl)
    torch.testing.assert_close(out.recon, rec)
    torch.testing.assert_close(out.loss, loss)
    for got, want in zip(module_grads, param_grads(twin)):
        torch.testing.assert_close(got, want)
    # loss really is recon + beta * kl, not just self-consistent.
    torch.testing.assert_close(out.loss, out.recon + 0.7 * out.kl)
    assert (out.loss.shape == (5,)) if reduction == "none" else (out.loss.dim() == 0)


def test_vae_reference_backend_equals_reference_composition(device):
    vae = make_vae(beta=2.0, backend="reference", device=device)
    x = torch.rand(4, 12, device=device)
    torch.manual_seed(7)
    out = vae(x)
    torch.manual_seed(7)
    mu, logvar = vae.encoder(x).chunk(2, dim=1)
    z, kl = reference.reparameterize_kl(mu, logvar)
    rec = reference.gaussian_recon_loss(vae.decoder(z), x)
    torch.testing.assert_close(out.z, z, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, rec + 2.0 * kl)


def test_fused_and_reference_backends_agree_given_the_same_eps(device):
    x = torch.rand(6, 12, device=device)
    fused = make_vae(beta=0.5, free_bits=0.1, device=device)
    ref = copy.deepcopy(fused)
    ref.loss_fn.backend = "reference"
    mu, logvar = fused.encode(x)
    eps = torch.randn(mu.shape, device=device)
    results = []
    for vae in (fused, ref):
        mu, logvar = vae.encode(x)
        z, kl = vae.loss_fn.sample(mu, logvar, eps=eps)
        out = vae.loss_fn(vae.decoder(z), x, kl)
        out.loss.backward()
        results.append((out, param_grads(vae)))
    (out_f, grads_f), (out_r, grads_r) = results
    torch.testing.assert_close(out_f.loss, out_r.loss)
    torch.testing.assert_close(out_f.kl, out_r.kl)
    for got, want in zip(grads_f, grads_r):
        torch.testing.assert_close(got, want)


def test_tuple_encoder_and_4d_latent(device):
    class ConvEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            h = self.conv(x)
            return h[:, :2], h[:, 2:]  # (mu, logvar), each (B, 2, H, W)

    torch.manual_seed(0)
    decoder = nn.Conv2d(2, 1, 3, padding=1)
    vae = fastelbo.VAE(ConvEncoder(), decoder, beta=0.3).to(device)
    x = torch.rand(3, 1, 5, 7, device=device)
    torch.manual_seed(1)
    out = vae(x)
    assert out.z.shape == (3, 2, 5, 7) and out.x_hat.shape == x.shape
    torch.manual_seed(1)
    mu, logvar = vae.encoder(x)
    z, kl = fastelbo.reparameterize_kl(mu, logvar)
    torch.testing.assert_close(out.loss, fastelbo.gaussian_recon_loss(decoder(z), x) + 0.3 * kl)


def test_single_tensor_encoder_splits_dim_1_of_a_4d_latent(device):
    torch.manual_seed(0)
    vae = fastelbo.VAE(nn.Conv2d(1, 6, 1), nn.Conv2d(3, 1, 1)).to(device)
    x = torch.rand(2, 1, 4, 4, device=device)
    mu, logvar = vae.encode(x)
    h = vae.encoder(x)
    torch.testing.assert_close(mu, h[:, :3])
    torch.testing.assert_close(logvar, h[:, 3:])


def test_odd_dim_1_is_a_clear_error():
    vae = fastelbo.VAE(nn.Linear(4, 5), nn.Linear(2, 4))
    with pytest.raises(ValueError, match="dim 1 must be even"):
        vae(torch.rand(3, 4))
    vae = fastelbo.VAE(lambda x: (x, x, x), nn.Identity())
    with pytest.raises(ValueError, match="expected \\(mu, logvar\\)"):
        vae(torch.rand(3, 4))


def test_eval_mode_decodes_the_mean_and_draws_nothing(device):
    vae = make_vae(beta=1.5, device=device)
    x = torch.rand(4, 12, device=device)
    vae.eval()
    state = default_rng_state(device)
    out = vae(x)
    assert torch.equal(default_rng_state(device), state), "eval mode advanced the random stream"
    torch.testing.assert_close(out.z, out.mu, rtol=0, atol=0)
    _, kl = fastelbo.reparameterize_kl(out.mu, out.logvar)
    torch.testing.assert_close(out.kl, kl)
    torch.testing.assert_close(out.loss, fastelbo.gaussian_recon_loss(vae.decoder(out.mu), x) + 1.5 * kl)
    # The flag overrides the mode in both directions.
    assert not torch.equal(vae(x, sample=True).z, out.z)
    vae.train()
    torch.testing.assert_close(vae(x, sample=False).z, out.mu)
    # Gradients still reach both mu and logvar through the KL.
    out = vae(x, sample=False)
    mu_grad, logvar_grad = torch.autograd.grad(out.loss, [out.mu, out.logvar])
    assert mu_grad.abs().sum() > 0 and logvar_grad.abs().sum() > 0


def test_generator_makes_draws_reproducible(device):
    vae = make_vae(device=device)
    x = torch.rand(4, 12, device=device)
    a = vae(x, generator=torch.Generator(device=device).manual_seed(5)).z
    b = vae(x, generator=torch.Generator(device=device).manual_seed(5)).z
    c = vae(x, generator=torch.Generator(device=device).manual_seed(6)).z
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_elbo_loss_module_equals_composition(device):
    elbo = fastelbo.ELBOLoss(beta=0.25, free_bits=0.2)
    mu = torch.randn(6, 4, device=device, requires_grad=True)
    logvar = torch.randn(6, 4, device=device, requires_grad=True)
    x = torch.rand(6, 4, device=device)
    torch.manual_seed(3)
    z, kl = elbo.sample(mu, logvar)
    out = elbo(torch.sigmoid(z), x, kl)
    assert isinstance(out, fastelbo.ELBOOutput)
    torch.manual_seed(3)
    z2, kl2 = fastelbo.reparameterize_kl(mu, logvar, free_bits=0.2)
    rec2 = fastelbo.gaussian_recon_loss(torch.sigmoid(z2), x)
    torch.testing.assert_close(z, z2, rtol=0, atol=0)
    torch.testing.assert_close(out.kl, kl2)
    torch.testing.assert_close(out.recon, rec2)
    torch.testing.assert_close(out.loss, rec2 + 0.25 * kl2)
    # free_bits reached the op: with a floor above every position's KL the KL is the floor sum.
    big = fastelbo.ELBOLoss(free_bits=50.0)
    _, kl_floor = big.sample(mu, logvar)
    torch.testing.assert_close(kl_floor, torch.tensor(50.0 * 4, device=device))


def test_elbo_loss_sample_with_eps_draws_nothing(device):
    """ELBOLoss.sample(eps=...) uses the given eps (z = mu + exp(logvar / 2) eps) and leaves the
    default generator where it was."""
    mu, logvar = torch.randn(5, 3, device=device), torch.randn(5, 3, device=device)
    eps = torch.randn(5, 3, device=device)
    state = default_rng_state(device)
    z, kl = fastelbo.ELBOLoss().sample(mu, logvar, eps=eps)
    assert torch.equal(default_rng_state(device), state)
    torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl, reference.reparameterize_kl(mu, logvar, eps=eps)[1])


def test_bad_options_raise():
    with pytest.raises(ValueError, match="reduction"):
        fastelbo.ELBOLoss(reduction="avg")
    with pytest.raises(ValueError, match="free_bits"):
        fastelbo.ELBOLoss(free_bits=-1.0)
    with pytest.raises(ValueError, match="free_bits"):
        fastelbo.ELBOLoss(reduction="none", free_bits=0.5)
    with pytest.raises(ValueError, match="backend"):
        fastelbo.VAE(nn.Identity(), nn.Identity(), backend="triton")
    with pytest.raises(TypeError, match="beta"):
        fastelbo.ELBOLoss(beta="1")
    # the functional API's rules, checked when the module is built instead of at its first call
    with pytest.raises(TypeError, match="free_bits"):
        fastelbo.ELBOLoss(free_bits="0.5")
    for name in ("beta", "free_bits"):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            fastelbo.ELBOLoss(**{name: float("nan")})
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            fastelbo.VAE(nn.Identity(), nn.Identity(), **{name: float("inf")})
        with pytest.raises(ValueError, match=f"{name} must be finite, got an integer of 1329 bits"):
            fastelbo.ELBOLoss(**{name: 10**400})  # past the doubles: not float()'s OverflowError
    # any real number type, as for fastelbo.reparameterize_kl's free_bits
    loss_fn = fastelbo.ELBOLoss(beta=np.float32(0.5), free_bits=np.float64(0.25))
    assert (loss_fn.beta, loss_fn.free_bits) == (0.5, 0.25)


def test_beta_is_settable_for_annealing(device):
    vae = make_vae(beta=0.0, device=device)
    x = torch.rand(3, 12, device=device)
    torch.manual_seed(0)
    out0 = vae(x)
    vae.beta = 2.0
    assert vae.loss_fn.beta == 2.0
    torch.manual_seed(0)
    out2 = vae(x)
    torch.testing.assert_close(out0.loss, out0.recon)
    torch.testing.assert_close(out2.loss, out2.recon + 2.0 * out2.kl)


# (what the module is given, the shapes of its operands, the fused op's message)
MISMATCHED_SHAPES = [
    # a decoder that keeps a singleton channel dim: plain PyTorch would broadcast it to (8, 8, 64)
    ("x_hat", (8, 1, 64), (8, 64), r"gaussian_recon_loss: x and x_hat must have the same shape, got x \[8, 64\] "
                                   r"and x_hat \[8, 1, 64\]"),
    ("x_hat", (8, 64), (1, 64), r"x and x_hat must have the same shape, got x \[1, 64\]"),
    ("logvar", (8, 4), (1, 4), r"reparameterize_kl: logvar and mu must have the same shape, got logvar \[1, 4\]"),
    ("eps", (8, 4), (8, 1), r"reparameterize_kl: eps .*shape.*got eps \[8, 1\]"),
]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("what,shape,other_shape,message", MISMATCHED_SHAPES,
                         ids=["x_hat-extra-dim", "x-batch-of-1", "logvar-batch-of-1", "eps-narrow"])
def test_both_backends_refuse_mismatched_shapes(device, backend, what, shape, other_shape, message):
    """ELBOLoss (and so VAE) runs "the same math" on either backend: where the fused op raises a
    ValueError for operands of different shapes, the reference backend raises it too instead of
    letting plain PyTorch broadcast them into a loss of another size."""
    elbo = fastelbo.ELBOLoss(backend=backend)
    a, b = torch.rand(shape, device=device), torch.rand(other_shape, device=device)
    with pytest.raises(ValueError, match=message):
        if what == "x_hat":
            elbo(a, b, torch.tensor(0.0, device=device))
        elif what == "logvar":
            elbo.sample(a, b)
        else:
            elbo.sample(a, a, eps=b)
    # The same module accepts operands of one shape (the refusal is about the mismatch).
    if what == "x_hat":
        out = elbo(a, a + 1, torch.tensor(0.0, device=device))
        torch.testing.assert_close(out.recon, torch.tensor(0.5 * a[0].numel(), device=device))
    else:
        z, _ = elbo.sample(a, a, eps=torch.zeros_like(a))
        assert z.shape == a.shape


def test_vae_refuses_a_decoder_of_another_shape_on_both_backends(device):
    """Through the VAE: a decoder whose output keeps an extra dim is refused on both backends."""
    for backend in ("fused", "reference"):
        vae = fastelbo.VAE(nn.Linear(12, 6), nn.Sequential(nn.Linear(3, 12), nn.Unflatten(1, (1, 12))),
                           backend=backend).to(device)
        with pytest.raises(ValueError, match=r"x and x_hat must have the same shape, got x \[5, 12\] and "
                                             r"x_hat \[5, 1, 12\]"):
            vae(torch.rand(5, 12, device=device))


def _train_steps(vae, data, steps, *, batch_size=64, lr=2e-3, seed=0):
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    shuffle = torch.Generator().manual_seed(seed)
    eps_generator = torch.Generator().manual_seed(seed + 1)
    vae.train()
    done = 0
    while done < steps:
        order = torch.randperm(data.shape[0], generator=shuffle)
        for start in range(0, data.shape[0] - batch_size + 1, batch_size):
            if done == steps:
                break
            out = vae(data[order[start:start + batch_size]], generator=eps_generator)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            done += 1


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: more threads only contend
    yield
    torch.set_num_threads(saved)


def test_training_on_digits_lowers_the_negative_elbo_fused_and_reference_alike(one_thread):
    pytest.importorskip("sklearn")
    from fastelbo.demo import build_vae, evaluate, load_digits_data, with_backend

    train, test = load_digits_data()
    data = torch.cat([train, test])
    torch.manual_seed(0)
    fused = build_vae(latent_dim=4, hidden=128, beta=1.0)  # beta = 1: the loss is the negative ELBO
    ref = with_backend(fused, "reference")
    before = evaluate(fused, data, seed=1)[0]
    assert before == pytest.approx(evaluate(ref, data, seed=1)[0], rel=0.05)
    _train_steps(fused, data, 300)
    _train_steps(ref, data, 300)
    after_fused = evaluate(fused, data, seed=1)[0]
    after_ref = evaluate(ref, data, seed=1)[0]
    assert after_fused < 0.6 * before, (before, after_fused)
    assert after_ref < 0.6 * before, (before, after_ref)
    # Different eps streams (Philox vs torch.randn), same model, data and batches.
    assert after_fused == pytest.approx(after_ref, rel=0.02), (after_fused, after_ref)
