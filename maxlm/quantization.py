"""Int8 weight-only quantization for serving.

Every parameter with two or more dimensions is stored as int8 with a float32 scale per slice
along its first axis' complement (symmetric, round to nearest: |error| <= scale / 2), four
times smaller at rest. The jitted serving functions call `dequantize` on their parameters, so
the matmuls themselves still run in the model's compute dtype.
"""

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Array:
  values: jax.Array  # int8, the parameter's shape
  scale: jax.Array   # float32, the parameter's shape with axis 0 reduced to 1


def quantize_int8(weight: jax.Array) -> Int8Array:
  """Symmetric int8 with one scale per slice along axis 0 (per output channel and head)."""
  weight = jnp.asarray(weight, jnp.float32)
  scale = jnp.max(jnp.abs(weight), axis=0, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  values = jnp.clip(jnp.round(weight / scale), -127, 127).astype(jnp.int8)
  return Int8Array(values, scale)


def quantize_params(params, mode: str | None):
  """`mode` None or "none" returns `params` unchanged; "int8" quantizes every matrix."""
  if mode in (None, "none"):
    return params
  if mode != "int8":
    raise ValueError(f"unknown quantization {mode!r}; use 'int8' or 'none'")
  return jax.tree.map(lambda p: quantize_int8(p) if p.ndim >= 2 else p, params)


def _is_quantized(leaf) -> bool:
  return isinstance(leaf, Int8Array)


def dequantize(params):
  """The float32 parameters back (identity on a tree without Int8Array leaves)."""
  return jax.tree.map(
      lambda p: p.values.astype(jnp.float32) * p.scale if _is_quantized(p) else p,
      params, is_leaf=_is_quantized)


def nbytes(params) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(params))
