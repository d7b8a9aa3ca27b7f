"""Losses that plug into `maxlm.steps`: each maps (model, batch) to (loss, metrics).

A task (pretraining now; SFT, DPO, vision later) supplies its own batch fields and loss;
the sharded step machinery around it stays the same.
"""

import jax
import jax.numpy as jnp


def cross_entropy_with_mask(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                            z_loss: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits: [batch, seq, vocab] float; targets, weights: [batch, seq].

  Returns (summed negative log-likelihood over weighted positions, sum of weights, summed
  z-loss `z_loss * log(Z)**2`, where Z is the softmax normalizer; it keeps log Z near 0).
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  return (jnp.sum((log_z - target_logits) * weights), jnp.sum(weights),
          z_loss * jnp.sum(jnp.square(log_z) * weights))


def next_token_targets(tokens: jax.Array, segment_ids: jax.Array):
  """Targets are the next token of the same document; the last token of a row or segment
  and padding predict nothing. tokens, segment_ids: [batch, seq]; returns [batch, seq] each,
  aligned with the logits so that no [batch, seq, vocab] array is sliced."""
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  next_segment = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
  weights = (next_segment == segment_ids) & (next_segment != 0)
  return targets, weights


def next_token_loss(model, batch: dict[str, jax.Array],
                    z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """Pretraining: mean next-token cross-entropy over packed documents, plus the mean z-loss
  times `z_loss` (0 turns it off)."""
  logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
  nll, count, z_loss_sum = cross_entropy_with_mask(logits, targets, weights, z_loss)
  loss = (nll + z_loss_sum) / jnp.maximum(count, 1.0)
  return loss, {"nll_sum": nll, "z_loss_sum": z_loss_sum, "target_tokens": count}
