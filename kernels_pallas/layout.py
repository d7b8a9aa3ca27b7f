"""Padding and head-major layout shared by every flash attention backend.

Model layout is [batch, seq, heads, head_dim]; kernel layout (see `flash_attention_kernels.py`) is
q: [batch, kv_heads, group, q_len_padded, head_dim] and k, v: [batch, kv_heads, kv_len_padded, head_dim],
with both lengths padded to whole blocks.
"""

import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.flash_attention_kernels import BLOCK_ID_BITS


def pad_axis(x, axis, size, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def to_kernel_layout(q, k, v, block_q, block_k):
  """[b, l, h, d] -> q: [b, kvh, g, lq_padded, d]; k, v: [b, kvh, lk_padded, d]."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  q_len_padded = pl.cdiv(q_len, block_q) * block_q
  kv_len_padded = pl.cdiv(kv_len, block_k) * block_k
  q = pad_axis(q, 1, q_len_padded).reshape(batch, q_len_padded, kv_heads, num_heads // kv_heads, head_dim)
  to_heads_first = lambda x: jnp.moveaxis(pad_axis(x, 1, kv_len_padded), 1, 2)
  return q.transpose(0, 2, 3, 1, 4), to_heads_first(k), to_heads_first(v)


def pack_ids(segment_ids, low_ids):
  """[b, l] segment ids (< 2**15, or None: one segment) and bidirectional block ids or branch ids
  (< 2**16) -> one int32 [b, l]: the kernels read both from the segment refs when
  `KernelConfig.packed`."""
  if segment_ids is None:
    segment_ids = jnp.zeros_like(low_ids)
  return (segment_ids.astype(jnp.int32) << BLOCK_ID_BITS) | low_ids.astype(jnp.int32)


def segments_to_kernel_layout(segment_ids, q_len_padded, kv_len_padded, packed=False):
  """[b, l] -> q side [b, lq_padded, 1], kv side [b, 1, lk_padded]; padded queries match no key.
  `packed`: the ids come from `pack_ids`, so the padding's segment sits in the upper bits."""
  segment_ids = segment_ids.astype(jnp.int32)
  shift = BLOCK_ID_BITS if packed else 0
  q_seg = pad_axis(segment_ids, 1, q_len_padded, value=-1 << shift)
  kv_seg = pad_axis(segment_ids, 1, kv_len_padded, value=-2 << shift)
  return q_seg[:, :, None], kv_seg[:, None, :]


def from_kernel_layout(o, q_len):
  """[b, kvh, g, lq_padded, d] -> [b, q_len, kvh * g, d]."""
  batch, kv_heads, group, _, head_dim = o.shape
  return o.transpose(0, 3, 1, 2, 4)[:, :q_len].reshape(batch, q_len, kv_heads * group, head_dim)
