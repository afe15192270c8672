"""torch.library.opcheck on every compiled op, and torch.compile(fullgraph=True) of a function
using both public functions against eager.

The two forward ops carry their own autograd (an Autograd-key kernel, csrc/autograd.cpp), so they
are opchecked with inputs that require grad too: opcheck then also checks that the autograd
registration is sound and traces the backward through the fake implementations. The backward ops
are only ever called inside that autograd, below the autograd key, so they get inputs that do
not require grad.

The sampling op is opchecked with eps given: with eps it is a pure function of its inputs, while
without it every call draws new numbers and opcheck's repeated-run comparisons could not agree.
Its backward op is deterministic given the rng_state, so it is also checked with eps=None.
"""
import pytest
import torch
from torch.library import opcheck

import fastelbo
from fastelbo.ops import REDUCTIONS

from conftest import dtype_id, random_grad_outputs, recon_inputs, sample_inputs, stable_seed

ops = torch.ops.fastelbo

REPARAM_CONFIGS = [  # (dtype, reduction, num_samples, free_bits)
    (torch.float32, "none", 1, 0.0), (torch.float32, "sum", 3, 0.0),
    (torch.float32, "batchmean", 2, 0.3), (torch.float32, "mean", 1, 0.3),
    (torch.bfloat16, "batchmean", 1, 0.0),
]
CONFIG_IDS = [f"{dtype_id(d)}-{r}-K{k}-fb{fb}" for d, r, k, fb in REPARAM_CONFIGS]


@pytest.mark.parametrize("config", REPARAM_CONFIGS, ids=CONFIG_IDS)
def test_opcheck_reparameterize_kl(device, config):
    dtype, reduction, num_samples, free_bits = config
    code = REDUCTIONS[reduction]
    mu, logvar, eps = sample_inputs((3, 2, 5), dtype, device, seed=stable_seed("oc", config),
                                    num_samples=num_samples, requires_grad=False)
    opcheck(ops.reparameterize_kl, (mu, logvar, eps, None, num_samples, code, free_bits))
    opcheck(ops.reparameterize_kl, (mu.detach().requires_grad_(), logvar.detach().requires_grad_(), eps, None,
                                    num_samples, code, free_bits))

    # the backward op, with eps given and with eps regenerated from the forward's rng_state
    for e in (eps, None):
        torch.manual_seed(0)
        z, kl, rng_state, kl_position_mean = ops.reparameterize_kl(mu, logvar, e, None, num_samples, code,
                                                                   free_bits)
        grad_z, grad_kl = random_grad_outputs((z, kl), reduction, seed=1)
        variants = ((grad_z, grad_kl), (None, grad_kl), (grad_z, None)) if e is None else ((grad_z, grad_kl),)
        for grads in variants:
            opcheck(ops.reparameterize_kl_backward,
                    (*grads, mu, logvar, e, rng_state, kl_position_mean, num_samples, code, free_bits))


@pytest.mark.parametrize("free_bits", [0.0, 0.3], ids=["plain", "free-bits"])
@pytest.mark.parametrize("shape", [(0, 2, 5), (0,)], ids=["B0x2x5", "B0"])
def test_opcheck_empty_batch(device, shape, free_bits):
    """An empty batch (the reduction's identity, no kernel): the fake implementations give the
    real ops' shapes, free bits' per-position means included (there is no mu[0] to size them by),
    so torch.compile and FakeTensor take empty batches too."""
    mu, logvar, eps = sample_inputs(shape, torch.float32, device, seed=stable_seed("empty", shape, free_bits),
                                    requires_grad=False)
    for reduction in ("sum", "batchmean"):
        code = REDUCTIONS[reduction]
        opcheck(ops.reparameterize_kl, (mu, logvar, eps, None, 1, code, free_bits))
        opcheck(ops.reparameterize_kl, (mu.detach().requires_grad_(), logvar.detach().requires_grad_(), eps, None,
                                        1, code, free_bits))
        real = ops.reparameterize_kl(mu, logvar, None, None, 2, code, free_bits)
        meta = ops.reparameterize_kl(mu.to("meta"), logvar.to("meta"), None, None, 2, code, free_bits)
        assert [t.shape for t in meta] == [t.shape for t in real]
        assert [t.dtype for t in meta] == [t.dtype for t in real]
    x_hat, x = recon_inputs(shape, torch.float32, device, seed=stable_seed("empty-recon", shape))
    for code in REDUCTIONS.values():
        opcheck(ops.gaussian_recon_loss, (x_hat, x, code, code != REDUCTIONS["none"]))


@pytest.mark.parametrize(
    "dtype, reduction",
    [(torch.float32, r) for r in REDUCTIONS] + [(torch.float16, "batchmean")],
    ids=[f"float32-{r}" for r in REDUCTIONS] + ["float16-batchmean"],
)
def test_opcheck_gaussian_recon_loss(device, reduction, dtype):
    code = REDUCTIONS[reduction]
    x_hat, x = recon_inputs((3, 2, 5), dtype, device, seed=stable_seed("ocr", reduction, dtype),
                            x_hat_grad=False)
    for save_grad_unit in (False, True):
        opcheck(ops.gaussian_recon_loss, (x_hat, x, code, save_grad_unit))
        opcheck(ops.gaussian_recon_loss, (x_hat.detach().requires_grad_(), x, code, save_grad_unit))
        opcheck(ops.gaussian_recon_loss, (x_hat.detach().requires_grad_(), x.detach().requires_grad_(), code,
                                          save_grad_unit))
    loss, _ = ops.gaussian_recon_loss(x_hat, x, code, False)
    (grad_loss,) = random_grad_outputs((loss,), reduction, seed=2)
    for need in ((True, False), (False, True), (True, True)):
        opcheck(ops.gaussian_recon_loss_backward, (grad_loss, x_hat, x, code, *need))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
def test_opcheck_gaussian_recon_loss_finish_grad(device, reduction, layout):
    """The in-place backward (the schema declares its write into grad_unit), for an incoming
    gradient of 1 (the buffer left as it is) and of another value (overwritten)."""
    code = REDUCTIONS[reduction]
    x_hat, x = recon_inputs((3, 4, 5, 2), torch.float32, device, seed=stable_seed("ocf", reduction, layout),
                            x_hat_grad=False)
    if layout == "channels_last":
        x_hat, x = (t.contiguous(memory_format=torch.channels_last) for t in (x_hat, x))
    for value in (1.0, 2.5):
        _, grad_unit = ops.gaussian_recon_loss(x_hat, x, code, True)
        opcheck(ops.gaussian_recon_loss_finish_grad_, (grad_unit, torch.tensor(value, device=device), x_hat, x, code))


@pytest.mark.parametrize("layouts", ["both_channels_last", "x_hat_channels_last", "batch_of_one"])
def test_opcheck_gaussian_recon_loss_layouts(device, layouts):
    """The fake implementations give the gradients the strides the kernels give them: x_hat's
    layout when it is dense with the batch outermost (x is read in place or copied into it)."""
    x_hat, x = recon_inputs((3, 4, 5, 2) if layouts != "batch_of_one" else (1, 4, 5, 2), torch.float32, device,
                            seed=stable_seed("ocl", layouts), x_hat_grad=False)
    x_hat = x_hat.contiguous(memory_format=torch.channels_last)
    if layouts != "x_hat_channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    code = REDUCTIONS["none"]
    for save_grad_unit in (False, True):
        opcheck(ops.gaussian_recon_loss, (x_hat.detach().requires_grad_(), x, code, save_grad_unit))
    grad_loss = torch.randn(x_hat.shape[0], device=device)
    opcheck(ops.gaussian_recon_loss_backward, (grad_loss, x_hat, x, code, True, True))
    grad_x_hat, _ = ops.gaussian_recon_loss_backward(grad_loss, x_hat, x, code, True, False)
    assert grad_x_hat.stride() == x_hat.stride()


# ---- torch.compile(fullgraph=True) ------------------------------------------------------------------

def negative_elbo(mu, logvar, x, eps):
    """A loss step using both public functions: the recon term reads z itself (as a decoder's
    output would), so its gradient flows back through the sampling op."""
    z, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps, reduction="batchmean", num_samples=2)
    rec = fastelbo.gaussian_recon_loss(z[0] * 0.5 + z[1] * 0.25, x, reduction="none")
    loss = 0.25 * rec.sum() + 0.5 * kl
    return z, kl, rec, loss


def negative_elbo_drawn(mu, logvar, x):
    return negative_elbo(mu, logvar, x, None)


def run_step(fn, mu, logvar, x, *rest):
    mu, logvar = (t.detach().clone().requires_grad_() for t in (mu, logvar))
    outs = fn(mu, logvar, x, *rest)
    grads = torch.autograd.grad(outs[-1], (mu, logvar))
    return [o.detach() for o in outs], list(grads)


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    return {
        "eps": torch.compile(negative_elbo, fullgraph=True, dynamic=False),
        "drawn": torch.compile(negative_elbo_drawn, fullgraph=True, dynamic=False),
    }


def test_compile_matches_eager_with_eps(device, compiled):
    mu, logvar, eps = sample_inputs((4, 6), torch.float32, device, seed=3, num_samples=2, requires_grad=False)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(4)).to(device)
    outs_c, grads_c = run_step(compiled["eps"], mu, logvar, x, eps)
    outs_e, grads_e = run_step(negative_elbo, mu, logvar, x, eps)
    for a, b in zip(outs_c + grads_c, outs_e + grads_e):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # the fused ops' own outputs are bit-identical (same kernels)
    for a, b in zip(outs_c[:3], outs_e[:3]):
        assert torch.equal(a, b)


def test_compile_matches_eager_drawn_eps(device, compiled):
    """Without eps: the compiled step after torch.manual_seed(s) equals the eager step after
    torch.manual_seed(s) (the draw goes through the generator, it is not frozen at trace time),
    and two compiled calls draw different eps."""
    mu, logvar = sample_inputs((4, 6), torch.float32, device, seed=5, with_eps=False, requires_grad=False)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(6)).to(device)
    torch.manual_seed(77)
    outs_c, grads_c = run_step(compiled["drawn"], mu, logvar, x)
    outs_c2, grads_c2 = run_step(compiled["drawn"], mu, logvar, x)
    torch.manual_seed(77)
    outs_e, grads_e = run_step(negative_elbo_drawn, mu, logvar, x)
    outs_e2, _ = run_step(negative_elbo_drawn, mu, logvar, x)
    for a, b in zip(outs_c + grads_c, outs_e + grads_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(outs_c[:3], outs_e[:3]):
        assert torch.equal(a, b)
    # second calls agree with each other too (same generator sequence) ...
    assert torch.equal(outs_c2[0], outs_e2[0])
    # ... and differ from the first calls: a new draw per call, including both draws of a call
    z1, z2 = outs_c[0], outs_c2[0]
    assert (z1 != z2).float().mean() > 0.9
    assert (z1[0] != z1[1]).float().mean() > 0.9
    assert not torch.equal(grads_c[1], grads_c2[1])


def test_compile_dynamic_batch_sizes(device):
    """torch.compile(dynamic=True), as a training loop whose last batch is smaller gets: one graph
    over symbolic batch sizes (the fake implementations compute the output shapes, free bits'
    per-position means included) gives the eager values and gradients at three batch sizes."""
    def step(mu, logvar, x_hat, x, eps):
        z, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps, free_bits=0.1)
        per_sample = fastelbo.gaussian_recon_loss(x_hat, x, reduction="none")
        return per_sample.mean() + kl, z

    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (8, 5, 3):
        mu, logvar, eps = sample_inputs((batch, 4), torch.float32, device, seed=20 + batch)
        x_hat, x = recon_inputs((batch, 6), torch.float32, device, seed=30 + batch)
        results = []
        for fn in (compiled, step):
            loss, z = fn(mu, logvar, x_hat, x, eps)
            results.append([loss, z, *torch.autograd.grad(loss, (mu, logvar, x_hat))])
        for a, b in zip(*results):
            assert a.shape == b.shape and torch.equal(a, b)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1  # no recompilation


class _TinyVAELoss(torch.nn.Module):
    """Encoder -> fused sample + KL -> decoder -> fused reconstruction loss, as a user would export."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(6, 2 * 4)
        self.decoder = torch.nn.Linear(4, 6)

    def forward(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z, kl = fastelbo.reparameterize_kl(mu, logvar, num_samples=2)
        return fastelbo.gaussian_recon_loss(self.decoder(z[0]), x) + kl


def test_torch_export_round_trip(device, tmp_path):
    """torch.export with a dynamic batch size, saved and loaded back: the program keeps the two
    fused ops (not decomposed), draws through the generator on every call (the same values as
    eager after the same manual_seed, a new draw per call), and its parameter gradients equal
    eager's bit for bit."""
    torch.manual_seed(0)
    model = _TinyVAELoss().to(device)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(7)).to(device)
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    path = tmp_path / "vae_loss.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    code = loaded.code
    assert "fastelbo.reparameterize_kl" in code and "fastelbo.gaussian_recon_loss" in code

    for rows in (5, 3):
        xb = x[:rows]
        results = []
        for fn in (loaded, model):
            fn.zero_grad(set_to_none=True)
            torch.manual_seed(11)
            first = fn(xb)
            second = fn(xb)
            first.backward()
            results.append([first, second, *(p.grad for p in fn.parameters())])
        for a, b in zip(*results):
            assert torch.equal(a, b)
        assert not torch.equal(results[0][0], results[0][1])  # a new draw per call


def test_compile_channels_last_reconstruction(device):
    """A conv decoder's channels_last output against channels_last data under torch.compile: the
    compiled graph (inductor, which plans buffers from the fake strides) gives eager's loss and
    gradient, in the inputs' layout."""
    def step(x_hat, x):
        return fastelbo.gaussian_recon_loss(x_hat * 2.0, x, reduction="none").sum() * 0.5

    x_hat, x = (t.contiguous(memory_format=torch.channels_last)
                for t in recon_inputs((3, 4, 5, 6), torch.float32, device, seed=41, x_hat_grad=False))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        leaf = x_hat.detach().requires_grad_()
        loss = fn(leaf, x)
        loss.backward()
        results.append((loss, leaf.grad))
    (loss_c, grad_c), (loss_e, grad_e) = results
    assert grad_e.stride() == x_hat.stride() and grad_c.stride() == grad_e.stride()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-6, atol=1e-6)


def _layout_case(name):
    """x_hat of one memory layout (the fake implementations must predict its gradients' strides)."""
    base = torch.randn(3, 4, 5, 6)
    return {
        "contiguous": base,
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "channels_last_empty_batch": torch.randn(0, 4, 5, 6).contiguous(memory_format=torch.channels_last),
        "channels_last_empty_inner": torch.randn(3, 4, 0, 6).contiguous(memory_format=torch.channels_last),
        "transposed_empty": torch.randn(6, 0).t(),
        "expanded": torch.randn(1, 1, 1, 1).expand(3, 4, 5, 6),
        "sliced": base[:, :, ::2],
        "batch_inner": base.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2),
        "size_one_dims": torch.randn(3, 1, 5, 1).as_strided((3, 1, 5, 1), (5, 99, 1, 7)),
        "batch_of_one_permuted": torch.randn(1, 4, 5, 6).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
    }[name]


@pytest.mark.parametrize("name", ["contiguous", "channels_last", "channels_last_empty_batch",
                                  "channels_last_empty_inner", "transposed_empty", "expanded", "sliced",
                                  "batch_inner", "size_one_dims", "batch_of_one_permuted"])
def test_fake_gradient_strides_match_the_kernels(name):
    """_recon_grad_strides (fastelbo/ops.py) predicts the strides recon_operands (csrc/ops.cpp)
    gives the gradients, for every kind of layout, empty tensors included."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x_hat = _layout_case(name)
    x = torch.randn(x_hat.shape)
    grad_loss = torch.tensor(1.0)
    code = REDUCTIONS["sum"]
    real = ops.gaussian_recon_loss_backward(grad_loss, x_hat, x, code, True, True)
    real_unit = ops.gaussian_recon_loss(x_hat, x, code, True)[1]
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(t) for t in (grad_loss, x_hat, x)]
        fake = ops.gaussian_recon_loss_backward(*fake_args, code, True, True)
        fake_unit = ops.gaussian_recon_loss(*fake_args[1:], code, True)[1]
    for r, f in zip((*real, real_unit), (*fake, fake_unit)):
        assert r.shape == f.shape and r.stride() == f.stride(), (name, r.stride(), f.stride())


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_data_dependent_batch(backend):
    """A batch picked by a boolean mask (a size known only at run time: no guard can be put on it)
    compiles with the backward and gives eager's loss and gradient."""
    torch._dynamo.reset()
    x_hat = torch.randn(6, 5, requires_grad=True)
    x = torch.randn(6, 5)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)

    def step(x_hat, x, mask):
        return fastelbo.gaussian_recon_loss(x_hat[mask], x[mask], reduction="sum")

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(step, backend=backend, fullgraph=True)
        results = []
        for fn in (compiled, step):
            x_hat.grad = None
            loss = fn(x_hat, x, mask)
            loss.backward()
            results.append((loss.detach(), x_hat.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)


# ---- compiled autograd ------------------------------------------------------------------------

def _loss_step(mu, logvar, x_hat, x, reduction, free_bits, num_samples):
    """Forward (eager, drawn eps after a fixed seed) of a loss that uses z, kl and rec."""
    torch.manual_seed(11)
    z, kl = fastelbo.reparameterize_kl(mu, logvar, reduction=reduction, free_bits=free_bits,
                                       num_samples=num_samples)
    rec = fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)
    return (rec + 2 * kl).sum() + (z * z).sum()


@pytest.mark.parametrize("reduction,free_bits,num_samples,x_grad", [
    ("batchmean", 0.0, 1, False), ("sum", 0.3, 2, False), ("none", 0.0, 1, True), ("mean", 0.0, 3, True),
], ids=["batchmean", "sum-fb-K2", "none-x-grad", "mean-K3-x-grad"])
def test_compiled_autograd_matches_eager_backward(device, reduction, free_bits, num_samples, x_grad):
    """The C++ autograd nodes under compiled autograd (the backward graph captured by dynamo, the
    forward run eagerly): the same gradients, bit for bit, as the eager backward. (A node that
    marks outputs non-differentiable fails there: CppNode asserts it marks none.)"""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch has no torch._dynamo.compiled_autograd._enable")
    mu, logvar = sample_inputs((5, 6), torch.float32, device, seed=21, with_eps=False, requires_grad=False)
    x_hat, x = recon_inputs((5, 3, 4), torch.float32, device, seed=22)
    results = []
    for compiled in (False, True):
        leaves = [t.detach().clone().requires_grad_(i < 3 or x_grad) for i, t in enumerate((mu, logvar, x_hat, x))]
        loss = _loss_step(*leaves, reduction, free_bits, num_samples)
        if compiled:
            torch._dynamo.reset()
            # (not fullgraph: C++ autograd Functions are not traced unless marked traceable, and
            # these are not, their backwards reading the incoming gradient's value and the graph
            # task, so compiled autograd runs them eagerly)
            with compiled_autograd._enable(torch.compile(backend="eager")):
                loss.backward()
        else:
            loss.backward()
        results.append([t.grad for t in leaves])
    for eager_grad, compiled_grad in zip(*results):
        if eager_grad is None:
            assert compiled_grad is None
        else:
            assert torch.equal(compiled_grad, eager_grad)
    assert results[0][3] is not None if x_grad else results[0][3] is None


def test_internal_outputs_are_not_differentiable(device):
    """The ops' bookkeeping outputs (rng_state, the free-bits batch means, the prepared x_hat
    gradient) do not require grad, as if marked non-differentiable (which compiled autograd
    refuses: the autograd kernels hand them out detached instead)."""
    mu, logvar = sample_inputs((4, 6), torch.float32, device, seed=23, with_eps=False)
    z, kl, rng_state, position_mean = ops.reparameterize_kl(mu, logvar, None, None, 1, REDUCTIONS["batchmean"], 0.3)
    assert z.requires_grad and kl.requires_grad
    assert not rng_state.requires_grad and not position_mean.requires_grad
    x_hat, x = recon_inputs((4, 6), torch.float32, device, seed=24)
    loss, grad_unit = ops.gaussian_recon_loss(x_hat, x, REDUCTIONS["batchmean"], True)
    assert loss.requires_grad and not grad_unit.requires_grad
    # the differentiable outputs of the same calls still are, through the batch means and buffer
    (kl + z.sum()).backward()
    loss.backward()
    assert mu.grad is not None and x_hat.grad is not None
    torch.testing.assert_close(x_hat.grad, (x_hat - x).detach() / 4)
    # and they are still checked as saved tensors: changed in place before the backward, refused
    z, kl, _, position_mean = ops.reparameterize_kl(mu, logvar, None, None, 1, REDUCTIONS["batchmean"], 0.3)
    loss, grad_unit = ops.gaussian_recon_loss(x_hat, x, REDUCTIONS["batchmean"], True)
    position_mean.zero_()
    grad_unit.zero_()
    for out in (kl, loss):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradients_handed_out_are_not_differentiable(device, reduction):
    """The gradients the nodes return (in a hook, from torch.autograd.grad) are plain tensors, with
    no grad_fn: the prepared x_hat gradient is handed out from the saved buffer, which is an
    output of the same node."""
    x_hat, x = recon_inputs((4, 6), torch.float32, device, seed=25)
    mu, logvar = sample_inputs((4, 6), torch.float32, device, seed=26, with_eps=False)
    seen = []
    for t in (x_hat, mu, logvar):
        t.register_hook(lambda g: seen.append((g.requires_grad, g.grad_fn)))
    z, kl = fastelbo.reparameterize_kl(mu, logvar, reduction=reduction,
                                       free_bits=0.3 if reduction != "none" else 0.0)
    rec = fastelbo.gaussian_recon_loss(x_hat, x, reduction=reduction)
    grads = torch.autograd.grad((rec + kl).sum() + z.sum(), (x_hat, mu, logvar))
    assert len(seen) == 3 and all(seen_one == (False, None) for seen_one in seen), seen
    assert all(not g.requires_grad and g.grad_fn is None for g in grads)
