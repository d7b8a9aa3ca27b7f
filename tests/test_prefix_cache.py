"""serving.prefix_cache: chained block hashes and the reference-counted caching allocator."""

import pytest

from serving.kv_pages import PoolExhausted
from serving.prefix_cache import CachingAllocator, block_hashes, shareable_blocks


def test_equal_prefixes_hash_alike_block_by_block_and_a_partial_block_not_at_all():
  first = block_hashes(list(range(10)), 4)
  second = block_hashes(list(range(8)) + [99, 98, 97], 4)
  assert len(first) == len(second) == 2  # tokens 8.. fill no block
  assert first == second
  assert len(set(first)) == 2


def test_a_block_hash_names_its_whole_prefix_not_its_tokens_alone():
  changed_head = block_hashes([7, 1, 2, 3] + [4, 5, 6, 7], 4)
  original = block_hashes([0, 1, 2, 3] + [4, 5, 6, 7], 4)
  assert changed_head[1] != original[1]  # same tokens in block 1, different prefix


def test_the_block_of_the_last_prompt_token_is_never_shared():
  assert [shareable_blocks(n, 4) for n in (1, 4, 5, 8, 9)] == [0, 0, 1, 1, 2]


def test_a_published_prefix_is_shared_and_counted_once_per_holder():
  allocator = CachingAllocator(6)
  hashes = block_hashes(list(range(12)), 4)
  blocks = allocator.allocate(3)
  allocator.publish(blocks, hashes)
  assert allocator.share(hashes[:2] + [b"unknown"]) == blocks[:2]
  assert allocator.share(hashes) == blocks
  assert allocator.referenced == 3
  allocator.release(blocks)
  allocator.release(blocks[:2])
  assert allocator.referenced == 3 and allocator.free == 3  # the last holder of all three
  allocator.release(blocks)
  assert (allocator.referenced, allocator.free, allocator.cached) == (0, 6, 3)


def test_a_lookup_stops_at_the_first_block_it_does_not_find():
  allocator = CachingAllocator(6)
  hashes = block_hashes(list(range(12)), 4)
  blocks = allocator.allocate(3)
  allocator.publish([blocks[0], blocks[2]], [hashes[0], hashes[2]])
  assert allocator.share(hashes) == [blocks[0]]


def test_unreferenced_cached_blocks_are_evicted_least_recently_released_first_and_only_when_needed():
  allocator = CachingAllocator(4)
  old, new = block_hashes(list(range(8)), 4), block_hashes(list(range(100, 108)), 4)
  old_blocks = allocator.allocate(2)
  allocator.publish(old_blocks, old)
  allocator.release(old_blocks)   # released first (tail, then head)
  new_blocks = allocator.allocate(2)  # the never-used blocks go first
  allocator.publish(new_blocks, new)
  allocator.release(new_blocks)
  assert allocator.share(old) == old_blocks and allocator.share(new) == new_blocks
  allocator.release(old_blocks)
  allocator.release(new_blocks)
  [taken] = allocator.allocate(1)
  assert taken == old_blocks[1]  # old's tail: released before its head and before new
  assert allocator.share(old) == [old_blocks[0]]
  assert allocator.share(new) == new_blocks


def test_a_held_block_is_never_evicted_and_a_dry_pool_says_so():
  allocator = CachingAllocator(2)
  hashes = block_hashes(list(range(8)), 4)
  blocks = allocator.allocate(2)
  allocator.publish(blocks, hashes)
  with pytest.raises(PoolExhausted):
    allocator.allocate(1)
  allocator.release(blocks[1:])
  assert allocator.allocate(1) == blocks[1:]
  assert allocator.share(hashes) == blocks[:1]


def test_a_second_block_with_a_published_hash_stays_private_and_returns_to_the_free_list():
  allocator = CachingAllocator(3)
  [hash_] = block_hashes([1, 2, 3, 4], 4)
  first, second = allocator.allocate(2)
  allocator.publish([first], [hash_])
  allocator.publish([second], [hash_])
  allocator.release([first, second])
  assert allocator.cached == 1
  assert allocator.share([hash_]) == [first]


def test_forgetting_unpublishes_the_unheld_blocks_and_keeps_the_held_ones():
  """vLLM's reset_prefix_cache: a released prefix is found no more and its blocks are free
  again; a prefix a running sequence holds stays published."""
  allocator = CachingAllocator(4)
  released, held = block_hashes(list(range(8)), 4), block_hashes(list(range(100, 108)), 4)
  released_blocks, held_blocks = allocator.allocate(2), allocator.allocate(2)
  allocator.publish(released_blocks, released)
  allocator.publish(held_blocks, held)
  allocator.release(released_blocks)
  assert allocator.forget_unheld() == 2
  assert allocator.cached_run(released) == 0 and allocator.cached_run(held) == 2
  assert (allocator.referenced, allocator.free, allocator.cached) == (2, 2, 2)
  assert sorted(allocator.allocate(2)) == sorted(released_blocks)
