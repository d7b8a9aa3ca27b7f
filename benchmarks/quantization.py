"""What `--quantize=int8` costs in held-out perplexity, and what it saves in weight memory.

  python benchmarks/quantization.py --checkpoint_dir=runs/tiny [--data_dir=DIR] [--json]

Loads the run's latest checkpoint as the server does, float32 and int8, and computes the
mean next-token loss over the validation split of the data it was trained on (default: the
default corpus that `python -m maxlm.train` builds), both in the same run.
"""

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maxlm import quantization, tasks  # noqa: E402
from maxlm.evals import heldout  # noqa: E402
from serving.engine import Engine  # noqa: E402


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _nll(graphdef, params, batch):
  _, metrics = tasks.next_token_loss(nnx.merge(graphdef, quantization.dequantize(params)), batch)
  return metrics["nll_sum"], metrics["target_tokens"]


def held_out_loss(engine: Engine, data_dir: str, batch_size: int, max_batches: int) -> float:
  def step(batch):
    nll, tokens = _nll(engine.graphdef, engine.params,
                       {name: np.asarray(array) for name, array in batch.items()})
    return {"nll": nll, "tokens": tokens}
  sums = heldout.split_sums(data_dir, step, batch_size, max_batches)
  return sums.get("nll", 0.0) / max(sums.get("tokens", 0.0), 1.0)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint_dir", required=True)
  parser.add_argument("--data_dir", default=None,
                      help="the run's training data; default: the default corpus")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--max_batches", type=int, default=100)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  data_dir = args.data_dir
  if data_dir is None:
    from maxlm import default_corpus
    data_dir = default_corpus.ensure_default_corpus()

  rows = {}
  for mode in ("none", "int8"):
    engine = Engine.from_checkpoint(args.checkpoint_dir, slots=1, quantize=mode)
    loss = held_out_loss(engine, data_dir, args.batch_size, args.max_batches)
    rows[mode] = {"loss": loss, "perplexity": math.exp(loss),
                  "weight_mb": quantization.nbytes(engine.params) / 2**20}
  result = {
      "float32_loss": rows["none"]["loss"], "int8_loss": rows["int8"]["loss"],
      "float32_perplexity": rows["none"]["perplexity"],
      "int8_perplexity": rows["int8"]["perplexity"],
      "perplexity_increase": rows["int8"]["perplexity"] / rows["none"]["perplexity"] - 1,
      "float32_weight_mb": rows["none"]["weight_mb"], "int8_weight_mb": rows["int8"]["weight_mb"],
  }
  print(f"\n{'weights':<10}{'held-out loss':>15}{'perplexity':>12}{'weights MB':>12}")
  for mode, name in (("none", "float32"), ("int8", "int8")):
    row = rows[mode]
    print(f"{name:<10}{row['loss']:>15.4f}{row['perplexity']:>12.3f}{row['weight_mb']:>12.2f}")
  print(f"int8 perplexity is {100 * result['perplexity_increase']:+.2f}% relative to float32")
  if args.json:
    print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
