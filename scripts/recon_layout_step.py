"""Times a loss step, forward + backward, of fastelbo.gaussian_recon_loss on a channels_last x_hat
against x in channels_last (default) or contiguous memory (X_LAYOUT), one thread:
benches/RESULTS.md, "Reconstruction inputs in channels_last". Prints the 10th percentile and the
median of REPS steps, in us.

    PYTHONPATH=<tree> .venv/bin/python scripts/recon_layout_step.py SHAPE REPS [X_LAYOUT]
    PYTHONPATH=<tree> .venv/bin/python scripts/recon_layout_step.py 8,3,256,256 40 contiguous

(PYTHONPATH picks the build to time: `python script.py` puts the script's folder, not the current
one, first on sys.path, so without it the editable install's build is imported.)
"""
import gc
import sys
import time

import torch

import fastelbo

torch.set_num_threads(1)
shape = tuple(int(v) for v in sys.argv[1].split(","))
xh0 = torch.randn(shape).contiguous(memory_format=torch.channels_last)
x_layout = sys.argv[3] if len(sys.argv) > 3 else "channels_last"
x = torch.randn(shape).contiguous(memory_format=getattr(torch, x_layout + "_format" if x_layout == "contiguous" else x_layout))
xh = xh0.clone().requires_grad_()


def step():
    xh.grad = None
    fastelbo.gaussian_recon_loss(xh, x).backward()


for _ in range(5):
    step()
gc.disable()
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter_ns()
    step()
    times.append(time.perf_counter_ns() - start)
times.sort()
print(f"{times[len(times) // 10] / 1e3:.0f} {times[len(times) // 2] / 1e3:.0f}")
