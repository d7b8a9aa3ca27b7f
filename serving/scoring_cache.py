"""Scoring's prefix cache: a prompt scored once lends its keys, values and scores to the later
prompts that begin as it does.

lm-eval sends a multiple-choice item as one prompt per choice, each the context followed by
that choice, and sends them longest first: wherever an item's choices differ in length
(HellaSwag's endings, ARC's and PIQA's answers) they land in different requests, and without
a cache every one of them computes the context again. With it, the first choice seen computes
the context, and the others compute only what follows the longest beginning they share with a
prompt scored before (`ContextCache.longest_match`).

A prompt of n tokens that shares its first m with a cached one reuses r = min(m, n) - 1
positions: their keys and values, each token's log-probability up to token r (token r is
the same in both), and the likeliest tokens after each of positions 0..r-1. Its tokens r..n-1
go into the scorer's packed row as before, at positions r..n-1, and attend to the reused keys
(`pack_with_context`, then `scoring.score_context_pack_fn`: the row's "context", each kept
prompt's keys and values once, seen by the row's tokens of its context id only;
`maxlm.model.kv_cache`'s packed-context kind).
That gives the scores after positions r..n-1: token r + 1's log-probability and on, and the
first new token's. Causal attention makes these the same numbers, to float rounding,
as a forward over the whole prompt. Prompts that reuse nothing share their beginnings within
the row as before (`scoring.pack`).
"""

import collections
import dataclasses

import numpy as np

from maxlm.evals.shared_prefixes import (common_prefix, empty_rows, group_tokens, lay_group,
                                         shared_prefix_groups)

BLOCK = 4  # the index names a prompt's beginnings every BLOCK tokens
QUERY_BLOCK = 32  # a packed row's queries attend in blocks of this many (`attention_windows`)
# A block's windows of keys are one of these wide, or the whole row or context: few programs
# to compile (lm-eval's HellaSwag-shaped requests need 64-256), and as fast as every power of
# two from 16 on within the spread of runs.
WINDOWS = (64, 256)
DEFAULT_MEGABYTES = 256  # host memory for kept prompts (runs/tiny: 2 KiB a token)


@dataclasses.dataclass
class ScoredPrompt:
  """A prompt's forward, kept: position t's key and value, token t's log-probability after
  the tokens before it (t = 0: none, 0.0), and the likeliest tokens after position t."""
  tokens: np.ndarray        # int32 [n]
  keys_values: np.ndarray | None  # [layers, 2 (keys, values), n, kv_heads, head_dim]; None:
                                  # scored, not kept
  logprobs: np.ndarray      # float32 [n]
  top_tokens: np.ndarray    # int32 [n, top]
  top_logprobs: np.ndarray  # float32 [n, top]
  index_keys: tuple = ()

  @property
  def nbytes(self) -> int:
    arrays = [self.tokens, self.keys_values, self.logprobs, self.top_tokens, self.top_logprobs]
    return sum(array.nbytes for array in arrays)

  @property
  def top(self) -> int:
    return self.top_tokens.shape[1]


def beginnings(tokens) -> list[int]:
  """A chained hash of each of `tokens`' first BLOCK, 2 * BLOCK, ... tokens."""
  hashes, parent = [], 0
  for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
    parent = hash((parent, *tokens[start:start + BLOCK]))
    hashes.append(parent)
  return hashes


def reused_positions(matched: int, length: int) -> int:
  """How many of a prompt's `length` positions a cached prompt sharing its first `matched`
  tokens lends it: all but the last shared one, whose scores for the token after it differ,
  and never the prompt's last, after which the first new token is chosen."""
  return max(0, min(matched, length) - 1)


class ContextCache:
  """Scored prompts, least recently used evicted first past `max_bytes`; found by their
  beginnings. Used by one thread (the scorer's)."""

  def __init__(self, max_bytes: int):
    self.max_bytes = max_bytes
    self.nbytes = 0
    self._entries: collections.OrderedDict[bytes, ScoredPrompt] = collections.OrderedDict()
    self._index: dict[int, ScoredPrompt] = {}

  def __len__(self) -> int:
    return len(self._entries)

  def longest_match(self, prompt: list[int], top: int, hashes: list[int] | None = None
                    ) -> tuple[ScoredPrompt | None, int]:
    """The cached prompt (with at least `top` alternatives a position) that shares the most
    first tokens with `prompt`, found to a multiple of BLOCK and followed from there, and how
    many it shares; (None, 0) when none shares a block. `hashes`: `beginnings(prompt)`."""
    hashes = beginnings(prompt) if hashes is None else hashes
    for block in range(len(hashes) - 1, -1, -1):
      entry, shared = self._index.get(hashes[block]), (block + 1) * BLOCK
      if (entry is None or entry.top < top
          or entry.tokens[:shared].tolist() != prompt[:shared]):
        continue  # a hash collision, or too few alternatives kept
      self._entries.move_to_end(entry.tokens.tobytes())
      return entry, shared + common_prefix(entry.tokens[shared:].tolist(), prompt[shared:])
    return None, 0

  def insert(self, entry: ScoredPrompt, hashes: list[int] | None = None):
    """Keeps `entry` (replacing one of the same tokens), then evicts the least recently used
    past `max_bytes`. An entry larger than the whole budget is not kept. `hashes`:
    `beginnings` of its tokens."""
    if entry.nbytes > self.max_bytes:
      return
    name = entry.tokens.tobytes()
    if name in self._entries:
      self._remove(name)
    entry.index_keys = tuple(beginnings(entry.tokens.tolist()) if hashes is None else hashes)
    for key in entry.index_keys:
      self._index[key] = entry  # the newest prompt with a beginning answers for it
    self._entries[name] = entry
    self.nbytes += entry.nbytes
    while self.nbytes > self.max_bytes:
      self._remove(next(iter(self._entries)))

  def _remove(self, name: bytes):
    entry = self._entries.pop(name)
    self.nbytes -= entry.nbytes
    for key in entry.index_keys:
      if self._index.get(key) is entry:
        del self._index[key]


@dataclasses.dataclass(frozen=True)
class ContextPack:
  """`scoring.Pack`'s row for prompts that may reuse kept ones, and its context: the reused
  keys and values, each kept prompt's once, seen by the row's tokens of the same context id."""
  tokens: np.ndarray        # int32 [1, width]
  positions: np.ndarray     # int32 [1, width]
  segment_ids: np.ndarray   # int32 [1, width]
  branch_ids: np.ndarray    # int32 [1, width]
  context_ids: np.ndarray   # int32 [1, width]: the context each token sees; 0 none
  predecessor: np.ndarray   # int32 [1, width]
  spans: list[np.ndarray]   # per prompt, where its computed tokens are (from `reused` on)
  last: np.ndarray          # int32 [seqs]
  context: np.ndarray       # [layers, 2 (keys, values), context_width, kv, d]
  context_owner: np.ndarray  # int32 [1, context_width]: whose context id; -1 the padding
  reused: list[int]
  entries: list[ScoredPrompt | None]
  kept: list[bool]          # per prompt: whether to keep it; of a group's members whose own
                            # rest is at most BLOCK tokens only the longest (one-token choices
                            # after one passage: the passage once; a kept prompt lends any
                            # beginning of itself)
  lookback: int             # `attention_windows`
  context_window: int
  context_start: np.ndarray  # int32 [width / QUERY_BLOCK]


def pack_with_context(prompts: list[list[int]], reused: list[int],
                      entries: list[ScoredPrompt | None], budget: int, width_of,
                      context_width_of, max_seqs, layers: int, kv_heads: int, head_dim: int,
                      dtype, windows: tuple[int, int] | None = None) -> ContextPack:
  """`prompts` in one row of `width_of(tokens)`, tokens <= `budget`. Prompts reusing the same
  kept prompt take its keys and values once into the context (of `context_width_of(tokens)`)
  and start from the fewest positions any of them reuses; then the prompts of each context
  (and those reusing nothing) are grouped by the beginnings they share
  (`shared_prefix_groups`: an item's choices after a kept passage, the passage once). Where
  that takes more than `budget` tokens, nothing is reused. `max_seqs(width)`: the rows of
  `last`, as `scoring.pack` has them. `windows`: (lookback, context_window) to use instead of
  the narrowest that hold the row's (`attention_windows`), as a wider compiled program has them."""
  reused = list(reused)
  by_entry: dict[int, list[int]] = {}
  for i, start in enumerate(reused):
    by_entry.setdefault(id(entries[i]) if start else 0, []).append(i)
  for members in by_entry.values():  # those reusing nothing are all 0 already
    start = min(reused[i] for i in members)
    for i in members:
      reused[i] = start
  suffixes = [prompt[start:] for prompt, start in zip(prompts, reused)]
  groups = []  # (context id, shared, members)
  for context_id, members in enumerate(sorted(by_entry.values(), key=lambda m: reused[m[0]]),
                                       start=1):
    groups += [(context_id if reused[members[0]] else 0, shared, [members[m] for m in group])
               for shared, group in shared_prefix_groups([suffixes[i] for i in members])]
  tokens = sum(group_tokens(suffixes, shared, members) for _, shared, members in groups)
  if tokens > budget and any(reused):
    return pack_with_context(prompts, [0] * len(prompts), [None] * len(prompts), budget,
                             width_of, context_width_of, max_seqs, layers, kv_heads, head_dim,
                             dtype, windows)
  width = width_of(tokens)
  rows = empty_rows(1, width)
  row = {name: array[0] for name, array in rows.items()}
  row["context_ids"] = np.zeros_like(row["segment_ids"])
  owners = {context_id: members[0] for context_id, _, members in groups if context_id}
  context_width = context_width_of(max(1, sum(reused[i] for i in owners.values())))
  context = np.zeros((layers, 2, context_width, kv_heads, head_dim), dtype)
  context_owner = np.full((1, context_width), -1, np.int32)
  at = 0
  for context_id, owner in owners.items():
    context[:, :, at:at + reused[owner]] = entries[owner].keys_values[:, :, :reused[owner]]
    context_owner[0, at:at + reused[owner]] = context_id
    at += reused[owner]
  spans, start = [None] * len(prompts), 0
  kept = {index for _, shared, members in groups for index in members
          if len(suffixes[index]) - shared > BLOCK}
  kept |= {max(members, key=lambda i: len(prompts[i])) for _, _, members in groups}
  for segment, (context_id, shared, members) in enumerate(groups, start=1):
    for index, span in zip(members, lay_group(row, start, suffixes, shared, members, segment)):
      spans[index] = span
    laid = slice(start, start + group_tokens(suffixes, shared, members))
    row["positions"][laid] += reused[members[0]]
    row["context_ids"][laid] = context_id
    start = laid.stop
  last = np.zeros(max_seqs(width), np.int32)
  last[:len(prompts)] = [span[-1] for span in spans]
  return ContextPack(rows["tokens"], rows["positions"], rows["segment_ids"],
                     rows["branch_ids"], row["context_ids"][None], rows["predecessor"], spans,
                     last, context, context_owner, reused, list(entries),
                     [index in kept for index in range(len(prompts))],
                     *attention_windows(row["segment_ids"], row["context_ids"], context_owner[0],
                                        windows))


def attention_windows(segment_ids: np.ndarray, context_ids: np.ndarray,
                      context_owner: np.ndarray, windows: tuple[int, int] | None = None
                      ) -> tuple[int, int, np.ndarray]:
  """For a packed row (segment and context ids [width]) over its context (owners
  [context_width]), which keys each block of QUERY_BLOCK queries needs (`kv_cache`'s
  `PackedWindows`): (lookback, the most keys before a block's first query that its segment
  reaches back; context_window, the most context keys between the first and the last kept
  key of any block's contexts; context_start per block, where its context keys begin), both
  widths rounded up by `window_width`, one compiled program each. Padding needs nothing.
  `windows`: (lookback, context_window) at least as wide as those, to take instead; narrower
  ones are a ValueError (a block would miss keys it sees)."""
  width, context_width = len(segment_ids), len(context_owner)
  index = np.arange(width)
  segment_start = np.maximum.accumulate(
      np.where(np.r_[True, segment_ids[1:] != segment_ids[:-1]], index, 0))
  block_starts = index[::QUERY_BLOCK]
  reach = (block_starts - segment_start[block_starts])[segment_ids[block_starts] != 0]
  lookback = window_width(reach_keys := int(reach.max(initial=0)), width)
  # Per context id, its first and last key; the last entry stands for no context (id 0).
  first_key = np.full(max(context_ids.max(), context_owner.max()) + 2, context_width)
  last_key = np.full_like(first_key, -1)
  owned = np.flatnonzero(context_owner >= 0)
  np.minimum.at(first_key, context_owner[owned], owned)
  np.maximum.at(last_key, context_owner[owned], owned)
  blocks = -(-width // QUERY_BLOCK)
  in_blocks = np.full(blocks * QUERY_BLOCK, -1, np.int64)
  in_blocks[:width] = np.where(context_ids == 0, -1, context_ids)
  begin = first_key[in_blocks].reshape(blocks, QUERY_BLOCK).min(axis=1)
  end = last_key[in_blocks].reshape(blocks, QUERY_BLOCK).max(axis=1) + 1
  seen = end > begin
  span_keys = int((end - begin)[seen].max(initial=0))
  context_window = window_width(span_keys, context_width)
  if windows is not None:
    if windows[0] < reach_keys or not span_keys <= windows[1] <= context_width:
      raise ValueError(f"windows {windows} do not hold this row's lookback of {reach_keys} and "
                       f"context span of {span_keys} within its context of {context_width}")
    lookback, context_window = windows
  context_start = np.where(seen, np.minimum(begin, context_width - context_window), 0)
  return lookback, context_window, context_start.astype(np.int32)


def window_width(keys: int, limit: int) -> int:
  """A window of at least `keys`: the first of WINDOWS that holds them, else `limit` (all)."""
  return min(limit, next((width for width in WINDOWS if width >= keys), limit))


def context_width(tokens: int) -> int:
  """A context's width: the power of two at or above `tokens`, 16 at least. Each width is a
  program per row width; padding a context costs only attention to masked keys."""
  return max(16, 1 << (tokens - 1).bit_length())


def scored_prompt(prompt: list[int], index: int, laid: ContextPack, scores, keys_values
                  ) -> ScoredPrompt:
  """Prompt `index` with all its positions' scores, and keys and values where the pack keeps
  it (else None): the reused ones from its cache entry, the rest from this forward (`scores`,
  `keys_values` on the host)."""
  start, entry, span = laid.reused[index], laid.entries[index], laid.spans[index]
  length, top = len(prompt), scores.top_tokens.shape[1]
  logprobs = np.zeros(length, np.float32)
  top_tokens = np.zeros((length, top), np.int32)
  top_logprobs = np.zeros((length, top), np.float32)
  kept = (np.empty((*keys_values.shape[:2], length, *keys_values.shape[3:]), keys_values.dtype)
          if laid.kept[index] else None)
  if start:
    logprobs[:start + 1] = entry.logprobs[:start + 1]
    top_tokens[:start] = entry.top_tokens[:start, :top]
    top_logprobs[:start] = entry.top_logprobs[:start, :top]
    if kept is not None:
      kept[:, :, :start] = entry.keys_values[:, :, :start]
  logprobs[start + 1:] = scores.logprobs[span[1:]]
  top_tokens[start:] = scores.top_tokens[span]
  top_logprobs[start:] = scores.top_logprobs[span]
  if kept is not None:
    kept[:, :, start:] = keys_values[:, :, span]
  return ScoredPrompt(np.asarray(prompt, np.int32), kept, logprobs, top_tokens, top_logprobs)
