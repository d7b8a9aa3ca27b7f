"""Array checksums match a NumPy reference of the same formula, do not depend on the sharding,
and change when a bit flips or two elements swap."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from maxlm import array_digest


def reference_checksum(x: np.ndarray) -> str:
  """The formula in NumPy over the flattened bytes, with Python's exact integers."""
  if x.dtype == np.bool_:
    words = x.astype(np.uint64).ravel()
  else:
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
    words = np.ascontiguousarray(x).view(unsigned).astype(np.uint64).ravel()

  def fmix32(h):
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) % 2**32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) % 2**32
    return h ^ (h >> 16)

  index = np.arange(words.size, dtype=np.uint64)
  sums = [int(fmix32(words ^ fmix32((index + seed) % 2**32)).sum()) % 2**32
          for seed in array_digest.SEEDS]
  return "".join(f"{s:08x}" for s in sums)


def _digest(x):
  return array_digest.digests({"x": x})["x"]


@pytest.mark.parametrize("x", [
    np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32),
    np.random.default_rng(1).normal(size=(4, 9)).astype(ml_dtypes.bfloat16),
    np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
    np.array([True, False, True]),
    np.float32(2.5),
], ids=["float32", "bfloat16", "int32", "bool", "scalar"])
def test_checksum_matches_the_numpy_reference(x):
  assert _digest(jnp.asarray(x)) == (reference_checksum(np.asarray(x)), 0)


def test_checksum_is_the_same_on_every_sharding():
  x = np.random.default_rng(2).normal(size=(16, 24)).astype(np.float32)
  mesh = jax.make_mesh((2, 4), ("a", "b"), devices=jax.devices()[:8])
  placements = [jax.devices()[0], NamedSharding(mesh, PartitionSpec("a", "b")),
                NamedSharding(mesh, PartitionSpec("b", None)), NamedSharding(mesh, PartitionSpec())]
  digests = {_digest(jax.device_put(x, placement)) for placement in placements}
  assert digests == {(reference_checksum(x), 0)}


def test_one_flipped_bit_or_two_swapped_elements_change_the_checksum():
  x = np.random.default_rng(3).normal(size=(8, 8)).astype(np.float32)
  flipped = x.copy()
  flipped.view(np.uint32)[3, 4] ^= 1 << 7
  swapped = x.copy()
  swapped[[0, 5]] = swapped[[5, 0]]
  assert len({_digest(jnp.asarray(v))[0] for v in (x, flipped, swapped)}) == 3


def test_non_finite_elements_are_counted():
  x = np.array([1.0, np.nan, np.inf, -np.inf, 0.0], np.float32)
  assert _digest(jnp.asarray(x))[1] == 3


def test_leaf_names_join_keys_with_dots():
  tree = {"params": {"blocks": {0: {"w": jnp.zeros(2)}}}, "opt": (jnp.zeros(1),)}
  assert sorted(array_digest.digests(tree)) == ["opt.0", "params.blocks.0.w"]
