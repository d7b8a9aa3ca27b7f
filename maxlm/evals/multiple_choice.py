"""Multiple-choice log-likelihood, scored as lm-evaluation-harness scores it.

Items are JSONL lines `{"context": str, "choices": [str], "gold": int}`. Each choice is the
continuation `" " + choice` of the context (lm-eval's default target delimiter); trailing
spaces of the context move to the continuation, the pair is tokenized whole and the context's
own tokens split off, no bos is added, and an empty context is the bos token alone (lm-eval's
`_encode_pair` and `loglikelihood` with a remote tokenizer). `acc` picks the choice of highest
log-likelihood; `acc_norm` divides each by its choice's length in characters.
"""

import dataclasses
from pathlib import Path
from typing import ClassVar

import gin
import numpy as np

from maxlm.errors import UserError
from maxlm.evals import files, scoring, text_ids
from maxlm.evals import progress as progress_lib

TARGET_DELIMITER = " "


@dataclasses.dataclass(frozen=True)
class Item:
  context: str
  choices: list[str]
  gold: int


EXAMPLE = '{"context": "The sky is", "choices": ["blue", "green"], "gold": 0}'


def read_items(path: str | Path, limit: int | None = None) -> list[Item]:
  return files.jsonl_items(path, "multiple-choice item", ("context", "choices", "gold"),
                           EXAMPLE, item_of, limit)


def item_of(record: dict, where: str) -> Item:
  """The item of one JSONL object, its fields' types and the gold index checked."""
  context, choices, gold = record["context"], record["choices"], record["gold"]
  if not isinstance(context, str):
    raise files.field_error(where, "context", context, "a string")
  if not files.is_string_list(choices):
    raise files.field_error(where, "choices", choices, "a non-empty list of strings")
  if not files.is_index(gold):
    raise files.field_error(where, "gold", gold, "an integer, the 0-based index of the right "
                            "choice")
  if not 0 <= gold < len(choices):
    raise UserError(f"{where}: gold={gold} but the item has {len(choices)} choices; gold is "
                    "a 0-based index into choices")
  return Item(context, choices, gold)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as lm-eval splits them."""
  if not context:
    continuation_ids = text_ids.encode(tokenizer, continuation)
    if continuation_ids and continuation_ids[0] == tokenizer.bos_id():
      return continuation_ids[:1], continuation_ids[1:]
    return [tokenizer.bos_id()], continuation_ids
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = text_ids.encode(tokenizer, context + continuation)
  context_ids = text_ids.encode(tokenizer, context)
  return context_ids, whole[len(context_ids):]


def loglikelihoods(model: scoring.EvalModel, pairs: list[tuple[str, str]],
                   progress: progress_lib.Progress | None = None) -> list[tuple[float, bool]]:
  """(log p(continuation | context), whether every continuation token is the argmax)."""
  encoded = [encode_pair(model.tokenizer, context, continuation)
             for context, continuation in pairs]
  scored = scoring.score(model, [context + continuation for context, continuation in encoded],
                         scored=progress_lib.counting(progress, len(pairs), "choices"))
  results = []
  for (context, _), (logprobs, greedy) in zip(encoded, scored):
    results.append((float(np.sum(logprobs[len(context) - 1:])),
                    bool(np.all(greedy[len(context) - 1:]))))
  return results


@gin.configurable(module="maxlm")
@dataclasses.dataclass(frozen=True)
class MultipleChoice:
  """A multiple-choice task from a JSONL file; `name` defaults to the file's stem."""
  path: str
  name: str | None = None
  limit: int | None = None
  metrics: ClassVar[tuple[str, ...]] = ("acc", "acc_norm", "items")

  @property
  def task_name(self) -> str:
    return self.name or files.default_task_name(self.path, "choice")

  def items(self) -> list[Item]:
    return read_items(self.path, self.limit)

  def check_inputs(self):
    """Raises what `run` would raise on a missing or malformed file, before a model loads."""
    self.items()

  def run(self, model: scoring.EvalModel, progress: progress_lib.Progress | None = None
          ) -> tuple[dict[str, float], list[dict]]:
    """({acc, acc_norm, items}, per item: the choices' log-likelihoods and the picks)."""
    items = self.items()
    pairs = [(item.context, TARGET_DELIMITER + choice) for item in items
             for choice in item.choices]
    results = iter(loglikelihoods(model, pairs, progress))
    per_item, correct, correct_norm = [], 0, 0
    for item in items:
      lls = np.array([next(results)[0] for _ in item.choices])
      lengths = np.array([float(len(choice)) for choice in item.choices])
      pick, pick_norm = int(np.argmax(lls)), int(np.argmax(lls / lengths))
      correct += pick == item.gold
      correct_norm += pick_norm == item.gold
      per_item.append({"loglikelihoods": lls.tolist(), "pick": pick, "pick_norm": pick_norm,
                       "gold": item.gold})
    return ({"acc": correct / len(items), "acc_norm": correct_norm / len(items),
             "items": len(items)}, per_item)
