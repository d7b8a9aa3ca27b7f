"""Pure functions for the transformer's math, with shapes in the docstrings."""

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked rows give a uniform softmax instead of NaN


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x: [..., embed]; scale: [embed]. Normalizes in float32, returns x's dtype."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, rotating the two halves of head_dim.

  x: [batch, seq, heads, head_dim]; positions: [batch, seq] integers.
  """
  head_dim = x.shape[-1]
  fraction = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta ** fraction)                                   # [head_dim/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq            # [b, s, head_dim/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


def attention_mask(q_index: jax.Array, kv_index: jax.Array,
                   q_segment_ids: jax.Array | None = None,
                   kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """Causal (and same-document) mask.

  q_index: [batch, q_len] index of each query in the key sequence; kv_index: [kv_len].
  segment ids: [batch, q_len] / [batch, kv_len], or None for one document per row.
  Returns bool [batch, 1, q_len, kv_len] (broadcasts over heads).
  """
  mask = kv_index[None, None, :] <= q_index[:, :, None]
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return mask[:, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention in plain XLA.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] with
  heads a multiple of kv_heads; mask: bool [batch, 1, q_len, kv_len].
  Returns [batch, q_len, heads, head_dim].
  """
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  grouped_q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", grouped_q, k).astype(jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(head_dim))
  scores = jnp.where(mask[:, :, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
  return out.reshape(batch, q_len, heads, head_dim)


def swiglu(x: jax.Array, gate_kernel: jax.Array, up_kernel: jax.Array,
           down_kernel: jax.Array) -> jax.Array:
  """x: [..., embed]; gate/up: [embed, mlp]; down: [mlp, embed]."""
  hidden = jax.nn.silu(x @ gate_kernel) * (x @ up_kernel)
  return hidden @ down_kernel
