"""`fastelbo bench`: the fused loss against eager PyTorch and torch.compile, on your machine.

One *loss step* is what a VAE training step spends on its loss, without the encoder and decoder:
mu, logvar (B, Z) and x_hat (B, D) require grad, x (B, D) does not;

    z, kl, rec = provider(mu, logvar, x_hat, x)          # "fwd"
    loss = rec + kl
    torch.autograd.backward((loss, z), (None, grad_z))   # "fwd+bwd" (forward included)

grad_z is a fixed random tensor standing in for the decoder's gradient, so the z-gradient path is
exercised, as the byte floor assumes. kl and rec use fastelbo's default reduction, "batchmean".

Providers (PROVIDERS; tests and users may register more with `register_provider`):
  eager     the eager code of the README's "Drop-in use" (randn_like inside), kl and rec divided by B
  compile   torch.compile(dynamic=False) of that same function, compiled before anything is timed
  fastelbo  fastelbo.reparameterize_kl + fastelbo.gaussian_recon_loss

Every provider is validated against fastelbo.reference before it is timed, at the size, dtype and
device it is timed at (see `validate_provider`); one that fails is refused: it is not timed, the
refusal and its reason are printed and written to the JSON, and the exit code is 1.

Timing (see `measure_case`): validation and warm-up first (torch.compile compiles there, never
inside a timed step); host-inclusive wall time of every step with time.perf_counter_ns, on CUDA
after torch.cuda.synchronize(); the providers are measured round-robin in interleaved chunks so
that drift of a shared machine hits them alike; several input sets are cycled when one set would
stay in the last-level cache (up to --max-input-sets: at the smallest sizes they all still fit in
it, and the row's `inputs_fit_in_cache` says so), and every provider gets the same input sets. On
CUDA, a profiled pass adds the summed kernel time and the kernel launches per step.

Byte floor (the bytes a loss step cannot avoid moving), N = B*Z latent elements, M = B*D data elements, s bytes per element:
fwd+bwd (8N + 5M) s, fwd (3N + 2M) s; `floor_fraction` = (floor bytes / copy bandwidth) / step time,
with the copy bandwidth (bytes read + written by a large tensor copy) measured in the same run, and
`effective_GBps` = floor bytes / step time (not the bytes the step moved: it may exceed the copy
bandwidth where a step moves less than the floor).
(DESIGN.md's floor. fastelbo goes below it in fwd+bwd: its recon forward also writes the x_hat
gradient, which the backward of loss.backward() then hands back, so recon moves 3M s instead of
5M s, and its "fwd" step moves M s more than the fwd floor. FASTELBO_GRAD_IN_FORWARD=0 turns
that off; README, API.)

Exit codes: 0 all requested providers validated and measured (cases that would not fit in memory
are skipped, and say so); 1 at least one provider was refused or a case failed with an error (the
others are still reported); 2 bad arguments.
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .cli import (DTYPE_SHORT_NAMES, MAX_SEED, cpu_only_build_note, default_devices, int_at_least, make_out_dir,
                  subcommand_main)

# ----------------------------------------------------------------------------------------------
# sizes, dtypes, modes

PRESETS = {
    "mnist-mlp": (128, 784, 20),
    "ldm-ae-256": (8, 196608, 4096),
    "large": (64, 2**20, 2**14),
    # The CPU anchor size: the GPU "large" with a batch of 16 (about 0.35 GB of fp32 inputs
    # instead of 1.4 GB), what a CPU run picks by default.
    "large-b16": (16, 2**20, 2**14),
}
DEFAULT_SIZES = {
    "cpu": ("mnist-mlp", "ldm-ae-256", "large-b16"),
    "cuda": ("mnist-mlp", "ldm-ae-256", "large"),
}
QUICK_SIZES = ("mnist-mlp", "ldm-ae-256")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DTYPES = ("fp32", "bf16")
MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    B: int
    D: int
    Z: int

    @property
    def N(self):  # latent elements per step
        return self.B * self.Z

    @property
    def M(self):  # data elements per step
        return self.B * self.D


def parse_size(text):
    """A preset name, "B,D,Z" or "BxDxZ" -> [Size]; "name1,name2" gives several presets."""
    text = text.strip()
    if text in PRESETS:
        return [Size(text, *PRESETS[text])]
    parts = text.replace("x", ",").split(",")
    if len(parts) == 3 and all(p.strip().isdigit() for p in parts):
        B, D, Z = (int(p) for p in parts)
        if min(B, D, Z) < 1:
            raise argparse.ArgumentTypeError(f"size {text!r}: B, D and Z must be >= 1")
        return [Size(f"{B}x{D}x{Z}", B, D, Z)]
    sizes = []
    for name in text.split(","):
        name = name.strip()
        if name not in PRESETS:
            raise argparse.ArgumentTypeError(
                f"unknown size {name!r}: use a preset ({', '.join(PRESETS)}) or B,D,Z (e.g. 16,1048576,16384)")
        sizes.append(Size(name, *PRESETS[name]))
    return sizes


def floor_bytes(size, dtype, mode):
    """The compulsory bytes of one loss step: fwd+bwd (8N + 5M) s, fwd (3N + 2M) s (reparam+KL reads
    mu, logvar and writes z: 3N; its backward reads grad_z, mu, logvar and writes two gradients: 5N;
    recon reads x_hat and x in each direction and writes grad_x_hat: 5M)."""
    s = torch.empty((), dtype=dtype).element_size()
    if mode == "fwd+bwd":
        return (8 * size.N + 5 * size.M) * s
    if mode == "fwd":
        return (3 * size.N + 2 * size.M) * s
    raise ValueError(f"unknown mode {mode!r}")


# ----------------------------------------------------------------------------------------------
# providers

def eager_loss(mu, logvar, x_hat, x, eps=None):
    """The README's eager code ("Drop-in use"), with kl and rec divided by B (fastelbo's default
    "batchmean")."""
    std = torch.exp(0.5 * logvar)
    if eps is None:
        eps = torch.randn_like(std)
    z = mu + eps * std
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / mu.shape[0]
    rec = 0.5 * F.mse_loss(x_hat, x, reduction="sum") / x.shape[0]
    return z, kl, rec


def fastelbo_loss(mu, logvar, x_hat, x, eps=None):
    import fastelbo

    z, kl = fastelbo.reparameterize_kl(mu, logvar, eps=eps)
    rec = fastelbo.gaussian_recon_loss(x_hat, x)
    return z, kl, rec


def _build_compiled():
    # Dynamo keeps its compiled variants on the code object of eager_loss, shared by every
    # torch.compile wrapper of it, with a limit (cache_size_limit, 8) past which it silently runs
    # eager code. Each case compiles afresh (its own shapes and dtype), so start from a clean cache.
    torch._dynamo.reset()
    return torch.compile(eager_loss, dynamic=False)


@dataclasses.dataclass(frozen=True)
class Provider:
    """build() -> loss_fn(mu, logvar, x_hat, x, eps=None) -> (z, kl, rec), called once per case
    (size, dtype, device). kl and rec are the batchmean losses; with eps given it must be used
    instead of drawing (validation compares with fastelbo.reference on the same eps)."""

    name: str
    build: Callable[[], Callable]
    description: str = ""


PROVIDERS: Dict[str, Provider] = {}


def register_provider(name, build, description=""):
    PROVIDERS[name] = Provider(name, build, description)
    return PROVIDERS[name]


register_provider("eager", lambda: eager_loss, "eager PyTorch (the README's eager code), batchmean")
register_provider("compile", _build_compiled, "torch.compile(dynamic=False) of the eager code")
register_provider("fastelbo", lambda: fastelbo_loss, "fastelbo.reparameterize_kl + gaussian_recon_loss")

BASELINE = "eager"

# ----------------------------------------------------------------------------------------------
# inputs


def _generator(device, seed):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def make_inputs(size, dtype, device, seed):
    """One input set: mu ~ N(0, 1), logvar ~ N(0, 0.5^2), x ~ U(0, 1) (an image), x_hat = x + 0.1
    N(0, 1) (a decent reconstruction), grad_z ~ N(0, 1). Drawn in float32 and cast."""
    g = _generator(device, seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32)

    B, D, Z = size.B, size.D, size.Z
    mu = randn(B, Z)
    logvar = 0.5 * randn(B, Z)
    x = torch.rand((B, D), generator=g, device=device, dtype=torch.float32)
    x_hat = x + 0.1 * randn(B, D)
    grad_z = randn(B, Z)
    return {
        "mu": mu.to(dtype).requires_grad_(),
        "logvar": logvar.to(dtype).requires_grad_(),
        "x_hat": x_hat.to(dtype).requires_grad_(),
        "x": x.to(dtype),
        "grad_z": grad_z.to(dtype),
    }


def input_set_bytes(size, dtype):
    s = torch.empty((), dtype=dtype).element_size()
    return (3 * size.N + 2 * size.M) * s  # mu, logvar, grad_z, x_hat, x


def cache_bytes(device):
    """The last-level cache: L2 of the GPU, or the largest CPU cache level in sysfs (32 MiB if unknown)."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * unit)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def available_bytes(device):
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimated_bytes(size, dtype, n_sets):
    """Rough high-water mark of one case: the input sets, their gradients, eager's intermediates
    and the float32 reference used in validation."""
    s = torch.empty((), dtype=dtype).element_size()
    return n_sets * (input_set_bytes(size, dtype) + (2 * size.N + size.M) * s) + (16 * size.N + 8 * size.M) * max(s, 4)


# ----------------------------------------------------------------------------------------------
# validation


class ValidationError(Exception):
    pass


# Relative L2 error allowed against fastelbo.reference (float32 arithmetic). Eager PyTorch in bf16/fp16 rounds
# every intermediate to the input dtype and lands at about 0.5 % (bf16) and 0.1 % (fp16).
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float64: 1e-9}


def _rel_error(got, want):
    got = got.detach().double().reshape(-1)
    want = want.detach().double().reshape(-1)
    scale = torch.linalg.vector_norm(want).item()
    return torch.linalg.vector_norm(got - want).item() / max(scale, 1e-30)


def _compare(name, got, want, tol, errors):
    if got is None:
        raise ValidationError(f"{name}: no value (None), reference has shape {tuple(want.shape)}")
    if tuple(got.shape) != tuple(want.shape):
        raise ValidationError(f"{name}: shape {tuple(got.shape)}, reference {tuple(want.shape)}")
    got_finite = bool(torch.isfinite(got.detach()).all())
    if not got_finite and bool(torch.isfinite(want.detach()).all()):
        hint = " (float16 overflow of the summed loss?)" if got.dtype == torch.float16 else ""
        value = f" = {got.item():.6g}" if got.numel() == 1 else ""
        raise ValidationError(f"{name}{value} is not finite where the reference is{hint}")
    err = _rel_error(got, want)
    errors[name] = err
    if not err <= tol:
        detail = f" ({got.item():.8g} vs reference {want.item():.8g})" if got.numel() == 1 else ""
        raise ValidationError(f"{name}: relative error {err:.3g} > tolerance {tol:.1g}{detail}")


def _run_step(fn, inputs, eps=None):
    """Leaf copies of the inputs, one forward+backward step; returns (z, kl, rec, loss, grads)."""
    mu = inputs["mu"].detach().clone().requires_grad_()
    logvar = inputs["logvar"].detach().clone().requires_grad_()
    x_hat = inputs["x_hat"].detach().clone().requires_grad_()
    x = inputs["x"]
    if eps is None:
        z, kl, rec = fn(mu, logvar, x_hat, x)
    else:
        z, kl, rec = fn(mu, logvar, x_hat, x, eps=eps)
    loss = rec + kl
    torch.autograd.backward((loss, z), (None, inputs["grad_z"]))
    grads = {"grad_mu": mu.grad, "grad_logvar": logvar.grad, "grad_x_hat": x_hat.grad}
    return z.detach(), kl.detach(), rec.detach(), loss.detach(), grads


def _reference_loss(mu, logvar, x_hat, x, eps=None):
    from . import reference

    z, kl = reference.reparameterize_kl(mu, logvar, eps=eps)
    rec = reference.gaussian_recon_loss(x_hat, x)
    return z, kl, rec


def validate_provider(fn, size, dtype, device, seed=1234):
    """Checks a provider's loss function against fastelbo.reference; raises ValidationError.

    1. eps given (shared with the reference): z, kl, rec, loss and the gradients of mu, logvar and
       x_hat must match within TOLERANCES[dtype] (relative L2 error).
    2. eps drawn (the path that is timed): eps_hat = (z - mu) / exp(logvar / 2) must look like
       N(0, 1) draws (mean, std and P(|eps| < 1)); the reference run on eps_hat must match the
       losses and all gradients (so d/d logvar checks the draw the provider used); a second call
       must draw a different z (no cached noise).
    Returns the relative errors (a dict).
    """
    tol = TOLERANCES.get(dtype, 1e-4)
    inputs = make_inputs(size, dtype, device, seed)
    eps = torch.randn((size.B, size.Z), generator=_generator(device, seed + 1), device=device,
                      dtype=torch.float32).to(dtype)
    errors = {}

    # 1. shared eps
    ref = _run_step(_reference_loss, inputs, eps)
    got = _run_step(fn, inputs, eps)
    for i, name in enumerate(("z", "kl", "rec", "loss")):
        _compare(f"{name} (eps given)", got[i], ref[i], tol, errors)
    for name in ref[4]:
        _compare(f"{name} (eps given)", got[4][name], ref[4][name], tol, errors)

    # 2. drawn eps
    z, kl, rec, loss, grads = _run_step(fn, inputs)
    mu32 = inputs["mu"].detach().float()
    std32 = torch.exp(0.5 * inputs["logvar"].detach().float())
    eps_hat = (z.float() - mu32) / std32
    if not bool(torch.isfinite(eps_hat).all()):
        raise ValidationError("z (eps drawn) is not finite")
    n = eps_hat.numel()
    if n >= 1000:
        mean = eps_hat.double().mean().item()
        sd = eps_hat.double().std().item()
        within = (eps_hat.abs() < 1).double().mean().item()
        errors["eps_mean"], errors["eps_std"], errors["eps_p_abs_lt_1"] = mean, sd, within
        if abs(mean) > 6 / math.sqrt(n) + 0.01 or abs(sd - 1) > 6 / math.sqrt(2 * n) + 0.02 \
                or abs(within - 0.6827) > 6 * 0.466 / math.sqrt(n) + 0.01:
            raise ValidationError(
                f"the drawn eps = (z - mu) / std does not look like N(0, 1): mean {mean:.4f}, "
                f"std {sd:.4f}, P(|eps| < 1) {within:.4f} (expected 0, 1, 0.6827)")
    ref = _run_step(_reference_loss, inputs, eps_hat)
    for i, (name, value) in enumerate((("z", z), ("kl", kl), ("rec", rec), ("loss", loss))):
        _compare(f"{name} (eps drawn)", value, ref[i], tol, errors)
    for name in ref[4]:
        _compare(f"{name} (eps drawn)", grads[name], ref[4][name], tol, errors)
    z2 = _run_step(fn, inputs)[0]
    if torch.equal(z2, z):
        raise ValidationError("two calls drew the same z: the provider does not draw fresh noise")
    return errors


# ----------------------------------------------------------------------------------------------
# timing


def _sync(device):
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def make_step(fn, input_sets, mode):
    """A zero-argument loss step cycling over the input sets."""
    state = {"i": 0}
    n = len(input_sets)

    if mode == "fwd":
        def step():
            s = input_sets[state["i"]]
            state["i"] = (state["i"] + 1) % n
            z, kl, rec = fn(s["mu"], s["logvar"], s["x_hat"], s["x"])
            return rec + kl
    elif mode == "fwd+bwd":
        def step():
            s = input_sets[state["i"]]
            state["i"] = (state["i"] + 1) % n
            mu, logvar, x_hat = s["mu"], s["logvar"], s["x_hat"]
            mu.grad = logvar.grad = x_hat.grad = None  # optimizer.zero_grad(set_to_none=True)
            z, kl, rec = fn(mu, logvar, x_hat, s["x"])
            loss = rec + kl
            torch.autograd.backward((loss, z), (None, s["grad_z"]))
            return loss
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return step


def time_steps(step, reps, sync):
    """Host-inclusive wall time of each step in ns (on CUDA: from launch to the device finishing)."""
    times = []
    clock = time.perf_counter_ns
    sync()
    for _ in range(reps):
        t0 = clock()
        step()
        sync()
        times.append(clock() - t0)
    return times


def _quantile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ns):
    t = sorted(x / 1000.0 for x in times_ns)
    return {
        "median_us": _quantile(t, 0.5),
        "p10_us": _quantile(t, 0.1),
        "p25_us": _quantile(t, 0.25),
        "p75_us": _quantile(t, 0.75),
        "p90_us": _quantile(t, 0.9),
        "iqr_us": _quantile(t, 0.75) - _quantile(t, 0.25),
        "min_us": t[0] if t else float("nan"),
        "mean_us": sum(t) / len(t) if t else float("nan"),
        "reps": len(t),
    }


def measure_copy_bandwidth(device, nbytes=None, samples=None):
    """Bytes read + written per second by dst.copy_(src) of a float32 tensor well beyond the
    caches (4x the last-level cache, 256 MiB to 1 GiB). On CUDA each sample times 10 back-to-back
    copies between synchronizations, so the sync latency does not dilute the bandwidth."""
    if nbytes is None:
        nbytes = min(max(4 * cache_bytes(device), 256 << 20), 1 << 30)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    sync = _sync(device)
    inner = 10 if device == "cuda" else 1
    for _ in range(3):
        dst.copy_(src)
    sync()

    def copies():
        for _ in range(inner):
            dst.copy_(src)

    times = time_steps(copies, samples or (20 if device == "cuda" else 10), sync)
    seconds = summarize(times)["median_us"] * 1e-6 / inner
    moved = 2 * n * 4
    return {"bytes_per_copy": moved, "median_us": seconds * 1e6, "GBps": moved / seconds / 1e9}


class _quiet_stderr:
    """Silences file descriptor 2 (kineto prints "profiler_start/stop" lines from C++ there)."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)
        return False


def _activity_kind(name):
    """memcpy, memset or kernel, from a CUDA activity's name (CUPTI's "Memcpy HtoD (Pageable ->
    Device)", "Memset (Device)"; every other name is a kernel's). The profiler's events carry no
    portable kind: an event's activity_type attribute is absent in torch 2.11."""
    for kind in ("memcpy", "memset"):
        if name.lower().startswith(kind):
            return kind
    return "kernel"


def profile_kernels(step, device, steps=5):
    """CUDA: summed device time and count of the kernels (memset and memcpy included) per step."""
    from torch.profiler import ProfilerActivity, profile

    sync = _sync(device)
    sync()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync()
    total_us = 0.0
    count = 0
    names, name_us, kinds = {}, {}, {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        count += 1
        elapsed = event.time_range.elapsed_us()
        total_us += elapsed
        names[event.name] = names.get(event.name, 0) + 1
        name_us[event.name] = name_us.get(event.name, 0.0) + elapsed
        kind = _activity_kind(event.name)
        kinds[kind] = kinds.get(kind, 0) + 1
    if count == 0:  # no CUPTI activity recorded: report n/a rather than "0 kernels"
        return {"kernel_time_us": None, "kernels_per_step": None, "kernel_names": {}, "kernel_time_us_by_name": {},
                "kernel_kinds": {}}
    return {
        "kernel_time_us": total_us / steps,
        "kernels_per_step": count / steps,
        "kernel_names": {k: v / steps for k, v in sorted(names.items(), key=lambda kv: -kv[1])},
        "kernel_time_us_by_name": {k: v / steps for k, v in sorted(name_us.items(), key=lambda kv: -kv[1])},
        "kernel_kinds": {k: v / steps for k, v in kinds.items()},
    }


def _fastelbo_C():
    try:
        from . import _C

        return _C
    except ImportError:  # pragma: no cover
        return None


def fastelbo_cpu_cache_bytes():
    """Bytes of CPU output buffers fastelbo keeps for reuse between steps (None if unknown)."""
    C = _fastelbo_C()
    return int(C._cpu_cache_bytes()) if C is not None and hasattr(C, "_cpu_cache_bytes") else None


def peak_step_memory(step, device, input_sets):
    """Bytes allocated at the peak of one step above what was allocated when it started (the inputs);
    fresh gradients count. CUDA: torch.cuda.max_memory_allocated. CPU: the allocation events of
    torch.profiler (profile_memory=True), replayed in order; fastelbo's CPU output-buffer cache does
    not report to the profiler, so for this one step its outputs are routed through torch's
    allocator (the junk-fill switch makes fastelbo bypass its cache). None when it cannot be measured."""
    for s in input_sets:
        s["mu"].grad = s["logvar"].grad = s["x_hat"].grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base), "torch.cuda.max_memory_allocated"
    C = _fastelbo_C()
    bypass = C is not None and hasattr(C, "_set_cpu_allocator_junk_fill")
    method = "torch.profiler allocation events" + (
        " (fastelbo's CPU buffer cache bypassed for the measured step)" if bypass
        else " (fastelbo's CPU buffer cache not visible)")
    try:
        from torch.profiler import ProfilerActivity, profile

        previous = C._set_cpu_allocator_junk_fill(True) if bypass else None
        try:
            with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
        finally:
            if bypass:
                C._set_cpu_allocator_junk_fill(previous)
        allocations = []

        def walk(node):
            if node.tag == torch._C._profiler._EventType.Allocation:
                extra = node.extra_fields
                allocations.append((node.start_time_ns, int(extra.alloc_size), int(extra.total_allocated)))
            for child in node.children:
                walk(child)

        for root in prof.profiler.kineto_results.experimental_event_tree():
            walk(root)
        if not allocations:
            return 0, method
        allocations.sort()
        start = allocations[0][2] - allocations[0][1]
        return int(max(a[2] for a in allocations) - start), method
    except Exception:  # private profiler API: report n/a rather than a wrong number
        return None, "n/a"


# ----------------------------------------------------------------------------------------------
# one case: (device, dtype, size) x modes x providers


@dataclasses.dataclass
class Config:
    providers: List[str]
    modes: List[str]
    reps: Optional[int] = None
    time_per_case: float = 1.0
    min_reps: int = 10
    max_reps: int = 2000
    warmup: int = 3
    max_input_sets: int = 32
    profile_steps: int = 5
    seed: int = 0
    rounds: int = 10


def n_input_sets(size, dtype, device, max_sets):
    """Enough input sets to exceed twice the last-level cache (capped), else one."""
    per_set = input_set_bytes(size, dtype)
    return max(1, min(max_sets, math.ceil(2 * cache_bytes(device) / per_set)))


def inputs_fit_in_cache(size, dtype, device, sets):
    """Whether `sets` input sets together fit in the last-level cache: then the cap on the sets
    (--max-input-sets) left every step's inputs cached, as at the smallest sizes (mnist-mlp's 32
    float32 sets are 25 MiB), and the row times a loss whose inputs are in cache (as they are in
    training, just written by the decoder), not one that reads them from memory."""
    return sets * input_set_bytes(size, dtype) <= cache_bytes(device)


def measure_case(size, dtype_name, device, cfg, copy_bw, log, progress=None):
    """Validates and times every provider on one (size, dtype, device); returns (rows, refused)."""
    dtype = DTYPES[dtype_name]
    rows, refused = [], []
    sync = _sync(device)
    case = {"device": device, "dtype": dtype_name, "size": size.name, "B": size.B, "D": size.D, "Z": size.Z,
            "N": size.N, "M": size.M}

    # build and validate
    fns = {}
    for name in cfg.providers:
        if progress is not None:
            progress.set_postfix_str(f"{device} {dtype_name} {size.name}: validating {name}")
        t0 = time.perf_counter()
        try:
            fn = PROVIDERS[name].build()
            errors = validate_provider(fn, size, dtype, device, seed=cfg.seed + 1000)
        except Exception as error:  # a provider that raises is refused like one that is wrong
            reason = str(error) if isinstance(error, ValidationError) else f"{type(error).__name__}: {error}"
            reason = reason.strip().splitlines()[0] if reason.strip() else type(error).__name__
            refused.append(dict(case, provider=name, reason=reason))
            log(f"REFUSED {name} on {device} {dtype_name} {size.name}: {reason}")
            if progress is not None:
                progress.update(len(cfg.modes))
            continue
        fns[name] = (fn, errors, time.perf_counter() - t0)

    if not fns:
        return rows, refused

    sets = n_input_sets(size, dtype, device, cfg.max_input_sets)
    input_sets = [make_inputs(size, dtype, device, cfg.seed + i) for i in range(sets)]

    for mode in cfg.modes:
        if progress is not None:
            progress.set_postfix_str(f"{device} {dtype_name} {size.name} {mode}")
        steps = {name: make_step(fn, input_sets, mode) for name, (fn, _, _) in fns.items()}
        # warm-up (compilation already happened in validation; this settles caches and allocators)
        estimate = {}
        for name, step in steps.items():
            warm = time_steps(step, max(cfg.warmup, 1), sync)
            estimate[name] = max(min(warm) / 1e9, 1e-7)
        reps = {}
        for name in steps:
            if cfg.reps:
                reps[name] = cfg.reps
            else:
                reps[name] = int(min(cfg.max_reps, max(cfg.min_reps, cfg.time_per_case / estimate[name])))
        samples = {name: [] for name in steps}
        order = list(steps)
        rounds = max(1, min(cfg.rounds, min(reps.values())))
        chunk = {name: math.ceil(reps[name] / rounds) for name in steps}
        # A machine that turns busy mid-run slows steps down after the rep counts were chosen: past
        # three times the planned time, stop at the end of a round once every provider has min_reps.
        deadline = time.perf_counter() + 3 * cfg.time_per_case * len(steps) if not cfg.reps else math.inf
        while any(len(samples[n]) < reps[n] for n in steps):
            for name in order:
                k = min(chunk[name], reps[name] - len(samples[name]))
                if k > 0:
                    samples[name] += time_steps(steps[name], k, sync)
            order = order[1:] + order[:1]
            if time.perf_counter() > deadline and all(len(samples[n]) >= min(cfg.min_reps, reps[n]) for n in steps):
                break
        fbytes = floor_bytes(size, dtype, mode)
        floor_us = fbytes / copy_bw["GBps"] / 1e3
        mode_rows = []
        for name, step in steps.items():
            stats = summarize(samples[name])
            row = dict(case, provider=name, mode=mode, element_bytes=torch.empty((), dtype=dtype).element_size(),
                       n_input_sets=sets, inputs_fit_in_cache=inputs_fit_in_cache(size, dtype, device, sets),
                       warmup=max(cfg.warmup, 1), **stats)
            row["floor_bytes"] = fbytes
            row["floor_us"] = floor_us
            row["copy_GBps"] = copy_bw["GBps"]
            # The floor's bytes over the step time: what the step would need at least, not what it
            # moved (eager moves several times the floor, fastelbo's fwd+bwd less), so it can exceed
            # copy_GBps; floor_fraction is the same figure relative to the copy bandwidth.
            row["effective_GBps"] = fbytes / (stats["median_us"] * 1e-6) / 1e9
            row["floor_fraction"] = floor_us / stats["median_us"]
            if device == "cuda":
                prof = profile_kernels(step, device, cfg.profile_steps)
                row.update(prof)
                row["kernel_floor_fraction"] = floor_us / prof["kernel_time_us"] if prof["kernel_time_us"] else None
            else:
                row.update(kernel_time_us=None, kernels_per_step=None, kernel_floor_fraction=None)
            row["peak_mem_bytes"], row["peak_mem_method"] = peak_step_memory(step, device, input_sets)
            # memory fastelbo's CPU kernels keep cached for reuse between steps (on top of peak_mem_bytes)
            row["fastelbo_cpu_cache_bytes"] = fastelbo_cpu_cache_bytes() if (device, name) == ("cpu", "fastelbo") else None
            row["validation_errors"] = fns[name][1]
            row["validation_s"] = fns[name][2]
            mode_rows.append(row)
            if progress is not None:
                progress.update(1)
        base = {r["provider"]: r["median_us"] for r in mode_rows}
        for row in mode_rows:
            row["speedup_vs_eager"] = base[BASELINE] / row["median_us"] if BASELINE in base else None
            row["speedup_vs_compile"] = base["compile"] / row["median_us"] if "compile" in base else None
        rows += mode_rows
    for s in input_sets:
        s.clear()
    C = _fastelbo_C()
    if device == "cpu" and C is not None and hasattr(C, "_empty_cpu_cache"):
        C._empty_cpu_cache()  # each case starts without buffers cached by the previous one
    return rows, refused


# ----------------------------------------------------------------------------------------------
# machine, table, plot


def _load_average():
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


def _busy_warning(meta, devices):
    """A CPU run on a machine with more runnable work than cores times scheduling, not kernels:
    with several threads, each parallel region waits for a descheduled thread."""
    cpus = meta["machine"]["cpu_count"] or 1
    loads = [x[0] for x in (meta.get("load_average_start"), meta.get("load_average_end")) if x]
    if "cpu" not in devices or not loads or max(loads) <= 0.75 * cpus:
        return None
    return (f"the machine was busy (1-min load average up to {max(loads):.1f} on {cpus} CPUs): CPU timings "
            f"with {torch.get_num_threads()} threads measure scheduling delays more than the kernels; "
            "compare only ratios from one run, or rerun on a quiet machine (or with --threads 1)")


def _git_commit(folder):
    """The source tree's commit (with "+dirty" for local changes), or None outside a git checkout."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


SOURCE_SUFFIXES = (".py", ".h", ".cpp", ".cu", ".cuh")


def source_digest(root):
    """12 hex digits of SHA-256 over the sources under root/fastelbo and root/csrc (relative path and
    content of every .py/.h/.cpp/.cu/.cuh file, in sorted order): names the code that ran even where
    git cannot, e.g. in a copy of a working tree whose .git is older than its files (the GPU
    machines' copies are), and matches the same files anywhere."""
    import hashlib

    digest = hashlib.sha256()
    for folder in ("fastelbo", "csrc"):
        base = os.path.join(root, folder)
        paths = []
        for parent, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            paths += [os.path.join(parent, f) for f in files if f.endswith(SOURCE_SUFFIXES)]
        for path in sorted(paths):
            digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read() + b"\0")
    return digest.hexdigest()[:12]


# The CUDA kernels' A/B switches (csrc/fastelbo.h; README): each on unless FASTELBO_<NAME>=0 (e.g.
# FASTELBO_CUDA_CLUSTERS=0), read through fastelbo._C._<name>_enabled() and recorded in the JSON
# as fastelbo_<name>: thread-block cluster reductions of small grids on sm_90, one block for the
# smallest reductions, blocks of up to 512 threads for the memory-bound grids, problems that give
# few threads work spread over more (tall batches, many draws).
CUDA_SWITCHES = ("cuda_clusters", "cuda_one_block", "cuda_large_blocks", "cuda_spread")


def machine_info():
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_model": None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import fastelbo
        from ._extension import BUILT_WITH_CUDA

        info["fastelbo"] = fastelbo.__version__
        info["fastelbo_built_with_cuda"] = BUILT_WITH_CUDA
        for name in CUDA_SWITCHES:  # on unless FASTELBO_<NAME>=0
            info[f"fastelbo_{name}"] = getattr(_fastelbo_C(), f"_{name}_enabled")()
        # The recon forward prepares the x_hat gradient unless FASTELBO_GRAD_IN_FORWARD=0.
        info["fastelbo_grad_in_forward"] = fastelbo.functional._GRAD_IN_FORWARD
        # AVX2/F16C CPU code where the processor has it (fastelbo._C._set_cpu_vector_paths).
        info["fastelbo_cpu_vector_paths"] = _fastelbo_C()._cpu_vector_paths_enabled()
        info["fastelbo_extension_built"] = datetime.datetime.fromtimestamp(
            os.path.getmtime(_fastelbo_C().__file__), datetime.timezone.utc).isoformat(timespec="seconds")
        info["fastelbo_git_commit"] = _git_commit(os.path.dirname(os.path.abspath(__file__)))
        info["fastelbo_source_digest"] = source_digest(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except Exception as error:  # pragma: no cover
        info["fastelbo"] = f"unavailable: {error}"
    return info


def _fmt(value, spec, missing="n/a"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _fmt_bytes(n):
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_table(rows):
    cuda = any(r["device"] == "cuda" for r in rows)
    head = ["device", "dtype", "size", "mode", "provider", "median us", "p10..p90 us", "x eager", "floor us",
            "floor %"]
    if cuda:
        head += ["kernel us", "launches"]
    head += ["peak mem"]
    lines = [head]
    for r in rows:
        line = [r["device"], r["dtype"], r["size"], r["mode"], r["provider"], _fmt(r["median_us"], ".1f"),
                f"{r['p10_us']:.1f}..{r['p90_us']:.1f}", _fmt(r["speedup_vs_eager"], ".2f"),
                _fmt(r["floor_us"], ".1f"), _fmt(100 * r["floor_fraction"], ".1f")]
        if cuda:
            line += [_fmt(r.get("kernel_time_us"), ".1f"), _fmt(r.get("kernels_per_step"), ".1f")]
        line += [_fmt_bytes(r["peak_mem_bytes"])]
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    left = {0, 1, 2, 3, 4}
    out = []
    for k, line in enumerate(lines):
        cells = [str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    devices = sorted({r["device"] for r in rows})
    fig, axes = plt.subplots(1, len(devices), figsize=(6.5 * len(devices), 4.5), squeeze=False)
    for ax, device in zip(axes[0], devices):
        mine = [r for r in rows if r["device"] == device and r["speedup_vs_eager"] is not None]
        keys = sorted({(r["provider"], r["dtype"], r["mode"]) for r in mine if r["provider"] != BASELINE})
        colors = {}
        for provider, dtype, _ in keys:
            colors.setdefault((provider, dtype), f"C{len(colors) % 10}")
        for provider, dtype, mode in keys:
            pts = sorted((r["N"] + r["M"], r["speedup_vs_eager"]) for r in mine
                         if (r["provider"], r["dtype"], r["mode"]) == (provider, dtype, mode))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if mode == "fwd+bwd" else "s",
                    linestyle="-" if mode == "fwd+bwd" else "--", color=colors[(provider, dtype)],
                    label=f"{provider} {dtype} {mode}")
        names = {}
        for r in mine:
            names.setdefault(r["N"] + r["M"], r["size"])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(sorted(names)))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(sorted(names), [f"{names[x]}\n{x:.3g}" for x in sorted(names)], fontsize=7)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("problem size: elements per step (B*Z + B*D)")
        ax.set_ylabel("speedup over eager (median step time ratio)")
        ax.set_title(f"{device}: loss step, higher is better")
        ax.grid(True, which="both", alpha=0.3)
        if keys:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# command line


EPILOG = """examples:
  fastelbo bench --quick                                  # about a minute on 2 CPU cores
  fastelbo bench --sizes mnist-mlp --size 16,1048576,16384 --dtypes fp32 --modes fwd+bwd
  fastelbo bench --devices cuda --sizes mnist-mlp ldm-ae-256 large --dtypes fp32,bf16
  fastelbo bench --list

Every provider is validated against fastelbo.reference (loss and gradients, at the size, dtype and
device it is timed at) before it is timed; one that fails is REFUSED: not timed, and the refusal
and its reason are printed and written to bench.json.
Output: a table on stdout, DIR/bench.json (every figure, machine, torch, CUDA, GPU), DIR/bench.png.
Exit codes: 0 ok; 1 a provider was refused or a case failed; 2 bad arguments.
"""


def add_arguments(parser):
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--sizes", nargs="+", metavar="SIZE", default=None,
                        help="presets (" + ", ".join(f"{k}={v}" for k, v in PRESETS.items()) + ") or B,D,Z; "
                             "default per device: cpu " + ",".join(DEFAULT_SIZES["cpu"]) + "; cuda "
                             + ",".join(DEFAULT_SIZES["cuda"]))
    parser.add_argument("--size", action="append", metavar="B,D,Z", default=[],
                        help="one more size (repeatable), e.g. --size 16,1048576,16384")
    parser.add_argument("--dtypes", default=None,
                        help="comma list of fp32,bf16,fp16 (or float32,bfloat16,float16) or 'all' (default fp32,bf16)")
    parser.add_argument("--devices", default=None,
                        help="comma list of cpu,cuda (default: cpu, and cuda where fastelbo's CUDA kernels can run)")
    parser.add_argument("--providers", default=None,
                        help="comma list of providers (default: all registered: " + ",".join(PROVIDERS) + ")")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of fwd,fwd+bwd (default both)")
    parser.add_argument("--reps", type=int_at_least(1), default=None, help="timed steps per provider (default: adaptive)")
    parser.add_argument("--time-per-case", type=positive_seconds, default=None,
                        help="seconds of timed steps per provider, size, dtype and mode (default 1.0; --quick 0.1)")
    parser.add_argument("--warmup", type=int_at_least(1), default=None,
                        help="untimed steps before timing, at least 1: they also estimate the step's time "
                             "(default 3; --quick 2)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (" + ",".join(QUICK_SIZES) + "), fp32, few reps: about a minute on 2 CPU cores")
    parser.add_argument("--out", default="fastelbo-bench", metavar="DIR",
                        help="folder for bench.json and bench.png (default ./fastelbo-bench)")
    parser.add_argument("--no-plot", action="store_true", help="do not write bench.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--profile-steps", type=int_at_least(1), default=5,
                        help="CUDA: steps profiled for kernel time and launches")
    parser.add_argument("--max-input-sets", type=int_at_least(1), default=32,
                        help="at most this many input sets cycled to defeat the cache (default 32; at the "
                             "smallest sizes they may all fit in it: a row's inputs_fit_in_cache)")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch.set_num_threads for the CPU (default: torch's default, all cores)")
    parser.add_argument("--copy-mib", type=int_at_least(1), default=None,
                        help="size of the tensor copied to measure the copy bandwidth (default: 4x the last-level "
                             "cache, 256 to 1024 MiB)")
    parser.add_argument("--list", action="store_true", help="list the presets and providers and exit")


def _repeated(items):
    """The first item that comes twice in `items` (it would be measured twice), or None."""
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _split(text, option, canonical=lambda item: item):
    """The items of a comma list, as canonical(item); a list with none (it would measure nothing)
    or with an item twice is an error."""
    items = [canonical(t.strip()) for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{option} {text!r} names nothing")
    if (twice := _repeated(items)) is not None:
        raise ValueError(f"{option} {text!r} names {twice} twice")
    return items


def positive_seconds(value):
    """An argparse `type=`: a finite number of seconds > 0."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {value!r}")
    return number


def _resolve(args):
    """-> (devices, {device: [Size]}, dtypes, providers, modes, Config); raises ValueError on bad input."""
    devices = _split(args.devices, "--devices") if args.devices is not None else default_devices()
    for d in devices:
        if d not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {d!r} (cpu, cuda)")
        if d == "cuda" and not torch.cuda.is_available():
            raise ValueError("--devices cuda: torch.cuda.is_available() is False on this machine")
    explicit = []
    for item in (args.sizes or []) + list(args.size):
        try:
            explicit += parse_size(item)
        except argparse.ArgumentTypeError as error:
            raise ValueError(str(error)) from None
    if (twice := _repeated([size.name for size in explicit])) is not None:
        raise ValueError(f"size {twice} is named twice")
    if args.copy_mib is not None:
        for d in devices:
            need, have = 2 * (args.copy_mib << 20), available_bytes(d)  # the copy's source and destination
            if have is not None and need > 0.8 * have:
                raise ValueError(f"--copy-mib {args.copy_mib}: the copy needs {need / 2**30:.1f} GiB on {d}, "
                                 f"{have / 2**30:.1f} GiB available")
    sizes = {}
    for d in devices:
        if explicit:
            sizes[d] = explicit
        else:
            names = QUICK_SIZES if args.quick else DEFAULT_SIZES[d]
            sizes[d] = [Size(n, *PRESETS[n]) for n in names]
    if args.dtypes is None:
        dtypes = ["fp32"] if args.quick else list(DEFAULT_DTYPES)
    elif args.dtypes == "all":
        dtypes = list(DTYPES)
    else:
        dtypes = _split(args.dtypes, "--dtypes", lambda dt: DTYPE_SHORT_NAMES.get(dt, dt))
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"unknown dtype {dt!r} ({', '.join(DTYPES)})")
    providers = _split(args.providers, "--providers") if args.providers is not None else list(PROVIDERS)
    if args.no_compile:
        providers = [p for p in providers if p != "compile"]
    for p in providers:
        if p not in PROVIDERS:
            raise ValueError(f"unknown provider {p!r} ({', '.join(PROVIDERS)})")
    if not providers:
        raise ValueError("no provider left to run")
    modes = _split(args.modes, "--modes")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r} ({', '.join(MODES)})")
    cfg = Config(providers=providers, modes=modes, reps=args.reps, seed=args.seed,
                 time_per_case=args.time_per_case if args.time_per_case is not None else (0.1 if args.quick else 1.0),
                 min_reps=5 if args.quick else 10, max_reps=300 if args.quick else 2000,
                 warmup=args.warmup if args.warmup is not None else (2 if args.quick else 3),
                 max_input_sets=args.max_input_sets, profile_steps=args.profile_steps)
    return devices, sizes, dtypes, cfg


def run(args):
    if args.list:
        for name, dims in PRESETS.items():
            print(f"size {name:<12} (B, D, Z) = {dims}")
        for provider in PROVIDERS.values():
            print(f"provider {provider.name:<10} {provider.description}")
        return 0
    try:
        devices, sizes, dtypes, cfg = _resolve(args)
    except ValueError as error:
        print(f"fastelbo bench: error: {error}", file=sys.stderr)
        return 2
    out_error = make_out_dir(args.out, "bench")
    if out_error:
        print(out_error, file=sys.stderr)
        return 2
    if args.devices is None and (note := cpu_only_build_note("bench")):
        print(note, file=sys.stderr)

    from tqdm import tqdm

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def log(message):
        tqdm.write(message, file=sys.stderr)

    started = time.time()
    torch.manual_seed(cfg.seed)
    meta = {
        "command": shlex.join(args.command_line) if getattr(args, "command_line", None) else None,
        "arguments": {k: v for k, v in vars(args).items() if not callable(v) and k != "command_line"},
        "argv": sys.argv,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_start": _load_average(),  # a busy machine makes CPU timings noisy
        "config": dataclasses.asdict(cfg),
        "devices": devices,
        "dtypes": dtypes,
        "sizes": {d: [dataclasses.asdict(s) for s in sizes[d]] for d in devices},
        "floor": "fwd+bwd (8N + 5M) s, fwd (3N + 2M) s bytes; N = B*Z, M = B*D, s bytes per element",
        "timing": "host-inclusive wall time per step (perf_counter_ns; CUDA: synchronized after each step); "
                  "median and quantiles over the timed steps; providers interleaved round-robin",
    }
    rows, refused, skipped, errors, copy = [], [], [], [], {}
    total = sum(len(sizes[d]) for d in devices) * len(dtypes) * len(cfg.providers) * len(cfg.modes)
    with tqdm(total=total, unit="case", delay=2.0, disable=True if args.no_progress else None,
              file=sys.stderr, dynamic_ncols=True) as progress:
        for device in devices:
            progress.set_postfix_str(f"{device}: copy bandwidth")
            copy[device] = measure_copy_bandwidth(device, None if args.copy_mib is None else args.copy_mib << 20)
            log(f"{device}: copy bandwidth {copy[device]['GBps']:.1f} GB/s (read + write)")
            for size in sizes[device]:
                for dtype_name in dtypes:
                    dtype = DTYPES[dtype_name]
                    sets = n_input_sets(size, dtype, device, cfg.max_input_sets)
                    need, have = estimated_bytes(size, dtype, sets), available_bytes(device)
                    if have is not None and need > 0.8 * have:
                        reason = f"needs about {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
                        skipped.append({"device": device, "dtype": dtype_name, "size": size.name, "reason": reason})
                        log(f"skipped {device} {dtype_name} {size.name}: {reason}")
                        progress.update(len(cfg.providers) * len(cfg.modes))
                        continue
                    try:
                        case_rows, case_refused = measure_case(size, dtype_name, device, cfg, copy[device], log,
                                                               progress)
                    except Exception as error:  # e.g. out of memory: report it and go on with the next case
                        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                        errors.append({"device": device, "dtype": dtype_name, "size": size.name, "error": message})
                        log(f"ERROR {device} {dtype_name} {size.name}: {message}")
                        if device == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    rows += case_rows
                    refused += case_refused
                    if device == "cuda":
                        torch.cuda.empty_cache()
    meta["copy_bandwidth"] = copy
    meta["elapsed_s"] = time.time() - started
    meta["load_average_end"] = _load_average()
    meta["busy_warning"] = _busy_warning(meta, devices)

    print(f"fastelbo bench: {meta['machine']['platform']}, {meta['machine']['cpu_count']} CPUs "
          f"({meta['machine']['cpu_model']}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"GPU {meta['machine']['gpu']}")
    for device, c in copy.items():
        print(f"{device} copy bandwidth (read + write): {c['GBps']:.1f} GB/s")
    settings = ["fastelbo_grad_in_forward", *(f"fastelbo_{name}" for name in CUDA_SWITCHES),
                "fastelbo_cpu_vector_paths"]
    changed = [name for name in settings if meta["machine"].get(name) is False]
    if changed:  # an A/B run: say so next to its numbers
        print("fastelbo settings switched off: " + ", ".join(changed) + " (README)")
    load = meta["load_average_start"]
    if load is not None:
        print(f"load average at start: {load[0]:.2f} (1 min) on {meta['machine']['cpu_count']} CPUs")
    if meta["busy_warning"]:
        print(f"WARNING: {meta['busy_warning']}")
    if rows:
        print(format_table(rows))
        print("median: host-inclusive step time; x eager: eager's median / this median (same run); "
              "floor %: byte-floor time at the copy bandwidth / median")
    for s in skipped:
        print(f"skipped {s['device']} {s['dtype']} {s['size']}: {s['reason']}")
    for r in refused:
        print(f"REFUSED {r['provider']} on {r['device']} {r['dtype']} {r['size']}: {r['reason']}")
    for e in errors:
        print(f"ERROR {e['device']} {e['dtype']} {e['size']}: {e['error']}")

    result = {"meta": meta, "results": rows, "refused": refused, "skipped": skipped, "errors": errors}
    json_path = os.path.join(args.out, "bench.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {json_path}")
    if not args.no_plot and rows:
        if any(r["provider"] != BASELINE and r["speedup_vs_eager"] is not None for r in rows):
            plot_path = os.path.join(args.out, "bench.png")
            write_plot(rows, plot_path)
            print(f"wrote {plot_path}")
        else:
            print(f"no bench.png: it plots speedups over the {BASELINE} provider, which this run did not time")
    return 1 if refused or errors else 0


def main(argv=None):
    """`python -m fastelbo.bench ...`: the same as `fastelbo bench ...`."""
    return subcommand_main("bench", argv)


if __name__ == "__main__":
    sys.exit(main())
