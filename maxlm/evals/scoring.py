"""Each token's log-probability given the tokens before it, over many sequences at once: the
model's forward pass without a cache, batched and padded to a few bucket lengths (one
compilation each). What every log-likelihood evaluator reads.

Sequences that begin alike (a multiple-choice item's choices after one context) share a row:
the shared beginning once, then each sequence's own rest as a branch that sees the beginning
and itself only (`maxlm.evals.shared_prefixes`), so a context is computed once per item, not
once per choice. cuDNN attention takes no branches and a quantized KV cache no segments:
those score each sequence in a row of its own."""

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
from maxlm.evals import shared_prefixes
from maxlm.model import init_kv_cache

SCORE_BLOCK = 64  # positions whose logits are made and reduced at a time (`score_block`)
SMALLEST_SCORE_BLOCK = 16


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

  @functools.cached_property
  def attention(self) -> str:
    """The model's attention implementation (`ModelConfig.attention`), looked up once."""
    return nnx.merge(self.graphdef, self.params).config.attention


@functools.partial(jax.jit, static_argnames=("graphdef", "kv_cache_dtype"))
def token_scores(graphdef, params, tokens: jax.Array, ends: jax.Array, alternatives: jax.Array,
                 kv_cache_dtype: str | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """tokens: [rows, seq] -> (log p(tokens[t + 1] | tokens[:t + 1]), whether tokens[t + 1] is
  the argmax), each [rows, seq - 1], then the same two, [rows, k], for `alternatives` [rows, k]
  read after position `ends` [rows] of each row: the other last tokens of sequences that
  differ from the row only there (a multiple-choice item's one-token choices). Padding after
  a row's end changes none of its entries.

  The forward is the one the server's scorer runs for lm-eval's `echo` requests
  (`serving.scoring`: no cache, causal attention), so their log-probabilities agree to float32
  rounding of one computation laid out differently. With `kv_cache_dtype` attention reads a KV
  cache of that dtype instead, as generation does: the quantization gates measure its rounding.
  """
  model = nnx.merge(graphdef, params)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  cache = (init_kv_cache(model.config, tokens.shape[0], tokens.shape[1], kv_cache_dtype)
           if kv_cache_dtype else None)
  hidden, _ = model.decode(model.embed(tokens), positions, cache=cache)
  target, greedy = blockwise_next_token_scores(model.logits, hidden[:, :-1], tokens[:, 1:])
  at_end = jnp.take_along_axis(hidden, ends[:, None, None], axis=1)  # [rows, 1, embed]
  end_logits = model.logits(at_end)[:, 0]
  largest, log_z = sampling.log_normalizer(end_logits)
  return (target, greedy,
          jnp.take_along_axis(end_logits, alternatives, axis=-1) - log_z[:, None],
          sampling.first_largest(end_logits, largest)[:, None] == alternatives)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def branch_token_scores(graphdef, params, tokens: jax.Array, positions: jax.Array,
                        segment_ids: jax.Array, branch_ids: jax.Array, predecessor: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """Rows laid by `lay_rows` ([rows, width] each) -> (log p(tokens[t] | the sequence up to
  its token at predecessor[t]), whether tokens[t] is the argmax there), [rows, width]. A
  sequence's first token (its own predecessor) and the padding get entries nobody reads."""
  model = nnx.merge(graphdef, params)
  hidden, _ = model.decode(model.embed(tokens), positions, segment_ids, branch_ids=branch_ids)
  before = jnp.take_along_axis(hidden, predecessor[..., None], axis=1)
  return blockwise_next_token_scores(model.logits, before, tokens)


@dataclasses.dataclass(frozen=True)
class Rows:
  """Groups of sequences laid one group a row (`shared_prefixes.lay_group`, segment 1): its
  shared prefix (branch 0), then each member's rest as its own branch at positions after the
  prefix; padding is segment 0."""
  tokens: np.ndarray       # int32 [rows, width]
  positions: np.ndarray
  segment_ids: np.ndarray
  branch_ids: np.ndarray
  predecessor: np.ndarray  # where each token's previous one is (itself at a sequence's first)
  spans: dict[int, tuple[int, np.ndarray]]  # sequence index -> (row, its positions in order)


def row_groups(sequences: list[list[int]], width: int) -> list[tuple[int, list[int]]]:
  """`shared_prefix_groups` of `sequences`, each split so that a row holds it in `width`."""
  rows = []
  for shared, members in shared_prefixes.shared_prefix_groups(sequences):
    current, laid = [], shared
    for index in members:
      rest = len(sequences[index]) - shared
      if current and laid + rest > width:
        rows.append((shared, current))
        current, laid = [], shared
      current.append(index)
      laid += rest
    rows.append((shared, current))
  return rows


def lay_rows(sequences: list[list[int]], groups: list[tuple[int, list[int]]],
             rows: int, width: int) -> Rows:
  """`groups` (at most `rows`, each laid in at most `width`) into `Rows`; rows past them
  are all padding."""
  arrays = shared_prefixes.empty_rows(rows, width)
  spans = {}
  for row, (shared, members) in enumerate(groups):
    laid = shared_prefixes.lay_group({name: array[row] for name, array in arrays.items()}, 0,
                                     sequences, shared, members, segment=1)
    spans.update((index, (row, span)) for index, span in zip(members, laid))
  return Rows(**arrays, spans=spans)


def score_in_branches(model: EvalModel, sequences: list[list[int]],
                      scored: Callable[[int], None] | None = None
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
  """`score` with each group of sequences that begin alike in one row (`lay_rows`)."""
  groups = row_groups(sequences, model.context_length)
  laid = [shared_prefixes.group_tokens(sequences, *group) for group in groups]
  order = sorted(range(len(groups)), key=laid.__getitem__)  # like lengths batch together
  groups, laid = [groups[i] for i in order], [laid[i] for i in order]
  results: list = [None] * len(sequences)
  for start in range(0, len(groups), model.batch_size):
    width = max(sampling.prefill_bucket(max(laid[start:start + model.batch_size]),
                                        model.context_length), 2)
    rows = lay_rows(sequences, groups[start:start + model.batch_size], model.batch_size, width)
    target, greedy = jax.device_get(branch_token_scores(
        model.graphdef, model.params, rows.tokens, rows.positions, rows.segment_ids,
        rows.branch_ids, rows.predecessor))
    for index, (row, span) in rows.spans.items():
      results[index] = (target[row, span[1:]].astype(np.float64), greedy[row, span[1:]].copy())
    if scored is not None:
      scored(len(rows.spans))
  return results


def score_block(count: int) -> int:
  """How many of `count` positions' logits are made and reduced at a time: SCORE_BLOCK, or
  the largest of its halves down to SMALLEST_SCORE_BLOCK that divides `count`, so few rows of
  logits are made for padding (a 16-position forward, lm-eval's batch of one through the
  server, made 64 with SCORE_BLOCK alone, which cost it a third of its forward)."""
  block = SCORE_BLOCK
  while count % block and block > SMALLEST_SCORE_BLOCK:
    block //= 2
  return block


def blockwise_next_token_scores(logits_of: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                                targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """hidden [rows, seq, embed], targets [rows, seq] -> `next_token_scores`, with the logits
  made and reduced `score_block` positions at a time (`logits_of`: hidden [1, n, embed] ->
  logits [1, n, vocab]), so no [rows, seq, vocab] array is written out and read back: on CPU
  1.3x faster than logits, log-softmax and argmax over all positions at once."""
  rows, seq, embed = hidden.shape
  count = rows * seq
  block = score_block(count)
  padding = -count % block
  blocks = jnp.pad(hidden.reshape(count, embed), ((0, padding), (0, 0)))
  block_targets = jnp.pad(targets.reshape(count), (0, padding))

  def block_scores(block):
    block_hidden, block_target = block
    return next_token_scores(logits_of(block_hidden[None])[0], block_target)

  target, greedy = jax.lax.map(block_scores, (blocks.reshape(-1, block, embed),
                                              block_targets.reshape(-1, block)))
  return target.reshape(-1)[:count].reshape(rows, seq), greedy.reshape(-1)[:count].reshape(
      rows, seq)


def next_token_scores(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits [n, vocab], targets [n] -> (each target's log-probability, as `sampling.choose`
  computes it: the logit minus the log-normalizer; whether it is the argmax, the first index
  of the largest logit, `sampling.first_largest`)."""
  largest, log_z = sampling.log_normalizer(logits)
  target = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return target - log_z, sampling.first_largest(logits, largest) == targets


def score(model: EvalModel, sequences: list[list[int]], *,
          scored: Callable[[int], None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per sequence: (float64 [len - 1] next-token log-probabilities, bool [len - 1] argmax).
  Sequences that differ only in their last token (an item's one-token choices, as MMLU's
  letters) run as one row, each last token read from the row's final distribution.
  `scored(n)` hears after each forward pass that n more sequences are done (for progress)."""
  too_long = [len(s) for s in sequences if len(s) > model.context_length]
  if too_long:
    raise UserError(f"an eval item is {max(too_long)} tokens but the model's context is "
                    f"{model.context_length}; shorten the task's contexts")
  if model.kv_cache_dtype is None and model.attention != "cudnn":
    return score_in_branches(model, sequences, scored)
  groups = same_but_last(sequences)
  order = sorted(range(len(groups)), key=lambda g: len(sequences[groups[g][0]]))
  results: list = [None] * len(sequences)
  for start in range(0, len(order), model.batch_size):
    batch = [groups[g] for g in order[start:start + model.batch_size]]
    width = sampling.prefill_bucket(max(len(sequences[members[0]]) for members in batch),
                                    model.context_length)
    width = max(width, 2)
    tokens = np.full((model.batch_size, width), sampling.PAD_ID, np.int32)
    ends = np.zeros(model.batch_size, np.int32)
    alternatives = np.zeros((model.batch_size, group_bucket(max(map(len, batch)))), np.int32)
    for row, members in enumerate(batch):
      sequence = sequences[members[0]]
      tokens[row, :len(sequence)] = sequence
      ends[row] = max(len(sequence) - 2, 0)
      alternatives[row, :len(members)] = [sequences[i][-1] for i in members]
    target, greedy, alternative, alternative_greedy = jax.device_get(token_scores(
        model.graphdef, model.params, tokens, ends, alternatives, model.kv_cache_dtype))
    for row, members in enumerate(batch):
      length = len(sequences[members[0]]) - 1
      for column, i in enumerate(members):
        logprobs, argmax = target[row, :length].astype(np.float64), greedy[row, :length].copy()
        if len(members) > 1:
          logprobs[-1], argmax[-1] = alternative[row, column], alternative_greedy[row, column]
        results[i] = (logprobs, argmax)
    if scored is not None:
      scored(sum(map(len, batch)))
  return results


def same_but_last(sequences: list[list[int]]) -> list[list[int]]:
  """The sequences' indices grouped by all their tokens but the last, first-seen order; a
  sequence of fewer than two tokens is alone."""
  groups: dict[tuple, list[int]] = {}
  for i, sequence in enumerate(sequences):
    key = tuple(sequence[:-1]) if len(sequence) >= 2 else (None, i)
    groups.setdefault(key, []).append(i)
  return list(groups.values())


def group_bucket(size: int) -> int:
  """The alternatives a row reads, padded to a power of two (one compilation each)."""
  return 1 << max(size - 1, 0).bit_length()
