"""Times fastelbo's CPU ops called directly (torch.ops.fastelbo, no autograd, no Python wrapper):
the figures of benches/RESULTS.md "CPU loops" ("batchmean" unless a line says otherwise). Median
of `--reps` calls after a warm-up.

    .venv/bin/python scripts/cpu_kernel_calls.py [--threads N] [--reps 3000]
"""
import argparse
import time

import torch

import fastelbo  # noqa: F401  (registers torch.ops.fastelbo)

BATCHMEAN = fastelbo.ops.REDUCTIONS["batchmean"]


def median_us(fn, reps, warmup=50, sync=None):
    """Median microseconds of `reps` calls of fn after min(warmup, reps) untimed ones. sync (e.g.
    torch.cuda.synchronize) runs before the first timed call and inside each timed one, after fn."""
    for _ in range(min(warmup, reps)):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter_ns() - start)
    times.sort()
    return times[len(times) // 2] / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=3000)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = torch.ops.fastelbo
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, median of {args.reps} calls, us")
    with torch.no_grad():
        for shape in [(1, 16384), (8, 65536), (128, 784)]:
            x_hat, x = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
            grad = torch.ones(())
            print(f"recon forward  {str(shape):12} {median_us(lambda: ops.gaussian_recon_loss(x_hat, x, BATCHMEAN, False), args.reps):9.1f}")
            print(f"recon backward {str(shape):12} {median_us(lambda: ops.gaussian_recon_loss_backward(grad, x_hat, x, BATCHMEAN, True, False), args.reps):9.1f}")
        for shape, name in [((128, 20), "batchmean"), ((8, 4096), "batchmean"), ((128, 20), "none"),
                            ((1024, 8), "none")]:
            code = fastelbo.ops.REDUCTIONS[name]
            mu, logvar = torch.randn(shape).to(dtype), (0.1 * torch.randn(shape)).to(dtype)
            _, kl, rng_state, position_mean = ops.reparameterize_kl(mu, logvar, None, None, 1, code, 0.0)
            grad_z, grad_kl = torch.randn(shape).to(dtype), torch.ones(kl.shape)
            forward = lambda: ops.reparameterize_kl(mu, logvar, None, None, 1, code, 0.0)
            backward = lambda: ops.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, None, rng_state,
                                                               position_mean, 1, code, 0.0)
            label = f"{str(shape)} {name}"
            print(f"sample+KL forward  {label:22} {median_us(forward, args.reps):9.1f}")
            print(f"sample+KL backward {label:22} {median_us(backward, args.reps):9.1f}")


if __name__ == "__main__":
    main()
