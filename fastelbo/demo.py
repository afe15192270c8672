"""`fastelbo demo`: train a small VAE on 8x8 digits with the fused loss and with the reference loss.

The data are scikit-learn's 1797 handwritten 8x8 digits (they ship inside the package: no
download), pixels scaled to [0, 1]. One MLP VAE is built, copied (copy.deepcopy, before any
training), and the two copies are trained side by side, one with fastelbo's fused kernels and one
with fastelbo.reference (plain PyTorch), from the same initial weights on the same batches in the
same order. Their eps differ (the fused kernels draw from their own Philox stream, the reference
with torch.randn), so the two runs agree statistically, not bit for bit.

Prints, per epoch, the training loss of both (recon + beta * KL per image), the held-out loss of
both, and the time per epoch of each; writes reconstructions.png (inputs, reconstructions of both
models, samples from the prior through both decoders) and loss_curves.png into --out.

The helpers (load_digits_data, build_vae, train_epoch, evaluate) are also what the tests use.
"""
import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

from .cli import (MAX_SEED, cpu_only_build_note, cuda_kernels_available, default_devices, int_at_least, make_out_dir,
                  subcommand_main)
from .modules import VAE

IMAGE_SIDE = 8
PIXELS = IMAGE_SIDE * IMAGE_SIDE
NUM_TEST = 297  # 1797 digits = 1500 for training + 297 held out


# ----------------------------------------------------------------------------------------------
# Data, model, training: plain functions, shared with the tests.

def load_digits_data(device="cpu", seed=0):
    """(train, test): float32 tensors of shape (1500, 64) and (297, 64), pixels in [0, 1], split by
    a seeded permutation."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    images = images[order].to(device)
    return images[:-NUM_TEST], images[-NUM_TEST:]


def build_vae(latent_dim=8, hidden=256, *, beta=1.0, backend="fused"):
    """An MLP VAE for 64-pixel images: 64 -> hidden -> hidden -> 2 * latent_dim (mu | logvar, split
    by fastelbo.VAE) and latent_dim -> hidden -> hidden -> 64 with a sigmoid (pixels in [0, 1])."""
    encoder = nn.Sequential(
        nn.Linear(PIXELS, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 2 * latent_dim),
    )
    decoder = nn.Sequential(
        nn.Linear(latent_dim, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, PIXELS), nn.Sigmoid(),
    )
    return VAE(encoder, decoder, beta=beta, backend=backend)


def with_backend(vae, backend):
    """A deep copy of vae (same weights) whose loss runs on `backend`."""
    twin = copy.deepcopy(vae)
    twin.loss_fn.backend = backend
    return twin


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(vae, optimizer, data, *, batch_size, shuffle_generator, eps_generator=None):
    """One pass over `data` in the order torch.randperm(shuffle_generator) gives.

    Returns (mean loss, mean recon, mean kl) per image over the epoch, as Python floats (one
    device sync at the end)."""
    vae.train()
    n = data.shape[0]
    order = torch.randperm(n, generator=shuffle_generator).to(data.device)
    totals = torch.zeros(3, device=data.device, dtype=torch.float64)
    for start in range(0, n, batch_size):
        batch = data[order[start:start + batch_size]]
        out = vae(batch, generator=eps_generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        totals += torch.stack([out.loss.detach(), out.recon.detach(), out.kl.detach()]).double() * batch.shape[0]
    loss, recon, kl = (totals / n).tolist()
    return loss, recon, kl


@torch.no_grad()
def evaluate(vae, data, *, seed=0, sample=True):
    """Loss (recon + beta * kl, per image) on `data`. sample=True: one draw of z per image from a
    generator seeded with `seed` (an unbiased estimate of the objective); sample=False: z = mu."""
    vae.eval()
    generator = torch.Generator(device=data.device).manual_seed(seed) if sample else None
    out = vae(data, sample=sample, generator=generator)
    return float(out.loss), float(out.recon), float(out.kl)


# ----------------------------------------------------------------------------------------------
# Pictures.

def save_reconstructions(path, fused, reference, test, *, latent_dim, seed=0, columns=12):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        inputs = test[:columns]
        fused.eval()
        reference.eval()
        rec_fused = fused(inputs).x_hat
        rec_reference = reference(inputs).x_hat
        prior = torch.randn(columns, latent_dim, generator=torch.Generator().manual_seed(seed)).to(test.device)
        samples_fused = fused.decode(prior)
        samples_reference = reference.decode(prior)
    rows = [
        ("input", inputs),
        ("reconstruction\n(fused)", rec_fused),
        ("reconstruction\n(reference)", rec_reference),
        ("prior sample\n(fused)", samples_fused),
        ("prior sample\n(reference)", samples_reference),
    ]
    figure, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.75 + 1.4, len(rows) * 0.8))
    for r, (label, images) in enumerate(rows):
        images = images.detach().float().cpu().reshape(-1, IMAGE_SIDE, IMAGE_SIDE).numpy()
        for c in range(columns):
            axis = axes[r, c]
            axis.imshow(images[c], cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_visible(False)
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    figure.suptitle("fastelbo demo: held-out digits, reconstructions (z = mu) and samples z ~ N(0, I)", fontsize=9)
    figure.subplots_adjust(left=0.13, right=0.99, top=0.9, bottom=0.01, wspace=0.08, hspace=0.12)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def save_loss_curves(path, history, *, beta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(range(1, len(history["fused"]["train"]) + 1))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for backend, color in (("fused", "tab:blue"), ("reference", "tab:orange")):
        h = history[backend]
        left.plot(epochs, h["train"], color=color, label=f"{backend}, train")
        left.plot(epochs, h["test"], color=color, linestyle="--", label=f"{backend}, held out")
        right.plot(epochs, [1000 * t for t in h["seconds"]], color=color, marker=".", label=backend)
    left.set_xlabel("epoch")
    left.set_ylabel(f"recon + {beta:g} * KL per image")
    left.set_title("loss", fontsize=10)
    left.legend(fontsize=8)
    right.set_xlabel("epoch")
    right.set_ylabel("ms per epoch")
    right.set_ylim(bottom=0)
    right.set_title("time per training epoch (model + loss)", fontsize=10)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------
# The `fastelbo demo` subcommand.

def _finite_float(value, *, minimum=None, strict=False):
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be finite, got {value!r}")
    if minimum is not None and (number < minimum or (strict and number == minimum)):
        raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {number:g}")
    return number


def _non_negative_float(value):
    return _finite_float(value, minimum=0.0)


def _positive_float(value):
    return _finite_float(value, minimum=0.0, strict=True)


def _device(value):
    if value == "auto":
        return value
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {value!r} (use auto, cpu or cuda[:N])") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be auto, cpu or cuda[:N], got {value!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value!r} was asked for but torch.cuda.is_available() is False")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{value!r}: only {torch.cuda.device_count()} CUDA device(s)")
        if not cuda_kernels_available():
            raise argparse.ArgumentTypeError(f"{value!r}: fastelbo was built without its CUDA kernels "
                                             "(rebuild with nvcc present, or use --device cpu)")
    return value


def resolve_device(value):
    """--device's value as a device: "auto" is cuda where fastelbo's CUDA kernels can run, else cpu."""
    if value != "auto":
        return value
    return default_devices()[-1]


def add_arguments(parser):
    parser.add_argument("--epochs", type=int_at_least(1), default=30, help="training epochs (default 30)")
    parser.add_argument("--latent-dim", type=int_at_least(1), default=8, help="latent size (default 8)")
    parser.add_argument("--beta", type=_non_negative_float, default=0.05,
                        help="weight of the KL term (default 0.05: with pixels in [0, 1], a unit-variance "
                             "decoder (beta = 1) collapses onto the prior; beta = s^2 is the ELBO of a "
                             "decoder with std s, scaled by s^2)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=64, help="batch size (default 64)")
    parser.add_argument("--hidden", type=int_at_least(1), default=256, help="width of the MLP layers (default 256)")
    parser.add_argument("--lr", type=_positive_float, default=2e-3, help="Adam learning rate (default 2e-3)")
    parser.add_argument("--seed", type=int_at_least(0, MAX_SEED), default=0,
                        help="seed of the weights, the data split, the batch order and eps (default 0)")
    parser.add_argument("--device", type=_device, default="auto",
                        help="auto (cuda where fastelbo's CUDA kernels can run, else cpu), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int_at_least(1), default=1,
                        help="CPU threads for torch (default 1: the model is too small to gain from more, "
                             "and extra threads only contend on a busy machine)")
    parser.add_argument("--out", default="demo_out", help="folder for the PNGs (default ./demo_out)")


def run(args):
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args):
    start_all = time.perf_counter()
    out_error = make_out_dir(args.out, "demo")
    if out_error:
        print(out_error, file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    if args.device == "auto" and (note := cpu_only_build_note("demo")):
        print(note)

    train, test = load_digits_data(device, seed=args.seed)
    torch.manual_seed(args.seed)
    fused = build_vae(args.latent_dim, args.hidden, beta=args.beta, backend="fused").to(device)
    reference = with_backend(fused, "reference")  # same initial weights, before any training
    models = {"fused": fused, "reference": reference}
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=args.lr) for name, model in models.items()}
    # One generator per run and purpose, seeded alike: both runs see the same batches in the same order.
    shuffles = {name: torch.Generator().manual_seed(args.seed + 1) for name in models}
    eps_generators = {name: torch.Generator(device=device).manual_seed(args.seed + 2) for name in models}
    history = {name: {"train": [], "test": [], "kl": [], "seconds": []} for name in models}

    steps = math.ceil(train.shape[0] / args.batch_size)
    layers = f"{PIXELS}-{args.hidden}-{args.hidden}-{args.latent_dim}"
    print(f"fastelbo demo: VAE (MLP {layers}) on scikit-learn's 8x8 digits, {train.shape[0]} train / "
          f"{test.shape[0]} held-out images, device {device}")
    print(f"loss = recon + beta * KL per image, recon = 1/2 ||x - x_hat||^2 (pixels in [0, 1]), beta = {args.beta:g}; "
          f"{args.epochs} epochs of {steps} steps, batch {args.batch_size}, Adam lr {args.lr:g}")
    print("both runs start from the same weights and see the same batches; their eps differ (fused: Philox")
    print("inside the kernel; reference: torch.randn), so the columns agree statistically, not bit for bit")
    print()
    print(f"{'':5}  {'train loss':^26}  {'held-out loss':^17}  {'train KL':^17}  {'ms per epoch':^17}")
    print(f"{'epoch':>5}  {'fused':>8} {'reference':>9} {'diff':>7}  {'fused':>8} {'reference':>8}  "
          f"{'fused':>8} {'reference':>8}  {'fused':>8} {'reference':>8}")
    for epoch in range(1, args.epochs + 1):
        for name, model in models.items():
            _sync(device)
            t0 = time.perf_counter()
            loss, _, kl = train_epoch(model, optimizers[name], train, batch_size=args.batch_size,
                                      shuffle_generator=shuffles[name], eps_generator=eps_generators[name])
            _sync(device)
            history[name]["seconds"].append(time.perf_counter() - t0)
            history[name]["train"].append(loss)
            history[name]["kl"].append(kl)
            history[name]["test"].append(evaluate(model, test, seed=args.seed + 3)[0])
        f, r = history["fused"], history["reference"]
        diff = (f["train"][-1] - r["train"][-1]) / abs(r["train"][-1]) if r["train"][-1] else 0.0
        print(f"{epoch:>5}  {f['train'][-1]:>8.4f} {r['train'][-1]:>9.4f} {diff:>+7.1%}  "
              f"{f['test'][-1]:>8.4f} {r['test'][-1]:>8.4f}  {f['kl'][-1]:>8.3f} {r['kl'][-1]:>8.3f}  "
              f"{1000 * f['seconds'][-1]:>8.1f} {1000 * r['seconds'][-1]:>8.1f}", flush=True)

    final = {name: evaluate(model, test, seed=args.seed + 3) for name, model in models.items()}
    gap = abs(final["fused"][0] - final["reference"][0]) / max(abs(final["reference"][0]), 1e-12)
    times = {name: statistics.median(history[name]["seconds"]) for name in models}
    print()
    print(f"held-out loss after {args.epochs} epochs: fused {final['fused'][0]:.4f} (recon {final['fused'][1]:.4f}, "
          f"KL {final['fused'][2]:.3f}), reference {final['reference'][0]:.4f} (recon {final['reference'][1]:.4f}, "
          f"KL {final['reference'][2]:.3f}): {gap:.1%} apart")
    print("(two runs that differ only in their eps draws end a few percent apart at this size even with the same\n"
          " backend: the columns should follow the same curve, not match digit for digit)")
    print(f"median time per epoch: fused {1000 * times['fused']:.1f} ms, reference {1000 * times['reference']:.1f} ms "
          f"(the MLP dominates at this size; `fastelbo bench` times the loss alone)")

    pictures = os.path.join(args.out, "reconstructions.png")
    curves = os.path.join(args.out, "loss_curves.png")
    save_reconstructions(pictures, fused, reference, test, latent_dim=args.latent_dim, seed=args.seed + 4)
    save_loss_curves(curves, history, beta=args.beta)
    print(f"wrote {pictures} and {curves} ({time.perf_counter() - start_all:.1f} s in all)")
    return 0


def main(argv=None):
    """`python -m fastelbo.demo ...`: the same as `fastelbo demo ...`."""
    return subcommand_main("demo", argv)


if __name__ == "__main__":
    sys.exit(main())
