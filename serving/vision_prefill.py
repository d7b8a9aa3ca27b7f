"""Prefill with pixels: a request's images through the ViT and projector, into its prompt.

A chat prompt holds one `<|image|>` per image part; `expanded_ids` repeats each
`VisionConfig.num_patches` times, as the data pipeline does, so a served prompt has the ids
the same turns had in training. The prefill embeds the text, puts the images' patch
embeddings at the placeholders (`maxlm.model.multimodal`), and runs the decoder over the
whole padded prompt at once, the patches of an image attending to each other whole. Its
result is `sampling.Prefix`, what a text prefill gives: `insert` and the decode steps never
know a request had images.

A separate compiled program per (prompt bucket, image bucket): text-only prefills keep theirs.
Images pad to a power-of-two count with black images that no placeholder reads.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from beam_pipelines.chat_template import expand_image_placeholders
from maxlm import paged_sampling, sampling
from maxlm.model import ModelConfig, init_kv_cache, multimodal, paged_kv
from serving import kv_pages


def image_bucket(count: int) -> int:
  """The padded image count a prefill compiles for: the next power of two."""
  return 1 << max(count - 1, 0).bit_length()


def padded_images(images: list[np.ndarray]) -> np.ndarray:
  """uint8 [1, image_bucket(len(images)), height, width, 3]: the images, then black ones."""
  stacked = np.stack(images).astype(np.uint8)
  padding = np.zeros((image_bucket(len(images)) - len(images), *stacked.shape[1:]), np.uint8)
  return np.concatenate([stacked, padding])[None]


def expanded_ids(prompt_ids: list[int], config: ModelConfig, images: int) -> list[int]:
  """`prompt_ids` with each placeholder repeated once per patch; ValueError when the prompt's
  placeholders are not one per image."""
  vision = config.vision
  placeholders = prompt_ids.count(vision.image_token_id)
  if placeholders != images:
    raise ValueError(f"the prompt holds {placeholders} image placeholders for {images} images; "
                     "send one image_url part per image")
  return expand_image_placeholders(prompt_ids, vision.image_token_id, vision.num_patches)


def check_image_token(config: ModelConfig):
  if config.vision.image_token_id is None:
    raise ValueError("the checkpoint's VisionConfig has no image_token_id; train it with "
                     "maxlm.train, which takes it from the data's tokenizer")


def image_prefill_fn(graphdef, params, padded_prompt, prompt_len, images, image_count, seed,
                     temperature, top_p, top_k) -> sampling.Prefix:
  """padded_prompt: [1, bucket] with num_patches placeholders per image; images: uint8
  [1, padded count, height, width, 3], of which `image_count` are the prompt's -> the
  prompt's Prefix, as `sampling.prefill_fn` makes it."""
  model = nnx.merge(graphdef, params)
  cache = init_kv_cache(model.config, 1, padded_prompt.shape[1])
  positions = jnp.arange(padded_prompt.shape[1])[None]
  hidden, cache = multimodal.image_and_text_hidden(model, padded_prompt, images, positions,
                                                   cache=cache,
                                                   image_counts=jnp.reshape(image_count, (1,)))
  logits = model.logits(hidden, jnp.reshape(prompt_len - 1, (1,)))
  choice = sampling.choose(logits[:, 0],
                           jax.random.fold_in(sampling.seed_key(seed), prompt_len - 1),
                           temperature, top_p, top_k)
  return sampling.Prefix(cache, choice, jnp.asarray(prompt_len, jnp.int32),
                         jnp.asarray(seed, jnp.uint32), jnp.asarray(temperature, jnp.float32),
                         jnp.asarray(top_p, jnp.float32), jnp.asarray(top_k, jnp.int32))


class ImagePrefill:
  """The jitted image prefill of one model, with `graphdef` closed over (see `sampling.bind`)."""

  def __init__(self, graphdef, config: ModelConfig, context_length: int):
    check_image_token(config)
    self.config, self.context_length = config, context_length
    self._prefill = jax.jit(functools.partial(image_prefill_fn, graphdef))

  @property
  def image_size(self) -> int:
    return self.config.vision.image_size

  def __call__(self, params, prompt_ids: list[int], images: list[np.ndarray],
               device_settings: tuple) -> sampling.Prefix:
    return self._prefill(params, sampling.padded_prompt(prompt_ids, self.context_length),
                         len(prompt_ids), padded_images(images), np.int32(len(images)),
                         *device_settings)


# --- straight into the paged pool, every image prompt of a turn in one call -------------------

def paged_image_prefill_fn(graphdef, params, state, prompts, lengths, images, image_counts,
                           block_table, slots, seeds, temperature, top_p, top_k):
  """prompts: [rows, bucket] (num_patches placeholders per image, then padding); lengths,
  slots: [rows]; images: uint8 [rows, count, height, width, 3], of which image_counts [rows]
  are each row's (see `multimodal.image_positions`); block_table: [rows, width],
  width * block_size >= bucket; seeds: [rows, 2]; temperature, top_p, top_k: [rows].
  Writes each row's whole prompt into its blocks from position 0, readies its slot as
  `paged_sampling.prefill_fn` does, and returns (state, choice [rows]). Padding rows name the
  extra slot and the trash block only; their padding positions land where a chunk's do."""
  model = nnx.merge(graphdef, params)
  positions = jnp.broadcast_to(jnp.arange(prompts.shape[1], dtype=jnp.int32), prompts.shape)
  cache = paged_kv.with_tables(state.pools, block_table)
  hidden, cache = multimodal.image_and_text_hidden(model, prompts, images, positions,
                                                   cache=cache, image_counts=image_counts)
  logits = model.logits(hidden, lengths - 1)
  keys = jax.vmap(lambda seed, last: jax.random.fold_in(sampling.seed_key(seed), last))(
      seeds, lengths - 1)
  choice = sampling.choose(logits[:, 0], keys, temperature, top_p, top_k)
  return paged_sampling.PagedState(
      pools=paged_kv.without_tables(cache),
      tokens=state.tokens.at[slots].set(choice.token),
      positions=state.positions.at[slots].set(lengths),
      seeds=state.seeds.at[slots].set(seeds),
      temperature=state.temperature.at[slots].set(temperature),
      top_p=state.top_p.at[slots].set(top_p),
      top_k=state.top_k.at[slots].set(top_k)), choice


def bind(graphdef):
  """`paged_image_prefill_fn` jitted with `graphdef` closed over, donating the state."""
  return jax.jit(functools.partial(paged_image_prefill_fn, graphdef), donate_argnums=(1,))


@dataclasses.dataclass
class PendingImagePrompt:
  token_ids: list[int]
  images: list[np.ndarray]
  settings: tuple  # engine.device_settings of the request


class ImagePrefills:
  """The image prompts admitted this turn, by slot, prefilled straight into their blocks of
  `pages` before the turn's decode step: as few calls as `max_tokens` (rows, padded to a
  power of two, times the prompt bucket) allows, so the compiled shapes stay few."""

  def __init__(self, pages: kv_pages.PageTables, prefill, slots: int, context_length: int,
               max_tokens: int):
    self.pages, self.slots, self.context_length = pages, slots, context_length
    self.max_tokens = max_tokens
    self._prefill = prefill
    self.pending: dict[int, PendingImagePrompt] = {}

  def begin(self, slot: int, token_ids: list[int], images: list[np.ndarray], settings: tuple):
    """Gives `slot` the blocks of `token_ids` (raises PoolExhausted if they are not free)."""
    self.pages.assign(slot, len(token_ids))
    self.pending[slot] = PendingImagePrompt(list(token_ids), list(images), settings)

  def discard(self, slot: int):
    self.pending.pop(slot, None)

  def fits_one_call(self, rows: int, bucket: int) -> bool:
    return rows == 1 or kv_pages.bucket(rows, self.slots) * bucket <= self.max_tokens

  def plan(self) -> list[list[int]]:
    """The pending slots in admission order, grouped into calls."""
    groups, longest = [], 0
    for slot, prompt in self.pending.items():
      length = max(longest, len(prompt.token_ids))
      bucket = sampling.prefill_bucket(length, self.context_length)
      if groups and self.fits_one_call(len(groups[-1]) + 1, bucket):
        groups[-1].append(slot)
        longest = length
      else:
        groups.append([slot])
        longest = len(prompt.token_ids)
    return groups

  def run(self, params, state, slots: list[int]):
    """Queues the prefill of the pending prompts of `slots`: (state, the choice, a row per
    slot in order, then padding rows)."""
    prompts = [self.pending.pop(slot) for slot in slots]
    rows = kv_pages.bucket(len(slots), self.slots)
    bucket = sampling.prefill_bucket(max(len(p.token_ids) for p in prompts), self.context_length)
    tokens = np.full((rows, bucket), sampling.PAD_ID, np.int32)
    lengths, row_slots = np.ones(rows, np.int32), np.full(rows, self.slots, np.int32)
    counts = np.zeros(rows, np.int32)
    images = np.zeros((rows, image_bucket(max(len(p.images) for p in prompts)),
                       *prompts[0].images[0].shape), np.uint8)
    for row, (slot, prompt) in enumerate(zip(slots, prompts)):
      tokens[row, :len(prompt.token_ids)] = prompt.token_ids
      lengths[row], row_slots[row], counts[row] = len(prompt.token_ids), slot, len(prompt.images)
      images[row, :len(prompt.images)] = np.stack(prompt.images)
    settings = [np.stack(column + column[:1] * (rows - len(slots)))
                for column in map(list, zip(*(p.settings for p in prompts)))]
    table = self.pages.table(slots, rows, -(-bucket // self.pages.block_size))
    return self._prefill(params, state, tokens, lengths, images, counts, table, row_slots,
                         *settings)

  def shapes(self, num_patches: int) -> list[tuple[int, int]]:
    """Every (rows, prompt bucket) of a one-image prompt that `run` can compile for."""
    return [(rows, bucket) for bucket in sampling.prefill_buckets(self.context_length)
            if bucket > num_patches for rows in kv_pages.buckets(self.slots)
            if self.fits_one_call(rows, bucket)]

  def warmup(self, params, state, image_token_id: int, num_patches: int, image_size: int,
             settings: tuple):
    """Compiles `run` for every shape of `shapes`; the slots stay free."""
    image = np.zeros((image_size, image_size, 3), np.uint8)
    for rows, bucket in self.shapes(num_patches):
      prompt = [image_token_id] * num_patches + [sampling.PAD_ID] * (bucket - num_patches)
      for slot in range(rows):
        self.begin(slot, prompt, [image], settings)
      state, _ = self.run(params, state, list(range(rows)))
      for slot in range(rows):
        self.pages.release(slot)
    return state
