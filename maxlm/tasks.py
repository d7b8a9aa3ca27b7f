"""Losses that plug into `maxlm.steps`: each maps (model, batch) to (loss, metrics).

A task (pretraining now; SFT, DPO, vision later) supplies its own batch fields and loss;
the sharded step machinery around it stays the same.
"""

import jax
import jax.numpy as jnp


def cross_entropy_with_mask(logits: jax.Array, targets: jax.Array,
                            weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits: [batch, seq, vocab] float; targets, weights: [batch, seq].

  Returns (summed negative log-likelihood over weighted positions, sum of weights).
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  return -jnp.sum(target_log_probs * weights), jnp.sum(weights)


def next_token_targets(tokens: jax.Array, segment_ids: jax.Array):
  """Targets are the next token of the same document; the last token of a segment and
  padding predict nothing. tokens, segment_ids: [batch, seq]; returns [batch, seq-1] each."""
  targets = tokens[:, 1:]
  weights = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
  return targets, weights


def next_token_loss(model, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
  """Pretraining: mean next-token cross-entropy over packed documents."""
  logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
  nll, count = cross_entropy_with_mask(logits[:, :-1], targets, weights)
  return nll / jnp.maximum(count, 1.0), {"nll_sum": nll, "target_tokens": count}
