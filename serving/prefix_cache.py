"""Prefix caching: sequences that start with the same tokens share those tokens' KV blocks.

A full block is named by a content hash chained through the blocks before it,
`sha256(parent's hash + its token ids)`, so one name stands for the whole prefix up to the
block's end and equal names mean equal KV. A block whose prefill has been queued is published
under its name; a later sequence takes the longest run of published blocks its own names find
and prefills only the tokens after them. Blocks are reference-counted: one no sequence holds
stays cached, and is evicted (least recently released first) only when the pool needs room.
Only full blocks are shared, and never the block of a sequence's last prompt token, which
the prefill must run to choose the first new token.
"""

import collections
import hashlib

import numpy as np

from serving.kv_pages import PoolExhausted


def block_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
  """The chained hash of each full block of `token_ids`, first block first."""
  hashes, parent = [], b""
  for end in range(block_size, len(token_ids) + 1, block_size):
    block = np.asarray(token_ids[end - block_size:end], np.int64).tobytes()
    parent = hashlib.sha256(parent + block).digest()
    hashes.append(parent)
  return hashes


def shareable_blocks(prompt_tokens: int, block_size: int) -> int:
  """How many leading full blocks a prompt may take from the cache: all but the tokens from
  its last one on, which its prefill computes."""
  return (prompt_tokens - 1) // block_size


class CachingAllocator:
  """`kv_pages.BlockAllocator`'s interface over blocks 1..blocks, with a cache of published
  blocks. `free` counts the never-used and the evictable (cached, unreferenced) blocks."""

  def __init__(self, blocks: int):
    self.blocks = blocks
    self._unused = list(range(blocks, 0, -1))  # pop() hands out low block ids first
    self._refs: dict[int, int] = {}
    self._block_of: dict[bytes, int] = {}
    self._hash_of: dict[int, bytes] = {}
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()

  @property
  def free(self) -> int:
    return len(self._unused) + len(self._evictable)

  @property
  def referenced(self) -> int:
    """Blocks some sequence holds now."""
    return len(self._refs)

  @property
  def cached(self) -> int:
    """Blocks published under a hash, held or not."""
    return len(self._block_of)

  def allocate(self, count: int) -> list[int]:
    if count > self.free:
      raise PoolExhausted(f"{count} blocks asked for, {self.free} free")
    return [self._take() for _ in range(count)]

  def _take(self) -> int:
    if self._unused:
      block = self._unused.pop()
    else:  # the least recently released cached block
      block, _ = self._evictable.popitem(last=False)
      del self._block_of[self._hash_of.pop(block)]
    self._refs[block] = 1
    return block

  def release(self, blocks: list[int]):
    """Drops one reference to each block; the last one frees it, a cached block into the
    eviction order (a sequence's tail before its head, so shared heads outlive tails)."""
    for block in reversed(blocks):
      self._refs[block] -= 1
      if self._refs[block] == 0:
        del self._refs[block]
        if block in self._hash_of:
          self._evictable[block] = None
        else:
          self._unused.append(block)

  def cached_run(self, hashes: list[bytes]) -> int:
    """How many of `hashes`, from the first, name published blocks."""
    count = 0
    while count < len(hashes) and hashes[count] in self._block_of:
      count += 1
    return count

  def share(self, hashes: list[bytes]) -> list[int]:
    """The published blocks of the longest run of `hashes` from the first, each referenced
    once more."""
    blocks = []
    for block_hash in hashes:
      block = self._block_of.get(block_hash)
      if block is None:
        break
      self._evictable.pop(block, None)
      self._refs[block] = self._refs.get(block, 0) + 1
      blocks.append(block)
    return blocks

  def forget_unheld(self) -> int:
    """Unpublishes every cached block no sequence holds (they return to the unused), so no
    later prompt finds them: vLLM's reset_prefix_cache. Held blocks stay published. Returns
    how many were forgotten."""
    forgotten = list(self._evictable)
    for block in forgotten:
      del self._block_of[self._hash_of.pop(block)]
      self._unused.append(block)
    self._evictable.clear()
    return len(forgotten)

  def publish(self, blocks: list[int], hashes: list[bytes]):
    """Names each block by its hash, once its KV is written (or queued to be); a hash that
    already names another block keeps that one."""
    for block, block_hash in zip(blocks, hashes):
      if block_hash not in self._block_of and block not in self._hash_of:
        self._block_of[block_hash], self._hash_of[block] = block, block_hash
