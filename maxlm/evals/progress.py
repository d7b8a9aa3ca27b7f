"""Progress of an evaluator's long work, reported as the trainer reports its steps: a line to
stderr every few seconds (`hellaswag: 2,560/40,168 choices [6%] elapsed 7s ETA 1m43s`), never
one per item or batch, and none for a task that ends within the first few seconds."""

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence

from maxlm.metrics import format_seconds

EVERY_S = 5.0  # seconds between two lines at least
# Prompts between two reports of a generate task, in batches: the decode slots run part-full
# while a chunk's last prompts finish.
CHUNK_BATCHES = 64

Progress = Callable[[int, int | None, str], None]  # (done, total or None, unit)


def counting(progress: Progress | None, total: int | None, unit: str
             ) -> Callable[[int], None] | None:
  """`scoring.score`'s `scored(n)`: adds up the n and tells `progress` the sum so far."""
  if progress is None:
    return None
  done = 0

  def scored(count: int):
    nonlocal done
    done += count
    progress(done, total, unit)
  return scored


def chunks(work: Sequence, batch_size: int, progress: Progress | None, unit: str
           ) -> Iterator[Sequence]:
  """`work` in slices of CHUNK_BATCHES batches; `progress` hears after each slice is done."""
  size = CHUNK_BATCHES * batch_size
  for start in range(0, len(work), size):
    yield work[start:start + size]
    if progress is not None:
      progress(min(start + size, len(work)), len(work), unit)


def progress_line(task: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
  if total is None:
    return f"{task}: {done:,} {unit} elapsed {format_seconds(elapsed)}"
  eta = elapsed / done * (total - done) if done else math.nan
  return (f"{task}: {done:,}/{total:,} {unit} [{100 * done / max(total, 1):.0f}%] "
          f"elapsed {format_seconds(elapsed)} ETA {format_seconds(eta)}")


class ConsoleProgress:
  """A `Progress` that prints `progress_line` to `stream` (default stderr) once `every_s`
  passed since the last line (or the start), and the last line of work that printed any."""

  def __init__(self, task: str, every_s: float | None = None, stream=None,
               clock: Callable[[], float] = time.monotonic):
    self.task, self.stream, self.clock = task, stream, clock
    self.every_s = EVERY_S if every_s is None else every_s
    self.start = self.last = clock()
    self.printed = False

  def __call__(self, done: int, total: int | None, unit: str):
    now = self.clock()
    finished_after_a_line = self.printed and total is not None and done >= total
    if now - self.last < self.every_s and not finished_after_a_line:
      return
    self.last, self.printed = now, True
    print(progress_line(self.task, done, total, unit, now - self.start),
          file=self.stream or sys.stderr, flush=True)
