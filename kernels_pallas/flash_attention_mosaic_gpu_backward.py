"""Flash attention backward for Hopper in Pallas Mosaic GPU (dq; dk/dv), and the differentiable entry.

Math as in `flash_attention_backward.py`: probs = exp(scores - lse), delta = rowsum(do * o),
dscores = probs * (do @ v.T - delta). Kernel structure as in `flash_attention_mosaic_gpu.py`: one
warpgroup per program, the resident tiles copied once, the streamed tiles double-buffered in SMEM, every
matmul a wgmma. The dk/dv kernel works in transposed score space ([block_k, block_q]) and sums over the
kv head's query group, so dk/dv come out per kv head without a reduction afterwards.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import layout
from kernels_pallas.flash_attention_backward import first_visible_q_block
from kernels_pallas.flash_attention_kernels import (
  KernelConfig,
  index_div,
  index_rem,
  num_visible_k_blocks,
)
from kernels_pallas.flash_attention_mosaic_gpu import (
  COLS,
  ROWS,
  accumulate,
  forward,
  grid_position,
  load_gmem,
  matmul_t,
  run_kernel,
  staging,
  tile_transforms,
  visible_scores,
  zeros,
)


def _dq_kernel(*refs, cfg: KernelConfig, group: int, has_segments: bool):
  """One (head, q block, batch): dq = sum over visible key blocks of dscores @ k."""
  num_inputs = 8 if has_segments else 6
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *seg_refs = refs[:num_inputs]
  dq_ref, q_smem, do_smem, k_smem, v_smem, q_barriers, k_barriers, v_barriers, *staging_smem = refs[num_inputs:]
  staging_smem = staging_smem[0] if staging_smem else None
  block_q, block_k = cfg.block_q, cfg.block_k
  head, q_block, batch = grid_position()
  kv_head, g = index_div(head, group), index_rem(head, group)
  q_start = q_block * block_q
  rows = (batch, kv_head, g, pl.ds(q_start, block_q))
  num_k_blocks = num_visible_k_blocks(q_start, cfg, k_ref.shape[2] // block_k)

  def fetch(j, slot):
    keys = pl.ds(j * block_k, block_k)
    plgpu.copy_gmem_to_smem(k_ref.at[batch, kv_head, keys], k_smem.at[slot], k_barriers.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, kv_head, keys], v_smem.at[slot], v_barriers.at[slot])

  plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_barriers.at[0])
  plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, q_barriers.at[1])
  pl.when(num_k_blocks > 0)(lambda: fetch(0, 0))
  lse = load_gmem(lse_ref.at[rows], ROWS)
  delta = load_gmem(delta_ref.at[rows], ROWS)
  q_seg = load_gmem(seg_refs[0].at[batch, pl.ds(q_start, block_q)], ROWS) if has_segments else None
  plgpu.barrier_wait(q_barriers.at[0])
  plgpu.barrier_wait(q_barriers.at[1])

  def step(j, dq):
    slot = index_rem(j, 2)
    pl.when(j + 1 < num_k_blocks)(lambda: fetch(j + 1, 1 - slot))
    k_start = j * block_k
    kv_seg = load_gmem(seg_refs[1].at[batch, pl.ds(k_start, block_k)], COLS) if has_segments else None
    plgpu.barrier_wait(k_barriers.at[slot])
    scores = visible_scores(q_smem, k_smem.at[slot], q_start, k_start, cfg, q_seg, kv_seg, True)
    probs = jnp.exp(scores - lax.broadcast_in_dim(lse, scores.shape, [0]))
    plgpu.barrier_wait(v_barriers.at[slot])
    dprobs = matmul_t(do_smem, v_smem.at[slot], (block_q, block_k))
    dscores = probs * (dprobs - lax.broadcast_in_dim(delta, scores.shape, [0]))
    return accumulate(dq, dscores, k_smem.at[slot], staging_smem)

  dq = lax.fori_loop(0, num_k_blocks, step, zeros(q_smem.shape))
  q_smem[...] = (dq * cfg.sm_scale).astype(q_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
  plgpu.wait_smem_to_gmem(0)


def _dkdv_kernel(*refs, cfg: KernelConfig, group: int, has_segments: bool):
  """One (kv head, k block, batch): dk, dv summed over the group's query heads and visible q blocks."""
  num_inputs = 8 if has_segments else 6
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *seg_refs = refs[:num_inputs]
  (dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem, k_barriers, q_barriers, do_barriers,
   *staging_smem) = refs[num_inputs:]
  staging_smem = staging_smem[0] if staging_smem else None
  block_q, block_k = cfg.block_q, cfg.block_k
  kv_head, k_block, batch = grid_position()
  k_start = k_block * block_k
  keys = (batch, kv_head, pl.ds(k_start, block_k))
  first_q_block = first_visible_q_block(k_start, cfg)
  q_blocks = jnp.maximum(q_ref.shape[3] // block_q - first_q_block, 0)   # visible q blocks per head
  num_steps = group * q_blocks

  def query_rows(t):
    """(batch, kv head, group member, q block slice) of step t, which walks heads then q blocks."""
    g, i = index_div(t, q_blocks), first_q_block + index_rem(t, q_blocks)
    return batch, kv_head, g, pl.ds(i * block_q, block_q)

  def fetch(t, slot):
    plgpu.copy_gmem_to_smem(q_ref.at[query_rows(t)], q_smem.at[slot], q_barriers.at[slot])
    plgpu.copy_gmem_to_smem(do_ref.at[query_rows(t)], do_smem.at[slot], do_barriers.at[slot])

  plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, k_barriers.at[0])
  plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, k_barriers.at[1])
  pl.when(num_steps > 0)(lambda: fetch(0, 0))
  kv_seg = load_gmem(seg_refs[1].at[batch, pl.ds(k_start, block_k)], ROWS) if has_segments else None
  plgpu.barrier_wait(k_barriers.at[0])
  plgpu.barrier_wait(k_barriers.at[1])

  def step(t, carry):
    dk, dv = carry
    slot = index_rem(t, 2)
    pl.when(t + 1 < num_steps)(lambda: fetch(t + 1, 1 - slot))
    rows = query_rows(t)
    q_start = rows[3].start
    q_seg = load_gmem(seg_refs[0].at[batch, rows[3]], COLS) if has_segments else None
    lse = load_gmem(lse_ref.at[rows], COLS)
    delta = load_gmem(delta_ref.at[rows], COLS)
    plgpu.barrier_wait(q_barriers.at[slot])
    scores_t = visible_scores(k_smem, q_smem.at[slot], k_start, q_start, cfg, kv_seg, q_seg, False)
    probs_t = jnp.exp(scores_t - lax.broadcast_in_dim(lse, scores_t.shape, [1]))
    plgpu.barrier_wait(do_barriers.at[slot])
    dv = accumulate(dv, probs_t, do_smem.at[slot], staging_smem)
    dprobs_t = matmul_t(v_smem, do_smem.at[slot], (block_k, block_q))
    dscores_t = probs_t * (dprobs_t - lax.broadcast_in_dim(delta, scores_t.shape, [1]))
    return accumulate(dk, dscores_t, q_smem.at[slot], staging_smem), dv

  dk, dv = lax.fori_loop(0, num_steps, step, (zeros(k_smem.shape), zeros(v_smem.shape)))
  k_smem[...] = (dk * cfg.sm_scale).astype(k_smem.dtype)
  v_smem[...] = dv.astype(v_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys])
  plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys])
  plgpu.wait_smem_to_gmem(0)


def backward(q, k, v, o, lse, do, q_seg, kv_seg, cfg: KernelConfig):
  """Kernel-layout tensors (lse: [b, kvh, g, lq] float32) -> (dq, dk, dv) in the same layouts."""
  batch, kv_heads, group, q_len_padded, head_dim = q.shape
  kv_len_padded = k.shape[2]
  has_segments = q_seg is not None
  segments = (q_seg, kv_seg) if has_segments else ()
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  smem = lambda shape, dtype: plgpu.SMEM(shape, dtype, transforms=tile_transforms(dtype))
  inputs = (q, k, v, do, lse, delta, *segments)

  dq_scratch = [smem((cfg.block_q, head_dim), q.dtype), smem((cfg.block_q, head_dim), do.dtype),
                smem((2, cfg.block_k, head_dim), k.dtype), smem((2, cfg.block_k, head_dim), v.dtype),
                plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
                *staging(cfg, (cfg.block_q, cfg.block_k), k.dtype)]
  dq = run_kernel(functools.partial(_dq_kernel, cfg=cfg, group=group, has_segments=has_segments), cfg,
                  (kv_heads * group, q_len_padded // cfg.block_q, batch),
                  jax.ShapeDtypeStruct(q.shape, q.dtype), dq_scratch)(*inputs)

  dkdv_scratch = [smem((cfg.block_k, head_dim), k.dtype), smem((cfg.block_k, head_dim), v.dtype),
                  smem((2, cfg.block_q, head_dim), q.dtype), smem((2, cfg.block_q, head_dim), do.dtype),
                  plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
                  *staging(cfg, (cfg.block_k, cfg.block_q), q.dtype)]
  dk, dv = run_kernel(functools.partial(_dkdv_kernel, cfg=cfg, group=group, has_segments=has_segments), cfg,
                      (kv_heads, kv_len_padded // cfg.block_k, batch),
                      (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
                      dkdv_scratch)(*inputs)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, q_seg, kv_seg, cfg: KernelConfig):
  return forward(q, k, v, q_seg, kv_seg, cfg)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, cfg):
  o, lse = forward(q, k, v, q_seg, kv_seg, cfg)
  return o, (q, k, v, o, lse, q_seg, kv_seg)


def _attention_bwd(cfg, residuals, do):
  q, k, v, o, lse, q_seg, kv_seg = residuals
  return (*backward(q, k, v, o, lse, do, q_seg, kv_seg, cfg), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, segment_ids, cfg: KernelConfig):
  """Differentiable Mosaic GPU flash attention in the model layout.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim]; segment_ids:
  [batch, seq_len] or None. cfg.block_q / block_k must pass `unsupported_reason`. Returns like q.
  """
  q5, k4, v4 = layout.to_kernel_layout(q, k, v, cfg.block_q, cfg.block_k)
  q_seg = kv_seg = None
  if segment_ids is not None:
    q_seg, kv_seg = layout.segments_to_kernel_layout(segment_ids, q5.shape[3], k4.shape[2])
    q_seg, kv_seg = q_seg[:, :, 0], kv_seg[:, 0, :]
  return layout.from_kernel_layout(_attention(q5, k4, v4, q_seg, kv_seg, cfg), q.shape[1])
