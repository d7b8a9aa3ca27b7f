"""Each token's log-probability given the tokens before it, over many sequences at once: the
model's forward pass without a cache, batched and padded to a few bucket lengths (one
compilation each). What every log-likelihood evaluator reads."""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from flax import nnx

from maxlm import sampling
from maxlm.errors import UserError
from maxlm.model import init_kv_cache


@dataclasses.dataclass(frozen=True)
class EvalModel:
  """A model as the evaluators see it: parameters (float or int8, on any mesh), tokenizer,
  context, how many sequences one forward pass takes, and how it completes prompts:
  `generate(prompt ids per prompt, max_tokens, stop strings) -> completion texts` (greedy)."""
  graphdef: object
  params: dict
  tokenizer: spm.SentencePieceProcessor
  context_length: int
  batch_size: int = 8
  generate: Callable[[list[list[int]], int, list[str]], list[str]] | None = None
  kv_cache_dtype: str | None = None  # "int8": attention reads int8 keys and values


@functools.partial(jax.jit, static_argnames=("graphdef", "kv_cache_dtype"))
def token_scores(graphdef, params, tokens: jax.Array,
                 kv_cache_dtype: str | None = None) -> tuple[jax.Array, jax.Array]:
  """tokens: [rows, seq] -> (log p(tokens[t + 1] | tokens[:t + 1]), whether tokens[t + 1] is
  the argmax), each [rows, seq - 1]. Padding after a row's end changes none of its entries.

  Attention runs over a KV cache, as the server's prefill runs it, so these agree with the
  server's `echo` log-probabilities (lm-eval's) to float32 rounding of the same computation.
  """
  model = nnx.merge(graphdef, params)
  cache = init_kv_cache(model.config, tokens.shape[0], tokens.shape[1], kv_cache_dtype)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  logits, _ = model(tokens, positions, cache=cache)
  logprobs = sampling.log_softmax_of_next(logits[:, :-1])
  target = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
  return target, jnp.argmax(logprobs, axis=-1) == tokens[:, 1:]


def score(model: EvalModel, sequences: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per sequence: (float64 [len - 1] next-token log-probabilities, bool [len - 1] argmax)."""
  too_long = [len(s) for s in sequences if len(s) > model.context_length]
  if too_long:
    raise UserError(f"an eval item is {max(too_long)} tokens but the model's context is "
                    f"{model.context_length}; shorten the task's contexts")
  order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
  results: list = [None] * len(sequences)
  for start in range(0, len(order), model.batch_size):
    rows = order[start:start + model.batch_size]
    width = sampling.prefill_bucket(max(len(sequences[i]) for i in rows), model.context_length)
    width = max(width, 2)
    tokens = np.full((model.batch_size, width), sampling.PAD_ID, np.int32)
    for row, i in enumerate(rows):
      tokens[row, :len(sequences[i])] = sequences[i]
    target, greedy = jax.device_get(token_scores(model.graphdef, model.params, tokens,
                                                 model.kv_cache_dtype))
    for row, i in enumerate(rows):
      length = len(sequences[i]) - 1
      results[i] = (target[row, :length].astype(np.float64), greedy[row, :length])
  return results
