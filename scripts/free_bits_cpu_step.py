"""Times the sample+KL step (forward + backward of z.sum() + kl) on the CPU, with and without free
bits, for fastelbo and for fastelbo.reference (plain PyTorch) in the same run: the shapes where
the free-bits kernels once ran on one thread or sampled short rows one at a time.

    PYTHONPATH=<tree> .venv/bin/python scripts/free_bits_cpu_step.py [--threads 2] [--reps 15]

(PYTHONPATH picks the build to time: `python script.py` puts the script's folder, not the current
one, first on sys.path, so without it the editable install's build is imported.)

Prints the median milliseconds per step. CPU timings are noisy: compare ratios within one run.
"""
import argparse

import torch

import fastelbo
from fastelbo import reference

from cpu_kernel_calls import median_us  # (this script's folder is on sys.path when it runs)

SHAPES = [(256, 64), (4096, 32), (65536, 64), (2**17, 16), (2**21, 1)]


def median_ms(step, reps):
    """Median milliseconds of `reps` steps after two untimed ones."""
    return median_us(step, reps, warmup=2) / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--free-bits", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"fastelbo from {fastelbo.__file__}; torch {torch.__version__}, {args.threads} threads, "
          f"free_bits {args.free_bits}, median ms per step")
    print(f"{'B':>8} {'D':>4}  {'fused':>8} {'fused fb':>9}  {'reference':>9} {'ref fb':>8}  {'fb: ref / fused':>15}")
    for B, D in SHAPES:
        generator = torch.Generator().manual_seed(0)
        mu = torch.randn(B, D, generator=generator).requires_grad_()
        logvar = torch.randn(B, D, generator=generator).requires_grad_()
        ms = {}
        for name, fn in (("fused", fastelbo.reparameterize_kl), ("reference", reference.reparameterize_kl)):
            for free_bits in (0.0, args.free_bits):
                def step(fn=fn, free_bits=free_bits):
                    z, kl = fn(mu, logvar, free_bits=free_bits)
                    torch.autograd.backward((z.sum(), kl))
                ms[name, free_bits > 0] = median_ms(step, args.reps)
        print(f"{B:>8} {D:>4}  {ms['fused', False]:>8.2f} {ms['fused', True]:>9.2f}  {ms['reference', False]:>9.2f} "
              f"{ms['reference', True]:>8.2f}  {ms['reference', True] / ms['fused', True]:>15.2f}")


if __name__ == "__main__":
    main()
