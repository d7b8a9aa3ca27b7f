"""A long job's progress on stderr, as the trainer reports its steps: a line every few seconds
(`hellaswag: 2,560/40,168 choices [6%] elapsed 7s ETA 1m43s`), never one per item, none for
work that ends within the first few seconds, and the last line of work that printed any. The
evaluators (`maxlm.evals.progress`) and the conversions (`maxlm.convert.progress`) print it."""

import math
import sys
import time
from collections.abc import Callable

from maxlm.metrics import format_seconds

EVERY_S = 5.0  # seconds between two lines at least


def progress_line(task: str, done: int, total: int | None, unit: str, elapsed: float,
                  detail: str = "") -> str:
  """`detail`, if any, follows the count in parentheses: `12/291 tensors (1.2/13.5 GB)`."""
  count = f"{done:,} {unit}" if total is None else f"{done:,}/{total:,} {unit}"
  count += f" ({detail})" if detail else ""
  if total is None:
    return f"{task}: {count} elapsed {format_seconds(elapsed)}"
  eta = elapsed / done * (total - done) if done else math.nan
  return (f"{task}: {count} [{100 * done / max(total, 1):.0f}%] "
          f"elapsed {format_seconds(elapsed)} ETA {format_seconds(eta)}")


class ConsoleProgress:
  """Prints `progress_line` to `stream` (default stderr) once `every_s` passed since the last
  line (or the start), and the last line of work that printed any."""

  def __init__(self, task: str, every_s: float | None = None, stream=None,
               clock: Callable[[], float] = time.monotonic):
    self.task, self.stream, self.clock = task, stream, clock
    self.every_s = EVERY_S if every_s is None else every_s
    self.start = self.last = clock()
    self.printed = False

  def __call__(self, done: int, total: int | None, unit: str, detail: str = ""):
    now = self.clock()
    finished_after_a_line = self.printed and total is not None and done >= total
    if now - self.last < self.every_s and not finished_after_a_line:
      return
    self.last, self.printed = now, True
    print(progress_line(self.task, done, total, unit, now - self.start, detail),
          file=self.stream or sys.stderr, flush=True)
