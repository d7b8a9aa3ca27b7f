"""Pallas kernel bodies and `pallas_call` builders for flash attention.

Kernel layout (the wrapper in `flash_attention.py` transposes and pads into it):
  q, do, o:       [batch, kv_heads, group, q_len_padded, head_dim]  (query head = kv_head * group + g)
  k, v:           [batch, kv_heads, kv_len_padded, head_dim]
  lse, delta:     [batch, kv_heads, group, q_len_padded, 1]  (column form; row form is a free reshape)
  q segment ids:  [batch, q_len_padded, 1]; kv segment ids: [batch, 1, kv_len_padded]

Backend notes (only interpret mode is tested here; no accelerator was available):
- Forward and dq keep one kv head's whole K/V (and kv segment ids) of one batch row resident in fast
  memory and loop over it. On TPU those blocks are single-buffered (`whole_sequence_mode`), so VMEM
  bounds kv_len at roughly kv_len * head_dim * 2 arrays * itemsize: about 8.3M of v5e's default 16M
  scoped VMEM at 32768 tokens, head_dim 64, bf16 (deviceless compile). Longer contexts want a kv grid
  axis with scratch accumulators there too.
- dk/dv on TPU and in interpret mode iterates (query head of the group, q block) as the innermost,
  sequential grid axes, with float32 VMEM accumulators, so its VMEM does not grow with the length.
  Triton runs grid programs in parallel, where outputs revisited across the grid would race: there
  dk/dv keeps the kv head's whole Q/dO resident and loops over it (`KernelConfig.triton`).
- Triton needs power-of-two block shapes (and head_dim) of at least 16 for `dot`. TPU wants block_q and
  block_k multiples of 128: the kernels slice segment ids and the dk/dv kernel's lse/delta rows along the
  lane dimension at block offsets, which Mosaic handles best (or only) when 128-aligned.
- On GPU, `pallas_call` without compiler params lowers through Pallas-Triton, which JAX 0.12 marks
  deprecated in favour of Mosaic GPU. `flash_attention` runs these kernels on CUDA only for the calls the
  Mosaic GPU (wgmma) kernels in `flash_attention_mosaic_gpu.py` decline; see `flash_attention.py`.
- Lowering of forward, dq and dk/dv to TPU Mosaic and Triton is checked offline in the tests (via
  `jax.export` with an abstract device); `benchmarks/aot_compile.py` runs libtpu's compiler on them
  deviceless. No kernel here has run on an accelerator.
- Forward and dq mark their grid axes "parallel" on TPU (`independent_programs`), so megacore chips
  split them over both TensorCores; dk/dv marks its batch, kv head and k block axes.
- Running max/sum are kept as [block_q, 1] float32 columns; TPU pads those to 128 lanes, which is a
  layout cost, not a correctness one.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


BLOCK_ID_BITS = 16   # packed ids (`layout.pack_ids`): segment id above, block or branch id below
BLOCK_ID_MASK = (1 << BLOCK_ID_BITS) - 1


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static facts of one call: hashable, so it can ride in `custom_vjp`'s nondiff args."""
  sm_scale: float
  causal: bool
  block_q: int
  block_k: int
  q_len: int          # real (unpadded) lengths
  kv_len: int
  interpret: bool
  triton: bool = False   # lowering through Triton: grid programs run in parallel (see backward's dk/dv)
  bidirectional: bool = False  # segment ids carry bidirectional blocks (`layout.pack_ids`)
  branches: bool = False  # segment ids carry branch ids (`layout.pack_ids`)

  @property
  def packed(self) -> bool:
    """Whether the segment ids hold a second id in their low bits (`layout.pack_ids`)."""
    return self.bidirectional or self.branches

  @property
  def skips_blocks(self) -> bool:
    """Whether loops stop at the causal diagonal; a bidirectional block may reach past it."""
    return self.causal and not self.bidirectional

  @property
  def causal_offset(self) -> int:
    """Query i sees keys j <= i + causal_offset (causal aligned to the end of the keys)."""
    return self.kv_len - self.q_len


def scaled_scores(a, b, sm_scale):
  """a: [m, d], b: [n, d] -> a @ b.T * sm_scale in float32: [m, n]."""
  dims = (((1,), (1,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32) * sm_scale


def matmul_f32(a, b):
  """a: [m, n], b: [n, d] -> a @ b in float32 (a is cast to b's dtype first, as MXU/tensor cores want)."""
  return jnp.dot(a.astype(b.dtype), b, preferred_element_type=jnp.float32)


def visible_pairs(q_pos, k_pos, q_seg, kv_seg, cfg: KernelConfig):
  """Which (query, key) pairs may attend; positions are int32 arrays of one shape, segments broadcast.

  With `cfg.bidirectional` the segment ids are packed (`layout.pack_ids`): a query also sees the keys
  of its own nonzero bidirectional block, past the causal diagonal. With `cfg.branches` they carry
  branch ids instead: a query sees only keys of branch 0 or of its own branch.
  Returns a bool array of that shape, or None when nothing is masked.
  """
  visible = None

  def both(a, b):
    return b if a is None else a & b

  if cfg.kv_len % cfg.block_k:
    visible = both(visible, k_pos < cfg.kv_len)
  if cfg.causal:
    seen = k_pos <= q_pos + cfg.causal_offset
    if cfg.bidirectional:
      q_block, kv_block = q_seg & BLOCK_ID_MASK, kv_seg & BLOCK_ID_MASK
      seen = seen | ((q_block == kv_block) & (q_block != 0))
    visible = both(visible, seen)
  if q_seg is not None and cfg.packed:
    visible = both(visible, (q_seg >> BLOCK_ID_BITS) == (kv_seg >> BLOCK_ID_BITS))
  elif q_seg is not None:
    visible = both(visible, q_seg == kv_seg)
  if q_seg is not None and cfg.branches:
    kv_branch = kv_seg & BLOCK_ID_MASK
    visible = both(visible, (kv_branch == 0) | (kv_branch == (q_seg & BLOCK_ID_MASK)))
  return visible


def tile_positions(row_start, col_start, shape):
  """Absolute row and column indices of a [rows, cols] tile starting at (row_start, col_start)."""
  rows = row_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = col_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  return rows, cols


def mask_scores(scores, visible):
  return scores if visible is None else jnp.where(visible, scores, -jnp.inf)


def index_div(index, divisor):
  """index // divisor for a non-negative int index (program id, loop counter). The divisor takes
  the index's dtype: under jax_enable_x64 a Python int becomes int64, and lax.div wants the
  dtypes equal."""
  return jax.lax.div(index, jax.lax.convert_element_type(divisor, jnp.result_type(index)))


def index_rem(index, divisor):
  """index % divisor for a non-negative int index, dtype-consistent under x64 as in `index_div`."""
  return jax.lax.rem(index, jax.lax.convert_element_type(divisor, jnp.result_type(index)))


def num_visible_k_blocks(q_start, cfg: KernelConfig, num_k_blocks: int):
  """Key blocks [0, n) hold every key some query in [q_start, q_start + block_q) may see."""
  if not cfg.skips_blocks:
    return num_k_blocks
  last_key_end = q_start + cfg.block_q + cfg.causal_offset
  n = index_div(jnp.maximum(last_key_end, 0) + cfg.block_k - 1, cfg.block_k)
  return jnp.minimum(n, num_k_blocks)


def split_refs(refs, num_inputs, has_segments):
  """(inputs, q_seg_ref, kv_seg_ref, outputs); the segment refs are None without segment ids."""
  inputs, rest = refs[:num_inputs], refs[num_inputs:]
  if has_segments:
    return inputs, rest[0], rest[1], rest[2:]
  return inputs, None, None, rest


def _forward_kernel(*refs, cfg: KernelConfig, has_segments: bool):
  """One (batch, head, q block): online softmax over the visible key blocks.

  q_ref: [block_q, d]; k_ref, v_ref: [kv_len_padded, d] -> o_ref: [block_q, d], lse_ref: [block_q, 1].
  """
  (q_ref, k_ref, v_ref), q_seg_ref, kv_seg_ref, (o_ref, lse_ref) = split_refs(refs, 3, has_segments)
  block_q, head_dim = q_ref.shape
  q_start = pl.program_id(2) * block_q
  q = q_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]

  def step(j, carry):
    row_max, row_sum, acc = carry
    k_start = pl.multiple_of(j * cfg.block_k, cfg.block_k)
    keys = pl.ds(k_start, cfg.block_k)
    q_pos, k_pos = tile_positions(q_start, k_start, (block_q, cfg.block_k))
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[:, keys]
    scores = mask_scores(scaled_scores(q, k_ref[keys, :], cfg.sm_scale), visible_pairs(q_pos, k_pos, q_seg, kv_seg, cfg))
    new_max = jnp.maximum(row_max, scores.max(axis=1, keepdims=True))
    safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)   # all keys so far masked: keep exp() finite
    probs = jnp.exp(scores - safe_max)
    rescale = jnp.exp(row_max - safe_max)
    row_sum = rescale * row_sum + probs.sum(axis=1, keepdims=True)
    acc = rescale * acc + matmul_f32(probs, v_ref[keys, :])
    return new_max, row_sum, acc

  init = (jnp.full((block_q, 1), -jnp.inf, jnp.float32),
          jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros((block_q, head_dim), jnp.float32))
  num_k_blocks = num_visible_k_blocks(q_start, cfg, k_ref.shape[0] // cfg.block_k)
  row_max, row_sum, acc = jax.lax.fori_loop(0, num_k_blocks, step, init)
  empty = row_sum == 0.0   # a query that sees no key: output 0, lse +inf so backward probs are 0
  o_ref[...] = (acc / jnp.where(empty, 1.0, row_sum)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, row_max + jnp.log(jnp.where(empty, 1.0, row_sum)))


def query_head_spec(block_q, head_dim, group):
  """Block of one query head's q block from [b, kv_heads, group, q_len, d] on grid (b, head, q block)."""
  return pl.BlockSpec((None, None, None, block_q, head_dim),
                      lambda b, h, i: (b, h // group, h % group, i, 0))


def whole_sequence_mode(cfg: KernelConfig):
  """Pipeline mode of the blocks that hold a whole sequence. Their block changes only with the head, so
  prefetching the next one buys little, and on TPU one VMEM buffer instead of Pallas's default two
  halves what bounds the length (Mosaic). Triton takes no pipeline mode."""
  return None if cfg.triton else pl.Buffered(1)


def independent_programs(cfg: KernelConfig, grid_axes: int):
  """Compiler params for a grid whose every program writes its own output block: Mosaic may then
  split it across a chip's TensorCores (v4, v5p megacore), which it does not for its default,
  sequential ("arbitrary") grid axes. Triton runs every grid program in parallel anyway."""
  return None if cfg.triton else pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_axes)


def whole_kv_spec(kv_len_padded, head_dim, group, cfg: KernelConfig):
  """All of one KV head's keys (or values) [b, kv_heads, kv_len, d] on grid (b, query head, q block)."""
  return pl.BlockSpec((None, None, kv_len_padded, head_dim), lambda b, h, i: (b, h // group, 0, 0),
                      pipeline_mode=whole_sequence_mode(cfg))


def segment_specs(block_q, kv_len_padded, cfg: KernelConfig):
  """q segment ids [b, q_len, 1] by q block and kv segment ids [b, 1, kv_len] whole, grid (b, head, q block)."""
  return [pl.BlockSpec((None, block_q, 1), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((None, 1, kv_len_padded), lambda b, h, i: (b, 0, 0),
                       pipeline_mode=whole_sequence_mode(cfg))]


def forward(q, k, v, q_seg, kv_seg, cfg: KernelConfig):
  """q: [b, kvh, g, lq, d]; k, v: [b, kvh, lk, d]; segs or None -> o like q, lse: [b, kvh, g, lq, 1] f32."""
  batch, kv_heads, group, q_len_padded, head_dim = q.shape
  kv_len_padded = k.shape[2]
  has_segments = q_seg is not None
  kv_spec = whole_kv_spec(kv_len_padded, head_dim, group, cfg)
  in_specs = [query_head_spec(cfg.block_q, head_dim, group), kv_spec, kv_spec]
  if has_segments:
    in_specs += segment_specs(cfg.block_q, kv_len_padded, cfg)
  kernel = pl.pallas_call(
      lambda *refs: _forward_kernel(*refs, cfg=cfg, has_segments=has_segments),
      grid=(batch, kv_heads * group, q_len_padded // cfg.block_q),
      in_specs=in_specs,
      out_specs=[query_head_spec(cfg.block_q, head_dim, group), query_head_spec(cfg.block_q, 1, group)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(q.shape[:-1] + (1,), jnp.float32)],
      compiler_params=independent_programs(cfg, 3),
      interpret=cfg.interpret,
      name="flash_attention_forward",
  )
  segments = (q_seg, kv_seg) if has_segments else ()
  return kernel(q, k, v, *segments)
