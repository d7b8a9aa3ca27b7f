"""Ragged paged attention for decoding: one query per row, keys and values in a block pool.

Each (row, kv head) program walks only its own row's blocks, `ceil(length / block_size)` of
them, through the block table, with an online softmax; so a short row costs little however
long the longest one is (the "ragged" part), unlike the gather path in `maxlm.model.paged_kv`,
which pads every row to the widest table.

Layout (the one `maxlm.model.paged_kv` keeps):
  q:            [batch, heads, head_dim]   (query head = kv_head * group + g)
  k/v pools:    [kv_heads, num_blocks, block_size, head_dim]
  block_table:  int32 [batch, width];  lengths: int32 [batch], positions each row sees.

Backend notes: only interpret mode runs here (no accelerator). Each program holds the whole
pools as refs and loads one [block_size, head_dim] tile per step by two leading indices: on
GPU (Triton) these are global-memory loads, fine at any size; on TPU the whole pools would sit
in VMEM, which bounds them to a few MiB; a TPU version wants the pools in HBM (`pl.ANY`) with
the block table scalar-prefetched and each tile DMA'd (as JetStream's ragged paged attention
does). The query group is padded to 16 rows, the smallest `dot` Triton takes.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MIN_ROWS = 16


def _kernel(q_ref, k_ref, v_ref, table_ref, lengths_ref, o_ref, *, block_size: int,
            scale: float):
  """q_ref, o_ref: [rows, head_dim] of one (batch row, kv head)."""
  row, head = pl.program_id(0), pl.program_id(1)
  length = lengths_ref[row]
  dtype = jnp.promote_types(q_ref.dtype, jnp.float32)  # bf16 in float32; float64 stays
  q = q_ref[...].astype(dtype) * scale
  offsets = jax.lax.broadcasted_iota(jnp.int32, (1, block_size), 1)

  def step(i, carry):
    row_max, row_sum, acc = carry
    block = table_ref[row, i]
    keys = k_ref[head, block].astype(dtype)             # [block_size, head_dim]
    values = v_ref[head, block].astype(dtype)
    scores = jax.lax.dot_general(q, keys, (((1,), (1,)), ((), ())))  # [rows, block_size]
    scores = jnp.where(i * block_size + offsets < length, scores, -jnp.inf)
    new_max = jnp.maximum(row_max, scores.max(axis=1, keepdims=True))
    probs = jnp.exp(scores - new_max)
    rescale = jnp.exp(row_max - new_max)
    return (new_max, rescale * row_sum + probs.sum(axis=1, keepdims=True),
            rescale * acc + jnp.dot(probs, values))

  rows, head_dim = q_ref.shape
  # A finite start: a row whose first block is all masked still gets exp() of finite values.
  init = (jnp.full((rows, 1), -1e30, dtype), jnp.zeros((rows, 1), dtype),
          jnp.zeros((rows, head_dim), dtype))
  blocks = (length + block_size - 1) // block_size
  _, row_sum, acc = jax.lax.fori_loop(0, blocks, step, init)
  o_ref[...] = (acc / jnp.where(row_sum == 0.0, 1.0, row_sum)).astype(o_ref.dtype)


def paged_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                    block_table: jax.Array, lengths: jax.Array, *,
                    interpret: bool = False) -> jax.Array:
  """Softmax attention of each row's one query over its first `lengths` positions, read
  through its block table; see the module docstring for shapes. A row with length 0 gets
  zeros. Returns [batch, heads, head_dim] in q's dtype."""
  batch, heads, head_dim = q.shape
  kv_heads, _, block_size, _ = k_pool.shape
  group = heads // kv_heads
  rows = max(MIN_ROWS, 1 << (group - 1).bit_length())
  grouped = q.reshape(batch, kv_heads, group, head_dim)
  grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  per_head = pl.BlockSpec((None, None, rows, head_dim), lambda b, h: (b, h, 0, 0))
  whole = pl.BlockSpec()  # the whole array: programs index the pools by the block table
  out = pl.pallas_call(
      functools.partial(_kernel, block_size=block_size, scale=1.0 / math.sqrt(head_dim)),
      grid=(batch, kv_heads),
      in_specs=[per_head, whole, whole, whole, whole],
      out_specs=per_head,
      out_shape=jax.ShapeDtypeStruct(grouped.shape, q.dtype),
      interpret=interpret,
      name="ragged_paged_attention",
  )(grouped, k_pool, v_pool, block_table.astype(jnp.int32), lengths.astype(jnp.int32))
  return out[:, :, :group].reshape(batch, heads, head_dim)
