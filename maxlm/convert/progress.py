"""A conversion's progress as it reads or writes tensors one at a time, in `maxlm.progress`'s
lines: `to_hf: 12/291 tensors (1.2/13.5 GB) [4%] elapsed 9s ETA 4m3s`."""

from maxlm.progress import ConsoleProgress

UNITS = (("GB", 10**9), ("MB", 10**6), ("kB", 10**3))


def sizes(done: int, total: int) -> str:
  """`done` and `total` bytes in the unit of the total: '1.2/13.5 GB'."""
  unit, scale = next(((unit, scale) for unit, scale in UNITS if total >= scale), UNITS[-1])
  return f"{done / scale:.1f}/{total / scale:.1f} {unit}"


class Progress:
  """Counts tensors and their bytes towards known totals; `console` takes ConsoleProgress's
  keywords."""

  def __init__(self, label: str, tensors: int, nbytes: int, **console):
    self.tensors, self.nbytes = tensors, nbytes
    self.tensors_done, self.bytes_done = 0, 0
    self._report = ConsoleProgress(label, **console)

  def advance(self, nbytes: int) -> None:
    self.tensors_done += 1
    self.bytes_done += nbytes
    self._report(self.tensors_done, self.tensors, "tensors", sizes(self.bytes_done, self.nbytes))
