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


def int_at_least(minimum):
    """An argparse `type=`: an integer >= minimum (otherwise argparse prints the usage and exits 2)."""
    def parse(value):
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {number}")
        return number
    parse.__name__ = f"int>={minimum}"
    return parse


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
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)
