"""The KV cache used for generation: its layout, writes at token positions, attention over it.

Each layer keeps keys transposed, `k: [batch, kv_heads, head_dim, max_len]`, and values
heads-major, `v: [batch, kv_heads, max_len, head_dim]`, so that both products of attention
over the cache are plain batched matmuls: XLA copies no [max_len, head_dim] transpose of the
whole cache on every decode step, as it does for a [batch, max_len, kv_heads, head_dim] cache.
One document per cache row: a token's cache slot is its position. A layer cache with a
"block_table" is paged instead (`maxlm.model.paged_kv`); `write` and `attend` take either.
A third kind, with "context_k", is a packed row of several prompts (segments, branches as
in `layers.attention_mask`) over a context of kept keys and values: a scorer's prompts
continuing ones it scored before (`serving.scoring_cache`); its `write` keeps the row's own.
An int8 cache also keeps `k_scale`, `v_scale: float32 [batch, kv_heads, max_len]`, one per
token and head, as the paged pool does (the eval harness measures that pool's rounding here).
"""

import dataclasses

import jax
import jax.numpy as jnp

from maxlm import quantization
from maxlm.model import layers, paged_kv

LayerCache = dict[str, jax.Array]
KVCache = list[LayerCache]


def empty(num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
          dtype) -> KVCache:
  arrays = {"k": ((batch, kv_heads, head_dim, max_len), dtype),
            "v": ((batch, kv_heads, max_len, head_dim), dtype)}
  if jnp.dtype(dtype) == jnp.int8:
    arrays |= {"k_scale": ((batch, kv_heads, max_len), jnp.float32),
               "v_scale": ((batch, kv_heads, max_len), jnp.float32)}
  return [{name: jnp.zeros(*spec) for name, spec in arrays.items()} for _ in range(num_layers)]


def length(cache: KVCache) -> int:
  """How many positions each row of the cache holds."""
  return cache[0]["v"].shape[2]


def write(layer_cache: LayerCache, k: jax.Array, v: jax.Array,
          positions: jax.Array) -> LayerCache:
  """k, v: [batch, seq, kv_heads, head_dim] written at positions [batch, seq]."""
  if "context_k" in layer_cache:
    return layer_cache | {"k": k, "v": v}
  if "block_table" in layer_cache:
    return paged_kv.write(layer_cache, k, v, positions)
  if "k_scale" in layer_cache:
    return _write_int8(layer_cache, k, v, positions)
  rows = jnp.arange(k.shape[0])[:, None]
  # The two integer indices are apart, so the indexed shape is [batch, seq, kv_heads, head_dim].
  return {"k": layer_cache["k"].at[rows, :, :, positions].set(k.astype(layer_cache["k"].dtype)),
          "v": layer_cache["v"].at[rows, :, positions, :].set(v.astype(layer_cache["v"].dtype))}


def _write_int8(layer_cache: LayerCache, k: jax.Array, v: jax.Array,
                positions: jax.Array) -> LayerCache:
  rows = jnp.arange(k.shape[0])[:, None]
  written = {}
  for name, new in (("k", k), ("v", v)):
    values, scale = quantization.quantize_rows(new)     # scale: [batch, seq, kv_heads, 1]
    at = (rows, slice(None), slice(None), positions) if name == "k" else (
        rows, slice(None), positions, slice(None))
    written[name] = layer_cache[name].at[at].set(values)
    written[f"{name}_scale"] = layer_cache[f"{name}_scale"].at[rows, :, positions].set(
        scale[..., 0])
  return written


def _read(layer_cache: LayerCache, dtype) -> tuple[jax.Array, jax.Array]:
  """(keys, values) in `dtype`, an int8 cache's times their scales."""
  keys, values = layer_cache["k"], layer_cache["v"]
  if "k_scale" not in layer_cache:
    return keys.astype(dtype), values.astype(dtype)
  return ((keys.astype(jnp.float32) * layer_cache["k_scale"][:, :, None, :]).astype(dtype),
          (values.astype(jnp.float32) * layer_cache["v_scale"][..., None]).astype(dtype))


def attend(layer_cache: LayerCache, q: jax.Array, positions: jax.Array) -> jax.Array:
  """Each query attends to every cache slot up to its own position.

  q: [batch, q_len, heads, head_dim]; positions: [batch, q_len]. Returns q's shape.
  """
  if "block_table" in layer_cache:
    return paged_kv.attend(layer_cache, q, positions)
  if "context_k" in layer_cache:
    return _attend_packed_context(layer_cache, q)
  batch, q_len, heads, head_dim = q.shape
  keys, values = _read(layer_cache, q.dtype)
  kv_heads, dtype = keys.shape[1], q.dtype
  grouped_q = (q * head_dim ** -0.5).reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  grouped_q = grouped_q.transpose(0, 2, 3, 1, 4)                          # [b, kv, g, q, d]
  scores = jnp.einsum("bkgqd,bkds->bkgqs", grouped_q, keys).astype(jnp.float32)
  mask = layers.attention_mask(positions, jnp.arange(keys.shape[-1]))     # [b, 1, q, s]
  scores = jnp.where(mask[:, :, None], scores, layers.NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("bkgqs,bksd->bkgqd", probs, values)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)


def _attend_packed_context(layer_cache: LayerCache, q: jax.Array) -> jax.Array:
  """The packed row's queries q [batch, q_len, heads, head_dim] over its context (every
  context key whose "context_owner" is the query's "context_ids": kept keys all come before
  the queries that continue them) and its own keys (causal, within segments and branches,
  in query blocks as `layers.causal_attention`). The context: "context_k", "context_v"
  [batch, context_len, kv_heads, head_dim] and "context_owner" [batch, context_len], -1 at
  the padding; a query of context id 0 sees none of it.

  With "windows" (`PackedWindows`), each block of queries takes only the keys its queries
  can see: its own segments' from `lookback` before the block, and `context_window` of the
  context from the block's `context_start`; the rest of the row and of the context would be
  masked scores (lm-eval's HellaSwag-shaped requests of 32 prompts on runs/tiny, whose
  packs of 384-704 tokens see 256-1,024 kept ones: 396 ms of forwards a pass without
  windows, 324-335 with)."""
  windows = layer_cache.get("windows")
  if windows is None or windows.whole(q.shape[1], layer_cache["context_k"].shape[1]):
    segments, branches = layer_cache["segment_ids"], layer_cache["branch_ids"]
    index = jnp.broadcast_to(jnp.arange(q.shape[1]), segments.shape)
    mask = jnp.concatenate([
        (layer_cache["context_owner"][:, None, None, :]
         == layer_cache["context_ids"][:, None, :, None]),
        layers.attention_mask(index, index[0], segments, segments, None, None, branches,
                              branches)], axis=-1)                         # [b, 1, q, s]
    keys, values = (jnp.concatenate([layer_cache[f"context_{name}"], layer_cache[name]], axis=1)
                    .astype(q.dtype) for name in ("k", "v"))
    return layers.query_blocked_attention(q, keys, values, mask, 128)
  return _attend_in_windows(layer_cache, q, windows)


def _attend_in_windows(layer_cache: LayerCache, q: jax.Array,
                       windows: "PackedWindows") -> jax.Array:
  """`_attend_packed_context` with each block of queries over its windows of keys, the
  blocks batched: one program whatever their count (unrolled, the 14 programs of the pass
  above compiled in 59 s, not 12; a loop over the blocks ran 1.3x slower)."""
  block, length, batch = windows.query_block, q.shape[1], q.shape[0]
  padded = -(-length // block) * block
  q, keys, values, segments, branches, context_ids = (
      jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
      for x in (q, layer_cache["k"], layer_cache["v"], layer_cache["segment_ids"],
                layer_cache["branch_ids"], layer_cache["context_ids"]))
  own = min(windows.lookback + block, padded)  # a block's keys of the row, up to its end
  index = jnp.arange(padded)[None]

  def block_attention(number, context_start):
    start = number * block
    first_key = jnp.clip(start + block - own, 0, padded - own)
    def queries(x):  # [batch, padded, ...] -> the block's [batch, block, ...]
      return jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)
    def row_keys(x):
      return jax.lax.dynamic_slice_in_dim(x, first_key, own, axis=1)
    def context(x):
      return jax.lax.dynamic_slice_in_dim(x, context_start, windows.context_window, axis=1)
    mask = jnp.concatenate([
        context(layer_cache["context_owner"])[:, None, None, :]
        == queries(context_ids)[:, None, :, None],
        layers.attention_mask(jnp.broadcast_to(queries(index), (batch, block)),
                              row_keys(index)[0], queries(segments), row_keys(segments),
                              None, None, queries(branches), row_keys(branches))], axis=-1)
    block_keys, block_values = (
        jnp.concatenate([context(layer_cache[f"context_{name}"]), row_keys(x)], axis=1)
        .astype(q.dtype) for name, x in (("k", keys), ("v", values)))
    return layers.query_blocked_attention(queries(q), block_keys, block_values, mask, block)

  out = jax.vmap(block_attention)(jnp.arange(padded // block), windows.context_start)
  return out.swapaxes(0, 1).reshape(q.shape)[:, :length]


@dataclasses.dataclass(frozen=True)
class PackedWindows:
  """Which keys each block of `query_block` queries of a packed row attends to: the row's
  own from `lookback` before the block's first query, and `context_window` keys of the
  context from `context_start` [blocks] on (`serving.scoring_cache.attention_windows`)."""
  query_block: int
  lookback: int
  context_window: int
  context_start: jax.Array

  def whole(self, width: int, context_width: int) -> bool:
    """Whether every block's windows are the whole row and context: then the row attends in
    causal blocks of 128 queries, without a copy of the row's keys for each block."""
    return self.lookback >= width - self.query_block and self.context_window >= context_width
