"""Running evaluators and reporting their numbers: a console table, JSON, writer scalars, and
the `--fail_below=task:metric=value` gates."""

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from maxlm.errors import UserError
from maxlm.evals import scoring
from maxlm.evals.progress import Progress


@dataclasses.dataclass(frozen=True)
class Gate:
  task: str
  metric: str
  minimum: float

  def __str__(self):
    return f"{self.task}:{self.metric}={self.minimum:g}"


def run_all(evaluators: Sequence, model: scoring.EvalModel,
            progress_of: Callable[[str], Progress] | None = None
            ) -> tuple[dict[str, dict[str, float]], dict[str, list[dict]]]:
  """({task: {metric: value}}, {task: per-item records}); task names must be distinct.
  Each task's work reports how far it has come to `progress_of(its name)`."""
  check_distinct_names(evaluators)
  results, items = {}, {}
  for evaluator in evaluators:
    name = evaluator.task_name
    if progress_of is None:
      results[name], items[name] = evaluator.run(model)
    else:
      results[name], items[name] = evaluator.run(model, progress=progress_of(name))
  return results, items


def check_distinct_names(evaluators: Sequence):
  names = [evaluator.task_name for evaluator in evaluators]
  if len(set(names)) != len(names):
    raise UserError(f"two eval tasks share a name among {', '.join(names)}; name them apart "
                    "(NAME=KIND:PATH)")


def writer_scalars(results: dict[str, dict[str, float]], prefix: str = "evals"
                   ) -> dict[str, float]:
  """`{prefix}/{task}/{metric}` scalars, as TensorBoard groups them."""
  return {f"{prefix}/{task}/{metric}": value for task, metrics in results.items()
          for metric, value in metrics.items()}


def table(results: dict[str, dict[str, float]]) -> str:
  rows = [(task, metric, cell(value)) for task, metrics in results.items()
          for metric, value in metrics.items()]
  widths = [max(len(row[i]) for row in rows + [("task", "metric", "value")]) for i in range(3)]
  line = lambda row: "  ".join(cell.ljust(width) for cell, width in zip(row, widths))  # noqa
  return "\n".join([line(("task", "metric", "value")), line(["-" * w for w in widths]),
                    *map(line, rows)])


def cell(value: float) -> str:
  """A count with thousands separators (`192,638`), any other number to 6 digits."""
  if math.isfinite(value) and float(value).is_integer() and abs(value) < 1e15:
    return f"{int(value):,}"
  return f"{value:.6g}"


def parse_gate(spec: str) -> Gate:
  task_metric, _, value = spec.partition("=")
  task, _, metric = task_metric.partition(":")
  try:
    minimum = float(value)
  except ValueError:
    minimum = math.nan
  if not (task and metric and math.isfinite(minimum)):
    raise UserError(f"--fail_below={spec}; write it as task:metric=value, e.g. arc:acc=0.3")
  return Gate(task, metric, minimum)


def check_gates(gates: Sequence[Gate], metrics_of: Mapping[str, Iterable[str]]):
  """Each gate names a task and one of its metrics (`metrics_of`: task -> metric names, the
  evaluators' before they run or their results after)."""
  for gate in gates:
    if gate.metric not in metrics_of.get(gate.task, ()):
      known = ", ".join(f"{task}:{metric}" for task, metrics in metrics_of.items()
                        for metric in metrics)
      raise UserError(f"--fail_below={gate} names no result; there are {known}")


def failed_gates(results: dict[str, dict[str, float]], gates: Sequence[Gate]) -> list[str]:
  """One line per gate the results fall below; a gate naming no result is a user error."""
  check_gates(gates, results)
  failed = []
  for gate in gates:
    value = results[gate.task][gate.metric]
    if not value >= gate.minimum:  # NaN fails too
      failed.append(f"{gate.task}:{gate.metric} = {value:.6g} is below {gate.minimum:g}")
  return failed
