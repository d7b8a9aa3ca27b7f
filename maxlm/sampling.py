"""Next-token sampling and KV-cached generation, shared by the trainer's sample and serving.

Generation has JetStream's shape. A `DecodeState` holds a fixed number of decode slots over
one preallocated KV cache with a row per slot. `prefill` runs one prompt, padded to a
power-of-two bucket so a handful of compilations cover every length, and returns its cache
rows and first token; `insert` copies them into a free slot; `generate_step` advances every slot
by one token at once. Each slot has its own position, sampling settings and random key.

The padding is harmless: pad tokens land in cache slots P..bucket-1, which no real token
attends to (a query at position p sees slots <= p), and the decode step at position p
overwrites slot p before any query can see it. The same holds for what a slot's previous
occupant left behind.
"""

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxlm.model import KVCache, ModelConfig, init_kv_cache, kv_cache

MIN_PREFILL_BUCKET = 16
PAD_ID = 0
TOP_LOGPROBS = 20  # alternatives reported per generated token (OpenAI's maximum for chat)
TOP_CANDIDATES = 256  # top-k/top-p look here first (see keep_threshold)


# --- sampling ----------------------------------------------------------------------------------

def _thresholds(descending: jax.Array, log_z: jax.Array, top_p: jax.Array,
                top_k: jax.Array) -> jax.Array:
  """The smallest logit each row keeps, from its largest logits in descending order.

  descending: [rows, width], the `width` largest logits of each row; log_z: [rows], the
  log-normalizer over the whole vocabulary. -inf where nothing is cut.
  """
  probs = jnp.exp(descending - log_z[:, None])
  probability_before = jnp.cumsum(probs, axis=-1) - probs
  nucleus_size = jnp.sum(probability_before < top_p[:, None], axis=-1)  # >= 1
  width = descending.shape[-1]
  at = lambda count: jnp.take_along_axis(descending, jnp.clip(count - 1, 0, width - 1)[:, None],
                                         axis=-1)[:, 0]
  by_p = jnp.where(top_p < 1.0, at(nucleus_size), -jnp.inf)
  by_k = jnp.where(top_k > 0, at(top_k), -jnp.inf)
  return jnp.maximum(by_p, by_k)


def keep_threshold(logits: jax.Array, top_p: jax.Array | float,
                   top_k: jax.Array | int = 0) -> jax.Array:
  """Per row, the smallest logit that survives both `top_k` and the `top_p` nucleus.

  logits: [rows, vocab]; settings scalar or [rows]. Returns float32 [rows], -inf where
  nothing is cut. XLA's full sort is slow on CPU (~0.7 ms per 4k-token row), so the answer
  comes from the TOP_CANDIDATES largest logits whenever they hold it (top_k within them and
  their probability reaching top_p), and from a full sort only otherwise.
  """
  rows, vocab = logits.shape
  top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (rows,))
  top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (rows,))
  log_z = jax.nn.logsumexp(logits, axis=-1)
  candidates = min(TOP_CANDIDATES, vocab)

  def from_sorted(descending):
    return _thresholds(descending, log_z, top_p, top_k)

  def cut():
    largest, _ = jax.lax.top_k(logits, candidates)
    mass = jnp.sum(jnp.exp(largest - log_z[:, None]), axis=-1)
    fits = ((top_p >= 1.0) | (mass >= top_p)) & (top_k <= candidates)
    return jax.lax.cond(jnp.all(fits), from_sorted, lambda _: from_sorted(
        -jnp.sort(-logits, axis=-1)), largest)

  anything_cut = jnp.any((top_p < 1.0) | (top_k > 0))
  return jax.lax.cond(anything_cut, cut, lambda: jnp.full((rows,), -jnp.inf, logits.dtype))


def nucleus_mask(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
  """The smallest set of most likely tokens whose probability reaches `top_p`.

  logits: [batch, vocab]; top_p: scalar or [batch]. Returns bool [batch, vocab]. The most
  likely token is always kept, and `top_p >= 1` keeps everything.
  """
  return logits >= keep_threshold(logits, top_p)[:, None]


def top_k_mask(logits: jax.Array, top_k: jax.Array | int) -> jax.Array:
  """The `top_k` most likely tokens (ties with the k-th all kept); `top_k <= 0` keeps all.

  logits: [batch, vocab]; top_k: scalar or [batch]. Returns bool [batch, vocab].
  """
  return logits >= keep_threshold(logits, 1.0, top_k)[:, None]


def sample_next(logits: jax.Array, key: jax.Array, temperature: jax.Array | float,
                top_p: jax.Array | float, top_k: jax.Array | int = 0,
                greedy: jax.Array | None = None) -> jax.Array:
  """logits: [batch, vocab] -> token ids int32 [batch].

  temperature 0 is greedy (argmax); otherwise logits are divided by the temperature and
  sampled from the tokens that survive both `top_k` and the `top_p` nucleus. The settings are
  scalars or one per row, and may be traced, so one compilation serves every request. `key` is
  one key for the whole batch or one per row. An all-greedy batch skips the sampling work.
  `greedy` is each row's argmax when the caller has it already.
  """
  rows = logits.shape[0]
  temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (rows,))
  if greedy is None:
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sample():
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sampling_top_p = jnp.where(temperature > 0, top_p, 1.0)  # greedy rows cut nothing
    sampling_top_k = jnp.where(temperature > 0, top_k, 0)
    threshold = keep_threshold(scaled, sampling_top_p, sampling_top_k)
    filtered = jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)
    if key.ndim:
      sampled = jax.vmap(jax.random.categorical)(key, filtered)
    else:
      sampled = jax.random.categorical(key, filtered, axis=-1)
    return jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy)

  return jax.lax.cond(jnp.any(temperature > 0), sample, lambda: greedy)


def seed_words(seed: int) -> np.ndarray:
  """uint32 [2]: any int seed as two words (`jax.random.key` alone keeps 32 bits when x64 is
  off). Jitted functions take these and make the key inside, so admitting a request runs no
  separate key computations on the host."""
  return np.array([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], np.uint32)


def seed_key(words: jax.Array) -> jax.Array:
  """The key of `seed_words(seed)`; `words` may be traced."""
  return jax.random.fold_in(jax.random.key(words[0]), words[1])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenChoice:
  """What one step picked for each row, with the model's (untempered) log-probabilities."""
  token: jax.Array           # int32 [rows]
  logprob: jax.Array         # float32 [rows]: log p(token) under the model
  top_tokens: jax.Array      # int32 [rows, TOP_LOGPROBS], most likely first
  top_logprobs: jax.Array    # float32 [rows, TOP_LOGPROBS]


def choose(logits, keys, temperature, top_p, top_k) -> TokenChoice:
  """One top-k pass over the logits gives the alternatives and the greedy token alike; log
  probabilities are logits minus the row's log-normalizer, never a full log-softmax array."""
  log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  top_logprobs, top_tokens = jax.lax.top_k(logits - log_z, min(TOP_LOGPROBS, logits.shape[-1]))
  top_tokens = top_tokens.astype(jnp.int32)
  # Not top_tokens[:, 0]: a second slice of the sort keeps XLA from turning it into a top-k.
  greedy = jnp.take_along_axis(top_tokens, jnp.argmax(top_logprobs, -1)[:, None], axis=-1)[:, 0]
  token = sample_next(logits, keys, temperature, top_p, top_k, greedy=greedy)
  logprob = jnp.take_along_axis(logits, token[:, None], axis=-1) - log_z
  return TokenChoice(token, logprob[:, 0], top_tokens, top_logprobs)


# --- shapes ------------------------------------------------------------------------------------

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


def padded_prompt(prompt_ids: list[int], cache_len: int) -> np.ndarray:
  """[1, bucket] int32: the prompt followed by PAD_ID."""
  padded = np.full((1, prefill_bucket(len(prompt_ids), cache_len)), PAD_ID, np.int32)
  padded[0, :len(prompt_ids)] = prompt_ids
  return padded


# --- prefill / insert / generate ---------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """Every decode slot: the cache and, per slot, the token to feed next and how to sample."""
  cache: KVCache          # per layer, see maxlm.model.kv_cache; slots rows of cache_len
  tokens: jax.Array       # int32 [slots]: the last token chosen, fed by the next step
  positions: jax.Array    # int32 [slots]: the position of `tokens`
  seeds: jax.Array        # uint32 [slots, 2]: each request's seed_words
  temperature: jax.Array  # float32 [slots]
  top_p: jax.Array        # float32 [slots]
  top_k: jax.Array        # int32 [slots]


def init_decode_state(config: ModelConfig, slots: int, cache_len: int) -> DecodeState:
  return DecodeState(
      cache=init_kv_cache(config, slots, cache_len), tokens=jnp.zeros((slots,), jnp.int32),
      positions=jnp.zeros((slots,), jnp.int32),
      seeds=jnp.zeros((slots, 2), jnp.uint32),
      temperature=jnp.zeros((slots,), jnp.float32), top_p=jnp.ones((slots,), jnp.float32),
      top_k=jnp.zeros((slots,), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefix:
  """One prefilled prompt, ready to `insert`: its cache rows and its first new token."""
  cache: KVCache          # per layer, see maxlm.model.kv_cache; one row of bucket positions
  choice: TokenChoice     # rows = 1
  position: jax.Array     # int32 scalar: the position of the first new token
  seed: jax.Array         # uint32 [2]: the request's seed_words
  temperature: jax.Array
  top_p: jax.Array
  top_k: jax.Array


def prefill_fn(graphdef, params, padded_prompt, prompt_len, seed, temperature, top_p,
               top_k) -> Prefix:
  """padded_prompt: [1, bucket] -> its Prefix; one compilation per bucket."""
  model = nnx.merge(graphdef, params)
  cache = init_kv_cache(model.config, 1, padded_prompt.shape[1])
  positions = jnp.arange(padded_prompt.shape[1])[None]
  last = jnp.reshape(prompt_len - 1, (1,))
  logits, cache = model(padded_prompt, positions, cache=cache, logits_at=last)
  choice = choose(logits[:, 0], jax.random.fold_in(seed_key(seed), prompt_len - 1), temperature,
                  top_p, top_k)
  return Prefix(cache, choice, jnp.asarray(prompt_len, jnp.int32), jnp.asarray(seed, jnp.uint32),
                *(jnp.asarray(x, dtype) for x, dtype in ((temperature, jnp.float32),
                                                         (top_p, jnp.float32),
                                                         (top_k, jnp.int32))))


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(prefix: Prefix, state: DecodeState, slot) -> DecodeState:
  """Puts a prefilled prompt into decode slot `slot` (one compilation per bucket)."""
  def put(cache_array, rows):
    return jax.lax.dynamic_update_slice(cache_array, rows.astype(cache_array.dtype),
                                        (slot,) + (0,) * (cache_array.ndim - 1))
  return DecodeState(
      cache=jax.tree.map(put, state.cache, prefix.cache),
      tokens=state.tokens.at[slot].set(prefix.choice.token[0]),
      positions=state.positions.at[slot].set(prefix.position),
      seeds=state.seeds.at[slot].set(prefix.seed),
      temperature=state.temperature.at[slot].set(prefix.temperature),
      top_p=state.top_p.at[slot].set(prefix.top_p),
      top_k=state.top_k.at[slot].set(prefix.top_k))


def generate_step_fn(graphdef, params, state: DecodeState) -> tuple[DecodeState, TokenChoice]:
  """Advances every slot by one token. A free slot computes garbage that nothing reads."""
  model = nnx.merge(graphdef, params)
  cache_len = kv_cache.length(state.cache)
  positions = jnp.minimum(state.positions, cache_len - 1)
  logits, cache = model(state.tokens[:, None], positions[:, None], cache=state.cache)
  keys = jax.vmap(lambda seed, position: jax.random.fold_in(seed_key(seed), position))(
      state.seeds, positions)
  choice = choose(logits[:, 0], keys, state.temperature, state.top_p, state.top_k)
  return dataclasses.replace(state, cache=cache, tokens=choice.token,
                             positions=positions + 1), choice


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PromptScores:
  """How likely the model found each prompt token given the ones before it (OpenAI's `echo`
  with `logprobs`). Index t describes token t; t = 0, which nothing predicts, holds zeros."""
  logprobs: jax.Array      # float32 [rows, seq]: log p(tokens[t] | tokens[:t])
  top_tokens: jax.Array    # int32 [rows, seq, top]: the likeliest tokens at t, most likely first
  top_logprobs: jax.Array  # float32 [rows, seq, top]


def log_normalizer(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits: [rows, vocab] -> (each row's largest logit, its log-normalizer), both [rows]."""
  largest = jnp.max(logits, axis=-1)
  return largest, largest + jnp.log(jnp.sum(jnp.exp(logits - largest[:, None]), axis=-1))


def first_largest(logits: jax.Array, largest: jax.Array) -> jax.Array:
  """int32 [rows]: the first index of each row's `largest` logit, as argmax picks it. XLA's CPU
  argmax takes ~6x a max over the same logits; this is a compare and a min."""
  index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(logits == largest[:, None], index, logits.shape[-1]), axis=-1)


def log_softmax_of_next(logits: jax.Array) -> jax.Array:
  """logits [rows, seq, vocab] -> log-probabilities of the next token, as `choose` computes
  them (logits minus the log-normalizer), so an argmax's logprob equals its top logprob."""
  return logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def prompt_scores(logits: jax.Array, tokens: jax.Array, top: int = TOP_LOGPROBS) -> PromptScores:
  """logits: [rows, seq, vocab] of `tokens` [rows, seq] (position t predicts token t + 1)."""
  logprobs = log_softmax_of_next(logits[:, :-1])
  target = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
  top_logprobs, top_tokens = jax.lax.top_k(logprobs, min(top, logits.shape[-1]))
  shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x], axis=1)  # noqa: E731
  return PromptScores(shift(target), shift(top_tokens.astype(jnp.int32)), shift(top_logprobs))


def scored_prefill_fn(graphdef, params, padded_prompt, prompt_len, seed, temperature, top_p,
                      top_k) -> tuple[Prefix, PromptScores]:
  """`prefill_fn`, computing the logits of every prompt position in the same forward pass
  (no second one) to score the prompt's own tokens."""
  model = nnx.merge(graphdef, params)
  cache = init_kv_cache(model.config, 1, padded_prompt.shape[1])
  positions = jnp.arange(padded_prompt.shape[1])[None]
  logits, cache = model(padded_prompt, positions, cache=cache)
  last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False)
  choice = choose(last, jax.random.fold_in(seed_key(seed), prompt_len - 1), temperature, top_p,
                  top_k)
  prefix = Prefix(cache, choice, jnp.asarray(prompt_len, jnp.int32),
                  jnp.asarray(seed, jnp.uint32),
                  *(jnp.asarray(x, dtype) for x, dtype in ((temperature, jnp.float32),
                                                           (top_p, jnp.float32),
                                                           (top_k, jnp.int32))))
  return prefix, prompt_scores(logits, padded_prompt)


prefill = jax.jit(prefill_fn, static_argnames=("graphdef",))
generate_step = jax.jit(generate_step_fn, static_argnames=("graphdef",),
                        donate_argnames=("state",))


def bind(graphdef):
  """(prefill, generate_step) jitted with `graphdef` closed over, taking the other arguments.

  A server calls these every step; passing the graphdef as a static argument would hash the
  whole graph on every call (about 0.2 ms for the tiny model).
  """
  return (jax.jit(functools.partial(prefill_fn, graphdef)),
          jax.jit(functools.partial(generate_step_fn, graphdef), donate_argnums=(1,)))


# --- one prompt at a time (the trainer's sample) -----------------------------------------------

def stream_tokens(graphdef, params, prompt_ids: list[int], *, config: ModelConfig,
                  max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                  top_k: int = 0, seed: int = 0, eos_id: int | None = None,
                  max_len: int | None = None) -> Iterator[int]:
  """Yields new token ids one at a time, ending after `eos_id` or `max_new_tokens`."""
  cache_len = context_length(config, max_len)
  check_prompt(prompt_ids, max_new_tokens, cache_len, config.vocab_size)
  if max_new_tokens <= 0:
    return
  prefix = prefill(graphdef, params, padded_prompt(prompt_ids, cache_len), len(prompt_ids),
                   seed_words(seed), temperature, top_p, top_k)
  state = insert(prefix, init_decode_state(config, 1, cache_len), 0)
  token_id = int(prefix.choice.token[0])
  for step in range(max_new_tokens):
    yield token_id
    if token_id == eos_id or step == max_new_tokens - 1:
      return
    state, choice = generate_step(graphdef, params, state)
    token_id = int(choice.token[0])


def generate(graphdef, params, prompt_ids: list[int], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             eos_id: int | None = None, config: ModelConfig,
             max_len: int | None = None) -> list[int]:
  """The new tokens only (the eos that ended them included)."""
  return list(stream_tokens(graphdef, params, prompt_ids, config=config,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, seed=seed, eos_id=eos_id, max_len=max_len))
