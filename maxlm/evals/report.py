"""Running evaluators and reporting their numbers: a console table, JSON, writer scalars, and
the `--fail_below=task:metric=value` gates."""

import dataclasses
import math
from collections.abc import Sequence

from maxlm.errors import UserError
from maxlm.evals import scoring


@dataclasses.dataclass(frozen=True)
class Gate:
  task: str
  metric: str
  minimum: float

  def __str__(self):
    return f"{self.task}:{self.metric}={self.minimum:g}"


def run_all(evaluators: Sequence, model: scoring.EvalModel
            ) -> tuple[dict[str, dict[str, float]], dict[str, list[dict]]]:
  """({task: {metric: value}}, {task: per-item records}); task names must be distinct."""
  names = [evaluator.task_name for evaluator in evaluators]
  if len(set(names)) != len(names):
    raise UserError(f"two eval tasks share a name among {', '.join(names)}; name them apart "
                    "(NAME=KIND:PATH)")
  results, items = {}, {}
  for evaluator in evaluators:
    results[evaluator.task_name], items[evaluator.task_name] = evaluator.run(model)
  return results, items


def writer_scalars(results: dict[str, dict[str, float]], prefix: str = "evals"
                   ) -> dict[str, float]:
  """`{prefix}/{task}/{metric}` scalars, as TensorBoard groups them."""
  return {f"{prefix}/{task}/{metric}": value for task, metrics in results.items()
          for metric, value in metrics.items()}


def table(results: dict[str, dict[str, float]]) -> str:
  rows = [(task, metric, f"{value:.6g}") for task, metrics in results.items()
          for metric, value in metrics.items()]
  widths = [max(len(row[i]) for row in rows + [("task", "metric", "value")]) for i in range(3)]
  line = lambda row: "  ".join(cell.ljust(width) for cell, width in zip(row, widths))  # noqa
  return "\n".join([line(("task", "metric", "value")), line(["-" * w for w in widths]),
                    *map(line, rows)])


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


def failed_gates(results: dict[str, dict[str, float]], gates: Sequence[Gate]) -> list[str]:
  """One line per gate the results fall below; a gate naming no result is a user error."""
  failed = []
  for gate in gates:
    if gate.metric not in results.get(gate.task, {}):
      known = ", ".join(f"{task}:{metric}" for task, metrics in results.items()
                        for metric in metrics)
      raise UserError(f"--fail_below={gate} names no result; there are {known}")
    value = results[gate.task][gate.metric]
    if not value >= gate.minimum:  # NaN fails too
      failed.append(f"{gate.task}:{gate.metric} = {value:.6g} is below {gate.minimum:g}")
  return failed
