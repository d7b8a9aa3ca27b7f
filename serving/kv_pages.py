"""Host-side bookkeeping of the paged KV cache: which blocks each decode slot holds.

The pool's blocks are handed out as a sequence grows (one more block each `block_size`
tokens) and all come back when it ends or is preempted. Block 0 (`paged_kv.TRASH_BLOCK`)
is never handed out: it is where table entries past a sequence's blocks point.
"""

import dataclasses
import math

import numpy as np

from maxlm.model import paged_kv

MAX_SLOTS = 256  # decode slots when memory decides (vLLM's max_num_seqs default)


class PoolExhausted(Exception):
  """The pool has no free block for the next token; preempt a sequence and retry."""


@dataclasses.dataclass(frozen=True)
class Capacity:
  """What the pool holds: `blocks` usable blocks of `block_size` tokens each."""
  blocks: int
  block_size: int
  block_bytes: int

  @property
  def tokens(self) -> int:
    return self.blocks * self.block_size

  def describe(self, context_length: int, slots: int) -> str:
    gib = (self.blocks + 1) * self.block_bytes / 2**30
    return (f"KV cache {gib:.3f} GiB: {self.blocks} blocks of {self.block_size} tokens = "
            f"{self.tokens} tokens in flight; up to {slots} sequences at once, "
            f"{self.tokens // context_length} of them at the full {context_length}-token context")


def capacity(block_bytes: int, block_size: int, kv_cache_memory_gib: float | None, slots: int,
             context_length: int) -> Capacity:
  """The pool `kv_cache_memory_gib` pays for, or else room for `slots` full contexts."""
  if kv_cache_memory_gib is None:
    blocks = slots * math.ceil(context_length / block_size)
  else:
    blocks = int(kv_cache_memory_gib * 2**30 // block_bytes) - 1  # less the trash block
    if blocks < 1:
      raise ValueError(f"--kv_cache_memory={kv_cache_memory_gib} GiB holds no block of "
                       f"{block_bytes} bytes; raise it to at least "
                       f"{2 * block_bytes / 2**30:.6f}")
  return Capacity(blocks, block_size, block_bytes)


def check_fits(pool: Capacity, free_bytes: int | None) -> None:
  """Refuses a pool larger than the memory the device has free (None: unknown, allowed)."""
  pool_bytes = (pool.blocks + 1) * pool.block_bytes
  if free_bytes is not None and pool_bytes > free_bytes:
    raise ValueError(f"the KV cache would take {pool_bytes / 2**30:.1f} GiB but the device has "
                     f"{free_bytes / 2**30:.1f} GiB free; lower --kv_cache_memory or --slots")


class BlockAllocator:
  """Free list of the pool's blocks 1..blocks (block 0 is the trash block)."""

  def __init__(self, blocks: int):
    self.blocks = blocks
    self._free = list(range(blocks, 0, -1))  # pop() hands out low block ids first

  @property
  def free(self) -> int:
    return len(self._free)

  def allocate(self, count: int) -> list[int]:
    if count > len(self._free):
      raise PoolExhausted(f"{count} blocks asked for, {len(self._free)} free")
    return [self._free.pop() for _ in range(count)]

  def release(self, blocks: list[int]):
    self._free.extend(reversed(blocks))


class PageTables:
  """Each slot's blocks and how many of its positions are written."""

  def __init__(self, allocator: BlockAllocator, slots: int, block_size: int, max_blocks: int):
    self.allocator, self.block_size, self.max_blocks = allocator, block_size, max_blocks
    self.blocks: list[list[int] | None] = [None] * slots
    self.lengths = [0] * slots

  def blocks_for(self, tokens: int) -> int:
    return min(self.max_blocks, math.ceil(tokens / self.block_size))

  def fits(self, tokens: int) -> bool:
    """Whether a new sequence of `tokens` tokens (and its next one) fits the free blocks, less
    one held back for each running sequence: admitting into the last free blocks would only
    have the newcomer preempted (its prefill wasted) at the next block boundary."""
    return self.blocks_for(tokens + 1) + len(self.active()) <= self.allocator.free

  def assign(self, slot: int, length: int, shared: list[int] = ()) -> list[int]:
    """Gives `slot` (freeing what it held) the blocks of its first `length` positions, the
    `shared` ones first (blocks of the prefix cache it already holds a reference to)."""
    self.release(slot)
    try:
      own = self.allocator.allocate(self.blocks_for(length) - len(shared))
    except PoolExhausted:
      self.allocator.release(list(shared))
      raise
    self.blocks[slot] = list(shared) + own
    self.lengths[slot] = length
    return self.blocks[slot]

  def release(self, slot: int):
    if self.blocks[slot] is not None:
      self.allocator.release(self.blocks[slot])
    self.blocks[slot], self.lengths[slot] = None, 0

  def active(self) -> list[int]:
    return [slot for slot, blocks in enumerate(self.blocks) if blocks is not None]

  def grow(self, slots: list[int]):
    """Makes room for one more token in each slot; raises PoolExhausted when the pool is dry
    (what was grown so far stays: those slots need it anyway)."""
    for slot in slots:
      missing = self.blocks_for(self.lengths[slot] + 1) - len(self.blocks[slot])
      if missing > 0:
        self.blocks[slot] += self.allocator.allocate(missing)

  def advance(self, slots: list[int]):
    for slot in slots:
      self.lengths[slot] += 1

  def table(self, slots: list[int], rows: int, width: int) -> np.ndarray:
    """int32 [rows, width]: the slots' blocks, trash past them and in the rows past `slots`."""
    table = np.full((rows, width), paged_kv.TRASH_BLOCK, np.int32)
    for row, slot in enumerate(slots):
      blocks = self.blocks[slot][:width]
      table[row, :len(blocks)] = blocks
    return table


def bucket(count: int, limit: int) -> int:
  """The power of two at or above `count`, at most `limit` (a compiled batch or table size)."""
  return min(limit, 1 << max(0, count - 1).bit_length())


def buckets(limit: int) -> list[int]:
  sizes = [1]
  while sizes[-1] < limit:
    sizes.append(bucket(sizes[-1] + 1, limit))
  return sizes
