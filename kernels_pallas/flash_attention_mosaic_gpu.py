"""Flash attention forward for Hopper (sm_90a) in Pallas Mosaic GPU, and when it applies.

Same semantics and kernel layout as `flash_attention_kernels.py` (causal aligned to the end of the keys,
GQA, segment ids, padded blocks, a query that sees no key gives 0 with lse = +inf). Backward kernels are
in `flash_attention_mosaic_gpu_backward.py`; the differentiable entry point is `attention` there.

One warpgroup per (head, q block, batch) program: Q is copied to SMEM once by TMA, K/V blocks stream
through two SMEM slots (the next block's copy is in flight while the current one is multiplied), both
matmuls are wgmma with float32 accumulators, and the online softmax runs on the accumulator's registers.
Segment ids, lse and delta are read straight from GMEM into the row/column layout of the wgmma tile.

What this path does not take (`unsupported_reason` says which; `flash_attention` then uses Triton):
- dtypes other than bfloat16/float16: the kernels use 16-bit wgmma operands (Hopper's wgmma has no
  full-float32 mode, only tf32, which these kernels do not implement);
- head_dim not a multiple of 64 or above 256: tiles are 128-byte swizzled (64 two-byte elements) and
  the P @ V wgmma has N = head_dim <= 256;
- block_q / block_k not multiples of 64 (wgmma M is 64 per warpgroup; K/V tiles are 64-row swizzled);
- tiles that do not fit the 227 KiB of SMEM of one H100 block;
- a local GPU that is not a Hopper (`device_reason`; wgmma is sm_90a only, Blackwell has tcgen05).
Tested here: lowering (offline `jax.export` for "cuda": one `mosaic_gpu_v2` custom call per kernel),
numerics under JAX's Mosaic GPU interpreter on CPU, and deviceless compiles through ptxas for sm_90a
(`benchmarks/aot_compile.py`, JAX 0.11.2 and 0.12). Run on an H200 (JAX 0.11.2, 2026-12-04,
benchmarks/RESULTS.md): forward and backward right, causal and packed (2.0e-3 / 2.5e-3 against
float32, bf16 inputs); causal forward 202 / 234 / 256 TF/s at 2k / 4k / 8k, 0.54-0.59x cuDNN. One
warpgroup per program means its softmax waits on its matmuls and they on it (FlashAttention-3 has
two warpgroups take turns): the first lead for the gap.
The interpreter also differs from the compiled kernel in one place, see `accumulate`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.flash_attention_kernels import (
  KernelConfig,
  index_div,
  index_rem,
  mask_scores,
  num_visible_k_blocks,
  visible_pairs,
)

TILE_ROWS = 64                 # block sizes and head_dim are multiples of this (wgmma M, 128-byte swizzle)
MAX_HEAD_DIM = 256             # wgmma N for P @ V
SMEM_BYTES = 227 * 1024        # dynamic SMEM one H100 block may use
SWIZZLE_BYTES = 128
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
GRID_NAMES = ("heads", "blocks", "batch")
TILE = plgpu.Layout.WGMMA
ROWS = plgpu.Layout.WGMMA.reduce(1)   # one value per row of a wgmma tile
COLS = plgpu.Layout.WGMMA.reduce(0)   # one value per column


@dataclasses.dataclass(frozen=True)
class Blocks:
  block_q: int
  block_k: int


def choose_blocks(q_len, kv_len, head_dim, block_q=None, block_k=None) -> Blocks:
  """Requested blocks, or 64 queries x 128 keys (64 keys when head_dim > 128), clipped to the lengths."""
  round_up = lambda n: pl.cdiv(n, TILE_ROWS) * TILE_ROWS
  block_q = block_q or min(TILE_ROWS, round_up(q_len))
  block_k = block_k or min(128 if head_dim <= 128 else 64, round_up(kv_len))
  return Blocks(block_q, block_k)


def smem_bytes(blocks: Blocks, head_dim, itemsize):
  """The largest SMEM footprint of the three kernels: one resident tile pair plus two streamed pairs."""
  forward_and_dq = 2 * blocks.block_q + 2 * 2 * blocks.block_k   # q, do + two slots of k, v
  dkdv = 2 * blocks.block_k + 2 * 2 * blocks.block_q              # k, v + two slots of q, do
  return max(forward_and_dq, dkdv) * head_dim * itemsize + 4 * blocks.block_q


def unsupported_reason(q, k, v, blocks: Blocks):
  """None when the Mosaic GPU kernels take this call, else one sentence saying why they do not."""
  dtype, head_dim = jnp.dtype(q.dtype), q.shape[-1]
  if dtype not in map(jnp.dtype, SUPPORTED_DTYPES) or k.dtype != dtype or v.dtype != dtype:
    return f"Mosaic GPU path takes bfloat16/float16 q, k, v (16-bit wgmma operands); got {q.dtype}."
  if head_dim % TILE_ROWS or head_dim > MAX_HEAD_DIM:
    return f"Mosaic GPU path needs head_dim a multiple of 64 up to 256; got {head_dim}."
  if blocks.block_q % TILE_ROWS or blocks.block_k % TILE_ROWS:
    return f"Mosaic GPU path needs block_q and block_k multiples of 64; got {blocks.block_q}, {blocks.block_k}."
  if (need := smem_bytes(blocks, head_dim, dtype.itemsize)) > SMEM_BYTES:
    return f"Mosaic GPU tiles need {need} bytes of SMEM, over the {SMEM_BYTES} of an H100 block."
  return None


def device_reason():
  """Why the local GPU cannot run these kernels (not a Hopper: wgmma is sm_90a only), else None.

  Without a local GPU (e.g. exporting for "cuda" from a CPU host) the target is assumed to be Hopper.
  """
  if jax.default_backend() != "gpu":
    return None
  capability = getattr(jax.devices()[0], "compute_capability", None)
  if capability is not None and not str(capability).startswith("9."):
    return f"Mosaic GPU kernels use Hopper wgmma (sm_90a); this GPU has compute capability {capability}."
  return None


def tile_transforms(dtype):
  """Tiling and swizzle that wgmma wants for [rows, head_dim] SMEM operands."""
  return (plgpu.TilingTransform((8, SWIZZLE_BYTES // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(SWIZZLE_BYTES))


def grid_position():
  """(head, block, batch) of this program."""
  return tuple(lax.axis_index(name) for name in GRID_NAMES)


def tile_visibility(row_start, col_start, shape, cfg: KernelConfig, row_seg, col_seg, rows_are_queries):
  """bool [rows, cols] in the wgmma layout (or None): which pairs of this score tile may attend.

  row_seg / col_seg: segment ids of the tile's rows / columns in ROWS / COLS layout, or None.
  """
  rows = row_start + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=TILE)
  cols = col_start + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=TILE)
  row_seg = None if row_seg is None else lax.broadcast_in_dim(row_seg, shape, [0])
  col_seg = None if col_seg is None else lax.broadcast_in_dim(col_seg, shape, [1])
  if rows_are_queries:
    return visible_pairs(rows, cols, row_seg, col_seg, cfg)
  return visible_pairs(cols, rows, col_seg, row_seg, cfg)


def visible_scores(row_smem, col_smem, row_start, col_start, cfg: KernelConfig, row_seg, col_seg,
                   rows_are_queries):
  """rows @ cols.T * sm_scale of one score tile (q k^T, or k q^T when the rows are keys) by wgmma,
  -inf where the pair may not attend; the arguments after cfg as for `tile_visibility`."""
  shape = (row_smem.shape[0], col_smem.shape[0])
  scores = matmul_t(row_smem, col_smem, shape) * cfg.sm_scale
  return mask_scores(scores, tile_visibility(row_start, col_start, shape, cfg, row_seg, col_seg,
                                             rows_are_queries))


def matmul_t(lhs_smem, rhs_smem, shape):
  """lhs @ rhs.T of two SMEM tiles by wgmma -> float32 [m, n] in registers."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, lhs_smem, rhs_smem.T)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def accumulate(acc, lhs, rhs_smem, staging_smem=None):
  """acc + lhs @ rhs by wgmma; acc: [m, n] float32, lhs: [m, k] registers (cast to rhs's dtype), rhs: [k, n] SMEM.

  Compiled, lhs goes to wgmma from registers and wgmma accumulates into acc in place (`run_state`).
  The Mosaic GPU interpreter (what the CPU tests run) implements neither register operands nor
  `run_state`, so under it (`staging_smem` given, [m, k], allocated only when interpreting) lhs is
  staged through SMEM and the product lands in a fresh accumulator that is then added: the same sum,
  by a different route. That route difference is the one part of the compiled kernels the tests do not run.
  """
  lhs = lhs.astype(rhs_smem.dtype)
  if staging_smem is None:
    def accumulate_in_place(acc_ref):
      plgpu.wgmma(acc_ref, lhs, rhs_smem)
    return pl.run_state(accumulate_in_place)(plgpu.ACC.init(acc))

  staging_smem[...] = lhs
  plgpu.commit_smem()

  def product(acc_ref):
    plgpu.wgmma(acc_ref, staging_smem, rhs_smem)
    return acc_ref[...]
  return acc + pl.run_scoped(product, plgpu.ACC(acc.shape, jnp.float32))


def staging(cfg: KernelConfig, shape, dtype):
  """SMEM for register matmul operands, only under the interpreter (see `accumulate`)."""
  return [plgpu.SMEM(shape, dtype, transforms=tile_transforms(dtype))] if cfg.interpret else []


def load_gmem(ref, layout):
  """A small GMEM vector (segment ids, lse, delta) into registers in `layout`. A plain load:
  Mosaic GPU's default, `optimized=True`, asks for a bank-conflict-free SMEM transfer, and
  JAX 0.11 refuses it for GMEM ("Only optimized transfers to SMEM supported")."""
  return plgpu.load(ref, layout=layout, optimized=False)


def zeros(shape, layout=TILE):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), layout)


def run_kernel(body, cfg: KernelConfig, grid, out_type, scratch_types):
  """plgpu.kernel over GRID_NAMES; on CPU with cfg.interpret (True or `plgpu.InterpretGPUParams`)."""
  interpret = cfg.interpret
  if not isinstance(interpret, plgpu.InterpretGPUParams):
    interpret = plgpu.InterpretGPUParams() if interpret else None
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch_types, grid=grid, grid_names=GRID_NAMES,
      compiler_params=plgpu.CompilerParams(), interpret=interpret)


def _forward_kernel(*refs, cfg: KernelConfig, group: int, has_segments: bool):
  """One (head, q block, batch): online softmax over the visible key blocks, K/V double-buffered."""
  num_inputs = 5 if has_segments else 3
  q_ref, k_ref, v_ref, *seg_refs = refs[:num_inputs]
  o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, q_barrier, k_barriers, v_barriers, *staging_smem = (
      refs[num_inputs:])
  staging_smem = staging_smem[0] if staging_smem else None
  block_q, block_k = cfg.block_q, cfg.block_k
  head, q_block, batch = grid_position()
  kv_head, g = index_div(head, group), index_rem(head, group)
  q_start = q_block * block_q
  queries = pl.ds(q_start, block_q)
  num_k_blocks = num_visible_k_blocks(q_start, cfg, k_ref.shape[2] // block_k)

  def fetch(j, slot):
    keys = pl.ds(j * block_k, block_k)
    plgpu.copy_gmem_to_smem(k_ref.at[batch, kv_head, keys], k_smem.at[slot], k_barriers.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, kv_head, keys], v_smem.at[slot], v_barriers.at[slot])

  plgpu.copy_gmem_to_smem(q_ref.at[batch, kv_head, g, queries], q_smem, q_barrier.at[0])
  pl.when(num_k_blocks > 0)(lambda: fetch(0, 0))
  q_seg = load_gmem(seg_refs[0].at[batch, queries], ROWS) if has_segments else None
  plgpu.barrier_wait(q_barrier.at[0])

  def step(j, carry):
    row_max, row_sum, acc = carry
    slot = index_rem(j, 2)
    pl.when(j + 1 < num_k_blocks)(lambda: fetch(j + 1, 1 - slot))
    k_start = j * block_k
    kv_seg = load_gmem(seg_refs[1].at[batch, pl.ds(k_start, block_k)], COLS) if has_segments else None
    plgpu.barrier_wait(k_barriers.at[slot])
    scores = visible_scores(q_smem, k_smem.at[slot], q_start, k_start, cfg, q_seg, kv_seg, True)
    new_max = jnp.maximum(row_max, scores.max(axis=1))
    safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)   # all keys so far masked: keep exp() finite
    probs = jnp.exp(scores - lax.broadcast_in_dim(safe_max, scores.shape, [0]))
    rescale = jnp.exp(row_max - safe_max)
    row_sum = rescale * row_sum + probs.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0])
    plgpu.barrier_wait(v_barriers.at[slot])
    return new_max, row_sum, accumulate(acc, probs, v_smem.at[slot], staging_smem)

  init = (plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), ROWS),
          zeros((block_q,), ROWS), zeros((block_q, q_ref.shape[-1])))
  row_max, row_sum, acc = lax.fori_loop(0, num_k_blocks, step, init)
  empty = row_sum == 0.0
  safe_sum = jnp.where(empty, 1.0, row_sum)
  q_smem[...] = (acc / lax.broadcast_in_dim(safe_sum, acc.shape, [0])).astype(q_smem.dtype)
  lse_smem[...] = jnp.where(empty, jnp.inf, row_max + jnp.log(safe_sum))
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, kv_head, g, queries])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, kv_head, g, queries])
  plgpu.wait_smem_to_gmem(0)


def forward(q, k, v, q_seg, kv_seg, cfg: KernelConfig):
  """q: [b, kvh, g, lq, d]; k, v: [b, kvh, lk, d]; segs [b, lq], [b, lk] or None
  -> o like q, lse: [b, kvh, g, lq] float32."""
  batch, kv_heads, group, q_len_padded, head_dim = q.shape
  has_segments = q_seg is not None
  transforms = tile_transforms(q.dtype)
  scratch = [
      plgpu.SMEM((cfg.block_q, head_dim), q.dtype, transforms=transforms),
      plgpu.SMEM((2, cfg.block_k, head_dim), k.dtype, transforms=transforms),
      plgpu.SMEM((2, cfg.block_k, head_dim), v.dtype, transforms=transforms),
      plgpu.SMEM((cfg.block_q,), jnp.float32),
      plgpu.Barrier(num_barriers=1),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      *staging(cfg, (cfg.block_q, cfg.block_k), q.dtype),
  ]
  out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32))
  body = lambda *refs: _forward_kernel(*refs, cfg=cfg, group=group, has_segments=has_segments)
  grid = (kv_heads * group, q_len_padded // cfg.block_q, batch)
  segments = (q_seg, kv_seg) if has_segments else ()
  return run_kernel(body, cfg, grid, out_type, scratch)(q, k, v, *segments)

