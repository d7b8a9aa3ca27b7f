"""Evaluates a checkpoint: perplexity and bits per byte, multiple-choice log-likelihood, and
generation scored by exact match.

  python -m maxlm.evaluate --checkpoint_dir=RUN --tasks=choice:arc.jsonl,perplexity:DATA_DIR
      [--tasks=qa=generate:qa.jsonl] [--step=N] [--quantize=int8] [--kv_cache_dtype=int8]
      [--dtype=bfloat16] [--output_dir=DIR]
      [--fail_below=arc:acc=0.3 ...] [--regex=PATTERN] [--max_tokens=32] [--limit=N]

A task is `[NAME=]KIND:PATH`; NAME defaults to the stem of a .jsonl, .json or .txt file, else
PATH's last part whole (a data dir's name keeps its dots; a glob takes its directory's). Kinds:
  choice      JSONL of {"context": str, "choices": [str], "gold": int}: acc, acc_norm
              (lm-evaluation-harness's scoring, so `lm_eval --model local-completions` against
              serving.server agrees)
  perplexity  a data dir (its validation split) or a glob of UTF-8 text files: bits_per_byte,
              perplexity
  generate    JSONL of {"prompt": str, "target": str}: exact_match of greedy completions,
              batched over serving's engine; --regex extracts the answer (its first group)
Every task's input and every --fail_below gate is checked before the model loads. Long tasks
print their progress to stderr every few seconds. Prints a table, writes
OUTPUT_DIR/results.json (per-item records too) and TensorBoard scalars `evals/TASK/METRIC` at
the checkpoint's step (default OUTPUT_DIR: RUN/evals). Any --fail_below gate that is not met
exits 1, after the results are written; a mistake in the flags or inputs exits 2.
"""

import argparse
import json
import os
import queue
import sys
from collections.abc import Callable
from pathlib import Path

from maxlm import checkpoint, compilation_cache, metrics
from maxlm.errors import UserError
from maxlm.evals import progress, report, scoring
from maxlm.evals.generation import Generation
from maxlm.evals.multiple_choice import MultipleChoice
from maxlm.evals.perplexity import Perplexity
from maxlm.progress import ConsoleProgress

KINDS = ("choice", "perplexity", "generate")


def parse_task(spec: str, args: argparse.Namespace):
  """An evaluator from `[NAME=]KIND:PATH`."""
  head, _, path = spec.partition(":")
  name, _, kind = head.rpartition("=")
  if kind not in KINDS or not path:
    raise UserError(f"--tasks entry {spec!r}; write [NAME=]KIND:PATH with KIND one of "
                    f"{', '.join(KINDS)}")
  name = name or None
  if kind == "choice":
    return MultipleChoice(path, name=name, limit=args.limit)
  if kind == "perplexity":
    return Perplexity(path, name=name, max_batches=args.limit)
  return Generation(path, name=name, regex=args.regex, max_tokens=args.max_tokens,
                    limit=args.limit)


def engine_generate(engine):
  """`EvalModel.generate` over serving's engine: every prompt goes to the orchestrator at
  once, which batches them over the engine's decode slots; returns (generate, close)."""
  from serving.engine import SamplingSettings  # noqa: PLC0415 - only the CLI loads serving
  from serving.orchestrator import Orchestrator, Request  # noqa: PLC0415

  orchestrator = Orchestrator(engine, max_queue=sys.maxsize).start()

  def generate(prompts: list[list[int]], max_tokens: int, stops: list[str]) -> list[str]:
    outputs = []
    for prompt_ids in prompts:
      try:
        engine.check_fits(len(prompt_ids), 1)
      except ValueError as error:
        raise UserError(f"a generate task's prompt: {error}") from None
      deltas: queue.Queue = queue.Queue()
      orchestrator.submit(Request(
          prompt_ids, max_tokens=min(max_tokens, engine.context_length - len(prompt_ids)),
          emit=deltas.put, stops=stops, settings=SamplingSettings(temperature=0.0)))
      outputs.append(deltas)
    texts = []
    for deltas in outputs:
      text = []
      while (item := deltas.get()) is not None:
        if isinstance(item, BaseException):
          raise item
        text.append(item.text)
      texts.append("".join(text))
    return texts

  return generate, lambda: orchestrator.shutdown(grace_s=0.0)


def parse_args(argv=None) -> argparse.Namespace:
  first_paragraph, _, rest = __doc__.partition("\n\n")
  kinds_and_outputs = rest.partition("\n\n")[2]  # past the usage, which argparse writes
  parser = argparse.ArgumentParser(prog="python -m maxlm.evaluate", description=first_paragraph,
                                   epilog=kinds_and_outputs,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint_dir", required=True,
                      help="a `python -m maxlm.train` --workdir")
  parser.add_argument("--tasks", action="append", required=True,
                      help="comma-separated [NAME=]KIND:PATH entries (repeatable)")
  parser.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
  parser.add_argument("--quantize", choices=("none", "int8"), default="none")
  parser.add_argument("--kv_cache_dtype", choices=("auto", "int8"), default="auto",
                      help="int8: log-likelihoods read int8 keys and values, as the server's "
                      "--kv_cache_dtype=int8 pool holds them")
  parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                      help="bfloat16: weights, activations and KV cache as the server's "
                      "--dtype=bfloat16 holds them")
  parser.add_argument("--compilation_cache_dir", default=compilation_cache.default_dir(),
                      help="where compiled programs are kept for the next run; empty: no cache")
  parser.add_argument("--output_dir", default=None, help="default: CHECKPOINT_DIR/evals")
  parser.add_argument("--fail_below", action="append", default=[],
                      help="task:metric=value; exit 1 if the result is below (repeatable)")
  parser.add_argument("--batch_size", type=int, default=8,
                      help="sequences per log-likelihood forward pass")
  parser.add_argument("--slots", type=int, default=8, help="decode slots for generate tasks")
  parser.add_argument("--regex", default=None, help="generate tasks: extracts the answer")
  parser.add_argument("--max_tokens", type=int, default=32, help="generate tasks' length")
  parser.add_argument("--limit", type=int, default=None,
                      help="at most this many items per task (perplexity: batches of a data dir; "
                      "a glob's files are read whole)")
  return parser.parse_args(argv)


def check_counts(args: argparse.Namespace):
  for flag in ("batch_size", "slots", "max_tokens", "limit"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      every = ", or leave --limit out to evaluate every item" if flag == "limit" else ""
      raise UserError(f"--{flag}={value}; pass 1 or more{every}")


def checked_tasks(args: argparse.Namespace) -> tuple[list, list[report.Gate]]:
  """--tasks' evaluators and --fail_below's gates, checked against each other and against the
  tasks' inputs before any model loads."""
  check_counts(args)
  gates = [report.parse_gate(spec) for specs in args.fail_below for spec in specs.split(",")]
  evaluators = [parse_task(spec, args) for specs in args.tasks for spec in specs.split(",")
                if spec]
  if not evaluators:
    raise UserError("--tasks names no task; pass [NAME=]KIND:PATH entries, e.g. "
                    "--tasks=choice:arc.jsonl")
  report.check_distinct_names(evaluators)
  report.check_gates(gates, {evaluator.task_name: evaluator.metrics for evaluator in evaluators})
  for evaluator in evaluators:
    evaluator.check_inputs()
  return evaluators, gates


def run(args: argparse.Namespace, evaluators: list,
        progress_of: Callable[[str], progress.Progress] | None = None) -> dict:
  """results.json's content: the checkpoint's numbers on `evaluators`, each task's progress
  told to `progress_of(its name)`."""
  from serving.engine import Engine  # noqa: PLC0415
  from serving.scoring import scoring_graphdef  # noqa: PLC0415
  try:
    step, _ = checkpoint.read_meta(args.checkpoint_dir, args.step)
    engine = Engine.from_checkpoint(args.checkpoint_dir, step=step, slots=args.slots,
                                    quantize=args.quantize, kv_cache_dtype=args.kv_cache_dtype,
                                    dtype=args.dtype)
  except (OSError, ValueError) as error:
    raise UserError(f"--checkpoint_dir {args.checkpoint_dir}: {error}") from None
  generate, close = engine_generate(engine)
  # XLA's attention, as the server's scorer has it (`scoring_graphdef`): a checkpoint trained
  # with the flash kernel or cuDNN evaluates on any backend, to the server's numbers.
  model = scoring.EvalModel(scoring_graphdef(engine), engine.params, engine.tokenizer,
                            engine.context_length, args.batch_size, generate,
                            None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype)
  try:
    results, items = report.run_all(evaluators, model, progress_of)
  finally:
    close()
  return {"checkpoint_dir": str(args.checkpoint_dir), "step": step, "quantize": args.quantize,
          "kv_cache_dtype": args.kv_cache_dtype, "dtype": args.dtype,
          "results": results, "items": items}


def evaluate(args: argparse.Namespace) -> tuple[dict, list[str]]:
  """(results.json's content, the gates that failed)."""
  evaluators, gates = checked_tasks(args)
  output = run(args, evaluators)
  return output, report.failed_gates(output["results"], gates)


def output_dir_of(args: argparse.Namespace) -> Path:
  return Path(args.output_dir or Path(args.checkpoint_dir) / "evals")


def check_output_dir(output_dir: Path):
  """`output_dir` is a directory, or can be made one, that this process can write."""
  existing = output_dir
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    where = "" if existing == output_dir else f" ({existing} is a file)"
    raise UserError(f"--output_dir {output_dir} is not a directory{where}; pass a directory, "
                    "or a path where one can be made")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"--output_dir {output_dir} cannot be written ({existing} is read-only); "
                    "pass a directory you can write")


def write_outputs(output: dict, output_dir: Path):
  try:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(output, indent=1) + "\n")
  except OSError as error:
    raise UserError(f"--output_dir {output_dir}: {error.strerror}; pass a directory you can "
                    "write") from None
  writer = metrics.TensorBoardWriter(output_dir / "tensorboard")
  writer.write_scalars(output["step"], report.writer_scalars(output["results"]))
  writer.close()


def main(argv=None) -> int:
  args = parse_args(argv)
  compilation_cache.enable(args.compilation_cache_dir)
  output_dir = output_dir_of(args)
  try:
    check_output_dir(output_dir)
    evaluators, gates = checked_tasks(args)
    output = run(args, evaluators, ConsoleProgress)
    write_outputs(output, output_dir)
    print(report.table(output["results"]))
    print(f"results: {output_dir / 'results.json'}")
    failed = report.failed_gates(output["results"], gates)
  except UserError as error:
    print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
    return 2
  for line in failed:
    print(f"fail_below: {line}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
