"""Next-token sampling and KV-cached generation, shared by the trainer's sample and serving.

Generation never recomputes the prefix: one jitted prefill per prompt-length bucket writes the
prompt into a fixed-length cache, then one jitted decode step feeds one token at a time.
The prompt is padded up to a power-of-two bucket so a handful of compilations cover every
length. The padding is harmless: pad tokens land in cache slots P..bucket-1, which no real
token attends to (a query at position p sees slots <= p), and the decode step at position p
overwrites slot p before any query can see it.
"""

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxlm.model import ModelConfig, init_kv_cache

MIN_PREFILL_BUCKET = 16
PAD_ID = 0


def nucleus_mask(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
  """The smallest set of most likely tokens whose probability reaches `top_p`.

  logits: [batch, vocab]; returns bool [batch, vocab]. The most likely token is always kept,
  and `top_p >= 1` keeps everything (rounding in the cumulative sum never drops a tail token).
  """
  order = jnp.argsort(-logits, axis=-1)
  sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
  probability_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = probability_before < top_p
  rank = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(keep_sorted, rank, axis=-1) | (top_p >= 1.0)


def sample_next(logits: jax.Array, key: jax.Array, temperature: jax.Array | float,
                top_p: jax.Array | float) -> jax.Array:
  """logits: [batch, vocab] -> token ids int32 [batch].

  temperature 0 is greedy (argmax); otherwise logits are divided by the temperature and
  sampled from the `top_p` nucleus. Both may be traced scalars, so one compilation serves
  every request's settings.
  """
  greedy = jnp.argmax(logits, axis=-1)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  nucleus_logits = jnp.where(nucleus_mask(scaled, top_p), scaled, -jnp.inf)
  sampled = jax.random.categorical(key, nucleus_logits, axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def seed_key(seed: int) -> jax.Array:
  """A key from any int seed; `jax.random.key` alone keeps only 32 bits when x64 is off."""
  return jax.random.fold_in(jax.random.key(seed & 0xFFFFFFFF), (seed >> 32) & 0xFFFFFFFF)


def context_length(config: ModelConfig, max_len: int | None = None) -> int:
  """Cache length: the model's context, optionally capped to save memory."""
  return config.max_seq_len if max_len is None else min(config.max_seq_len, max_len)


def prefill_bucket(prompt_len: int, cache_len: int) -> int:
  """Power-of-two padded prompt length (at least MIN_PREFILL_BUCKET, at most the cache)."""
  bucket = max(MIN_PREFILL_BUCKET, 1 << (prompt_len - 1).bit_length())
  return min(bucket, cache_len)


def prefill_buckets(cache_len: int) -> list[int]:
  """Every bucket `prefill_bucket` can return for this cache, smallest first."""
  buckets = [prefill_bucket(1, cache_len)]
  while buckets[-1] < cache_len:
    buckets.append(prefill_bucket(buckets[-1] + 1, cache_len))
  return buckets


def check_prompt(prompt_ids: list[int], max_new_tokens: int, cache_len: int, vocab_size: int):
  if not prompt_ids:
    raise ValueError("prompt_ids is empty; start it with the tokenizer's bos id")
  if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
    raise ValueError(f"prompt_ids must lie in [0, {vocab_size}); encode the prompt with the "
                     "model's own tokenizer")
  if len(prompt_ids) + max_new_tokens > cache_len:
    raise ValueError(f"{len(prompt_ids)} prompt tokens + max_new_tokens={max_new_tokens} exceed "
                     f"the {cache_len}-token context; shorten the prompt or lower max_new_tokens")


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(graphdef, params, padded_prompt, prompt_len, key, temperature, top_p, *,
             cache_len):
  """padded_prompt: [1, bucket] -> (first new token [1], cache holding the prompt)."""
  model = nnx.merge(graphdef, params)
  cache = init_kv_cache(model.config, padded_prompt.shape[0], cache_len)
  positions = jnp.broadcast_to(jnp.arange(padded_prompt.shape[1]), padded_prompt.shape)
  logits, cache = model(padded_prompt, positions, cache=cache)
  last_logits = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False)
  key = jax.random.fold_in(key, prompt_len - 1)
  return sample_next(last_logits, key, temperature, top_p), cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode_step(graphdef, params, cache, token, position, key, temperature, top_p):
  """token: [batch] at `position` -> (the token after it [batch], cache with it written)."""
  model = nnx.merge(graphdef, params)
  positions = jnp.full((token.shape[0], 1), position, jnp.int32)
  logits, cache = model(token[:, None], positions, cache=cache)
  key = jax.random.fold_in(key, position)
  return sample_next(logits[:, 0], key, temperature, top_p), cache


def stream_tokens(graphdef, params, prompt_ids: list[int], *, config: ModelConfig,
                  max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0, eos_id: int | None = None,
                  max_len: int | None = None) -> Iterator[int]:
  """Yields new token ids one at a time, ending after `eos_id` or `max_new_tokens`."""
  cache_len = context_length(config, max_len)
  check_prompt(prompt_ids, max_new_tokens, cache_len, config.vocab_size)
  if max_new_tokens <= 0:
    return
  prompt_len = len(prompt_ids)
  padded_prompt = np.full((1, prefill_bucket(prompt_len, cache_len)), PAD_ID, np.int32)
  padded_prompt[0, :prompt_len] = prompt_ids
  key = seed_key(seed)
  temperature, top_p = jnp.float32(temperature), jnp.float32(top_p)
  token, cache = _prefill(graphdef, params, padded_prompt, prompt_len, key, temperature, top_p,
                          cache_len=cache_len)
  for step in range(max_new_tokens):
    token_id = int(token[0])
    yield token_id
    if token_id == eos_id or step == max_new_tokens - 1:
      return
    token, cache = _decode_step(graphdef, params, cache, token, prompt_len + step, key,
                                temperature, top_p)


def generate(graphdef, params, prompt_ids: list[int], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, config: ModelConfig,
             max_len: int | None = None) -> list[int]:
  """The new tokens only (the eos that ended them included)."""
  return list(stream_tokens(graphdef, params, prompt_ids, config=config,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, eos_id=eos_id, max_len=max_len))
