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

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from beam_pipelines.chat_template import expand_image_placeholders
from maxlm import sampling
from maxlm.model import ModelConfig, init_kv_cache, multimodal


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


def image_prefill_fn(graphdef, params, padded_prompt, prompt_len, images, seed, temperature,
                     top_p, top_k) -> sampling.Prefix:
  """padded_prompt: [1, bucket] with num_patches placeholders per image; images: uint8
  [1, count, height, width, 3] -> the prompt's Prefix, as `sampling.prefill_fn` makes it."""
  model = nnx.merge(graphdef, params)
  vision = model.config.vision
  x = model.embed(padded_prompt)
  image_embeddings = model.projector(model.vision(images, x.dtype))
  x = multimodal.insert_image_embeddings(x, padded_prompt, image_embeddings,
                                         vision.image_token_id)
  block_ids = multimodal.image_block_ids(padded_prompt, vision.image_token_id,
                                         vision.num_patches)
  cache = init_kv_cache(model.config, 1, padded_prompt.shape[1])
  positions = jnp.arange(padded_prompt.shape[1])[None]
  hidden, cache = model.decode(x, positions, cache=cache, bidirectional_ids=block_ids)
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
    if config.vision.image_token_id is None:
      raise ValueError("the checkpoint's VisionConfig has no image_token_id; train it with "
                       "maxlm.train, which takes it from the data's tokenizer")
    self.config, self.context_length = config, context_length
    self._prefill = jax.jit(functools.partial(image_prefill_fn, graphdef))

  @property
  def image_size(self) -> int:
    return self.config.vision.image_size

  def __call__(self, params, prompt_ids: list[int], images: list[np.ndarray],
               device_settings: tuple) -> sampling.Prefix:
    return self._prefill(params, sampling.padded_prompt(prompt_ids, self.context_length),
                         len(prompt_ids), padded_images(images), *device_settings)

  def warmup(self, params, bos_id: int, device_settings: tuple):
    """Compiles the one-image program for every prompt bucket that holds an image."""
    image = np.zeros((self.image_size, self.image_size, 3), np.uint8)
    prompt = [bos_id] + [self.config.vision.image_token_id] * self.config.vision.num_patches
    for bucket in sampling.prefill_buckets(self.context_length):
      if bucket >= len(prompt):
        jax.block_until_ready(self(params, prompt + [bos_id] * (bucket - len(prompt)), [image],
                                   device_settings))
