"""`fastelbo validate`: passes on the real kernels, and fails when a deliberately broken op is
swapped in (each kind of breakage is caught by the part of the validator meant for it)."""
import types

import pytest
import torch

from fastelbo import cli, functional, validate

from conftest import DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_validate_command_passes(capsys, device, cpu_code_path):
    code = cli.main(["validate", "--device", device])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FAIL" not in out
    assert "all passed" in out
    # The table covers every dtype, reduction, layout and the rng checks, on this device only.
    for word in ("float64", "float32", "float16", "bfloat16", "none", "sum", "mean", "batchmean",
                 "(2,3,5,7)", "(600,20)", "(2,150001)", "none K=3", "sum fb=0.6 K=3", "channels_last",
                 "x_hat channels_last", "rng moments", "rng backward eps", "rng backward eps none K=3",
                 "rng backward eps fb", "empty batch"):
        assert word in out, word
    rows = [line for line in out.splitlines() if line.startswith(("cpu ", "cuda "))]
    assert rows and all(line.startswith(device + " ") for line in rows)


# ---- deliberately broken implementations --------------------------------------------------------

class _MapGrad(torch.autograd.Function):
    """t itself, whose incoming gradient goes through grad_map on its way back."""
    @staticmethod
    def forward(ctx, t, grad_map):
        ctx.grad_map = grad_map
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return ctx.grad_map(grad), None


def _kl_doubled(mu, logvar, **kw):
    z, kl = functional.reparameterize_kl(mu, logvar, **kw)
    return z, 2 * kl


def _logvar_grad_off_by_one_percent(mu, logvar, **kw):
    return functional.reparameterize_kl(mu, _MapGrad.apply(logvar, lambda g: g * 1.01), **kw)


def _z_rounded_through_half(mu, logvar, **kw):
    # Rounds z through bfloat16 whatever the input dtype: the precision loss the 2x rule is there for.
    z, kl = functional.reparameterize_kl(mu, logvar, **kw)
    return z.to(torch.bfloat16).to(z.dtype), kl


def _recon_summed_not_reduced(x_hat, x, *, reduction="batchmean"):
    return functional.gaussian_recon_loss(x_hat, x, reduction="sum" if reduction != "none" else "none")


def _uniform_eps(mu, logvar, *, eps=None, generator=None, num_samples=1, **kw):
    if eps is None:  # draws from the wrong distribution (but passes every shared-eps check)
        shape = (num_samples, *mu.shape) if num_samples > 1 else mu.shape
        eps = (torch.rand(shape, generator=generator, device=mu.device, dtype=mu.dtype) - 0.5) * 12 ** 0.5
    return functional.reparameterize_kl(mu, logvar, eps=eps, num_samples=num_samples, **kw)


def _ignores_generator(mu, logvar, *, generator=None, **kw):
    return functional.reparameterize_kl(mu, logvar, **kw)


def _backward_redraws_eps(mu, logvar, *, eps=None, generator=None, num_samples=1, **kw):
    """Right values, and right gradients when eps is given; with internal draws the logvar gradient
    uses a second, independent eps instead of the forward's."""
    if eps is not None:
        return functional.reparameterize_kl(mu, logvar, eps=eps, num_samples=num_samples, **kw)
    z, kl = functional.reparameterize_kl(mu, logvar, generator=generator, num_samples=num_samples, **kw)
    other = torch.randn(z.shape, device=mu.device, dtype=mu.dtype)
    std = torch.exp(0.5 * logvar.detach())
    z = z.detach() + (mu - mu.detach()) + 0.5 * std * other * (logvar - logvar.detach())
    return z, kl


def _none_backward_redraws_eps(mu, logvar, *, reduction="batchmean", **kw):
    """Like _backward_redraws_eps, for reduction "none" only: a per-sample forward whose draws the
    backward does not regenerate (the other reductions' rng rows pass)."""
    if reduction == "none":
        return _backward_redraws_eps(mu, logvar, reduction=reduction, **kw)
    return functional.reparameterize_kl(mu, logvar, reduction=reduction, **kw)


def _free_bits_dropped_with_draws(mu, logvar, *, free_bits=0.0, num_samples=1, **kw):
    return functional.reparameterize_kl(mu, logvar, free_bits=free_bits if num_samples == 1 else 0.0,
                                        num_samples=num_samples, **kw)


def _recon_off_by_one_percent_when_large(x_hat, x, *, reduction="batchmean"):
    # A bug confined to the large grids of the reducing kernels ("none" has kernels of its own):
    # the value 1% off, gradients right. The summation allowance of (terms - 1) u |sum| let it pass.
    loss = functional.gaussian_recon_loss(x_hat, x, reduction=reduction)
    return loss + 0.01 * loss.detach() if x_hat.numel() > 100_000 and reduction != "none" else loss


def _recon_with_x_constant(grad_map):
    """gaussian_recon_loss whose incoming gradient goes through grad_map when x needs no gradient
    (the training path, whose own branches can break alone)."""
    def recon(x_hat, x, **kw):
        loss = functional.gaussian_recon_loss(x_hat, x, **kw)
        return loss if x.requires_grad else _MapGrad.apply(loss, grad_map)
    return recon


class _EpsFromZ(torch.autograd.Function):
    """z passes through; the backward recovers eps as (z - mu) / std from the rounded z, which
    DESIGN.md section 1 forbids (in 16-bit it cancels when |mu| >> std)."""
    @staticmethod
    def forward(ctx, z, mu, logvar):
        ctx.save_for_backward(z, mu, logvar)
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):
        z, mu, logvar = ctx.saved_tensors
        acc = torch.float64 if mu.dtype == torch.float64 else torch.float32  # as the kernels compute
        std = torch.exp(0.5 * logvar.to(acc))
        eps = (z.to(acc) - mu.to(acc)) / std
        grad_mu, grad_logvar = grad.to(acc), 0.5 * grad.to(acc) * std * eps
        if z.dim() > mu.dim():  # num_samples > 1: the draws' gradients add up
            grad_mu, grad_logvar = grad_mu.sum(0), grad_logvar.sum(0)
        return None, grad_mu.to(mu.dtype), grad_logvar.to(logvar.dtype)


def _backward_eps_from_z(mu, logvar, **kw):
    z, kl = functional.reparameterize_kl(mu, logvar, **kw)  # kl keeps the fused op's gradient
    return _EpsFromZ.apply(z.detach(), mu, logvar), kl


BROKEN = {
    "kl doubled": (dict(reparameterize_kl=_kl_doubled), "kl"),
    "logvar gradient 1% off": (dict(reparameterize_kl=_logvar_grad_off_by_one_percent), "grad_logvar"),
    "z through bfloat16": (dict(reparameterize_kl=_z_rounded_through_half), "z"),
    "recon not reduced": (dict(gaussian_recon_loss=_recon_summed_not_reduced), "rec"),
    "uniform eps": (dict(reparameterize_kl=_uniform_eps), "rng moments+tails"),
    "generator ignored": (dict(reparameterize_kl=_ignores_generator), "rng reproducible"),
    "backward redraws eps": (dict(reparameterize_kl=_backward_redraws_eps), "rng backward eps"),
    "none's backward redraws eps": (dict(reparameterize_kl=_none_backward_redraws_eps), "rng backward eps none"),
    "free bits dropped with K > 1": (dict(reparameterize_kl=_free_bits_dropped_with_draws), "sum fb=0.6 K=3"),
    "reduced recon 1% off above 100,000 elements": (dict(gaussian_recon_loss=_recon_off_by_one_percent_when_large),
                                                    "rec"),
    "x constant: gradient not scaled": (dict(gaussian_recon_loss=_recon_with_x_constant(torch.ones_like)),
                                        "grad_x_hat@g"),
    "x constant: gradient of exactly 1 mishandled": (
        dict(gaussian_recon_loss=_recon_with_x_constant(lambda g: torch.where(g == 1, 1.01 * g, g))), "grad_x_hat@1"),
    "backward eps from (z - mu) / std": (dict(reparameterize_kl=_backward_eps_from_z), "rng backward eps |mu|>>std"),
}
# The shapes each broken op is checked on: SMALL_SHAPES, unless it only shows at a large size.
LARGE_SHAPE = {"reduced recon 1% off above 100,000 elements": (2, 150001)}


def _implementation(**overrides):
    functions = dict(reparameterize_kl=functional.reparameterize_kl,
                     gaussian_recon_loss=functional.gaussian_recon_loss)
    functions.update(overrides)
    return types.SimpleNamespace(**functions)


SMALL_SHAPES = ((1, 1), (3, 5), (2, 3, 5, 7))


@pytest.mark.parametrize("name", list(BROKEN))
def test_validator_catches_a_broken_op(name):
    overrides, caught_by = BROKEN[name]
    dtype = torch.float64 if name == "z through bfloat16" else torch.float32
    if caught_by.startswith("rng"):  # these pass every shared-eps check by construction
        rows = validate.check_rng(_implementation(**overrides), "cpu", seed=0)
    else:
        shapes = (LARGE_SHAPE[name],) if name in LARGE_SHAPE else SMALL_SHAPES
        rows = validate.validate(fused=_implementation(**overrides), devices=["cpu"], dtypes=[dtype], shapes=shapes,
                                 rng=False)
    failed = [row for row in rows if not row.ok]
    assert failed, f"the validator missed: {name}"
    assert any(caught_by in (row.worst, row.check) or row.check.startswith(caught_by) for row in failed), (
        [(row.check, row.worst) for row in failed]
    )


def test_the_unbroken_implementation_passes_the_same_subset():
    # The control for the test above: the same calls with nothing swapped in pass.
    rows = validate.validate(fused=_implementation(), devices=["cpu"], dtypes=[torch.float32, torch.float64],
                             shapes=SMALL_SHAPES)
    assert all(row.ok for row in rows), [validate.format_row(row) for row in rows if not row.ok]


def test_validate_command_exits_1_with_a_broken_op_swapped_in(monkeypatch, capsys):
    monkeypatch.setattr(validate, "FUSED", _implementation(reparameterize_kl=_kl_doubled))
    monkeypatch.setattr(validate, "SHAPES", SMALL_SHAPES)  # keeps the test fast; the full set runs above
    code = cli.main(["validate", "--device", "cpu", "--dtype", "bfloat16", "--failures-only"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out
    assert " ok" not in out  # --failures-only


@pytest.mark.parametrize("dtype", list(validate.DTYPES.values()))
def test_rng_rows_follow_the_dtypes(dtype):
    rows = validate.check_rng(functional, "cpu", seed=0, dtypes=[dtype])
    assert rows and all(row.dtype == str(dtype).replace("torch.", "") for row in rows), [
        (row.dtype, row.check) for row in rows]


def test_validate_command_dtype_restricts_the_rng_rows_too(monkeypatch, capsys):
    monkeypatch.setattr(validate, "SHAPES", SMALL_SHAPES)  # keeps the test fast
    code = cli.main(["validate", "--device", "cpu", "--dtype", "bf16"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("cpu ")]
    assert code == 0, out
    assert {row[1] for row in rows} == {"bfloat16"}, out
    assert any(row[2] == "rng" for row in rows), out


def test_a_crashing_op_is_a_failed_row_not_a_crash():
    def crash(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    rows = validate.validate(fused=_implementation(gaussian_recon_loss=crash), devices=["cpu"],
                             dtypes=[torch.float32], shapes=SMALL_SHAPES, rng=False)
    assert rows and not any(row.ok for row in rows)
    assert "kernel exploded" in rows[0].note


@pytest.mark.parametrize("argv", [
    ["validate", "--dtype", "float8"],
    ["validate", "--device", "tpu"],
    ["validate", "--seed", "-1"],
    ["validate", "--seed", "x"],
    ["validate", "--bogus"],
])
def test_bad_arguments_give_usage_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fastelbo" in err
