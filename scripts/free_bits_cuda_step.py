"""Times the sample+KL step with free bits on a GPU (forward, then backward of z and the floored
kl): fastelbo with the batch split over more blocks (the default), fastelbo without the split
(FASTELBO_CUDA_FREE_BITS_SPLIT=0's setting, switched in the same process), and
fastelbo.reference (plain PyTorch), in the same run. Kernel time per step from torch.profiler
(fastelbo.bench.profile_kernels), and the host-inclusive median step time; shapes from mnist's
latent to tall batches of few positions, where the columns kernel alone ran on a couple of blocks.

    python scripts/free_bits_cuda_step.py [--free-bits 0.1] [--steps 3] [--reps 20] [--device cuda]

(--device cpu only smoke-runs the script: no kernel times, and the switch changes nothing there.)

Also prints, per shape, the largest relative difference of the floored loss and the per-position
means between the two fastelbo settings (a sanity check; tests/test_cuda.py checks the values).
"""
import argparse
import statistics
import time

import torch

import fastelbo
from fastelbo import reference
from fastelbo.bench import profile_kernels

SHAPES = [(128, 20), (1024, 20), (4096, 20), (65536, 20), (2**20, 4), (2**16, 128), (256, 4096)]


def median_step_us(step, reps, sync):
    for _ in range(2):
        step()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        step()
        sync()
        times.append((time.perf_counter_ns() - start) / 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--free-bits", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per case")
    parser.add_argument("--reps", type=int, default=20, help="timed steps per case (host-inclusive median)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="*", default=None, help="B,D pairs (default: a fixed list)")
    args = parser.parse_args()
    device = args.device
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    card = torch.cuda.get_device_name() if device == "cuda" else "the CPU (smoke run)"
    print(f"free bits {args.free_bits} on {card}; torch {torch.__version__}; "
          f"kernel us per step (profiler), step us (host-inclusive median)")
    print(f"{'B':>8} {'D':>5} {'splits':>6}  {'split kernel':>12} {'step':>8}  {'unsplit kernel':>14} {'step':>8}  "
          f"{'reference kernel':>16} {'step':>8}  {'max rel diff':>12}")
    previous = fastelbo._C._set_cuda_free_bits_split(True)
    try:
        for B, D in shapes:
            generator = torch.Generator(device=device).manual_seed(0)
            mu = torch.randn(B, D, device=device, generator=generator).requires_grad_()
            logvar = (0.5 * torch.randn(B, D, device=device, generator=generator)).requires_grad_()
            grad_z = torch.randn(B, D, device=device, generator=generator)
            row = {}
            values = {}
            for name, fn, split in (("split", fastelbo.reparameterize_kl, True),
                                    ("unsplit", fastelbo.reparameterize_kl, False),
                                    ("reference", reference.reparameterize_kl, True)):
                fastelbo._C._set_cuda_free_bits_split(split)

                def step(fn=fn):
                    mu.grad = logvar.grad = None
                    z, kl = fn(mu, logvar, free_bits=args.free_bits)
                    torch.autograd.backward((z, kl), (grad_z, None))
                    return kl

                step()
                if name != "reference":
                    torch.manual_seed(1)
                    _, kl, _, position_mean = torch.ops.fastelbo.reparameterize_kl(
                        mu.detach(), logvar.detach(), None, None, 1, 3, args.free_bits)
                    values[name] = torch.cat([kl.reshape(1), position_mean]).double()
                kernels = profile_kernels(step, device, steps=args.steps)
                row[name] = (kernels["kernel_time_us"] or float("nan"), median_step_us(step, args.reps, sync))
            diff = ((values["split"] - values["unsplit"]).abs() / values["unsplit"].abs().clamp_min(1e-30)).max()
            fastelbo._C._set_cuda_free_bits_split(True)
            splits = fastelbo._C._cuda_free_bits_grid(B, D)["row_splits"]
            print(f"{B:>8} {D:>5} {splits:>6}  {row['split'][0]:>12.1f} {row['split'][1]:>8.1f}  "
                  f"{row['unsplit'][0]:>14.1f} {row['unsplit'][1]:>8.1f}  {row['reference'][0]:>16.1f} "
                  f"{row['reference'][1]:>8.1f}  {diff.item():>12.2e}")
    finally:
        fastelbo._C._set_cuda_free_bits_split(previous)


if __name__ == "__main__":
    main()
