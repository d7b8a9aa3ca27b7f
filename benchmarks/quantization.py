"""What `--quantize=int8` costs, from the eval harness: Δ bits per byte on held-out text and
Δ multiple-choice accuracy against float32, with the issue's gate, and the weight memory.

  python benchmarks/quantization.py --checkpoint_dir=runs/tiny [--data_dir=DIR] [--items=200]
      [--max_batches=40] [--json]

Runs `maxlm.evaluate` twice on the run's latest checkpoint, float32 and int8 weights, over the
validation split of the data it was trained on (default: the default corpus that
`python -m maxlm.train` builds) and over `--items` multiple-choice items (a context cut from a
line of the stdlib's `textwrap` and four continuations, the first the true one; written to a
temporary JSONL file). Exits 1 when int8's bits per byte exceed float32's by more than 1%
(`--max_bpb_increase`): a relative gate. For an absolute floor on a quantized export,
`python -m maxlm.evaluate --quantize=int8 --tasks=choice:ITEMS.jsonl --fail_below=choice:acc=X`.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.evaluate import make_items  # noqa: E402
from maxlm import evaluate, quantization  # noqa: E402
from serving.engine import Engine  # noqa: E402

MODES = ("none", "int8")


def write_choice_items(path: Path, count: int):
  with path.open("w") as out:
    for context, choices in make_items(count):
      out.write(json.dumps({"context": context, "choices": [" " + c for c in choices],
                            "gold": 0}) + "\n")


def harness_results(checkpoint_dir: str, mode: str, data_dir: str, items: Path,
                    max_batches: int) -> dict:
  args = evaluate.parse_args([f"--checkpoint_dir={checkpoint_dir}", f"--quantize={mode}",
                              f"--tasks=heldout=perplexity:{data_dir}",
                              f"--tasks=choice=choice:{items}", f"--limit={max_batches}"])
  output, _ = evaluate.evaluate(args)
  return output["results"]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint_dir", required=True)
  parser.add_argument("--data_dir", default=None,
                      help="the run's training data; default: the default corpus")
  parser.add_argument("--items", type=int, default=200)
  parser.add_argument("--max_batches", type=int, default=40,
                      help="held-out batches (the default corpus' split has 40)")
  parser.add_argument("--max_bpb_increase", type=float, default=0.01)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  data_dir = args.data_dir
  if data_dir is None:
    from maxlm import default_corpus
    data_dir = default_corpus.ensure_default_corpus()

  rows = {}
  with tempfile.TemporaryDirectory() as scratch:
    items = Path(scratch) / "choice.jsonl"
    write_choice_items(items, args.items)
    for mode in MODES:
      results = harness_results(args.checkpoint_dir, mode, data_dir, items, args.max_batches)
      engine = Engine.from_checkpoint(args.checkpoint_dir, slots=1, quantize=mode)
      rows[mode] = {"bits_per_byte": results["heldout"]["bits_per_byte"],
                    "acc": results["choice"]["acc"], "acc_norm": results["choice"]["acc_norm"],
                    "weight_mb": quantization.nbytes(engine.params) / 2**20}
  base, int8 = rows["none"], rows["int8"]
  result = {
      "float32_bits_per_byte": base["bits_per_byte"], "int8_bits_per_byte": int8["bits_per_byte"],
      "int8_bpb_increase": int8["bits_per_byte"] / base["bits_per_byte"] - 1,
      "float32_acc": base["acc"], "int8_acc": int8["acc"],
      "int8_acc_change": int8["acc"] - base["acc"],
      "int8_acc_norm_change": int8["acc_norm"] - base["acc_norm"],
      "float32_weight_mb": base["weight_mb"], "int8_weight_mb": int8["weight_mb"],
      "max_bpb_increase": args.max_bpb_increase,
  }
  print(f"\n{'weights':<10}{'bits/byte':>11}{'Δ bpb':>9}{'acc':>8}{'Δ acc':>8}{'weights MB':>12}")
  for mode, name in (("none", "float32"), ("int8", "int8")):
    row = rows[mode]
    print(f"{name:<10}{row['bits_per_byte']:>11.4f}"
          f"{100 * (row['bits_per_byte'] / base['bits_per_byte'] - 1):>8.2f}%"
          f"{row['acc']:>8.3f}{row['acc'] - base['acc']:>+8.3f}{row['weight_mb']:>12.2f}")
  if args.json:
    print(json.dumps(result))
  if result["int8_bpb_increase"] > args.max_bpb_increase:
    raise SystemExit(f"int8 raises bits per byte by {100 * result['int8_bpb_increase']:.2f}%, "
                     f"over the {100 * args.max_bpb_increase:.0f}% gate")
  return result


if __name__ == "__main__":
  main()
