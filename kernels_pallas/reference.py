"""Pure-JAX attention with the same semantics as the Pallas kernels: the XLA fallback path."""

import math

import jax.numpy as jnp


def attention_mask(q_len, kv_len, *, causal, segment_ids, bidirectional_ids=None, branch_ids=None):
  """bool [batch or 1, q_len, kv_len]: which keys each query may see (causal aligned to the end, plus
  the keys of the query's own nonzero bidirectional id; with branch ids, only keys of branch 0 or of
  the query's own branch)."""
  visible = jnp.ones((1, q_len, kv_len), bool)
  if causal:
    q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    visible = visible & (jnp.arange(kv_len)[None, :] <= q_pos)[None]
    if bidirectional_ids is not None:
      ids = bidirectional_ids
      visible = visible | ((ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] != 0))
  if segment_ids is not None:
    visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
  if branch_ids is not None:
    kv_branch = branch_ids[:, None, :]
    visible = visible & ((kv_branch == 0) | (kv_branch == branch_ids[:, :, None]))
  return visible


def reference_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                        bidirectional_ids=None, branch_ids=None):
  """q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] -> like q.

  Query head h uses kv head h // (heads // kv_heads); a query that sees no key returns zeros.
  """
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
  q = q.reshape(batch, q_len, kv_heads, num_heads // kv_heads, head_dim)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * sm_scale
  visible = attention_mask(q_len, kv_len, causal=causal, segment_ids=segment_ids,
                           bidirectional_ids=bidirectional_ids,
                           branch_ids=branch_ids)[:, None, None]
  scores = jnp.where(visible, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  probs = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  row_sum = jnp.sum(probs, axis=-1, keepdims=True)
  probs = probs / jnp.where(row_sum == 0.0, 1.0, row_sum)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
