"""Images into the decoder: patch embeddings at the `<|image|>` placeholders, prefix-LM mask.

A sequence holds `num_patches` placeholder tokens per image, in a row (the data pipeline and
the server expand each `<|image|>` so: `beam_pipelines.chat_template.expand_image_placeholders`).
The k-th placeholder of a row takes the k-th patch embedding of that row's images, in order;
the patches of one image attend to each other whole, while text stays causal.
"""

import jax
import jax.numpy as jnp

from maxlm.sharding import constrain


def image_positions(tokens: jax.Array, image_token_id: int, num_patches: int,
                    image_counts: jax.Array | None = None) -> jax.Array:
  """bool [batch, seq]: where a row's images go. Without `image_counts` [batch], every
  placeholder (a training record's are exactly its images'); with them, a row's first
  `count * num_patches` placeholders only: a placeholder after them is text, e.g. one the
  model generated, which a preempted request's prefill meets again."""
  is_placeholder = tokens == image_token_id
  if image_counts is None:
    return is_placeholder
  ordinal = jnp.cumsum(is_placeholder, axis=1) - 1
  return is_placeholder & (ordinal < image_counts[:, None] * num_patches)


def insert_image_embeddings(x: jax.Array, is_image: jax.Array,
                            image_embeddings: jax.Array) -> jax.Array:
  """x: [batch, seq, embed] token embeddings; is_image: [batch, seq] (`image_positions`);
  image_embeddings: [batch, images, num_patches, embed]. Returns x with image position k of
  each row replaced by patch k of the row's images flattened in order (positions past the
  last patch repeat it: the pipeline writes exactly one patch's worth per image)."""
  batch, count, num_patches, embed = image_embeddings.shape
  flat = image_embeddings.reshape(batch, count * num_patches, embed).astype(x.dtype)
  ordinal = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, count * num_patches - 1)
  gathered = jnp.take_along_axis(flat, ordinal[..., None], axis=1)
  return constrain(jnp.where(is_image[..., None], gathered, x), ("batch", "length", "act_embed"))


def image_block_ids(is_image: jax.Array, num_patches: int) -> jax.Array:
  """is_image: [batch, seq] (`image_positions`) -> int32 [batch, seq]: image i of a row (from
  1) on its patches, 0 on text; the `bidirectional_ids` of `layers.attention_mask`. Images in
  a row stay apart, so an earlier image never sees text that a later one saw."""
  ordinal = jnp.cumsum(is_image, axis=1) - 1
  return jnp.where(is_image, ordinal // num_patches + 1, 0).astype(jnp.int32)


def image_and_text_hidden(model, tokens: jax.Array, images: jax.Array,
                          positions: jax.Array | None = None,
                          segment_ids: jax.Array | None = None, cache=None,
                          image_counts: jax.Array | None = None):
  """`Transformer.decode` of text whose placeholders hold `images` (uint8 [batch, images,
  height, width, 3]), through the model's vision tower and projector: (hidden [batch, seq,
  embed], updated cache or None). Training and both image prefills run this one forward;
  the prefills give `image_counts` (see `image_positions`)."""
  vision = model.config.vision
  x = model.embed(tokens)
  image_embeddings = model.projector(model.vision(images, x.dtype))
  is_image = image_positions(tokens, vision.image_token_id, vision.num_patches, image_counts)
  x = insert_image_embeddings(x, is_image, image_embeddings)
  block_ids = image_block_ids(is_image, vision.num_patches)
  return model.decode(x, positions, segment_ids, cache, bidirectional_ids=block_ids)


def image_and_text_logits(model, tokens: jax.Array, images: jax.Array,
                          positions: jax.Array | None = None,
                          segment_ids: jax.Array | None = None,
                          image_counts: jax.Array | None = None) -> jax.Array:
  """The logits [batch, seq, vocab] of a `Transformer` with a vision tower over text whose
  placeholders hold `images` (uint8 [batch, images, height, width, 3])."""
  hidden, _ = image_and_text_hidden(model, tokens, images, positions, segment_ids,
                                    image_counts=image_counts)
  return model.logits(hidden)
