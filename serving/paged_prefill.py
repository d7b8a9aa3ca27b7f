"""Prompts prefilled straight into the paged KV cache, after their cached prefix, in chunks.

`begin` gives a slot the blocks of its prompt, the leading ones shared from the prefix cache
when it has them (`serving.prefix_cache`), and notes the prompt as pending from the first
uncached token. Each turn of the orchestrator's loop, `plan` picks what to prefill next, oldest
prompt first, at most `max_chunk` tokens in all (vLLM's `max_num_batched_tokens` idea), so a
long prompt takes several turns and the running sequences decode a token between each: their
rate holds while it arrives. `run` queues one chunk (`maxlm.paged_sampling.prefill_fn`) and
publishes the prompt's full blocks it has now written; the last chunk's choice is the first
new token.
"""

import collections
import dataclasses
import itertools
import math

import numpy as np

from maxlm import sampling
from serving import kv_pages, prefix_cache

DEFAULT_PREFILL_CHUNK = 512  # prompt tokens between two decode steps (the server's default)


def describe(caching: bool, max_chunk: int | None) -> str:
  chunks = ("whole" if max_chunk is None
            else f"in chunks of at most {max_chunk} tokens between decode steps")
  return f"prefix caching {'on' if caching else 'off'}; prompts prefilled {chunks}"


@dataclasses.dataclass
class PendingPrompt:
  """A prompt on its way into a slot's blocks: positions before `done` are written."""
  token_ids: list[int]
  settings: tuple  # engine.device_settings of the request
  done: int
  hashes: list[bytes]
  order: int
  published: int  # hashes[:published] name blocks of the cache (its own or shared)


class Prefills:
  """The prompts being prefilled, by slot, over `pages` (whose allocator is a
  `prefix_cache.CachingAllocator` when `caching`)."""

  def __init__(self, pages: kv_pages.PageTables, prefill, caching: bool,
               max_chunk: int | None, context_length: int):
    if max_chunk is not None and max_chunk < 1:
      raise ValueError(f"--max_prefill_chunk={max_chunk}; give at least 1 token per chunk")
    self.pages, self.caching, self.max_chunk = pages, caching, max_chunk
    self.context_length = context_length
    self._prefill = prefill
    self.pending: dict[int, PendingPrompt] = {}
    self.computed_tokens = 0  # prompt tokens run through the model (cached ones are not)
    self._order = itertools.count()
    self._coming = collections.Counter()  # hashes the pending prompts will publish

  def begin(self, slot: int, token_ids: list[int], settings: tuple) -> int:
    """Gives `slot` the blocks of `token_ids` (raises PoolExhausted if they are not free);
    the number of its tokens whose KV the prefix cache already holds."""
    block_size = self.pages.block_size
    hashes, shared = [], []
    if self.caching:
      hashes = prefix_cache.block_hashes(token_ids, block_size)
      shared = self.pages.allocator.share(
          hashes[:prefix_cache.shareable_blocks(len(token_ids), block_size)])
    self.pages.assign(slot, len(token_ids), shared)
    cached = len(shared) * block_size
    self.pending[slot] = PendingPrompt(list(token_ids), settings, cached, hashes,
                                       next(self._order), len(shared))
    self._coming.update(hashes[len(shared):])
    return cached

  def awaits_prefix(self, token_ids: list[int]) -> bool:
    """Whether a prompt being prefilled will publish the next block of `token_ids` that the
    cache lacks: admitted after that chunk, it computes less."""
    if not self.caching:
      return False
    hashes = prefix_cache.block_hashes(token_ids, self.pages.block_size)[
        :prefix_cache.shareable_blocks(len(token_ids), self.pages.block_size)]
    found = self.pages.allocator.cached_run(hashes)
    return found < len(hashes) and self._coming[hashes[found]] > 0

  def plan(self) -> list[tuple[int, int]]:
    """(slot, tokens) to prefill this turn, oldest prompt first."""
    budget = math.inf if self.max_chunk is None else self.max_chunk
    chunks = []
    for slot, prompt in sorted(self.pending.items(), key=lambda item: item[1].order):
      if budget <= 0:
        break
      tokens = int(min(len(prompt.token_ids) - prompt.done, budget))
      chunks.append((slot, tokens))
      budget -= tokens
    return chunks

  def run(self, params, state, slot: int, tokens: int):
    """Queues the next `tokens` of `slot`'s prompt: (state, its first new token's choice
    once the prompt is done, else None)."""
    prompt = self.pending[slot]
    start, block_size = prompt.done, self.pages.block_size
    bucket = sampling.prefill_bucket(tokens, self.context_length)
    chunk = np.full((1, bucket), sampling.PAD_ID, np.int32)
    chunk[0, :tokens] = prompt.token_ids[start:start + tokens]
    state, choice = self._prefill(params, state, chunk, np.int32(start), np.int32(tokens),
                                  self.pages.table([slot], 1, self.table_width(bucket)),
                                  np.int32(slot), *prompt.settings)
    prompt.done += tokens
    self.computed_tokens += tokens
    if self.caching:
      full = min(prompt.done // block_size, len(prompt.hashes))
      self.pages.allocator.publish(self.pages.blocks[slot][:full], prompt.hashes[:full])
      self._coming.subtract(prompt.hashes[prompt.published:full])
      prompt.published = max(prompt.published, full)
    if prompt.done < len(prompt.token_ids):
      return state, None
    del self.pending[slot]
    return state, choice

  def discard(self, slot: int):
    prompt = self.pending.pop(slot, None)
    if prompt is not None:
      self._coming.subtract(prompt.hashes[prompt.published:])

  def table_width(self, bucket: int) -> int:
    """A chunk of `bucket` tokens' block table width: room for its padding past the context's
    last position (a write past the table would land in its last block). The attention reads
    only the blocks up to the chunk's furthest position (`paged_kv.chunked_attend`), so one
    width, and one compiled program, serves a chunk at every start."""
    return math.ceil((self.context_length - 1 + bucket) / self.pages.block_size)

  def buckets(self) -> list[tuple[int, int]]:
    """Every (chunk bucket, table width) `run` can compile for this context."""
    largest = self.context_length if self.max_chunk is None else min(self.max_chunk,
                                                                     self.context_length)
    return [(bucket, self.table_width(bucket))
            for bucket in sampling.prefill_buckets(self.context_length)
            if bucket <= sampling.prefill_bucket(largest, self.context_length)]
