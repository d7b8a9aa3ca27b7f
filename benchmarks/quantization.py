"""What int8 weights, the int8 KV cache and bfloat16 cost, from the eval harness: Δ bits per
byte on held-out text and Δ multiple-choice accuracy against float32, with the issue's gates,
and the weight and KV-cache memory.

  python benchmarks/quantization.py --checkpoint_dir=runs/tiny [--files=12] [--items=200]
      [--json]

Runs `maxlm.evaluate` once per option on the run's latest checkpoint: float32, int8 weights
(`--quantize=int8`), int8 weights and KV cache (`--kv_cache_dtype=int8` on top), and bfloat16
weights, activations and KV cache (`--dtype=bfloat16`). The held-out
text is `--files` of the stdlib's idlelib sources, which the default corpus leaves out of
training; it is scored through the KV cache, so every attention read sees the cache's rounding.
The multiple-choice items are `--items` contexts cut from the stdlib's `textwrap` with four
continuations, the first the true one. Exits 1 when an option's bits per byte exceed
float32's by more than its gate (1% for int8 weights and for bfloat16, 2% with the int8 KV
cache).
For an absolute floor on a quantized export,
`python -m maxlm.evaluate --quantize=int8 --tasks=choice:ITEMS.jsonl --fail_below=choice:acc=X`.
"""

import argparse
import json
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.evaluate import make_items  # noqa: E402
from maxlm import evaluate, quantization  # noqa: E402
from maxlm.model import paged_kv  # noqa: E402
from serving.engine import Engine  # noqa: E402

# (name, --quantize, --kv_cache_dtype, --dtype, the gate on Δ bits per byte; None: baseline)
OPTIONS = (("float32", "none", "auto", "auto", None), ("int8", "int8", "auto", "auto", 0.01),
           ("int8+kv8", "int8", "int8", "auto", 0.02),
           ("bfloat16", "none", "auto", "bfloat16", 0.01))


def write_choice_items(path: Path, count: int):
  with path.open("w") as out:
    for context, choices in make_items(count):
      out.write(json.dumps({"context": context, "choices": [" " + c for c in choices],
                            "gold": 0}) + "\n")


def heldout_files(count: int) -> list[str]:
  """Held-out Python: idlelib, which `maxlm.default_corpus` skips."""
  files = sorted(Path(sysconfig.get_paths()["stdlib"], "idlelib").glob("*.py"))
  return [str(path) for path in files[:count]]


def harness_results(checkpoint_dir: str, quantize: str, kv_cache_dtype: str, dtype: str,
                    texts: Path, items: Path) -> dict:
  args = evaluate.parse_args([f"--checkpoint_dir={checkpoint_dir}", f"--quantize={quantize}",
                              f"--kv_cache_dtype={kv_cache_dtype}", f"--dtype={dtype}",
                              f"--tasks=heldout=perplexity:{texts}/*.py",
                              f"--tasks=choice=choice:{items}"])
  output, _ = evaluate.evaluate(args)
  return output["results"]


def memory_mb(checkpoint_dir: str, quantize: str, kv_cache_dtype: str, dtype: str
              ) -> tuple[float, float]:
  """(weight MiB, KV-cache KiB per token) of the server's engine with these options."""
  engine = Engine.from_checkpoint(checkpoint_dir, slots=1, quantize=quantize,
                                  kv_cache_dtype=kv_cache_dtype, dtype=dtype)
  c = engine.config
  kv = paged_kv.block_bytes(c.num_layers, 1, c.num_kv_heads, c.head_dim, engine.kv_cache_dtype)
  return quantization.nbytes(engine.params) / 2**20, kv / 2**10


def table(rows: dict) -> str:
  base = rows["float32"]
  header = (f"{'option':<10}{'bits/byte':>11}{'Δ bpb':>9}{'gate':>7}{'acc':>8}{'Δ acc':>8}"
            f"{'weights MiB':>13}{'KV KiB/token':>14}")
  lines = [header]
  for name, row in rows.items():
    gate = "" if row["gate"] is None else f"{100 * row['gate']:.0f}%"
    lines.append(f"{name:<10}{row['bits_per_byte']:>11.4f}{100 * row['bpb_increase']:>8.2f}%"
                 f"{gate:>7}{row['acc']:>8.3f}{row['acc'] - base['acc']:>+8.3f}"
                 f"{row['weight_mib']:>13.3f}{row['kv_kib_per_token']:>14.3f}")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint_dir", required=True)
  parser.add_argument("--files", type=int, default=12, help="held-out idlelib files")
  parser.add_argument("--items", type=int, default=200)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)

  rows = {}
  with tempfile.TemporaryDirectory() as scratch:
    texts, items = Path(scratch) / "heldout", Path(scratch) / "choice.jsonl"
    texts.mkdir()
    for path in heldout_files(args.files):
      (texts / Path(path).name).write_bytes(Path(path).read_bytes())
    write_choice_items(items, args.items)
    for name, quantize, kv_cache_dtype, dtype, gate in OPTIONS:
      results = harness_results(args.checkpoint_dir, quantize, kv_cache_dtype, dtype, texts,
                                items)
      weight_mib, kv_kib = memory_mb(args.checkpoint_dir, quantize, kv_cache_dtype, dtype)
      rows[name] = {"bits_per_byte": results["heldout"]["bits_per_byte"],
                    "acc": results["choice"]["acc"], "acc_norm": results["choice"]["acc_norm"],
                    "weight_mib": weight_mib, "kv_kib_per_token": kv_kib, "gate": gate}
  base = rows["float32"]
  for row in rows.values():
    row["bpb_increase"] = row["bits_per_byte"] / base["bits_per_byte"] - 1
    row["acc_change"] = row["acc"] - base["acc"]
  print(table(rows))
  result = {"options": rows, "files": args.files, "items": args.items}
  if args.json:
    print(json.dumps(result))
  failed = [f"{name} raises bits per byte by {100 * row['bpb_increase']:.2f}%, over its "
            f"{100 * row['gate']:.0f}% gate" for name, row in rows.items()
            if row["gate"] is not None and row["bpb_increase"] > row["gate"]]
  if failed:
    raise SystemExit("; ".join(failed))
  return result


if __name__ == "__main__":
  main()
