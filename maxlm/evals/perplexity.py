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

import gin
import jax
import numpy as np
from flax import nnx

from maxlm import tasks
from maxlm.errors import UserError
from maxlm.evals import heldout, scoring


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
                  max_batches: int | None) -> dict[str, float]:
  byte_lengths = piece_byte_lengths(model.tokenizer)

  def step(batch):
    arrays = {name: np.asarray(batch[name]) for name in ("tokens", "segment_ids", "positions")}
    nll, tokens = _nll(model.graphdef, model.params, arrays)
    return {"nll": nll, "tokens": tokens, "bytes": target_bytes(arrays, byte_lengths)}

  sums = heldout.split_sums(data_dir, step, model.batch_size, max_batches, split)
  return scalars(sums.get("nll", 0.0), sums.get("tokens", 0.0), sums.get("bytes", 0.0))


def windows(token_ids: list[int], context: int) -> list[list[int]]:
  """Sequences of at most `context` tokens that together predict every token after the first
  once: each starts with the last token of the one before."""
  step = context - 1
  return [token_ids[start:start + context] for start in range(0, len(token_ids) - 1, step)]


def text_scalars(model: scoring.EvalModel, paths: list[str]) -> dict[str, float]:
  nll, tokens, num_bytes = 0.0, 0, 0
  for path in paths:
    text = Path(path).read_text(encoding="utf-8")
    ids = [model.tokenizer.bos_id()] + model.tokenizer.encode(text)
    for logprobs, _ in scoring.score(model, windows(ids, model.context_length)):
      nll -= float(np.sum(logprobs))
      tokens += len(logprobs)
    num_bytes += len(text.encode("utf-8"))
  return scalars(nll, tokens, num_bytes)


@gin.configurable(module="maxlm")
@dataclasses.dataclass(frozen=True)
class Perplexity:
  """`path`: a data dir (its `split`, up to `max_batches` batches) or a glob of text files."""
  path: str
  name: str | None = None
  split: str = "validation"
  max_batches: int | None = None

  @property
  def task_name(self) -> str:
    return self.name or Path(self.path.rstrip("/")).stem or "perplexity"

  def run(self, model: scoring.EvalModel) -> tuple[dict[str, float], list[dict]]:
    if (Path(self.path) / "manifest.json").is_file():
      return split_scalars(model, self.path, self.split, self.max_batches), []
    paths = sorted(glob.glob(self.path))
    if not paths:
      raise UserError(f"perplexity path {self.path} is neither a data dir (no manifest.json) "
                      "nor a glob that matches text files; pass one of those")
    return text_scalars(model, paths), []
