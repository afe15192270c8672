"""What the three commands (fastelbo/cli.py) share: default devices on a GPU machine whose build has
no CUDA kernels, --out checked before the run, bounded seeds, dtype names accepted by both bench and
validate, and `python -m fastelbo.<command>` behaving like `fastelbo <command>`."""
import argparse
import subprocess
import sys

import pytest
import torch

import fastelbo
from fastelbo import bench, cli, demo, validate


def bench_args(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def gpu_without_cuda_kernels(monkeypatch):
    """A machine with a GPU where fastelbo was built without nvcc (setup.py's FASTELBO_CUDA=auto
    then builds the CPU kernels only)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fastelbo._extension, "BUILT_WITH_CUDA", False)


def test_a_cpu_only_build_on_a_gpu_machine_defaults_to_the_cpu(gpu_without_cuda_kernels, capsys):
    assert not cli.cuda_kernels_available()
    assert validate.available_devices() == ["cpu"]
    assert demo.resolve_device("auto") == "cpu"
    assert bench._resolve(bench_args())[0] == ["cpu"]
    assert "built without its CUDA kernels" in cli.cpu_only_build_note("demo")
    # asking for cuda there is a usage error that says why
    for argv in (["demo", "--device", "cuda"], ["validate", "--device", "cuda"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        assert "built without its CUDA kernels" in capsys.readouterr().err


def test_no_note_where_the_devices_are_what_they_seem(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.cpu_only_build_note("bench") is None
    assert validate.available_devices() == ["cpu"] and demo.resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fastelbo._extension, "BUILT_WITH_CUDA", True)
    assert cli.cpu_only_build_note("bench") is None
    assert validate.available_devices() == ["cpu", "cuda"] and demo.resolve_device("auto") == "cuda"


@pytest.mark.parametrize("command", [
    ["bench", "--sizes", "4,64,8", "--reps", "5", "--warmup", "1", "--copy-mib", "16", "--no-progress"],
    ["demo", "--epochs", "1", "--hidden", "8"],
], ids=["bench", "demo"])
def test_an_unusable_out_folder_fails_before_the_run(tmp_path, capsys, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main([*command, "--out", str(blocker / "sub")]) == 2
    captured = capsys.readouterr()
    assert f"--out {blocker / 'sub'}" in captured.err and "Not a directory" in captured.err
    assert "bandwidth" not in captured.err and "epoch" not in captured.out  # nothing ran


@pytest.mark.parametrize("argv", [
    ["bench", "--seed", str(2**70)],
    ["bench", "--seed", "-1"],
    ["bench", "--copy-mib", "0"],
    ["bench", "--warmup", "-1"],
    ["bench", "--profile-steps", "0"],
    ["bench", "--max-input-sets", "0"],
    ["bench", "--reps", "0"],
    ["bench", "--threads", "0"],
    ["validate", "--seed", str(2**70)],
    ["demo", "--seed", str(cli.MAX_SEED + 1)],
])
def test_numbers_out_of_range_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert f"argument {argv[1]}" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--modes", "--dtypes", "--devices", "--providers"])
def test_bench_lists_that_name_nothing_exit_2(option, tmp_path, capsys):
    assert cli.main(["bench", option, ",", "--out", str(tmp_path)]) == 2
    assert f"{option} ',' names nothing" in capsys.readouterr().err


def test_dtype_names_of_either_command_are_accepted():
    assert bench._resolve(bench_args("--dtypes", "float32,bf16,float16"))[2] == ["fp32", "bf16", "fp16"]
    args = cli.build_parser().parse_args(["validate", "--dtype", "fp32", "--dtype", "bfloat16", "--dtype", "fp64"])
    assert args.dtype == ["float32", "bfloat16", "float64"]


@pytest.mark.parametrize("module, argv, code, expected", [
    ("fastelbo.validate", ["--help"], 0, "usage: fastelbo validate"),
    ("fastelbo.demo", ["--epochs", "0"], 2, "usage: fastelbo demo"),
    ("fastelbo.bench", ["--list"], 0, "size mnist-mlp"),
])
def test_python_dash_m_of_each_command_runs_it(module, argv, code, expected):
    result = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == code, result.stderr
    assert expected in result.stdout + result.stderr
