"""Images into the decoder: patch embeddings at the `<|image|>` placeholders, prefix-LM mask.

A sequence holds `num_patches` placeholder tokens per image, in a row (the data pipeline and
the server expand each `<|image|>` so: `beam_pipelines.chat_template.expand_image_placeholders`).
The k-th placeholder of a row takes the k-th patch embedding of that row's images, in order;
the patches of one image attend to each other whole, while text stays causal.
"""

import jax
import jax.numpy as jnp

from maxlm.sharding import constrain


def insert_image_embeddings(x: jax.Array, tokens: jax.Array, image_embeddings: jax.Array,
                            image_token_id: int) -> jax.Array:
  """x: [batch, seq, embed] token embeddings; tokens: [batch, seq]; image_embeddings:
  [batch, images, num_patches, embed]. Returns x with placeholder k of each row replaced by
  patch k of the row's images flattened in order (placeholders past the last patch repeat it:
  the pipeline writes exactly one patch's worth per image)."""
  batch, count, num_patches, embed = image_embeddings.shape
  flat = image_embeddings.reshape(batch, count * num_patches, embed).astype(x.dtype)
  is_image = tokens == image_token_id
  ordinal = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, count * num_patches - 1)
  gathered = jnp.take_along_axis(flat, ordinal[..., None], axis=1)
  return constrain(jnp.where(is_image[..., None], gathered, x), ("batch", "length", "act_embed"))


def image_block_ids(tokens: jax.Array, image_token_id: int, num_patches: int) -> jax.Array:
  """tokens: [batch, seq] -> int32 [batch, seq]: image i of a row (from 1) on its patches, 0
  on text; the `bidirectional_ids` of `layers.attention_mask`. Images in a row stay apart, so
  an earlier image never sees text that a later one saw."""
  is_image = tokens == image_token_id
  ordinal = jnp.cumsum(is_image, axis=1) - 1
  return jnp.where(is_image, ordinal // num_patches + 1, 0).astype(jnp.int32)


def image_and_text_hidden(model, tokens: jax.Array, images: jax.Array,
                          positions: jax.Array | None = None,
                          segment_ids: jax.Array | None = None, cache=None):
  """`Transformer.decode` of text whose placeholders hold `images` (uint8 [batch, images,
  height, width, 3]), through the model's vision tower and projector: (hidden [batch, seq,
  embed], updated cache or None). Training and both image prefills run this one forward."""
  vision = model.config.vision
  x = model.embed(tokens)
  image_embeddings = model.projector(model.vision(images, x.dtype))
  x = insert_image_embeddings(x, tokens, image_embeddings, vision.image_token_id)
  block_ids = image_block_ids(tokens, vision.image_token_id, vision.num_patches)
  return model.decode(x, positions, segment_ids, cache, bidirectional_ids=block_ids)


def image_and_text_logits(model, tokens: jax.Array, images: jax.Array,
                          positions: jax.Array | None = None,
                          segment_ids: jax.Array | None = None) -> jax.Array:
  """The logits [batch, seq, vocab] of a `Transformer` with a vision tower over text whose
  placeholders hold `images` (uint8 [batch, images, height, width, 3])."""
  hidden, _ = image_and_text_hidden(model, tokens, images, positions, segment_ids)
  return model.logits(hidden)
