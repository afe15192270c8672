"""Times fastelbo's kernels on a GPU at shapes where a kernel's parallelism, not bytes, may decide:
tall batches of short samples and many draws, against fastelbo.reference (plain PyTorch) in the
same run:

- free bits: the sample+KL step (forward, then backward of z and the floored kl) with the batch
  split over more blocks (the default), without the split (FASTELBO_CUDA_SPREAD=0's
  setting, switched in the same process), and the reference; shapes from mnist's latent to tall
  batches of few positions, where the columns kernel alone ran on a couple of blocks. Also the
  largest relative difference of the floored loss and the per-position means between the two
  fastelbo settings (a sanity check; tests/test_cuda.py checks the values).
- reduction="none": the sample+KL step and the reconstruction step (forward, then backward of the
  per-sample losses), where samples of up to 16 windows now go several to a warp; with and without
  the spread, and the reference.
- num_samples K > 1 (IWAE-style draws) on small latents: the sample+KL step. Each thread of the
  sample+KL kernels drew its elements' K normals one draw after another (and the backward
  regenerated them so), so a small latent with many draws was one long chain per thread; now the
  draws go over lanes (per 4-element chunk; for "none" on short samples, per window of a sample;
  with free bits, per sample). With and without the spread, and the reference.

Kernel time per step from torch.profiler (fastelbo.bench.profile_kernels) and the host-inclusive
median step time, in microseconds.

    python scripts/cuda_shapes_step.py [--free-bits 0.1] [--steps 3] [--reps 20] [--device cuda]

(--device cpu only smoke-runs the script: no kernel times, and the switch changes nothing there.)
"""
import argparse

import torch

import fastelbo
from fastelbo import reference
from fastelbo.bench import profile_kernels

from cpu_kernel_calls import median_us  # (this script's folder is on sys.path when it runs)

FREE_BITS_SHAPES = [(128, 20), (1024, 20), (4096, 20), (65536, 20), (2**20, 4), (2**16, 128), (256, 4096)]
NONE_SHAPES = [(65536, 20), (2**21, 1), (65536, 64), (4096, 784)]
DRAWS = [(128, 20, 1), (128, 20, 8), (128, 20, 50), (128, 64, 50), (1024, 64, 50)]
NONE_DRAWS = [(128, 20, 50), (4096, 20, 8)]  # reduction "none": the short-rows kernel's draws over lanes
FREE_BITS_DRAWS = [(128, 20, 50), (4096, 20, 8)]  # free bits: the columns kernels' draws over lanes


def timed(step, args, device, sync):
    """(kernel us per step, host-inclusive median step us)."""
    step()
    kernels = profile_kernels(step, device, steps=args.steps)
    return kernels["kernel_time_us"] or float("nan"), median_us(step, args.reps, warmup=2, sync=sync)


def time_providers(make_step, providers, args, device, sync):
    """{name: timed(make_step(module))} over (name, module, spread) providers, each with the spread
    switch as it says (set back on afterwards)."""
    row = {}
    try:
        for name, module, spread in providers:
            fastelbo._C._set_cuda_spread(spread)
            row[name] = timed(make_step(module), args, device, sync)
    finally:
        fastelbo._C._set_cuda_spread(True)
    return row


def tensors(shape, device, count):
    generator = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(shape, device=device, generator=generator) for _ in range(count)]


def latent(shape, device):
    """mu and logvar (scaled by 1/2) of a (B, D) latent, requiring grad."""
    mu, logvar = tensors(shape, device, 2)
    return mu.requires_grad_(), logvar.mul_(0.5).requires_grad_()


# The providers of the tables: fastelbo with the spread (the default), without it
# (FASTELBO_CUDA_SPREAD=0's setting, switched in the same process), and plain PyTorch; in the
# free-bits table the spread is the batch split.
PROVIDERS = (("spread", fastelbo, True), ("plain", fastelbo, False), ("reference", reference, True))
FREE_BITS_PROVIDERS = (("split", fastelbo, True), ("unsplit", fastelbo, False), ("reference", reference, True))


def free_bits_table(args, device, sync):
    print(f"free bits {args.free_bits}, sample+KL fwd+bwd: kernel us / step us")
    print(f"{'B':>8} {'D':>5} {'splits':>6}  {'split':>17}  {'unsplit':>17}  {'reference':>17}  {'max rel diff':>12}")
    for B, D in args.free_bits_shapes:
        mu, logvar = latent((B, D), device)
        grad_z = tensors((B, D), device, 3)[2]
        values = {}
        for name, split in (("split", True), ("unsplit", False)):
            fastelbo._C._set_cuda_spread(split)
            _, kl, _, position_mean = torch.ops.fastelbo.reparameterize_kl(
                mu.detach(), logvar.detach(), None, None, 1, 3, args.free_bits)
            values[name] = torch.cat([kl.reshape(1), position_mean]).double()
        fastelbo._C._set_cuda_spread(True)

        def make_step(module):
            def step():
                mu.grad = logvar.grad = None
                z, kl = module.reparameterize_kl(mu, logvar, free_bits=args.free_bits)
                torch.autograd.backward((z, kl), (grad_z, None))
            return step

        row = time_providers(make_step, FREE_BITS_PROVIDERS, args, device, sync)
        diff = ((values["split"] - values["unsplit"]).abs() / values["unsplit"].abs().clamp_min(1e-30)).max()
        splits = fastelbo._C._cuda_free_bits_grid(B, D)["row_splits"] if device == "cuda" else 0
        cells = "  ".join(f"{row[n][0]:>8.1f}/{row[n][1]:>8.1f}" for n in ("split", "unsplit", "reference"))
        print(f"{B:>8} {D:>5} {splits:>6}  {cells}  {diff.item():>12.2e}")




def none_table(args, device, sync):
    print('reduction="none", fwd+bwd: kernel us / step us; fastelbo spread (default), plain '
          '(FASTELBO_CUDA_SPREAD=0), plain PyTorch')
    print(f"{'B':>8} {'D':>5}  " + "  ".join(f"{'KL ' + n:>17}" for n, _, _ in PROVIDERS) + "  "
          + "  ".join(f"{'recon ' + n:>17}" for n, _, _ in PROVIDERS))
    for B, D in args.none_shapes:
        mu, logvar = latent((B, D), device)
        grad_z, x_hat, x = tensors((B, D), device, 5)[2:]
        x_hat.requires_grad_()
        weights = torch.rand(B, device=device)

        def kl_step(module):
            def step():
                mu.grad = logvar.grad = None
                z, kl = module.reparameterize_kl(mu, logvar, reduction="none")
                torch.autograd.backward((z, kl), (grad_z, weights))
            return step

        def recon_step(module):
            def step():
                x_hat.grad = None
                rec = module.gaussian_recon_loss(x_hat, x, reduction="none")
                rec.backward(weights)
            return step

        row = {op: time_providers(make_step, PROVIDERS, args, device, sync)
               for op, make_step in (("kl", kl_step), ("recon", recon_step))}
        cells = "  ".join(f"{row[op][n][0]:>8.1f}/{row[op][n][1]:>8.1f}" for op in ("kl", "recon") for n, _, _ in PROVIDERS)
        print(f"{B:>8} {D:>5}  {cells}")


def draws_table(args, device, sync):
    print("num_samples K, sample+KL fwd+bwd: kernel us / step us; fastelbo spread (default), "
          "plain (FASTELBO_CUDA_SPREAD=0), plain PyTorch")
    print(f"{'B':>8} {'D':>5} {'K':>4} {'reduction':>9} {'lanes':>5}  " + "  ".join(f"{n:>17}" for n, _, _ in PROVIDERS))
    cases = ([(B, D, K, "batchmean", 0.0) for B, D, K in args.draws]
             + [(B, D, K, "none", 0.0) for B, D, K in args.none_draws]
             + [(B, D, K, "fb", args.free_bits) for B, D, K in args.free_bits_draws])
    for B, D, K, label, free_bits in cases:
        reduction = "batchmean" if label == "fb" else label
        mu, logvar = latent((B, D), device)
        grad_z = tensors((K, B, D) if K > 1 else (B, D), device, 1)[0]

        def make_step(module):
            def step():
                mu.grad = logvar.grad = None
                z, kl = module.reparameterize_kl(mu, logvar, num_samples=K, reduction=reduction, free_bits=free_bits)
                torch.autograd.backward((z, kl), (grad_z, torch.ones_like(kl) if reduction == "none" else None))
            return step

        row = time_providers(make_step, PROVIDERS, args, device, sync)
        if device != "cuda":
            lanes = 0
        elif label == "none":  # the forward's lanes per window (the backward's per chunk)
            lanes = fastelbo._C._cuda_short_rows_lanes(B, D, K)["draw_lanes"]
        elif label == "fb":  # the forward's lanes per sample
            lanes = fastelbo._C._cuda_free_bits_grid(B, D, K)["draw_lanes"]
        else:
            lanes = fastelbo._C._cuda_draw_lanes(B * D, K)
        cells = "  ".join(f"{row[n][0]:>8.1f}/{row[n][1]:>8.1f}" for n, _, _ in PROVIDERS)
        print(f"{B:>8} {D:>5} {K:>4} {label:>9} {lanes:>5}  {cells}")


def int_tuple(text):
    """"B,D" or "B,D,K" as a tuple of ints (argparse type)."""
    return tuple(map(int, text.split(",")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--free-bits", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per case")
    parser.add_argument("--reps", type=int, default=20, help="timed steps per case (host-inclusive median)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--free-bits-shapes", nargs="*", default=FREE_BITS_SHAPES, type=int_tuple,
                        help="B,D pairs")
    parser.add_argument("--none-shapes", nargs="*", default=NONE_SHAPES, type=int_tuple,
                        help="B,D pairs")
    parser.add_argument("--draws", nargs="*", default=DRAWS, type=int_tuple,
                        help="B,D,K triples (reduction batchmean)")
    parser.add_argument("--none-draws", nargs="*", default=NONE_DRAWS, type=int_tuple,
                        help="B,D,K triples (reduction none)")
    parser.add_argument("--free-bits-draws", nargs="*", default=FREE_BITS_DRAWS,
                        type=int_tuple, help="B,D,K triples (batchmean, --free-bits)")
    args = parser.parse_args()
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    card = torch.cuda.get_device_name() if device == "cuda" else "the CPU (smoke run)"
    print(f"fastelbo on {card}; torch {torch.__version__}")
    previous = fastelbo._C._set_cuda_spread(True)
    try:
        free_bits_table(args, device, sync)
        none_table(args, device, sync)
        draws_table(args, device, sync)
    finally:
        fastelbo._C._set_cuda_spread(previous)


if __name__ == "__main__":
    main()
