"""How an evaluator's long work tells `maxlm.progress` how far it is: the scorer's forward
passes counted up, or a generate task's prompts in chunks."""

from collections.abc import Callable, Iterator, Sequence

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
