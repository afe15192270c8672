"""The `fastelbo` command: `fastelbo bench`, `fastelbo validate`, `fastelbo demo`.

Each subcommand lives in its own module (fastelbo/bench.py, validate.py, demo.py), which provides
`add_arguments(parser)` and `run(args) -> int` (the exit code) and keeps its heavy imports
(matplotlib, scikit-learn) inside `run`, so that `fastelbo --help` stays fast.
"""
import argparse
import importlib

SUBCOMMANDS = {
    "bench": ("fastelbo.bench", "benchmark the fused loss against eager PyTorch and torch.compile"),
    "validate": ("fastelbo.validate", "check the fused kernels against fastelbo.reference"),
    "demo": ("fastelbo.demo", "train a small VAE on 8x8 digits with the fused and the reference loss"),
}


# Seeds the commands accept: every seed they derive from one (validate's seed * 1000 + case) stays
# within torch.manual_seed's range.
MAX_SEED = 2**32 - 1


def int_at_least(minimum, maximum=None):
    """An argparse `type=`: an integer >= minimum (and <= maximum if given); otherwise argparse
    prints the usage and exits 2."""
    def parse(value):
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None
        if number < minimum or (maximum is not None and number > maximum):
            bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {number}")
        return number
    parse.__name__ = f"int>={minimum}"
    return parse


def make_out_dir(path, command):
    """Creates the output folder `path` (before a run, so that a bad path costs no run); returns an
    error message naming `--out`, or None."""
    import os

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        return f"fastelbo {command}: error: --out {path}: {error.strerror or error}"
    if not os.access(path, os.W_OK):
        return f"fastelbo {command}: error: --out {path}: not writable"
    return None


def cuda_kernels_available():
    """Whether fastelbo can run on CUDA here: a GPU is visible and the extension was built with its
    CUDA kernels (setup.py builds without them when nvcc is missing). The commands' default devices
    follow it, so that a GPU machine with a CPU-only build runs on the CPU instead of failing."""
    import torch

    from ._extension import BUILT_WITH_CUDA

    return BUILT_WITH_CUDA and torch.cuda.is_available()


def default_devices():
    """The devices the commands run on by default: cpu, and cuda where the CUDA kernels can run."""
    return ["cpu", "cuda"] if cuda_kernels_available() else ["cpu"]


# The dtype names of `fastelbo validate` (torch's) and their short forms (`fastelbo bench`'s); each
# command takes both.
DTYPE_SHORT_NAMES = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16"}


def cpu_only_build_note(command):
    """A note for a command that leaves CUDA out of its default devices on a GPU machine, or None."""
    import torch

    if torch.cuda.is_available() and not cuda_kernels_available():
        return (f"fastelbo {command}: note: a GPU is visible, but fastelbo was built without its CUDA "
                "kernels (no nvcc at build time): running on the CPU only")
    return None


def build_parser():
    parser = argparse.ArgumentParser(prog="fastelbo", description="fastelbo: fused Gaussian VAE loss kernels for PyTorch")
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    commands.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv=None):
    """Entry point of the console script; argparse exits with code 2 on bad arguments."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = ["fastelbo", *argv]  # as typed, for the records a command writes
    return int(args.run(args) or 0)


def subcommand_main(name, argv=None):
    """`python -m fastelbo.<name> ...`: the same as `fastelbo <name> ...`."""
    import sys

    return main([name, *(sys.argv[1:] if argv is None else argv)])
