"""Every documented bad input raises the documented exception type, naming the argument (and the
offending shapes or dtypes). reparameterize_kl raises before it draws: the default generator's
state (and that of a generator passed in) is unchanged afterwards. Also: double backward is
refused clearly.
"""
import pytest
import torch

import fastelbo

from conftest import default_rng_state, requires_cuda


def latents(device, shape=(3, 4), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g).to(device, dtype).requires_grad_(),
            torch.randn(shape, generator=g).to(device, dtype).requires_grad_())


def assert_raises_naming(call, exc_type, *fragments):
    """call() raises exc_type whose message contains every fragment (case-insensitive)."""
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value).lower()
    for fragment in fragments:
        assert fragment.lower() in message, f"{fragment!r} not in {str(info.value)!r}"
    return info.value


def assert_raises_first(device, call, exc_type, *fragments):
    """call(generator) raises exc_type whose message contains every fragment (case-insensitive),
    and neither the default generator nor the fresh generator handed to call moved."""
    torch.manual_seed(123)
    before = default_rng_state(device)
    generator = torch.Generator(device=device).manual_seed(5)
    generator_before = generator.get_state()
    error = assert_raises_naming(lambda: call(generator), exc_type, *fragments)
    assert torch.equal(default_rng_state(device), before), "the default generator moved before the error"
    assert torch.equal(generator.get_state(), generator_before), "generator= moved before the error"
    return error


# (id, kwargs builder(mu, logvar) -> dict of arguments overriding (mu, logvar), exception, fragments)
def _reparam_cases():
    def i64(t):
        return t.detach().to(torch.int64)

    return [
        ("mu_int", lambda mu, lv: dict(mu=i64(mu), logvar=i64(lv)), TypeError, ["mu"]),
        ("mu_bool", lambda mu, lv: dict(mu=mu.detach() > 0, logvar=lv.detach() > 0), TypeError, ["mu"]),
        ("mu_complex", lambda mu, lv: dict(mu=mu.detach().to(torch.complex64), logvar=lv.detach().to(torch.complex64)),
         TypeError, ["mu"]),
        ("logvar_int", lambda mu, lv: dict(logvar=i64(lv)), TypeError, ["logvar"]),
        ("logvar_dtype", lambda mu, lv: dict(logvar=lv.detach().double()), TypeError, ["logvar", "double", "float"]),
        ("logvar_half", lambda mu, lv: dict(logvar=lv.detach().half()), TypeError, ["logvar", "half", "float"]),
        ("eps_dtype", lambda mu, lv: dict(eps=torch.zeros(3, 4, dtype=torch.float64, device=mu.device)),
         TypeError, ["eps", "double"]),
        ("logvar_shape", lambda mu, lv: dict(logvar=torch.zeros(3, 5, device=mu.device)), ValueError,
         ["logvar", "[3, 5]", "[3, 4]"]),
        ("logvar_shape_broadcastable", lambda mu, lv: dict(logvar=torch.zeros(1, 4, device=mu.device)), ValueError,
         ["logvar", "[1, 4]"]),
        ("eps_shape", lambda mu, lv: dict(eps=torch.zeros(3, 5, device=mu.device)), ValueError, ["eps", "[3, 5]"]),
        ("eps_shape_num_samples", lambda mu, lv: dict(eps=torch.zeros(3, 4, device=mu.device), num_samples=3),
         ValueError, ["eps", "[3, 3, 4]"]),
        ("reduction", lambda mu, lv: dict(reduction="avg"), ValueError, ["reduction", "avg"]),
        ("reduction_case", lambda mu, lv: dict(reduction="Sum"), ValueError, ["reduction"]),
        ("reduction_none_object", lambda mu, lv: dict(reduction=None), ValueError, ["reduction"]),
        ("num_samples_0", lambda mu, lv: dict(num_samples=0), ValueError, ["num_samples"]),
        ("num_samples_bool", lambda mu, lv: dict(num_samples=True), TypeError, ["num_samples", "int"]),
        ("num_samples_float", lambda mu, lv: dict(num_samples=2.0), TypeError, ["num_samples", "int"]),
        ("free_bits_string", lambda mu, lv: dict(free_bits="0.5"), TypeError, ["free_bits"]),
        ("eps_requires_grad", lambda mu, lv: dict(eps=torch.zeros(3, 4, device=mu.device, requires_grad=True)),
         ValueError, ["eps", "require grad"]),
        ("num_samples_neg", lambda mu, lv: dict(num_samples=-2), ValueError, ["num_samples"]),
        ("num_samples_past_int64", lambda mu, lv: dict(num_samples=2**70), ValueError, ["num_samples", "2**63"]),
        ("num_samples_below_int64", lambda mu, lv: dict(num_samples=-2**70), ValueError, ["num_samples", ">= 1"]),
        ("free_bits_past_double", lambda mu, lv: dict(free_bits=10**400), ValueError, ["free_bits", "finite", "1329 bits"]),
        ("num_samples_past_str", lambda mu, lv: dict(num_samples=10**5000), ValueError, ["num_samples", "16610 bits"]),
        ("free_bits_past_str", lambda mu, lv: dict(free_bits=-10**5000), ValueError, ["free_bits", "16610 bits"]),
        ("free_bits_neg", lambda mu, lv: dict(free_bits=-0.1), ValueError, ["free_bits"]),
        ("free_bits_nan", lambda mu, lv: dict(free_bits=float("nan")), ValueError, ["free_bits"]),
        ("free_bits_none_reduction", lambda mu, lv: dict(free_bits=0.5, reduction="none"), ValueError,
         ["free_bits", "none"]),
        ("zero_dim", lambda mu, lv: dict(mu=mu.detach()[0, 0], logvar=lv.detach()[0, 0]), ValueError, ["mu"]),
        ("mu_not_tensor", lambda mu, lv: dict(mu=[[0.0] * 4] * 3), TypeError, ["mu"]),
        ("logvar_device_meta", lambda mu, lv: dict(logvar=lv.detach().to("meta")), RuntimeError, ["logvar", "meta"]),
        ("mu_device_meta", lambda mu, lv: dict(mu=mu.detach().to("meta")), RuntimeError, ["mu", "meta"]),
        ("eps_device_meta", lambda mu, lv: dict(eps=torch.zeros(3, 4, device="meta")), RuntimeError, ["eps", "meta"]),
        ("mu_sparse", lambda mu, lv: dict(mu=mu.detach().to_sparse()), TypeError, ["mu", "dense", "sparse_coo"]),
        ("logvar_sparse", lambda mu, lv: dict(logvar=lv.detach().to_sparse()), TypeError, ["logvar", "dense"]),
        ("eps_sparse", lambda mu, lv: dict(eps=torch.zeros(3, 4, device=mu.device).to_sparse()), TypeError,
         ["eps", "dense"]),
    ]


def as_params(cases):
    """pytest params; the different-device cases use the meta device (no GPU needed)."""
    return [pytest.param(c, id=c[0]) for c in cases]


REPARAM_CASES = as_params(_reparam_cases())


@pytest.mark.parametrize("case", REPARAM_CASES)
def test_reparameterize_kl_bad_input(device, case):
    _, build, exc_type, fragments = case
    mu, logvar = latents(device)

    def call(generator):
        args = dict(mu=mu, logvar=logvar)
        args.update(build(mu, logvar))
        return fastelbo.reparameterize_kl(args.pop("mu"), args.pop("logvar"), generator=generator, **args)

    assert_raises_first(device, call, exc_type, *fragments)
    assert mu.grad is None and logvar.grad is None


def _recon_cases():
    return [
        ("x_hat_int", lambda xh, x: dict(x_hat=xh.detach().long(), x=x.long()), TypeError, ["x_hat"]),
        ("x_int", lambda xh, x: dict(x=x.long()), TypeError, ["x", "long"]),
        ("x_dtype", lambda xh, x: dict(x=x.double()), TypeError, ["x", "double", "float"]),
        ("x_hat_dtype", lambda xh, x: dict(x_hat=xh.detach().bfloat16()), TypeError, ["x_hat", "bfloat16"]),
        ("x_shape", lambda xh, x: dict(x=torch.zeros(3, 5, device=x.device)), ValueError, ["x", "[3, 5]", "[3, 4]"]),
        ("x_shape_broadcastable", lambda xh, x: dict(x=torch.zeros(4, device=x.device)), ValueError, ["x", "[4]"]),
        ("reduction", lambda xh, x: dict(reduction="elementwise_mean"), ValueError, ["reduction"]),
        ("zero_dim", lambda xh, x: dict(x_hat=xh.detach()[0, 0], x=x[0, 0]), ValueError, ["x_hat"]),
        ("x_not_tensor", lambda xh, x: dict(x=1.0), TypeError, ["x"]),
        ("x_device_meta", lambda xh, x: dict(x=x.to("meta")), RuntimeError, ["x", "meta"]),
        ("x_hat_device_meta", lambda xh, x: dict(x_hat=xh.detach().to("meta")), RuntimeError, ["x_hat", "meta"]),
        ("x_hat_sparse", lambda xh, x: dict(x_hat=xh.detach().to_sparse()), TypeError, ["x_hat", "dense", "sparse"]),
        ("x_sparse", lambda xh, x: dict(x=x.to_sparse()), TypeError, ["x", "dense", "sparse"]),
        ("x_nested", lambda xh, x: dict(x=torch.nested.nested_tensor(list(x), layout=torch.jagged)), TypeError,
         ["x", "dense", "nested"]),
    ]


RECON_CASES = as_params(_recon_cases())


def test_generator_that_is_not_a_generator(device):
    mu, logvar = latents(device)
    for generator in (3, "cuda", torch.zeros(2)):
        with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
            fastelbo.reparameterize_kl(mu, logvar, generator=generator)


@pytest.mark.parametrize("case", RECON_CASES)
def test_gaussian_recon_loss_bad_input(device, case):
    """The documented exception, naming the argument. (No generator check: the loss draws
    nothing, so one could not fail.)"""
    _, build, exc_type, fragments = case
    x_hat, x = latents(device)
    x = x.detach()

    def call():
        args = dict(x_hat=x_hat, x=x)
        args.update(build(x_hat, x))
        return fastelbo.gaussian_recon_loss(args.pop("x_hat"), args.pop("x"), **args)

    assert_raises_naming(call, exc_type, *fragments)
    assert x_hat.grad is None


@requires_cuda
def test_different_devices_cuda():
    mu, logvar = latents("cpu")
    for args in ((mu, logvar.detach().cuda()), (mu.detach().cuda(), logvar)):
        assert_raises_first("cpu", lambda g: fastelbo.reparameterize_kl(*args), RuntimeError, "device")
    eps = torch.zeros(3, 4, device="cuda")
    assert_raises_first("cpu", lambda g: fastelbo.reparameterize_kl(mu, logvar, eps=eps), RuntimeError, "eps")
    assert_raises_naming(lambda: fastelbo.gaussian_recon_loss(mu, logvar.detach().cuda()), RuntimeError, "x")


@requires_cuda
def test_generator_of_the_wrong_device():
    for tensor_device, generator_device in (("cpu", "cuda"), ("cuda", "cpu")):
        mu, logvar = latents(tensor_device)
        wrong = torch.Generator(device=generator_device).manual_seed(3)
        wrong_state = wrong.get_state()
        assert_raises_first(
            tensor_device,
            lambda g: fastelbo.reparameterize_kl(mu, logvar, generator=wrong),
            RuntimeError, "generator",
        )
        assert torch.equal(wrong.get_state(), wrong_state)


def test_backward_ops_check_their_arguments(device):
    """The backward ops validate too (they are public through torch.ops.fastelbo)."""
    mu, logvar = (t.detach() for t in latents(device))
    ops = torch.ops.fastelbo
    z, kl, rng, kpm = ops.reparameterize_kl(mu, logvar, None, None, 1, 1, 0.0)
    with pytest.raises(ValueError, match="grad_z"):
        ops.reparameterize_kl_backward(torch.ones(3, 5, device=device), None, mu, logvar, None, rng, kpm, 1, 1, 0.0)
    with pytest.raises(TypeError, match="grad_z"):
        ops.reparameterize_kl_backward(torch.ones(3, 4, dtype=torch.float64, device=device), None, mu, logvar,
                                       None, rng, kpm, 1, 1, 0.0)
    with pytest.raises(ValueError, match="grad_kl"):
        ops.reparameterize_kl_backward(None, torch.ones(2, device=device), mu, logvar, None, rng, kpm, 1, 1, 0.0)
    with pytest.raises(TypeError, match="rng_state"):
        ops.reparameterize_kl_backward(None, kl, mu, logvar, None, rng.float(), kpm, 1, 1, 0.0)
    with pytest.raises(ValueError, match="kl_position_mean"):
        ops.reparameterize_kl_backward(None, kl, mu, logvar, None, rng, kpm, 1, 1, 0.5)
    with pytest.raises(ValueError, match="reduction"):
        ops.reparameterize_kl(mu, logvar, None, None, 1, 7, 0.0)
    with pytest.raises(ValueError, match="reduction"):
        ops.gaussian_recon_loss(mu, logvar, 4, False)
    with pytest.raises(ValueError, match="grad_loss"):
        ops.gaussian_recon_loss_backward(torch.ones(2, device=device), mu, logvar, 1, True, False)
    with pytest.raises(ValueError, match="grad_loss"):
        ops.gaussian_recon_loss_backward(torch.ones(2, device=device), mu, logvar, 0, True, False)


# ---- double backward ------------------------------------------------------------------------

def first_order_grads(device, function, output="kl", grad_output=1.0, x_grad=True):
    """First-order gradients built with create_graph=True, and the tensors they came from."""
    a, b = latents(device, dtype=torch.float64)
    if function == "reparameterize_kl":
        eps = torch.randn(3, 4, dtype=torch.float64, device=device)
        z, kl = fastelbo.reparameterize_kl(a, b, eps=eps, reduction="sum")
        out = (z * z).sum() if output == "z" else kl
        wrt = (a, b)
    else:
        b.requires_grad_(x_grad)
        out = fastelbo.gaussian_recon_loss(a, b, reduction="sum")
        wrt = (a, b) if x_grad else (a,)
    g_out = torch.tensor(grad_output, dtype=out.dtype, device=device)
    return torch.autograd.grad(out, wrt, g_out, create_graph=True), wrt


CASES = [("reparameterize_kl", dict(output="z")), ("reparameterize_kl", dict(output="kl")),
         ("gaussian_recon_loss", dict(grad_output=1.0, x_grad=False)),
         ("gaussian_recon_loss", dict(grad_output=1.0, x_grad=True)),
         ("gaussian_recon_loss", dict(grad_output=0.5, x_grad=False)),
         ("gaussian_recon_loss", dict(grad_output=0.5, x_grad=True))]
CASE_IDS = ["kl-z", "kl-kl", "rec-1-x_hat", "rec-1-both", "rec-0.5-x_hat", "rec-0.5-both"]


@pytest.mark.parametrize("function, kwargs", CASES, ids=CASE_IDS)
def test_double_backward_refused_through_backward(device, function, kwargs):
    """grad(create_graph=True), then .backward() on a function of those gradients."""
    grads, _ = first_order_grads(device, function, **kwargs)
    for g in grads:
        with pytest.raises(RuntimeError, match="double backward"):
            (g * g).sum().backward(retain_graph=True)


@pytest.mark.parametrize("function, kwargs", CASES, ids=CASE_IDS)
def test_double_backward_refused_through_autograd_grad(device, function, kwargs):
    """grad(create_graph=True), then torch.autograd.grad of those gradients w.r.t. the inputs
    (a gradient penalty): must raise the double backward error, not return None or complain
    about unused tensors."""
    grads, wrt = first_order_grads(device, function, **kwargs)
    for g in grads:
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad((g * g).sum(), wrt, retain_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad((g * g).sum(), wrt, retain_graph=True, allow_unused=True)


def test_first_order_grads_with_create_graph_are_right(device):
    """create_graph=True alone (without differentiating again) still gives the right gradients."""
    mu, logvar = latents(device, dtype=torch.float64)
    eps = torch.randn(3, 4, dtype=torch.float64, device=device)
    _, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction="sum")
    g1 = torch.autograd.grad(kl, (mu, logvar), create_graph=True)
    _, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction="sum")
    g2 = torch.autograd.grad(kl, (mu, logvar))
    assert all(torch.equal(a.detach(), b) for a, b in zip(g1, g2))


EPS_ENTRY_POINTS = {
    "functional": lambda mu, lv, eps: fastelbo.reparameterize_kl(mu, lv, eps=eps),
    "op": lambda mu, lv, eps: torch.ops.fastelbo.reparameterize_kl(mu, lv, eps, None, 1, 3, 0.0)[:2],
    "Function": lambda mu, lv, eps: fastelbo.ops.ReparameterizeKL.apply(mu, lv, eps, None, 1, 3, 0.0),
}


@pytest.mark.parametrize("entry", list(EPS_ENTRY_POINTS))
def test_eps_that_requires_grad_is_refused_by_every_entry_point(device, entry):
    """z = mu + std * eps depends on eps, but the backward gives eps no gradient: an eps that
    requires grad (computed by something differentiable) would silently lose its share, so every
    entry point that records a graph refuses it; with grad mode off there is no graph to spoil."""
    call = EPS_ENTRY_POINTS[entry]
    mu, logvar = latents(device)
    eps = torch.randn(3, 4, device=device).requires_grad_()
    with pytest.raises(ValueError, match="eps must not require grad"):
        call(mu, logvar, eps)
    with pytest.raises(ValueError, match="eps must not require grad"):
        call(mu.detach(), logvar.detach(), eps)  # eps alone requiring grad
    with torch.no_grad():
        z, _ = call(mu, logvar, eps)
    torch.testing.assert_close(z, mu.detach() + torch.exp(logvar.detach() / 2) * eps.detach())
