"""Times the reconstruction's forward + backward ops on the CPU, called directly, the three ways
csrc/autograd.cpp can run them for an incoming gradient g (figures of benches/RESULTS.md,
"The gradient prepared in the forward"):

  plain     forward without the prepared gradient, then gaussian_recon_loss_backward
            (FASTELBO_GRAD_IN_FORWARD=0; and the path under retain_graph=True)
  prepared  forward writing the gradient for g = 1, then gaussian_recon_loss_finish_grad_
            (g = 1: nothing to do; float32, g != 1: the buffer scaled in place)
  recompute forward writing the gradient, then gaussian_recon_loss_backward anyway (what the CPU
            did for g != 1 before finish_grad_)

Median of `--reps` pairs of calls after a warm-up, "batchmean", float32, rounds interleaved.

    .venv/bin/python scripts/recon_backward_paths.py [--threads 1] [--reps 200] [--rounds 3]
"""
import argparse

import torch

import fastelbo  # noqa: F401  (registers torch.ops.fastelbo)
from cpu_kernel_calls import median_us  # (this script's folder is on sys.path when it runs)

BATCHMEAN = fastelbo.ops.REDUCTIONS["batchmean"]
ops = torch.ops.fastelbo


def paths(x_hat, x, g):
    def plain():
        ops.gaussian_recon_loss(x_hat, x, BATCHMEAN, False)
        return ops.gaussian_recon_loss_backward(g, x_hat, x, BATCHMEAN, True, False)[0]

    def prepared():
        _, grad = ops.gaussian_recon_loss(x_hat, x, BATCHMEAN, True)
        ops.gaussian_recon_loss_finish_grad_(grad, g, x_hat, x, BATCHMEAN)
        return grad

    def recompute():
        ops.gaussian_recon_loss(x_hat, x, BATCHMEAN, True)
        return ops.gaussian_recon_loss_backward(g, x_hat, x, BATCHMEAN, True, False)[0]

    return {"plain": plain, "prepared": prepared, "recompute": recompute}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="8x196608,16x1048576", help="BxD,... (float32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batchmean, "
          f"median of {args.reps} forward+backward pairs, us; one figure per round")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for size in args.sizes.split(","):
            b, d = (int(v) for v in size.split("x"))
            x_hat, x = torch.randn(b, d, generator=gen), torch.randn(b, d, generator=gen)
            for value in (1.0, 3.0):
                g = torch.tensor(value)
                fns = paths(x_hat, x, g)
                want = fns["plain"]()
                for name, fn in fns.items():  # the same gradient every way (float32 scaling: last bits)
                    torch.testing.assert_close(fn(), want, rtol=2.5e-7, atol=0)
                figures = {name: [] for name in fns}
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        figures[name].append(median_us(fn, args.reps))
                row = ", ".join(f"{name} " + " / ".join(f"{v:.0f}" for v in vs) for name, vs in figures.items())
                print(f"({b}, {d}) g={value:g}: {row}")


if __name__ == "__main__":
    main()
