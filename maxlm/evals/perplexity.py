"""Perplexity and bits per byte of held-out text.

Bits per byte (summed negative log-likelihood in bits over the text's UTF-8 bytes) does not
depend on the tokenizer, so models with different tokenizers compare. The text is a data
dir's split (the bytes are those of the predicted tokens' pieces; SentencePiece's leading
space counts as one byte per document) or raw text files (the files' own bytes; each file is
one document after a bos, cut into windows of the context where each window's first token is
the previous window's last, as lm-eval's rolling log-likelihood does).
"""

import dataclasses
import functools
import glob
import math
from pathlib import Path
from typing import ClassVar

import gin
import jax
import numpy as np
from flax import nnx

from maxlm import data, tasks
from maxlm.errors import UserError
from maxlm.evals import files, heldout, scoring
from maxlm.evals import progress as progress_lib


def piece_byte_lengths(tokenizer) -> np.ndarray:
  """int64 [vocab]: how many bytes of text each token stands for (controls none)."""
  lengths = np.zeros(tokenizer.vocab_size(), np.int64)
  for token_id in range(tokenizer.vocab_size()):
    if tokenizer.is_byte(token_id):
      lengths[token_id] = 1
    elif not (tokenizer.is_control(token_id) or tokenizer.is_unknown(token_id)):
      lengths[token_id] = len(tokenizer.id_to_piece(token_id).replace("\u2581", " ").encode())
  return lengths


def bits_per_byte(nll_nats: float, num_bytes: float) -> float:
  return nll_nats / math.log(2) / max(num_bytes, 1.0)


def scalars(nll_nats: float, tokens: float, num_bytes: float) -> dict[str, float]:
  return {"bits_per_byte": bits_per_byte(nll_nats, num_bytes),
          "perplexity": math.exp(nll_nats / max(tokens, 1.0)), "tokens": tokens,
          "bytes": num_bytes}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _nll(graphdef, params, batch):
  _, metrics = tasks.next_token_loss(nnx.merge(graphdef, params), batch)
  return metrics["nll_sum"], metrics["target_tokens"]


def target_bytes(batch: dict, byte_lengths: np.ndarray) -> float:
  """The bytes of the tokens `tasks.next_token_targets` predicts in a packed batch."""
  tokens, segments = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
  predicted = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
  return float(np.sum(byte_lengths[tokens[:, 1:]] * predicted))


def split_scalars(model: scoring.EvalModel, data_dir: str, split: str,
                  max_batches: int | None, progress: progress_lib.Progress | None = None
                  ) -> dict[str, float]:
  byte_lengths = piece_byte_lengths(model.tokenizer)
  batches = None if progress is None else split_batches(data_dir, split, model.batch_size,
                                                        max_batches)
  scored = progress_lib.counting(progress, batches, "batches")

  def step(batch):
    arrays = {name: np.asarray(batch[name]) for name in ("tokens", "segment_ids", "positions")}
    nll, tokens = _nll(model.graphdef, model.params, arrays)
    if scored is not None:
      scored(1)
    return {"nll": nll, "tokens": tokens, "bytes": target_bytes(arrays, byte_lengths)}

  sums = heldout.split_sums(data_dir, step, model.batch_size, max_batches, split)
  return scalars(sums.get("nll", 0.0), sums.get("tokens", 0.0), sums.get("bytes", 0.0))


def split_batches(data_dir: str, split: str, batch_size: int, max_batches: int | None
                  ) -> int | None:
  """How many batches `heldout.split_sums` reads, where the manifest counts the sequences."""
  sequences = data.load_manifest(data_dir)["splits"].get(split, {}).get("sequences")
  if sequences is None:
    return max_batches
  batches = -(-sequences // batch_size)
  return batches if max_batches is None else min(batches, max_batches)


def windows(token_ids: list[int], context: int) -> list[list[int]]:
  """Sequences of at most `context` tokens that together predict every token after the first
  once: each starts with the last token of the one before."""
  step = context - 1
  return [token_ids[start:start + context] for start in range(0, len(token_ids) - 1, step)]


def text_scalars(model: scoring.EvalModel, paths: list[str],
                 progress: progress_lib.Progress | None = None) -> dict[str, float]:
  texts = [read_text(path) for path in paths]
  sequences = [window for text in texts for window in windows(
      [model.tokenizer.bos_id()] + model.tokenizer.encode(text), model.context_length)]
  nll, tokens = 0.0, 0
  scored = progress_lib.counting(progress, len(sequences), "windows")
  for logprobs, _ in scoring.score(model, sequences, scored=scored):
    nll -= float(np.sum(logprobs))
    tokens += len(logprobs)
  return scalars(nll, tokens, sum(len(text.encode("utf-8")) for text in texts))


def read_text(path: str) -> str:
  return files.read_text(path, "UTF-8 text file")


@gin.configurable(module="maxlm")
@dataclasses.dataclass(frozen=True)
class Perplexity:
  """`path`: a data dir (its `split`, up to `max_batches` batches) or a glob of text files."""
  path: str
  name: str | None = None
  split: str = "validation"
  max_batches: int | None = None
  metrics: ClassVar[tuple[str, ...]] = ("bits_per_byte", "perplexity", "tokens", "bytes")

  @property
  def task_name(self) -> str:
    return self.name or files.default_task_name(self.path, "perplexity")

  def is_data_dir(self) -> bool:
    return (Path(self.path) / "manifest.json").is_file()

  def text_paths(self) -> list[str]:
    """The text files `path` names, a glob's matches that are files."""
    if Path(self.path).is_dir():
      raise UserError(f"perplexity path {self.path} is a directory without manifest.json; "
                      "pass a data dir from beam_pipelines.prepare_text or a glob of text "
                      f"files in it, e.g. {Path(self.path) / '*.txt'}")
    paths = [path for path in sorted(glob.glob(self.path)) if Path(path).is_file()]
    if not paths:
      raise UserError(f"perplexity path {self.path} is neither a data dir (no manifest.json) "
                      "nor a glob that matches text files; pass one of those")
    return paths

  def check_inputs(self):
    """Raises what `run` would raise on a bad path, split or text file, before a model loads."""
    if not self.is_data_dir():
      for path in self.text_paths():
        read_text(path)
      return
    try:
      manifest = data.load_manifest(self.path)
    except (OSError, ValueError) as error:
      raise UserError(f"perplexity path {self.path}: {error}") from None
    if self.split not in manifest["splits"]:
      raise UserError(f"perplexity path {self.path} has no split {self.split!r}; pick one of "
                      f"{', '.join(sorted(manifest['splits']))}")

  def run(self, model: scoring.EvalModel, progress: progress_lib.Progress | None = None
          ) -> tuple[dict[str, float], list[dict]]:
    if self.is_data_dir():
      return split_scalars(model, self.path, self.split, self.max_batches, progress), []
    return text_scalars(model, self.text_paths(), progress), []
