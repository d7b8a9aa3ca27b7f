"""Whether other work shares the CPUs before a benchmark that times PyTorch beside XLA.

PyTorch's CPU threads slow far more than XLA's when another job runs on the same cores (on the
2-core machine, timm fell from ~1,400 to 40-92 images/s beside a training run while our ViT
kept most of its rate), so a ratio against PyTorch read on a busy machine means nothing.
"""

import os
import sys

BUSY_LOAD_PER_CPU = 0.5  # the 1-minute load average per core above which the machine is busy


def load_before_run() -> dict:
  """The 1-minute load average and the core count; warns on stderr when the machine is busy.
  Call it first, before the benchmark's own work adds to the load."""
  load, cpus = os.getloadavg()[0], os.cpu_count() or 1
  if load > BUSY_LOAD_PER_CPU * cpus:
    print(f"warning: the 1-minute load average is {load:.2f} on {cpus} cores before the run: "
          "other work shares the CPUs, and PyTorch slows far more than XLA beside it, so the "
          "ratios against PyTorch below are not meaningful; rerun on an idle machine",
          file=sys.stderr)
  return {"load_average": round(load, 2), "cpus": cpus,
          "busy": load > BUSY_LOAD_PER_CPU * cpus}
