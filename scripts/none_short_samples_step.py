"""Times each op's step (forward + backward for random per-sample weights) with reduction "none" on
samples of a few elements, on the CPU, for fastelbo and for fastelbo.reference (plain PyTorch) in
the same run: the shapes where the CPU kernels once cut their work at every sample.

    PYTHONPATH=<tree> .venv/bin/python scripts/none_short_samples_step.py [--threads 2] [--reps 15]

(PYTHONPATH picks the build to time: `python script.py` puts the script's folder, not the current
one, first on sys.path, so without it the editable install's build is imported.) Prints the median
milliseconds per step. CPU timings are noisy: compare ratios within one run.
"""
import argparse

import torch

import fastelbo
from fastelbo import reference

from free_bits_cpu_step import median_ms  # (this script's folder is on sys.path when it runs)

SHAPES = [(2**21, 1), (2**20, 3), (2**19, 7), (2**18, 20)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"fastelbo from {fastelbo.__file__}; torch {torch.__version__}, {args.threads} threads, "
          "reduction none, median ms per step")
    print(f"{'B':>8} {'D':>3}  {'kl fused':>9} {'kl ref':>7}  {'rec fused':>9} {'rec ref':>8}")
    for B, D in SHAPES:
        generator = torch.Generator().manual_seed(0)
        mu, logvar, x_hat, x = (torch.randn(B, D, generator=generator) for _ in range(4))
        weights = torch.randn(B, generator=generator)
        for t in (mu, logvar, x_hat):
            t.requires_grad_()
        ms = {}
        for name, module in (("fused", fastelbo), ("ref", reference)):
            def kl_step(module=module):
                z, kl = module.reparameterize_kl(mu, logvar, reduction="none")
                torch.autograd.backward((z.sum(), kl), (None, weights))

            def rec_step(module=module):
                module.gaussian_recon_loss(x_hat, x, reduction="none").backward(weights)

            ms["kl", name] = median_ms(kl_step, args.reps)
            ms["rec", name] = median_ms(rec_step, args.reps)
        print(f"{B:>8} {D:>3}  {ms['kl', 'fused']:>9.2f} {ms['kl', 'ref']:>7.2f}  {ms['rec', 'fused']:>9.2f} "
              f"{ms['rec', 'ref']:>8.2f}")


if __name__ == "__main__":
    main()
