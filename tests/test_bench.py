"""`fastelbo bench`: the CLI end to end at a tiny size, its JSON, the byte floor, and the
validation that refuses a wrong provider before it is timed."""
import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fastelbo import bench, cli

TINY = "4,64,8"  # B, D, Z

ROW_FIELDS = {
    "device", "dtype", "size", "B", "D", "Z", "N", "M", "provider", "mode", "element_bytes", "n_input_sets",
    "inputs_fit_in_cache", "warmup", "reps", "median_us", "p10_us", "p25_us", "p75_us", "p90_us", "iqr_us", "min_us", "mean_us",
    "floor_bytes", "floor_us", "copy_GBps", "effective_GBps", "floor_fraction", "kernel_time_us",
    "kernels_per_step", "kernel_floor_fraction", "peak_mem_bytes", "peak_mem_method", "fastelbo_cpu_cache_bytes",
    "validation_errors",
    "validation_s", "speedup_vs_eager", "speedup_vs_compile",
}
MACHINE_FIELDS = {"platform", "cpu_count", "torch", "cuda", "gpu", "cpu_model", "torch_threads", "python",
                  "fastelbo_cuda_clusters", "fastelbo_cuda_one_block", "fastelbo_cuda_large_blocks",
                  "fastelbo_cuda_spread",
                  "fastelbo_grad_in_forward", "fastelbo_cpu_vector_paths", "fastelbo_source_digest"}


def run_bench(tmp_path, *extra):
    out = tmp_path / "out"
    argv = ["bench", "--sizes", TINY, "--reps", "5", "--warmup", "1", "--copy-mib", "16", "--no-progress",
            "--out", str(out), *extra]
    rc = cli.main(argv)
    with open(out / "bench.json") as f:
        return rc, json.load(f), out


# ---------------------------------------------------------------------------------------------- floor


@pytest.mark.parametrize("dtype, s", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
def test_floor_bytes_matches_a_hand_count(dtype, s):
    size = bench.Size("t", B=2, D=3, Z=5)  # N = 10 latent elements, M = 6 data elements
    N, M = 10, 6
    # fwd+bwd: reparam+KL forward reads mu, logvar, writes z; backward reads g_z, mu, logvar and
    # writes g_mu, g_logvar; recon reads x_hat and x twice and writes g_x_hat.
    hand = (2 * N + N) + (3 * N + 2 * N) + (2 * M + 2 * M + M)
    assert hand == 8 * N + 5 * M == 110
    assert bench.floor_bytes(size, dtype, "fwd+bwd") == hand * s
    # forward only: read mu, logvar, write z; read x_hat, x.
    assert bench.floor_bytes(size, dtype, "fwd") == (2 * N + N + 2 * M) * s == 42 * s
    large = bench.Size("large", *bench.PRESETS["large"])
    assert bench.floor_bytes(large, dtype, "fwd+bwd") == (8 * 64 * 2**14 + 5 * 64 * 2**20) * s
    with pytest.raises(ValueError):
        bench.floor_bytes(size, dtype, "backward")


def test_parse_size():
    assert bench.parse_size("mnist-mlp") == [bench.Size("mnist-mlp", 128, 784, 20)]
    assert bench.parse_size("16,1048576,16384") == [bench.Size("16x1048576x16384", 16, 1048576, 16384)]
    assert bench.parse_size("2x3x5") == [bench.Size("2x3x5", 2, 3, 5)]
    assert [s.name for s in bench.parse_size("mnist-mlp,large")] == ["mnist-mlp", "large"]
    assert bench.PRESETS["ldm-ae-256"] == (8, 196608, 4096) and bench.PRESETS["large"] == (64, 2**20, 2**14)
    for bad in ("nope", "1,2", "0,4,4", "1,2,x3"):
        with pytest.raises(argparse.ArgumentTypeError, match="size"):
            bench.parse_size(bad)


def test_summary_statistics():
    stats = bench.summarize([1000 * v for v in range(1, 12)])  # 1 .. 11 us
    assert stats["median_us"] == 6 and stats["min_us"] == 1 and stats["reps"] == 11
    assert stats["p10_us"] == pytest.approx(2.0) and stats["p90_us"] == pytest.approx(10.0)
    assert stats["iqr_us"] == pytest.approx(5.0)


def test_input_sets_rotate_only_when_they_fit_in_cache(monkeypatch):
    monkeypatch.setattr(bench, "cache_bytes", lambda device: 32 << 20)  # whatever this machine's cache
    tiny = bench.Size("t", 4, 64, 8)
    huge = bench.Size("h", 16, 2**20, 2**14)  # one set: 131 MiB
    mnist = bench.Size("mnist-mlp", *bench.PRESETS["mnist-mlp"])  # one float32 set: 0.8 MiB
    assert bench.n_input_sets(tiny, torch.float32, "cpu", 32) == 32
    assert bench.n_input_sets(huge, torch.float32, "cpu", 32) == 1
    assert bench.n_input_sets(mnist, torch.float32, "cpu", 32) == 32
    assert bench.n_input_sets(mnist, torch.float32, "cpu", 100) == 81  # twice the cache
    # 32 sets of mnist-mlp (25 MiB) still fit in the cache, and the rows say so; 81 do not
    assert bench.inputs_fit_in_cache(mnist, torch.float32, "cpu", 32)
    assert not bench.inputs_fit_in_cache(mnist, torch.float32, "cpu", 81)
    assert not bench.inputs_fit_in_cache(huge, torch.float32, "cpu", 1)


def test_profiled_activities_are_told_apart_by_name():
    assert bench._activity_kind("Memcpy HtoD (Pageable -> Device)") == "memcpy"
    assert bench._activity_kind("Memset (Device)") == "memset"
    assert bench._activity_kind("void fastelbo::(anonymous namespace)::recon_forward_flat_kernel<float>(...)") == "kernel"


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_writes_every_field(tmp_path, capsys):
    rc, data, out = run_bench(tmp_path, "--no-compile", "--dtypes", "fp32,bf16")
    assert rc == 0
    printed = capsys.readouterr().out
    assert "eager" in printed and "fastelbo" in printed and "x eager" in printed

    meta = data["meta"]
    assert MACHINE_FIELDS <= set(meta["machine"])
    assert meta["command"].startswith(f"fastelbo bench --sizes {TINY} --reps 5")  # the argv given, not sys.argv
    assert meta["machine"]["torch"] == torch.__version__
    assert meta["machine"]["cpu_count"] == os.cpu_count()
    assert meta["machine"]["fastelbo_source_digest"] == bench.source_digest(str(Path(bench.__file__).resolve().parents[1]))
    assert meta["copy_bandwidth"]["cpu"]["GBps"] > 0
    assert meta["copy_bandwidth"]["cpu"]["bytes_per_copy"] == 2 * (16 << 20)
    assert {"arguments", "started", "elapsed_s", "config", "load_average_start", "busy_warning"} <= set(meta)
    assert data["refused"] == [] and data["skipped"] == [] and data["errors"] == []

    rows = data["results"]
    keys = {(r["provider"], r["dtype"], r["mode"]) for r in rows}
    assert keys == {(p, d, m) for p in ("eager", "fastelbo") for d in ("fp32", "bf16") for m in ("fwd", "fwd+bwd")}
    assert len(rows) == len(keys)
    copy = meta["copy_bandwidth"]["cpu"]["GBps"]
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert (r["B"], r["D"], r["Z"], r["N"], r["M"]) == (4, 64, 8, 32, 256)
        assert r["reps"] == 5
        assert 0 < r["p10_us"] <= r["median_us"] <= r["p90_us"]
        size = bench.Size(r["size"], r["B"], r["D"], r["Z"])
        assert r["floor_bytes"] == bench.floor_bytes(size, bench.DTYPES[r["dtype"]], r["mode"])
        assert r["floor_us"] == pytest.approx(r["floor_bytes"] / copy / 1e3)
        assert r["floor_fraction"] == pytest.approx(r["floor_us"] / r["median_us"])
        assert r["kernel_time_us"] is None  # CPU: no kernel profile
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
        assert all(v == v for v in r["validation_errors"].values())  # no NaN
        eager = next(e for e in rows if (e["provider"], e["dtype"], e["mode"]) == ("eager", r["dtype"], r["mode"]))
        assert r["speedup_vs_eager"] == pytest.approx(eager["median_us"] / r["median_us"])
    # fwd+bwd allocates at least the three fresh gradients (2N + M elements)
    for r in rows:
        if r["mode"] == "fwd+bwd" and r["peak_mem_bytes"] is not None:
            assert r["peak_mem_bytes"] >= (2 * 32 + 256) * r["element_bytes"]
    assert (out / "bench.png").stat().st_size > 1000


def test_no_plot_without_the_eager_baseline(tmp_path, capsys):
    """bench.png plots speedups over eager: a run without eager writes none, and says why."""
    rc, result, out = run_bench(tmp_path, "--providers", "fastelbo", "--modes", "fwd")
    assert rc == 0 and result["results"]
    assert "no bench.png" in capsys.readouterr().out
    assert not (out / "bench.png").exists()


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    assert cli.main(["bench", "--dtypes", "fp8", "--out", str(tmp_path)]) == 2
    assert cli.main(["bench", "--providers", "nope", "--out", str(tmp_path)]) == 2
    assert cli.main(["bench", "--sizes", "1,2", "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    # An empty list measured everything (the defaults, compile included), a doubled item twice.
    for argv, message in ((["--providers", ""], "names nothing"), (["--dtypes", ""], "names nothing"),
                          (["--devices", ""], "names nothing"), (["--dtypes", "fp32,float32"], "names fp32 twice"),
                          (["--modes", "fwd,fwd"], "names fwd twice"), (["--providers", "eager,eager"], "twice"),
                          (["--sizes", TINY, TINY], "named twice"),
                          (["--copy-mib", str(1 << 40)], "--copy-mib")):
        assert cli.main(["bench", *argv, "--out", str(tmp_path)]) == 2, argv
        assert message in capsys.readouterr().err, argv
    # argparse's own checks: the usage and exit 2
    for argv in (["--time-per-case", "-5"], ["--time-per-case", "0"], ["--time-per-case", "nan"],
                 ["--time-per-case", "inf"], ["--warmup", "0"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["bench", *argv, "--out", str(tmp_path)])
        assert info.value.code == 2, argv
        assert "usage: fastelbo bench" in capsys.readouterr().err, argv
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--devices", "cuda", "--out", str(tmp_path)]) == 2


# ---------------------------------------------------------------------------------------------- validation


def wrong_loss(mu, logvar, x_hat, x, eps=None):
    z, kl, rec = bench.eager_loss(mu, logvar, x_hat, x, eps)
    return z, kl, 1.05 * rec  # 5 % off


def wrong_grad(mu, logvar, x_hat, x, eps=None):
    # right values everywhere, but no gradient from z to logvar
    std = torch.exp(0.5 * logvar)
    if eps is None:
        eps = torch.randn_like(std)
    z = mu + eps * std.detach()
    _, kl, rec = bench.eager_loss(mu, logvar, x_hat, x, eps)
    return z, kl, rec


_FROZEN = {}


def frozen_noise(mu, logvar, x_hat, x, eps=None):
    # uses the given eps, but always the same cached eps when drawing: the timed path would be wrong
    if eps is None:
        key = (tuple(mu.shape), mu.dtype)
        eps = _FROZEN.setdefault(key, torch.randn_like(mu))
    return bench.eager_loss(mu, logvar, x_hat, x, eps)


def uniform_noise(mu, logvar, x_hat, x, eps=None):
    # mean 0, variance 1, but not Gaussian
    if eps is None:
        eps = (torch.rand_like(mu) * 2 - 1) * 3**0.5
    return bench.eager_loss(mu, logvar, x_hat, x, eps)


@pytest.mark.parametrize("fn, message", [
    (wrong_loss, "rec (eps given)"),
    (wrong_grad, "grad_logvar (eps given)"),
    (frozen_noise, "same z"),
])
def test_validation_catches_a_wrong_provider(fn, message):
    size = bench.Size("t", 4, 64, 8)
    with pytest.raises(bench.ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bench.validate_provider(fn, size, torch.float32, "cpu")


def test_validation_catches_non_gaussian_noise():
    size = bench.Size("t", 64, 16, 64)  # N = 4096 draws: enough for the distribution check
    with pytest.raises(bench.ValidationError, match="N\\(0, 1\\)"):
        bench.validate_provider(uniform_noise, size, torch.float32, "cpu")
    errors = bench.validate_provider(bench.eager_loss, size, torch.float32, "cpu")
    assert abs(errors["eps_std"] - 1) < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_builtin_providers_validate(dtype):
    size = bench.Size("t", 8, 96, 16)
    for name in ("eager", "fastelbo"):
        errors = bench.validate_provider(bench.PROVIDERS[name].build(), size, dtype, "cpu")
        assert max(v for k, v in errors.items() if not k.startswith("eps_")) <= bench.TOLERANCES[dtype]


def test_source_digest_names_the_sources(tmp_path):
    root = Path(bench.__file__).resolve().parents[1]
    if not (root / "csrc").is_dir():
        pytest.skip("needs the source tree (csrc/ next to the package)")
    copy = tmp_path / "tree"
    shutil.copytree(root / "fastelbo", copy / "fastelbo")
    shutil.copytree(root / "csrc", copy / "csrc")
    digest = bench.source_digest(str(root))
    assert len(digest) == 12 and bench.source_digest(str(copy)) == digest
    # Build products and caches are not sources.
    (copy / "fastelbo" / "_C.fake.so").write_bytes(b"\x7fELF")
    (copy / "fastelbo" / "__pycache__").mkdir(exist_ok=True)
    (copy / "fastelbo" / "__pycache__" / "x.py").write_text("")
    assert bench.source_digest(str(copy)) == digest
    # One byte of a kernel source, or a moved file, changes it.
    kernel = next(iter(sorted((copy / "csrc").rglob("*.h"))))
    kernel.write_bytes(kernel.read_bytes() + b" ")
    changed = bench.source_digest(str(copy))
    assert changed != digest
    kernel.write_bytes(kernel.read_bytes()[:-1])
    assert bench.source_digest(str(copy)) == digest
    kernel.rename(kernel.with_name("renamed_" + kernel.name))
    assert bench.source_digest(str(copy)) not in (digest, changed)


def test_cli_records_fastelbo_settings(tmp_path, monkeypatch, capsys):
    """An A/B run with a fastelbo setting switched off says so, in the JSON and next to its
    numbers; a run with the defaults records them."""
    import fastelbo

    fastelbo_args = ("--providers", "fastelbo", "--dtypes", "fp32", "--modes", "fwd+bwd", "--no-plot")
    monkeypatch.setattr(fastelbo.functional, "_GRAD_IN_FORWARD", True)
    _, data, _ = run_bench(tmp_path / "default", *fastelbo_args)
    assert data["meta"]["machine"]["fastelbo_grad_in_forward"] is True
    assert data["meta"]["machine"]["fastelbo_cpu_vector_paths"] is fastelbo._C._cpu_vector_paths_enabled()
    assert data["meta"]["machine"]["fastelbo_cuda_one_block"] is fastelbo._C._cuda_one_block_enabled()
    assert data["meta"]["machine"]["fastelbo_cuda_large_blocks"] is fastelbo._C._cuda_large_blocks_enabled()
    capsys.readouterr()
    monkeypatch.setattr(fastelbo.functional, "_GRAD_IN_FORWARD", False)
    rc, data, _ = run_bench(tmp_path / "switched", *fastelbo_args)
    assert rc == 0
    assert data["meta"]["machine"]["fastelbo_grad_in_forward"] is False
    assert "fastelbo settings switched off: fastelbo_grad_in_forward (README)" in capsys.readouterr().out
    monkeypatch.setattr(fastelbo.functional, "_GRAD_IN_FORWARD", True)
    for setter, field in (("_set_cuda_one_block", "fastelbo_cuda_one_block"),
                          ("_set_cuda_large_blocks", "fastelbo_cuda_large_blocks")):
        previous = getattr(fastelbo._C, setter)(False)
        try:
            _, data, _ = run_bench(tmp_path / field, *fastelbo_args)
        finally:
            getattr(fastelbo._C, setter)(previous)
        assert data["meta"]["machine"][field] is False
        assert f"fastelbo settings switched off: {field} (README)" in capsys.readouterr().out


def test_cli_refuses_wrong_providers(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.PROVIDERS, "wrong-loss", bench.Provider("wrong-loss", lambda: wrong_loss))
    monkeypatch.setitem(bench.PROVIDERS, "wrong-grad", bench.Provider("wrong-grad", lambda: wrong_grad))
    rc, data, _ = run_bench(tmp_path, "--providers", "eager,wrong-loss,fastelbo,wrong-grad", "--dtypes", "fp32",
                            "--modes", "fwd+bwd", "--no-plot")
    assert rc == 1
    refused = {r["provider"]: r["reason"] for r in data["refused"]}
    assert set(refused) == {"wrong-loss", "wrong-grad"}
    assert "rec" in refused["wrong-loss"] and "grad_logvar" in refused["wrong-grad"]
    assert {r["provider"] for r in data["results"]} == {"eager", "fastelbo"}
    printed = capsys.readouterr().out
    assert "REFUSED wrong-loss" in printed and "REFUSED wrong-grad" in printed


def test_cli_with_torch_compile(tmp_path, monkeypatch):
    """The one case that compiles (tiny, fp32, fwd+bwd): compile is validated and reported, and
    compiles before timing: no timed step (warm-up included) compiles a graph."""
    from torch._dynamo.utils import counters

    def compiled_graphs():
        return counters["stats"]["unique_graphs"]

    timed_calls, compiled_while_timed = [], []
    untimed = bench.time_steps

    def time_steps(step, reps, sync):
        before = compiled_graphs()
        times = untimed(step, reps, sync)
        timed_calls.append(reps)
        compiled_while_timed.append(compiled_graphs() - before)
        return times

    monkeypatch.setattr(bench, "time_steps", time_steps)
    graphs_before = compiled_graphs()
    rc, data, _ = run_bench(tmp_path, "--providers", "eager,compile", "--dtypes", "fp32", "--modes", "fwd+bwd",
                            "--no-plot")
    assert compiled_graphs() > graphs_before  # the counter sees torch.compile's graphs
    assert timed_calls and not any(compiled_while_timed), compiled_while_timed
    assert rc == 0, data["refused"]
    rows = {r["provider"]: r for r in data["results"]}
    assert set(rows) == {"eager", "compile"}
    assert rows["eager"]["speedup_vs_compile"] == pytest.approx(
        rows["compile"]["median_us"] / rows["eager"]["median_us"])


# ---------------------------------------------------------------------------------------------- pytest-benchmark suite


def _collect_benches(*options):
    """`pytest benches/ --collect-only` with the suite's options: (exit code, output)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           str(root / "benches"), *options], capture_output=True, text=True, cwd=root, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_benchmark_suite_takes_bench_names_and_refuses_unknown_ones():
    """benches/ takes the dtype names `fastelbo bench` takes (float32 for fp32); an unknown dtype,
    device, provider or size, or a thread count below 1, is a usage error before anything runs."""
    rc, out = _collect_benches("--fastelbo-dtypes", "float32", "--fastelbo-sizes", TINY, "--fastelbo-devices", "cpu",
                               "--fastelbo-providers", "eager,fastelbo")
    assert rc == 0, out
    assert "test_loss_step[cpu-fp32-4x64x8-fwd-eager]" in out and "4 tests collected" in out, out
    for option, value, message in (("--fastelbo-dtypes", "fp8", "--fastelbo-dtypes 'fp8'"),
                                   ("--fastelbo-devices", "tpu", "--fastelbo-devices 'tpu'"),
                                   ("--fastelbo-providers", "nope", "--fastelbo-providers 'nope'"),
                                   ("--fastelbo-sizes", "1,2", "--fastelbo-sizes"),
                                   ("--fastelbo-threads", "0", "--fastelbo-threads must be >= 1")):
        rc, out = _collect_benches(option, value)
        assert rc != 0 and message in out, (option, out)
