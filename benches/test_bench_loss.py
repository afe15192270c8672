"""pytest-benchmark view of `fastelbo bench`: one loss step (fwd, or fwd+bwd) per provider, at small
sizes, grouped per device, dtype, size and mode so that the table puts the providers side by side.

    pytest benches/ --benchmark-only
    pytest benches/ --benchmark-only --fastelbo-sizes "mnist-mlp;16,65536,1024" --fastelbo-dtypes fp32,bf16

The providers, inputs, steps and validation are fastelbo.bench's: every provider is checked against
fastelbo.reference (at the benchmarked size, dtype and device) before it is timed, and a provider
that fails is reported as a test failure, not as a number. Compilation (torch.compile) and warm-up
happen before pytest-benchmark starts timing.
"""
import pytest
import torch

from fastelbo import bench

DEFAULT_SIZES = "mnist-mlp;ldm-ae-256"


def _option_list(config, option, known, canonical=lambda item: item):
    """The comma list of `option` as canonical names (None when not given), read as `fastelbo
    bench` reads its lists (bench._split); an empty or doubled list or an unknown name is a usage
    error."""
    text = config.getoption(option)
    if text is None:
        return None
    try:
        items = bench._split(text, option, canonical)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    if any(item not in known for item in items):
        raise pytest.UsageError(f"{option} {text!r}: expected a comma list of {', '.join(known)}")
    return items


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    sizes = []
    for item in (config.getoption("--fastelbo-sizes") or DEFAULT_SIZES).split(";"):
        try:
            sizes += bench.parse_size(item)
        except Exception as error:  # argparse.ArgumentTypeError: the size's own message
            raise pytest.UsageError(f"--fastelbo-sizes: {error}") from None
    providers = _option_list(config, "--fastelbo-providers", list(bench.PROVIDERS)) or list(bench.PROVIDERS)
    dtypes_opt = _option_list(config, "--fastelbo-dtypes", list(bench.DTYPES),
                              lambda name: bench.DTYPE_SHORT_NAMES.get(name, name))
    present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = _option_list(config, "--fastelbo-devices", ["cpu", "cuda"]) or present
    params, ids = [], []
    for device in devices:
        dtypes = dtypes_opt or (["fp32", "bf16"] if device == "cuda" else ["fp32"])
        for dtype in dtypes:
            for size in sizes:
                for mode in bench.MODES:
                    for provider in providers:
                        params.append((provider, device, dtype, size, mode))
                        ids.append(f"{device}-{dtype}-{size.name}-{mode}-{provider}")
    metafunc.parametrize("case", params, ids=ids)


_inputs = {}  # (device, dtype, size) -> the input sets, shared by every provider and mode
_validated = {}  # (provider, device, dtype, size) -> loss function, or the ValidationError message


def _input_sets(device, dtype, size):
    key = (device, dtype, size)
    if key not in _inputs:
        _inputs.clear()  # one size at a time in memory
        n = bench.n_input_sets(size, bench.DTYPES[dtype], device, 32)
        _inputs[key] = [bench.make_inputs(size, bench.DTYPES[dtype], device, seed) for seed in range(n)]
    return _inputs[key]


def _loss_fn(provider, device, dtype, size):
    key = (provider, device, dtype, size)
    if key not in _validated:
        if provider == "compile":  # a fresh compile per case (its build resets dynamo's caches)
            for old in [k for k in _validated if k[0] == "compile"]:
                del _validated[old]
        fn = bench.PROVIDERS[provider].build()
        try:
            bench.validate_provider(fn, size, bench.DTYPES[dtype], device)
            _validated[key] = fn
        except bench.ValidationError as error:
            _validated[key] = f"{provider} refused: {error}"
    return _validated[key]


def test_loss_step(benchmark, case):
    provider, device, dtype, size, mode = case
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    fn = _loss_fn(provider, device, dtype, size)
    if isinstance(fn, str):
        pytest.fail(fn)
    step = bench.make_step(fn, _input_sets(device, dtype, size), mode)
    sync = bench._sync(device)
    for _ in range(3):  # warm-up: compiled code and allocator settle before timing
        step()
    sync()

    def timed():
        step()
        sync()

    benchmark.group = f"{device} {dtype} {size.name} (B={size.B}, D={size.D}, Z={size.Z}) {mode}"
    benchmark.name = provider
    benchmark.extra_info.update(provider=provider, device=device, dtype=dtype, size=size.name, B=size.B,
                                D=size.D, Z=size.Z, mode=mode,
                                floor_bytes=bench.floor_bytes(size, bench.DTYPES[dtype], mode))
    benchmark(timed)
