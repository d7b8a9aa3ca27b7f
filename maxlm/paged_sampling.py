"""Generation over the paged KV cache: `sampling`'s insert and decode step, batch set by memory.

A `PagedState` holds the pool (see `maxlm.model.paged_kv`) and, per decode slot, the token to
feed next and how to sample it; which blocks a slot's positions live in is the host's business
(`serving.kv_pages`), passed to each call as a block table. A decode step runs only the rows
it is given (`rows`: slot ids, padded to a compiled batch size with the extra slot at index
`slots`, whose table rows name the trash block only), so empty slots cost nothing.
A prefill is `sampling.prefill` unchanged, whose cache rows `insert` copies into blocks, or
`prefill_fn`, which writes one chunk of a prompt into the pool after the positions already
there (a shared prefix, the chunks before).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from maxlm.model import ModelConfig, paged_kv
from maxlm.sampling import Prefix, TokenChoice, choose, seed_key


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedState:
  """The pool and every slot's next token and settings; arrays have slots + 1 rows, the last
  one for padding rows."""
  pools: list[paged_kv.LayerPool]
  tokens: jax.Array       # int32 [slots + 1]: the last token chosen, fed by the next step
  positions: jax.Array    # int32 [slots + 1]: the position of `tokens`
  seeds: jax.Array        # uint32 [slots + 1, 2]
  temperature: jax.Array  # float32 [slots + 1]
  top_p: jax.Array        # float32 [slots + 1]
  top_k: jax.Array        # int32 [slots + 1]


def init_state(config: ModelConfig, slots: int, num_blocks: int, block_size: int,
               kv_dtype=None) -> PagedState:
  """`kv_dtype`: the pool's (int8 keeps a scale per token and head); None: the compute dtype."""
  rows = slots + 1
  return PagedState(
      pools=paged_kv.empty(config.num_layers, num_blocks, block_size, config.num_kv_heads,
                           config.head_dim, jnp.dtype(kv_dtype or config.dtype)),
      tokens=jnp.zeros((rows,), jnp.int32), positions=jnp.zeros((rows,), jnp.int32),
      seeds=jnp.zeros((rows, 2), jnp.uint32), temperature=jnp.zeros((rows,), jnp.float32),
      top_p=jnp.ones((rows,), jnp.float32), top_k=jnp.zeros((rows,), jnp.int32))


def _as_blocks(rows: jax.Array, block_size: int) -> jax.Array:
  """[kv_heads, positions, head_dim] -> [kv_heads, blocks, block_size, head_dim], zero-padded."""
  padding = math.ceil(rows.shape[1] / block_size) * block_size - rows.shape[1]
  rows = jnp.pad(rows, ((0, 0), (0, padding), (0, 0)))
  return rows.reshape(rows.shape[0], -1, block_size, rows.shape[-1])


def insert_fn(prefix: Prefix, state: PagedState, slot, block_row) -> PagedState:
  """Copies a prefill's cache rows into the blocks `block_row` names (int32
  [ceil(bucket / block_size)], trash past the prompt's blocks) and readies `slot`."""
  block_size = state.pools[0]["k"].shape[2]

  def put(pool, layer_cache):
    keys = layer_cache["k"][0].transpose(0, 2, 1)    # [kv, d, bucket] -> [kv, bucket, d]
    written = dict(pool)
    for name, rows in (("k", keys), ("v", layer_cache["v"][0])):
      for key, stored in paged_kv.encoded(pool, name, _as_blocks(rows, block_size)).items():
        written[key] = pool[key].at[:, block_row].set(stored)
    return written

  return PagedState(
      pools=[put(pool, layer) for pool, layer in zip(state.pools, prefix.cache)],
      tokens=state.tokens.at[slot].set(prefix.choice.token[0]),
      positions=state.positions.at[slot].set(prefix.position),
      seeds=state.seeds.at[slot].set(prefix.seed),
      temperature=state.temperature.at[slot].set(prefix.temperature),
      top_p=state.top_p.at[slot].set(prefix.top_p),
      top_k=state.top_k.at[slot].set(prefix.top_k))


def prefill_fn(graphdef, params, state: PagedState, chunk, start, length, block_table, slot,
               seed, temperature, top_p, top_k) -> tuple[PagedState, TokenChoice]:
  """Prefills one chunk of a prompt straight into the pool: chunk [1, bucket] holds the
  tokens of positions start.. (`length` of them real, then padding), which attend to the
  positions before them (a shared prefix, earlier chunks) through block_table [1, width],
  width * block_size >= start + bucket. Readies `slot` as `insert_fn` does; the choice (one
  row) is the prompt's first new token when this chunk ends the prompt.

  The padding writes past the chunk's real positions, into the slot's own blocks (which the
  next chunk or decode step overwrites before any query reads them) or the trash block."""
  model = nnx.merge(graphdef, params)
  positions = start + jnp.arange(chunk.shape[1], dtype=jnp.int32)[None]
  cache = paged_kv.with_tables(state.pools, block_table)
  last = jnp.reshape(length - 1, (1,))
  logits, cache = model(chunk, positions, cache=cache, logits_at=last)
  end = start + length
  choice = choose(logits[:, 0], jax.random.fold_in(seed_key(seed), end - 1), temperature,
                  top_p, top_k)
  return PagedState(
      pools=paged_kv.without_tables(cache),
      tokens=state.tokens.at[slot].set(choice.token[0]),
      positions=state.positions.at[slot].set(end),
      seeds=state.seeds.at[slot].set(seed),
      temperature=state.temperature.at[slot].set(temperature),
      top_p=state.top_p.at[slot].set(top_p),
      top_k=state.top_k.at[slot].set(top_k)), choice


def step_fn(graphdef, params, state: PagedState, rows, block_table
            ) -> tuple[PagedState, TokenChoice]:
  """Advances the slots `rows` [batch] by one token, reading through block_table
  [batch, width]. The choice comes back indexed by slot ([slots + 1] rows; others zero)."""
  model = nnx.merge(graphdef, params)
  last_position = block_table.shape[1] * state.pools[0]["k"].shape[2] - 1
  positions = jnp.minimum(state.positions[rows], last_position)
  # Padding rows sit at position 0: the step's attention reads up to its furthest position.
  positions = jnp.where(rows == state.tokens.shape[0] - 1, 0, positions)
  cache = paged_kv.with_tables(state.pools, block_table)
  logits, cache = model(state.tokens[rows][:, None], positions[:, None], cache=cache)
  keys = jax.vmap(lambda seed, position: jax.random.fold_in(seed_key(seed), position))(
      state.seeds[rows], positions)
  choice = choose(logits[:, 0], keys, state.temperature[rows], state.top_p[rows],
                  state.top_k[rows])
  by_slot = jax.tree.map(
      lambda x: jnp.zeros((state.tokens.shape[0], *x.shape[1:]), x.dtype).at[rows].set(x), choice)
  return dataclasses.replace(state, pools=paged_kv.without_tables(cache),
                             tokens=state.tokens.at[rows].set(choice.token),
                             positions=state.positions.at[rows].set(positions + 1)), by_slot


def bind(graphdef):
  """(insert, step) jitted, `step` with `graphdef` closed over; both donate the state."""
  return (jax.jit(insert_fn, donate_argnums=(1,)),
          jax.jit(functools.partial(step_fn, graphdef), donate_argnums=(1,)))


def bind_prefill(graphdef):
  """`prefill_fn` jitted with `graphdef` closed over, donating the state."""
  return jax.jit(functools.partial(prefill_fn, graphdef), donate_argnums=(1,))
