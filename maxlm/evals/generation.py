"""Generation scored by exact match: greedy completions of JSONL prompts
(`{"prompt": str, "target": str}`), each compared with its target after an optional regex
extracts the answer (its first group, else its whole match; no match scores 0).

The completions come from `EvalModel.generate`, which `maxlm.evaluate` backs with serving's
engine (every prompt batched over its decode slots) and the trainer with `maxlm.sampling`.
"""

import dataclasses
import re
from pathlib import Path
from typing import ClassVar

import gin

from maxlm import sampling
from maxlm.errors import UserError
from maxlm.evals import files, scoring
from maxlm.evals import progress as progress_lib


def extract(text: str, pattern: re.Pattern | None) -> str | None:
  """The answer in a completion: the pattern's first group (or whole match), else the text."""
  if pattern is None:
    return text.strip()
  found = pattern.search(text)
  if found is None:
    return None
  return (found.group(1) if pattern.groups else found.group(0)).strip()


def cut_at_stop(text: str, stops: list[str]) -> str:
  ends = [text.index(stop) for stop in stops if stop in text]
  return text[:min(ends)] if ends else text


def sampling_generate(model: scoring.EvalModel, config):
  """`EvalModel.generate` from `maxlm.sampling`, one prompt at a time (inside training)."""
  def generate(prompts: list[list[int]], max_tokens: int, stops: list[str]) -> list[str]:
    texts = []
    for prompt_ids in prompts:
      new = sampling.generate(model.graphdef, model.params, prompt_ids, max_new_tokens=min(
          max_tokens, model.context_length - len(prompt_ids)), eos_id=model.tokenizer.eos_id(),
          config=config, max_len=model.context_length)
      texts.append(cut_at_stop(model.tokenizer.decode(new), stops))
    return texts
  return generate


EXAMPLE = '{"prompt": "2 + 2 =", "target": "4"}'


def read_items(path: str | Path, limit: int | None) -> list[dict]:
  return files.jsonl_items(path, "generation item", ("prompt", "target"), EXAMPLE, item_of,
                           limit)


def item_of(record: dict, where: str) -> dict:
  for name in ("prompt", "target"):
    if not isinstance(record[name], str):
      raise files.field_error(where, name, record[name], "a string")
  return {"prompt": record["prompt"], "target": record["target"]}


@gin.configurable(module="maxlm")
@dataclasses.dataclass(frozen=True)
class Generation:
  """Exact match of greedy completions; `regex` extracts the answer from each completion."""
  path: str
  name: str | None = None
  regex: str | None = None
  max_tokens: int = 32
  stop: tuple[str, ...] = ("\n",)
  limit: int | None = None
  metrics: ClassVar[tuple[str, ...]] = ("exact_match", "items")

  @property
  def task_name(self) -> str:
    return self.name or files.default_task_name(self.path, "generate")

  def items(self) -> list[dict]:
    return read_items(self.path, self.limit)

  def pattern(self) -> re.Pattern | None:
    try:
      return re.compile(self.regex) if self.regex else None
    except re.error as error:
      raise UserError(f"task {self.task_name}: regex {self.regex!r} does not compile "
                      f"({error}); fix the pattern") from None

  def check_inputs(self):
    """Raises what `run` would raise on a malformed file or regex, before a model loads."""
    self.pattern()
    self.items()

  def run(self, model: scoring.EvalModel, progress: progress_lib.Progress | None = None
          ) -> tuple[dict[str, float], list[dict]]:
    if model.generate is None:
      raise UserError(f"task {self.task_name} generates text, and this model has no "
                      "generator; run it with maxlm.evaluate")
    pattern = self.pattern()
    items = self.items()
    prompts = [[model.tokenizer.bos_id()] + model.tokenizer.encode(item["prompt"])
               for item in items]
    completions = []
    for part in progress_lib.chunks(prompts, model.batch_size, progress, "prompts"):
      completions.extend(model.generate(part, self.max_tokens, list(self.stop)))
    per_item, matches = [], 0
    for item, completion in zip(items, completions):
      answer = extract(completion, pattern)
      match = answer is not None and answer == item["target"].strip()
      matches += match
      per_item.append({"completion": completion, "answer": answer, "match": match})
    return {"exact_match": matches / len(items), "items": len(items)}, per_item
