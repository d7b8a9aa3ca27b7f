"""Int8 weights for serving, which stay int8 inside the compiled program.

Each matrix the language model multiplies is stored as int8 with a float32 scale per output
channel (symmetric, round to nearest: |error| <= scale / 2), four times smaller at rest. The
model consumes an `Int8Array` where it uses the weight: a projection quantizes its input per
token on the fly and runs an int8 x int8 -> int32 matmul, scaled afterwards (XLA:CPU does not
fuse an int8 -> float convert into a dot, so a weight-only matmul would build a float copy of
the whole weight on every call); the embedding gathers int8 rows and scales them. MoE
experts [experts, in, out] have a scale per expert and output channel, and run as int8
grouped matmuls (`grouped_dense`, `per_group_dense`).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Array:
  values: jax.Array  # int8, the parameter's shape
  scale: jax.Array   # float32, the parameter's shape with its contracted axes reduced to 1

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape


def quantize_int8(weight: jax.Array, reduced_axes: tuple[int, ...] = (0,)) -> Int8Array:
  """Symmetric int8 with one scale per slice across `reduced_axes` (a matmul's contracted
  axes, so the scale factors out of the sum)."""
  weight = jnp.asarray(weight, jnp.float32)
  scale = jnp.max(jnp.abs(weight), axis=reduced_axes, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  values = jnp.clip(jnp.round(weight / scale), -127, 127).astype(jnp.int8)
  return Int8Array(values, scale)


def _key_name(key) -> str:
  return str(getattr(key, "key", getattr(key, "idx", key)))


def reduced_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...] | None:
  """The axes a Transformer parameter at `path` (`blocks/0/attention/q` as a tuple) contracts
  over, which its int8 scale reduces; None for a parameter that stays float (norms, the MoE
  router, the vision tower, LoRA adapters)."""
  if path[0] in ("vision", "projector") or ndim < 2:
    return None
  name, parent = path[-1], path[-2] if len(path) > 1 else ""
  if name == "embedding":  # a lookup by row, and the tied logits contract over embed
    return (1,)
  if name == "unembedding" or (parent == "attention" and name in ("q", "k", "v")):
    return (0,)
  if parent == "attention" and name == "o":  # [heads, head_dim, embed]
    return (0, 1)
  if parent in ("mlp", "shared_mlp") and name in ("gate", "up", "down") and ndim == 2:
    return (0,)
  if parent == "mlp" and name in ("gate", "up", "down") and ndim == 3:  # MoE [experts, in, out]
    return (1,)
  return None


def quantize_params(params, mode: str | None):
  """`mode` None or "none" returns `params` unchanged; "int8" quantizes every matrix the model
  consumes as an `Int8Array` (see `reduced_axes`). params: a pure dict of a Transformer."""
  if mode in (None, "none"):
    return params
  if mode != "int8":
    raise ValueError(f"unknown quantization {mode!r}; use 'int8' or 'none'")

  def quantized(path, leaf):
    axes = reduced_axes(tuple(_key_name(key) for key in path), leaf.ndim)
    return leaf if axes is None else quantize_int8(leaf, axes)
  return jax.tree_util.tree_map_with_path(quantized, params)


def is_quantized(leaf) -> bool:
  return isinstance(leaf, Int8Array)


def dequantize(params):
  """The float32 parameters back (identity on a tree without Int8Array leaves)."""
  return jax.tree.map(
      lambda p: p.values.astype(jnp.float32) * p.scale if is_quantized(p) else p,
      params, is_leaf=is_quantized)


def nbytes(params) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x: [..., features] -> (int8 values, float32 scale [..., 1]), symmetric per row."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def _int8_matmul(x: jax.Array, values: jax.Array, contract_rhs: int) -> jax.Array:
  """x: [tokens, k] float times int8 values [k, n] (contract_rhs=0) or [n, k] (1): float32
  [tokens, n] before the weight's scale."""
  x_int8, x_scale = quantize_rows(x)
  product = jax.lax.dot_general(x_int8, values, (((1,), (contract_rhs,)), ((), ())),
                                preferred_element_type=jnp.int32)
  return product.astype(jnp.float32) * x_scale


def dense(x: jax.Array, kernel: Int8Array, contracting_dims: int = 1) -> jax.Array:
  """`layers.dense` of an int8 kernel [*in, *out] whose scale reduces the `in` axes.
  x: [..., *in]; returns [..., *out] in x's dtype."""
  in_shape, out_shape = kernel.values.shape[:contracting_dims], kernel.values.shape[
      contracting_dims:]
  leading = x.shape[:x.ndim - contracting_dims]
  in_size = math.prod(in_shape)
  product = _int8_matmul(x.reshape(-1, in_size), kernel.values.reshape(in_size, -1), 0)
  out = product * kernel.scale.reshape(1, -1)
  return out.reshape(*leading, *out_shape).astype(x.dtype)


def dense_transposed(x: jax.Array, kernel: Int8Array) -> jax.Array:
  """x [..., k] times the transpose of an int8 kernel [n, k] with one scale per row (tied
  logits through the embedding): [..., n] in x's dtype."""
  leading = x.shape[:-1]
  product = _int8_matmul(x.reshape(-1, x.shape[-1]), kernel.values, 1)
  out = product * kernel.scale.reshape(1, -1)
  return out.reshape(*leading, -1).astype(x.dtype)


def take_rows(kernel: Int8Array, ids: jax.Array, dtype) -> jax.Array:
  """Rows `ids` ([...] int) of an int8 kernel [n, k] with one scale per row: [..., k]."""
  rows = jnp.take(kernel.values, ids, axis=0).astype(jnp.float32)
  return (rows * jnp.take(kernel.scale, ids, axis=0)).astype(dtype)


def grouped_dense(x: jax.Array, kernel: Int8Array, group_sizes: jax.Array,
                  row_groups: jax.Array) -> jax.Array:
  """`jax.lax.ragged_dot` with an int8 kernel: rows x [rows, in], sorted by group (`group_sizes`
  of them each), times kernel [groups, in, out] whose scale [groups, 1, out] reduces `in`;
  row_groups [rows]: each row's group. Returns [rows, out] in x's dtype."""
  x_int8, x_scale = quantize_rows(x)
  product = jax.lax.ragged_dot(x_int8, kernel.values, group_sizes,
                               preferred_element_type=jnp.int32)
  scale = jnp.take(kernel.scale[:, 0, :], row_groups, axis=0)
  return (product.astype(jnp.float32) * x_scale * scale).astype(x.dtype)


def per_group_dense(x: jax.Array, kernel: Int8Array) -> jax.Array:
  """Each group's rows through its own int8 kernel: x [..., groups, rows, in], kernel [groups,
  in, out] (scale [groups, 1, out]) -> [..., groups, rows, out] in x's dtype."""
  x_int8, x_scale = quantize_rows(x)
  product = jnp.einsum("...ecd,edf->...ecf", x_int8, kernel.values,
                       preferred_element_type=jnp.int32)
  return (product.astype(jnp.float32) * x_scale * kernel.scale).astype(x.dtype)
