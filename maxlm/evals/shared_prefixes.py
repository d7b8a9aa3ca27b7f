"""Sequences that begin alike, grouped so that a forward pass computes each shared beginning
once: lm-eval sends a multiple-choice item as one prompt per choice, each repeating the
context. The server's scorer (`serving.scoring`) and the in-process evaluators
(`maxlm.evals.scoring`) lay each group as its shared prefix, then every member's own rest."""


def laid_tokens(prompts: list[list[int]], groups: list[tuple[int, list[int]]] | None = None
                ) -> int:
  """The tokens `prompts` take laid in their groups: each group's shared prefix once, then
  every member's rest."""
  groups = shared_prefix_groups(prompts) if groups is None else groups
  return sum(shared + sum(len(prompts[i]) - shared for i in members)
             for shared, members in groups)


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
  return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
