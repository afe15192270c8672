"""`fastelbo demo`: a tiny run writes both pictures and the per-epoch table; bad arguments give
argparse's usage message and exit code 2."""
import os
import re
import subprocess
import sys

import pytest
import torch

from fastelbo import cli

from conftest import DEVICES

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_demo_writes_both_pictures_and_the_table(tmp_path, capsys, device):
    threads = torch.get_num_threads()
    out_dir = tmp_path / "out"
    code = cli.main(["demo", "--epochs", "2", "--hidden", "32", "--latent-dim", "2", "--batch-size", "128",
                     "--device", device, "--out", str(out_dir)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"device {device}" in printed
    for name in ("reconstructions.png", "loss_curves.png"):
        path = out_dir / name
        assert path.is_file(), name
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 2000, name
    # One row per epoch: epoch, then fused and reference losses, their difference, ...
    rows = [line for line in printed.splitlines() if re.match(r"\s+\d+\s+\d", line)]
    assert [int(row.split()[0]) for row in rows] == [1, 2], printed
    for row in rows:
        fields = row.split()
        fused, reference = float(fields[1]), float(fields[2])
        assert 0 < fused < 10 and 0 < reference < 10, row
        assert len(fields) == 10, row  # epoch, 2 train, diff, 2 held-out, 2 KL, 2 ms/epoch
    assert "held-out loss after 2 epochs" in printed
    assert "median time per epoch" in printed
    assert torch.get_num_threads() == threads, "the demo must restore torch's thread count"


def test_demo_reference_twin_starts_from_the_same_weights():
    from fastelbo.demo import build_vae, with_backend

    fused = build_vae(latent_dim=3, hidden=8)
    twin = with_backend(fused, "reference")
    assert twin.backend == "reference" and fused.backend == "fused"
    for a, b in zip(fused.parameters(), twin.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


@pytest.mark.parametrize("flags", [
    ["--epochs", "0"],
    ["--epochs", "two"],
    ["--latent-dim", "0"],
    ["--beta", "-1"],
    ["--beta", "nan"],
    ["--batch-size", "0"],
    ["--lr", "0"],
    ["--device", "tpu"],
    ["--device", "not a device"],
    ["--seed", "-3"],
    ["--threads", "0"],
])
def test_bad_arguments_give_usage_and_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fastelbo demo" in err
    assert "error: argument " + flags[0] in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--device", "cuda"])
    assert info.value.code == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_the_console_entry_point_exits_2_on_bad_arguments():
    # End to end through `python -m fastelbo` (what the `fastelbo` script runs), in a fresh process.
    result = subprocess.run([sys.executable, "-m", "fastelbo", "demo", "--epochs", "0"],
                            capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2, result.stderr
    assert "usage: fastelbo demo" in result.stderr
    assert "--epochs: must be >= 1" in result.stderr
