"""The one loop over a data dir's held-out split: metric sums of a step over its batches. The
trainer's eval, `benchmarks/quantization.py` and the perplexity evaluator all run it."""

from collections.abc import Callable

from maxlm import data


def split_sums(data_dir, step: Callable[[dict], dict], global_batch_size: int,
               max_batches: int | None = None, split: str = "validation") -> dict[str, float]:
  """Sums of `step(batch)`'s metrics over (up to `max_batches` of) `split`, in order; the
  loader pads its last batch with empty sequences, which carry no target."""
  dataset = data.make_dataset(data_dir, split, global_batch_size=global_batch_size, seed=0,
                              shuffle=False, num_epochs=1)
  sums: dict[str, float] = {}
  for i, batch in enumerate(dataset):
    if i == max_batches:
      break
    for name, value in step(batch).items():
      sums[name] = sums.get(name, 0.0) + float(value)
  return sums
