"""Options of the pytest-benchmark suite (`pytest benches/ --benchmark-only`).

    --fastelbo-sizes     presets or B,D,Z separated by ';' (default: mnist-mlp;ldm-ae-256)
    --fastelbo-dtypes    comma list of fp32,bf16,fp16 (default fp32; fp32,bf16 on CUDA)
    --fastelbo-providers comma list (default: every provider of fastelbo.bench.PROVIDERS)
    --fastelbo-devices   comma list of cpu,cuda (default: those present)
    --fastelbo-threads   torch.set_num_threads for CPU runs (default: torch's default)
"""
import pytest


def pytest_addoption(parser):
    group = parser.getgroup("fastelbo", "fastelbo loss-step benchmarks")
    group.addoption("--fastelbo-sizes", default=None, help="presets or B,D,Z separated by ';'")
    group.addoption("--fastelbo-dtypes", default=None, help="comma list of fp32,bf16,fp16")
    group.addoption("--fastelbo-providers", default=None, help="comma list of providers")
    group.addoption("--fastelbo-devices", default=None, help="comma list of cpu,cuda")
    group.addoption("--fastelbo-threads", type=int, default=None, help="torch.set_num_threads for CPU runs")


def pytest_configure(config):
    threads = config.getoption("--fastelbo-threads", default=None)
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"--fastelbo-threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
