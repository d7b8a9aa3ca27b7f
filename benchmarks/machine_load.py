"""Whether other work shares the CPUs before a benchmark that times PyTorch beside XLA.

PyTorch's CPU threads slow far more than XLA's when another job runs on the same cores (on the
2-core machine, timm fell from ~1,400 to 40-92 images/s beside a training run while our ViT
kept most of its rate), so a ratio against PyTorch read on a busy machine means nothing.
The CPU use is sampled over a second, not read from the load average, which still counts a job
that ended a minute ago (a benchmark run right after another).
"""

import sys

import psutil

BUSY_PERCENT = 50.0  # CPU use of all cores together above which the machine is busy
SAMPLE_S = 1.0


def load_before_run() -> dict:
  """The CPU use of all cores over SAMPLE_S, while this process waits, and the core count;
  warns on stderr when the machine is busy. Call it first, before the benchmark's own work."""
  percent, cpus = psutil.cpu_percent(interval=SAMPLE_S), psutil.cpu_count() or 1
  busy = percent > BUSY_PERCENT
  if busy:
    print(f"warning: the CPUs are {percent:.0f}% busy before the run ({cpus} cores): other "
          "work shares them, and PyTorch slows far more than XLA beside it, so the ratios "
          "against PyTorch below are not meaningful; rerun on an idle machine", file=sys.stderr)
  return {"cpu_busy_percent": percent, "cpus": cpus, "busy": busy}
