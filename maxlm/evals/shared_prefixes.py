"""Sequences that begin alike, grouped so that a forward pass computes each shared beginning
once: lm-eval sends a multiple-choice item as one prompt per choice, each repeating the
context. The server's scorer (`serving.scoring`) and the in-process evaluators
(`maxlm.evals.scoring`) lay each group as its shared prefix, then every member's own rest."""


import itertools
import operator

import numpy as np

from maxlm import sampling


def group_tokens(prompts: list[list[int]], shared: int, members: list[int]) -> int:
  """The tokens one group is laid in: its shared prefix once, then every member's rest."""
  return shared + sum(len(prompts[i]) - shared for i in members)


def laid_tokens(prompts: list[list[int]], groups: list[tuple[int, list[int]]] | None = None
                ) -> int:
  """The tokens `prompts` take laid in their groups (`group_tokens` of each)."""
  groups = shared_prefix_groups(prompts) if groups is None else groups
  return sum(group_tokens(prompts, shared, members) for shared, members in groups)


def empty_rows(rows: int, width: int) -> dict[str, np.ndarray]:
  """int32 [rows, width] arrays for `lay_group`, all padding: tokens PAD_ID, positions,
  segment and branch ids 0, each position its own predecessor."""
  arrays = {name: np.zeros((rows, width), np.int32)
            for name in ("tokens", "positions", "segment_ids", "branch_ids")}
  arrays["tokens"][:] = sampling.PAD_ID
  arrays["predecessor"] = np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width)).copy()
  return arrays


def lay_group(row: dict[str, np.ndarray], start: int, prompts: list[list[int]], shared: int,
              members: list[int], segment: int) -> list[np.ndarray]:
  """One group into `row` (one row of `empty_rows`' arrays) from index `start`, all of it
  segment `segment`: the shared prefix once (branch 0), then each member's rest as its own
  branch (1, 2, ...; a lone member stays branch 0), which sees the prefix and itself only,
  at positions after the prefix. Each token's predecessor is the index of the token before
  it in its prompt. Returns each member's indices in the row, in order."""
  def lay(tokens, first_position, branch, before):
    nonlocal start
    span = np.arange(start, start + len(tokens))
    row["tokens"][span] = tokens
    row["positions"][span] = np.arange(first_position, first_position + len(tokens))
    row["segment_ids"][span], row["branch_ids"][span] = segment, branch
    row["predecessor"][span[1:]] = span[:-1]
    if before is not None and len(span):
      row["predecessor"][span[0]] = before
    start += len(tokens)
    return span

  prefix = lay(prompts[members[0]][:shared], 0, 0, None)
  before = prefix[-1] if shared else None
  return [np.concatenate([prefix, lay(prompts[index][shared:], shared, branch, before)])
          for branch, index in enumerate(members, start=1 if len(members) > 1 else 0)]


MAX_MEMBERS = 64  # a group's prompts at most: what a server pack holds (`max_seqs`)


def shared_prefix_groups(prompts: list[list[int]]) -> list[tuple[int, list[int]]]:
  """(shared prefix length, prompt indices) per group: `prompts` split into groups whose
  members share their first tokens, so a forward pass computes them once. The groups are
  runs of the prompts in sorted order, the split that saves most tokens (a dynamic program);
  every member keeps at least its last token of its own. A group has at most MAX_MEMBERS
  members, which keeps the program linear in the prompts: a whole eval's prompts often share
  a first word over thousands of items."""
  order = sorted(range(len(prompts)), key=lambda index: prompts[index])
  common = [common_prefix(prompts[a], prompts[b]) for a, b in zip(order, order[1:])]
  saved, split = [0] * (len(order) + 1), [0] * (len(order) + 1)
  for end in range(1, len(order) + 1):  # the best split of order[:end]
    saved[end], split[end] = saved[end - 1], end - 1
    shared = len(prompts[order[end - 1]]) - 1
    for start in range(end - 2, max(end - MAX_MEMBERS, 0) - 1, -1):  # group order[start:end]
      shared = min(shared, common[start], len(prompts[order[start]]) - 1)
      if shared <= 0:
        break
      if saved[start] + (end - start - 1) * shared > saved[end]:
        saved[end], split[end] = saved[start] + (end - start - 1) * shared, start
  groups, end = [], len(order)
  while end:
    start = split[end]
    members = order[start:end]
    shared = min(len(prompts[i]) - 1 for i in members) if len(members) > 1 else 0
    for a, b in zip(members, members[1:]):
      shared = min(shared, common_prefix(prompts[a], prompts[b]))
    groups.append((shared, members))
    end = start
  return groups[::-1]


def common_prefix(a: list[int], b: list[int]) -> int:
  """How many first tokens `a` and `b` share (the scan runs in C: 1.5x a generator's speed on
  an MMLU item's prompts, 300 tokens alike)."""
  return next(itertools.compress(itertools.count(), map(operator.ne, a, b)), min(len(a), len(b)))
