"""SigLIP's heads and loss: the ViT pretrained contrastively on image-caption pairs.

An image's embedding is the mean of its ViT patch features, projected; a caption's is the
mean of the language model's final hidden states over the caption's tokens, projected (the
LM reads the caption as text: the image's placeholders stay tokens, so the text side never
sees the image). Both are L2-normalized; the logit of pair (i, j) is
`exp(log_scale) * image_i . caption_j + bias`, and each pair is a binary problem: positive
when the captions of rows i and j are the same text (a set of few classes repeats captions
within a batch, and calling a same-text pair negative would teach the heads a contradiction),
negative otherwise. SigLIP (Zhai et al., 2023) initializes the scale at log 10 and the bias
at -10 so that the many negatives start near probability 0.
"""

import jax
import jax.numpy as jnp
from flax import nnx

INITIAL_LOG_SCALE = 2.302585  # log 10
INITIAL_BIAS = -10.0


class ContrastiveHeads(nnx.Module):
  """Two linear maps into a shared width `dim`, and the logits' learned scale and bias."""

  def __init__(self, vision_dim: int, text_dim: int, dim: int, *, rngs: nnx.Rngs):
    self.image = nnx.Param(jax.random.normal(rngs.params(), (vision_dim, dim), jnp.float32)
                           * vision_dim ** -0.5, logical_axes=("embed", "mlp"))
    self.text = nnx.Param(jax.random.normal(rngs.params(), (text_dim, dim), jnp.float32)
                          * text_dim ** -0.5, logical_axes=("embed", "mlp"))
    self.log_scale = nnx.Param(jnp.array(INITIAL_LOG_SCALE, jnp.float32), logical_axes=())
    self.bias = nnx.Param(jnp.array(INITIAL_BIAS, jnp.float32), logical_axes=())

  def __call__(self, image_features: jax.Array, text_features: jax.Array) -> jax.Array:
    """image_features [batch, vision_dim], text_features [batch, text_dim] -> float32 logits
    [batch (images), batch (captions)]."""
    images = unit_rows(image_features.astype(jnp.float32) @ self.image[...])
    texts = unit_rows(text_features.astype(jnp.float32) @ self.text[...])
    return jnp.exp(self.log_scale[...]) * images @ texts.T + self.bias[...]


def unit_rows(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """x [batch, seq, dim] averaged over the positions where mask [batch, seq] is set."""
  weights = mask.astype(jnp.float32)
  total = jnp.einsum("bsd,bs->bd", x.astype(jnp.float32), weights)
  return total / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)


def same_text(tokens: jax.Array, mask: jax.Array, vocab_size: int) -> jax.Array:
  """bool [batch, batch]: rows whose masked tokens are the same bag of tokens (the same
  caption, read up to word order, which captions of one template share)."""
  rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
  bags = jnp.zeros((tokens.shape[0], vocab_size), jnp.float32).at[rows, tokens].add(
      mask.astype(jnp.float32))                                    # token counts, [batch, vocab]
  # |a - b|^2 from one [batch, batch] product: exact for integer counts (never [batch, batch,
  # vocab] in memory, which a 128k vocabulary would make gigabytes).
  gram = jnp.matmul(bags, bags.T, precision=jax.lax.Precision.HIGHEST)
  norms = jnp.diagonal(gram)
  return norms[:, None] + norms[None, :] - 2 * gram == 0


def sigmoid_loss_sum(logits: jax.Array, positives: jax.Array, real: jax.Array) -> jax.Array:
  """SigLIP's loss summed over the pairs of real rows: -log sigmoid(+logit) for a positive
  pair, -log sigmoid(-logit) for a negative one. Divided by the number of real rows, it is
  the paper's per-image loss."""
  signs = jnp.where(positives, 1.0, -1.0)
  pairs = (real[:, None] & real[None, :]).astype(jnp.float32)
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits) * pairs)


def retrieval_hits(logits: jax.Array, positives: jax.Array, real: jax.Array) -> jax.Array:
  """How many real images rank a caption of their own text first among the real captions."""
  masked = jnp.where(real[None, :], logits, -jnp.inf)
  best = jnp.argmax(masked, axis=1)
  return jnp.sum(jnp.take_along_axis(positives, best[:, None], axis=1)[:, 0] & real)
