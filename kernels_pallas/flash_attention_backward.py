"""Pallas backward kernels for flash attention: one for dq, one for dk/dv.

Both recompute probabilities from the forward's logsumexp: probs = exp(scores - lse), and use
delta = rowsum(do * o) so that dscores = probs * (do @ v.T - delta). Layouts and backend notes are in
`flash_attention_kernels.py`. The dk/dv kernels work in transposed score space ([block_k, block_q]) so
every matmul is a plain or rhs-transposed one, which both Triton and TPU Mosaic lower well. dk/dv comes
in two structures: TPU and interpret mode reduce over query blocks on the grid (`_dkdv_query_grid`),
Triton in a loop inside each program (`_dkdv_query_loop`), since its grid programs run in parallel.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.flash_attention_kernels import (
    KernelConfig, index_div, independent_programs, mask_scores, matmul_f32, num_visible_k_blocks,
    query_head_spec, scaled_scores, segment_specs, split_refs, tile_positions, visible_pairs,
    whole_kv_spec)


def first_visible_q_block(k_start, cfg: KernelConfig):
  """Query blocks [n, end) hold every query that may see some key in [k_start, k_start + block_k)."""
  if not cfg.skips_blocks:
    return 0
  return index_div(jnp.maximum(k_start - cfg.causal_offset, 0), cfg.block_q)


def _dq_kernel(*refs, cfg: KernelConfig, has_segments: bool):
  """One (batch, head, q block). q_ref, do_ref: [block_q, d]; k_ref, v_ref: [kv_len_padded, d];
  lse_ref, delta_ref: [block_q, 1] -> dq_ref: [block_q, d]."""
  inputs, q_seg_ref, kv_seg_ref, (dq_ref,) = split_refs(refs, 6, has_segments)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  block_q, head_dim = q_ref.shape
  q_start = pl.program_id(2) * block_q
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]

  def step(j, dq):
    k_start = pl.multiple_of(j * cfg.block_k, cfg.block_k)
    keys = pl.ds(k_start, cfg.block_k)
    q_pos, k_pos = tile_positions(q_start, k_start, (block_q, cfg.block_k))
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[:, keys]
    k = k_ref[keys, :]
    scores = mask_scores(scaled_scores(q, k, cfg.sm_scale), visible_pairs(q_pos, k_pos, q_seg, kv_seg, cfg))
    probs = jnp.exp(scores - lse)
    dprobs = scaled_scores(do, v_ref[keys, :], 1.0)
    return dq + matmul_f32(probs * (dprobs - delta), k)

  num_k_blocks = num_visible_k_blocks(q_start, cfg, k_ref.shape[0] // cfg.block_k)
  dq = jax.lax.fori_loop(0, num_k_blocks, step, jnp.zeros((block_q, head_dim), jnp.float32))
  dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkdv_query_loop_kernel(*refs, cfg: KernelConfig, has_segments: bool):
  """One (batch, kv head, k block), summing over the kv head's query group in a loop.

  q_ref, do_ref: [group, q_len_padded, d]; k_ref, v_ref: [block_k, d];
  lse_ref, delta_ref: [group, 1, q_len_padded] -> dk_ref, dv_ref: [block_k, d].
  """
  inputs, q_seg_ref, kv_seg_ref, (dk_ref, dv_ref) = split_refs(refs, 6, has_segments)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  group, q_len_padded, _ = q_ref.shape
  block_k, head_dim = k_ref.shape
  k_start = pl.program_id(2) * block_k
  k, v = k_ref[...], v_ref[...]
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
  first_q_block = first_visible_q_block(k_start, cfg)

  def step(i, carry, g):
    dk, dv = carry
    q_start = pl.multiple_of(i * cfg.block_q, cfg.block_q)
    queries = pl.ds(q_start, cfg.block_q)
    k_pos, q_pos = tile_positions(k_start, q_start, (block_k, cfg.block_q))
    q_seg = None if q_seg_ref is None else q_seg_ref[:, queries]
    q, do = q_ref[g, queries, :], do_ref[g, queries, :]
    scores_t = mask_scores(scaled_scores(k, q, cfg.sm_scale), visible_pairs(q_pos, k_pos, q_seg, kv_seg, cfg))
    probs_t = jnp.exp(scores_t - lse_ref[g, :, queries])
    dprobs_t = scaled_scores(v, do, 1.0)
    dscores_t = probs_t * (dprobs_t - delta_ref[g, :, queries])
    return dk + matmul_f32(dscores_t, q), dv + matmul_f32(probs_t, do)

  def head(g, carry):
    return jax.lax.fori_loop(first_q_block, q_len_padded // cfg.block_q,
                             lambda i, c: step(i, c, g), carry)

  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkdv_query_grid_kernel(*refs, cfg: KernelConfig, has_segments: bool):
  """One (batch, kv head, k block, g, q block); dk/dv accumulate in VMEM across (g, q block).

  q_ref, do_ref: [block_q, d]; k_ref, v_ref: [block_k, d]; lse_ref, delta_ref: [1, block_q];
  q_seg_ref: [1, block_q]; kv_seg_ref: [block_k, 1] -> dk_ref, dv_ref: [block_k, d], written at the
  last (g, q block). dk_acc, dv_acc: float32 [block_k, d] scratch.
  """
  inputs, q_seg_ref, kv_seg_ref, (dk_ref, dv_ref, dk_acc, dv_acc) = split_refs(refs, 6, has_segments)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  block_k = k_ref.shape[0]
  k_start = pl.program_id(2) * block_k
  g, i = pl.program_id(3), pl.program_id(4)
  q_start = i * cfg.block_q

  @pl.when((g == 0) & (i == 0))
  def _():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  @pl.when(i >= first_visible_q_block(k_start, cfg))
  def _():
    k, v, q, do = k_ref[...], v_ref[...], q_ref[...], do_ref[...]
    k_pos, q_pos = tile_positions(k_start, q_start, (block_k, cfg.block_q))
    q_seg = None if q_seg_ref is None else q_seg_ref[...]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
    scores_t = mask_scores(scaled_scores(k, q, cfg.sm_scale), visible_pairs(q_pos, k_pos, q_seg, kv_seg, cfg))
    probs_t = jnp.exp(scores_t - lse_ref[...])
    dscores_t = probs_t * (scaled_scores(v, do, 1.0) - delta_ref[...])
    dk_acc[...] += matmul_f32(dscores_t, q)
    dv_acc[...] += matmul_f32(probs_t, do)

  @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _():
    dk_ref[...] = (dk_acc[...] * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq(q, k, v, do, lse, delta, q_seg, kv_seg, cfg: KernelConfig):
  batch, kv_heads, group, q_len_padded, head_dim = q.shape
  kv_len_padded = k.shape[2]
  has_segments = q_seg is not None
  kv_spec = whole_kv_spec(kv_len_padded, head_dim, group, cfg)
  q_spec = query_head_spec(cfg.block_q, head_dim, group)
  stat_spec = query_head_spec(cfg.block_q, 1, group)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec]
  if has_segments:
    in_specs += segment_specs(cfg.block_q, kv_len_padded, cfg)
  kernel = pl.pallas_call(
      lambda *refs: _dq_kernel(*refs, cfg=cfg, has_segments=has_segments),
      grid=(batch, kv_heads * group, q_len_padded // cfg.block_q),
      in_specs=in_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=independent_programs(cfg, 3),
      interpret=cfg.interpret,
      name="flash_attention_dq",
  )
  segments = (q_seg, kv_seg) if has_segments else ()
  return kernel(q, k, v, do, lse, delta, *segments)


def _dkdv_query_grid(q, k, v, do, lse, delta, q_seg, kv_seg, cfg: KernelConfig):
  """TPU and interpret mode: grid (batch, kv head, k block, g, q block), the last two a sequential
  reduction, so VMEM holds one q block, not the whole query length. Query blocks that the causal
  mask hides from a k block are neither computed nor fetched (their index is clamped to the first
  visible one, and Pallas skips the copy of an unchanged block)."""
  batch, kv_heads, group, q_len_padded, head_dim = q.shape
  kv_len_padded = k.shape[2]
  has_segments = q_seg is not None

  def visible(j, i):
    return jnp.maximum(i, first_visible_q_block(j * cfg.block_k, cfg))

  q_spec = pl.BlockSpec((None, None, None, cfg.block_q, head_dim),
                        lambda b, h, j, g, i: (b, h, g, visible(j, i), 0))
  stat_spec = pl.BlockSpec((None, None, None, 1, cfg.block_q),
                           lambda b, h, j, g, i: (b, h, g, 0, visible(j, i)))
  kv_spec = pl.BlockSpec((None, None, cfg.block_k, head_dim), lambda b, h, j, g, i: (b, h, j, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec]
  segments = ()
  if has_segments:
    in_specs += [pl.BlockSpec((None, 1, cfg.block_q), lambda b, h, j, g, i: (b, 0, visible(j, i))),
                 pl.BlockSpec((None, cfg.block_k, 1), lambda b, h, j, g, i: (b, j, 0))]
    segments = (q_seg.reshape(batch, 1, q_len_padded), kv_seg.reshape(batch, kv_len_padded, 1))
  row = lambda stat: stat.reshape(batch, kv_heads, group, 1, q_len_padded)
  kernel = pl.pallas_call(
      lambda *refs: _dkdv_query_grid_kernel(*refs, cfg=cfg, has_segments=has_segments),
      grid=(batch, kv_heads, kv_len_padded // cfg.block_k, group, q_len_padded // cfg.block_q),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((cfg.block_k, head_dim), jnp.float32)] * 2,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=cfg.interpret,
      name="flash_attention_dkdv",
  )
  return kernel(q, k, v, do, row(lse), row(delta), *segments)


def _dkdv_query_loop(q, k, v, do, lse, delta, q_seg, kv_seg, cfg: KernelConfig):
  """Triton: grid programs run in parallel, so no output may be revisited across the grid; each
  program loops over the whole query length of its kv head's group, held in fast memory."""
  batch, kv_heads, group, q_len_padded, head_dim = q.shape
  kv_len_padded = k.shape[2]
  has_segments = q_seg is not None
  group_spec = pl.BlockSpec((None, None, group, q_len_padded, head_dim), lambda b, h, j: (b, h, 0, 0, 0))
  stat_spec = pl.BlockSpec((None, None, group, 1, q_len_padded), lambda b, h, j: (b, h, 0, 0, 0))
  kv_spec = pl.BlockSpec((None, None, cfg.block_k, head_dim), lambda b, h, j: (b, h, j, 0))
  in_specs = [group_spec, kv_spec, kv_spec, group_spec, stat_spec, stat_spec]
  segments = ()
  if has_segments:
    in_specs += [pl.BlockSpec((None, 1, q_len_padded), lambda b, h, j: (b, 0, 0)),
                 pl.BlockSpec((None, cfg.block_k, 1), lambda b, h, j: (b, j, 0))]
    segments = (q_seg.reshape(batch, 1, q_len_padded), kv_seg.reshape(batch, kv_len_padded, 1))
  row = lambda stat: stat.reshape(batch, kv_heads, group, 1, q_len_padded)
  kernel = pl.pallas_call(
      lambda *refs: _dkdv_query_loop_kernel(*refs, cfg=cfg, has_segments=has_segments),
      grid=(batch, kv_heads, kv_len_padded // cfg.block_k),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=cfg.interpret,
      name="flash_attention_dkdv",
  )
  return kernel(q, k, v, do, row(lse), row(delta), *segments)


def backward(q, k, v, o, lse, do, q_seg, kv_seg, cfg: KernelConfig):
  """Kernel-layout tensors (see `flash_attention_kernels`) -> (dq, dk, dv) in the same layouts."""
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  dq = _dq(q, k, v, do, lse, delta, q_seg, kv_seg, cfg)
  dkdv = _dkdv_query_loop if cfg.triton else _dkdv_query_grid
  dk, dv = dkdv(q, k, v, do, lse, delta, q_seg, kv_seg, cfg)
  return dq, dk, dv
