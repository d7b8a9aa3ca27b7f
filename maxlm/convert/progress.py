"""A conversion's progress on stderr, as it reads or writes tensors one at a time: a line such as
`to_hf: 12/291 tensors, 1.2/13.5 GB` for the first tensor, then at most every few seconds, and
for the last."""

import math
import sys
import time
from collections.abc import Callable

INTERVAL_S = 3.0
UNITS = (("GB", 10**9), ("MB", 10**6), ("kB", 10**3))


def sizes(done: int, total: int) -> str:
  """`done` and `total` bytes in the unit of the total: '1.2/13.5 GB'."""
  unit, scale = next(((unit, scale) for unit, scale in UNITS if total >= scale), UNITS[-1])
  return f"{done / scale:.1f}/{total / scale:.1f} {unit}"


class Progress:
  """Counts tensors and their bytes towards a known total, printing a line now and then."""

  def __init__(self, label: str, tensors: int, nbytes: int, interval_s: float = INTERVAL_S,
               clock: Callable[[], float] = time.monotonic):
    self.label, self.tensors, self.nbytes = label, tensors, nbytes
    self.interval_s, self._clock = interval_s, clock
    self.tensors_done, self.bytes_done = 0, 0
    self._printed_at = -math.inf

  def advance(self, nbytes: int) -> None:
    self.tensors_done += 1
    self.bytes_done += nbytes
    now = self._clock()
    if now - self._printed_at >= self.interval_s or self.tensors_done == self.tensors:
      self._printed_at = now
      print(self.line(), file=sys.stderr, flush=True)

  def line(self) -> str:
    return (f"{self.label}: {self.tensors_done}/{self.tensors} tensors, "
            f"{sizes(self.bytes_done, self.nbytes)}")
