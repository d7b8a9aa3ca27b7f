"""The paged KV cache: one pool of fixed-size blocks per layer, read through block tables.

A sequence's positions live in the blocks its row of the block table names, in order:
position p is slot `p % block_size` of block `table[p // block_size]`. Block 0 is never handed
to a sequence (see `serving.kv_pages`): table entries past a sequence's own blocks name it, so
what lands there (a prefill's padding, an empty batch row) sits in a block that every query
reads only under its causal mask.

A layer's paged cache is `{"k", "v": [kv_heads, num_blocks, block_size, head_dim],
"block_table": int32 [batch, width]}`, and for an int8 pool `"k_scale", "v_scale": float32
[kv_heads, num_blocks, block_size]` (one per token and head: quantized on write, applied on
read); `kv_cache.write` and `kv_cache.attend` dispatch here
when a layer cache has a block table, so the model runs unchanged over either layout. Heads
lead so that one head's block is one contiguous [block_size, head_dim] tile, indexed by
leading axes only: what a kernel loads per step (`kernels_pallas.paged_attention`).
"""

import jax
import jax.numpy as jnp

import kernels_pallas
from maxlm import quantization
from maxlm.model import layers

LayerPool = dict[str, jax.Array]
TRASH_BLOCK = 0
# Blocks a CPU decode step reads per loop iteration: a chunk's keys and values stay in cache.
DECODE_CHUNK_BLOCKS = 4
# Positions a prefill chunk reads per loop iteration at the least (see prefill_chunk_blocks).
PREFILL_CHUNK_POSITIONS = 128


def empty(num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
          dtype) -> list[LayerPool]:
  shape = (kv_heads, num_blocks, block_size, head_dim)
  arrays = {"k": (shape, dtype), "v": (shape, dtype)}
  if jnp.dtype(dtype) == jnp.int8:
    arrays |= {"k_scale": (shape[:-1], jnp.float32), "v_scale": (shape[:-1], jnp.float32)}
  # Each layer's arrays are its own buffers: the jitted steps donate them.
  return [{name: jnp.zeros(*spec) for name, spec in arrays.items()} for _ in range(num_layers)]


def with_tables(pools: list[LayerPool], block_table: jax.Array) -> list[LayerPool]:
  """The model's cache argument: every layer reads through the same block table."""
  return [{**pool, "block_table": block_table} for pool in pools]


def without_tables(cache: list[LayerPool]) -> list[LayerPool]:
  return [{name: array for name, array in layer.items() if name != "block_table"}
          for layer in cache]


def block_bytes(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype) -> int:
  """Bytes one block takes over all layers, keys and values (and an int8 pool's scales)."""
  scale_bytes = 4 if jnp.dtype(dtype) == jnp.int8 else 0
  token_bytes = head_dim * jnp.dtype(dtype).itemsize + scale_bytes
  return 2 * num_layers * block_size * kv_heads * token_bytes


def encoded(pool: LayerPool, name: str, rows: jax.Array) -> LayerPool:
  """What storing rows [..., head_dim] of keys or values (`name`) writes into `pool`'s
  arrays: {name: rows in the pool's dtype}, and for an int8 pool their scales too."""
  if f"{name}_scale" not in pool:
    return {name: rows.astype(pool[name].dtype)}
  values, scale = quantization.quantize_rows(rows)
  return {name: values, f"{name}_scale": scale[..., 0]}


def _addresses(block_table: jax.Array, positions: jax.Array, block_size: int):
  """(block, offset) of each position [batch, seq] through the table [batch, width]."""
  index = jnp.minimum(positions // block_size, block_table.shape[1] - 1)
  return jnp.take_along_axis(block_table, index, axis=1), positions % block_size


def write(layer: LayerPool, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerPool:
  """k, v: [batch, seq, kv_heads, head_dim] written at positions [batch, seq]."""
  blocks, offsets = _addresses(layer["block_table"], positions, layer["k"].shape[2])
  # The two index arrays are adjacent, so the indexed shape is [kv_heads, batch, seq, head_dim].
  written = dict(layer)
  for name, new in (("k", k), ("v", v)):
    for key, rows in encoded(layer, name, new.transpose(2, 0, 1, 3)).items():
      written[key] = layer[key].at[:, blocks, offsets].set(rows)
  return written


def gathered(pool: jax.Array, block_table: jax.Array) -> jax.Array:
  """pool [kv_heads, blocks, block_size, head_dim] -> each row's positions in order,
  [kv_heads, batch, width * block_size, head_dim]."""
  rows = pool[:, block_table]
  return rows.reshape(*rows.shape[:2], -1, rows.shape[-1])


def attend(layer: LayerPool, q: jax.Array, positions: jax.Array) -> jax.Array:
  """Each query attends to its row's positions up to its own, read through the table: a decode
  step (one query per row) on GPU by the ragged Pallas kernel, elsewhere (and a prefill chunk
  everywhere) a chunk of blocks at a time, up to the furthest position's chunk only.

  q: [batch, q_len, heads, head_dim]; positions: [batch, q_len]. Returns q's shape.
  """
  if q.shape[1] > 1:
    return chunked_attend(layer, q, positions, prefill_chunk_blocks(q.shape[1],
                                                                     layer["k"].shape[2]))
  if "k_scale" in layer:  # the kernel reads float pools only
    return chunked_attend(layer, q, positions)
  return jax.lax.platform_dependent(layer, q, positions, cuda=_kernel_attend,
                                    default=chunked_attend)


def _kernel_attend(layer: LayerPool, q: jax.Array, positions: jax.Array) -> jax.Array:
  out = kernels_pallas.paged_attention(q[:, 0], layer["k"], layer["v"], layer["block_table"],
                                       positions[:, 0] + 1)
  return out[:, None]


def prefill_chunk_blocks(q_len: int, block_size: int) -> int:
  """Blocks a prefill chunk of `q_len` queries reads per loop iteration: at least its own
  length (a prompt's first chunk is one iteration, one batched matmul as a gather of its
  blocks would be) and at least PREFILL_CHUNK_POSITIONS (a short chunk deep in a long prompt
  takes a few iterations, not one per block)."""
  return -(-max(q_len, PREFILL_CHUNK_POSITIONS) // block_size)


def chunked_attend(layer: LayerPool, q: jax.Array, positions: jax.Array,
                   chunk_blocks: int = DECODE_CHUNK_BLOCKS) -> jax.Array:
  """`attend` with an online softmax over chunks of `chunk_blocks` blocks, up to the chunk of
  the batch's furthest position only: a step or a prefill chunk reads the blocks in use, not
  the table's padded width (so one compiled program serves every table width's worth of
  context), and never copies every row's keys at once (on CPU that copy, not the arithmetic,
  is what a wide table costs)."""
  batch, q_len, heads, head_dim = q.shape
  dtype, score_dtype = q.dtype, jnp.promote_types(q.dtype, jnp.float32)
  kv_heads, block_size = layer["k"].shape[0], layer["k"].shape[2]
  table = _padded_to_chunks(layer["block_table"], chunk_blocks)
  chunk = chunk_blocks * block_size
  group = heads // kv_heads
  # A row's queries and the heads sharing a kv head are one axis, so a decode step (q_len 1)
  # runs the same 4-d einsums as before prefill chunks took this path.
  grouped_q = (q * head_dim ** -0.5).reshape(batch, q_len, kv_heads, group, head_dim)
  grouped_q = grouped_q.transpose(2, 0, 1, 3, 4).reshape(kv_heads, batch, q_len * group,
                                                         head_dim)          # [kv, b, q*g, d]

  def add_chunk(index, carry):
    running_max, total, weighted = carry
    blocks = jax.lax.dynamic_slice_in_dim(table, index * chunk_blocks, chunk_blocks, axis=1)
    part = {**layer, "block_table": blocks}
    keys, values = (_gathered_rows(part, name, dtype) for name in ("k", "v"))  # [kv, b, c, d]
    scores = jnp.einsum("kbgd,kbsd->kbgs", grouped_q, keys).astype(score_dtype)
    seen = index * chunk + jnp.arange(chunk) <= positions[..., None]      # [b, q, c]
    seen = jnp.repeat(seen, group, axis=1)                                 # [b, q*g, c]
    scores = jnp.where(seen[None], scores, layers.NEG_INF)
    new_max = jnp.maximum(running_max, scores.max(axis=-1))
    rescale = jnp.exp(running_max - new_max)
    probs = jnp.exp(scores - new_max[..., None])
    chunk_out = jnp.einsum("kbgs,kbsd->kbgd", probs.astype(dtype), values)
    return (new_max, total * rescale + probs.sum(axis=-1),
            weighted * rescale[..., None] + chunk_out.astype(score_dtype))

  # Chunk 0 holds position 0, which every query sees: the running max is a real score after it.
  start = (jnp.full(grouped_q.shape[:-1], layers.NEG_INF, score_dtype),
           jnp.zeros(grouped_q.shape[:-1], score_dtype),
           jnp.zeros(grouped_q.shape, score_dtype))
  # A prefill chunk's padding queries (past its real tokens) count too: at most one more chunk.
  chunks = jnp.minimum(positions.max() // chunk + 1, table.shape[1] // chunk_blocks)
  _, total, weighted = jax.lax.fori_loop(0, chunks, add_chunk, start)
  out = (weighted / total[..., None]).astype(dtype)                      # [kv, b, q*g, d]
  out = out.reshape(kv_heads, batch, q_len, group, head_dim).transpose(1, 2, 0, 3, 4)
  return out.reshape(batch, q_len, heads, head_dim)


def _padded_to_chunks(block_table: jax.Array, chunk_blocks: int) -> jax.Array:
  """The table widened with trash blocks to a whole number of chunks."""
  padding = -block_table.shape[1] % chunk_blocks
  return jnp.pad(block_table, ((0, 0), (0, padding)), constant_values=TRASH_BLOCK)


def gathered_attend(layer: LayerPool, q: jax.Array, positions: jax.Array) -> jax.Array:
  """`attend` by gathering each row's blocks, the table's whole width, into one padded
  sequence: the reference the ragged kernel is tested against."""
  batch, q_len, heads, head_dim = q.shape
  dtype = q.dtype
  keys, values = (_gathered_rows(layer, name, dtype) for name in ("k", "v"))
  kv_heads = keys.shape[0]
  grouped_q = (q * head_dim ** -0.5).reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("bqkgd,kbsd->bkgqs", grouped_q, keys)
  scores = scores.astype(jnp.promote_types(dtype, jnp.float32))  # bf16 softmax in float32
  mask = layers.attention_mask(positions, jnp.arange(keys.shape[2]))     # [b, 1, q, s]
  scores = jnp.where(mask[:, :, None], scores, layers.NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("bkgqs,kbsd->bqkgd", probs, values)
  return out.reshape(batch, q_len, heads, head_dim)


def _gathered_rows(layer: LayerPool, name: str, dtype) -> jax.Array:
  """`gathered` keys or values in `dtype`, an int8 pool's times their scales."""
  rows = gathered(layer[name], layer["block_table"])
  if f"{name}_scale" not in layer:
    return rows.astype(dtype)
  scale = gathered(layer[f"{name}_scale"][..., None], layer["block_table"])
  return (rows.astype(jnp.float32) * scale).astype(dtype)
