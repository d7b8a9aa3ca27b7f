"""Post-training tasks: supervised fine-tuning (SFT) and direct preference optimization (DPO).

Both read the chat records of `beam_pipelines.prepare_chat` (see its manifest): packed rows
of conversations whose `loss_mask` is 1 on exactly the tokens to predict (an assistant's
content and its `<|end|>`). The loss at position t predicts tokens[t+1] and counts iff
loss_mask[t+1] == 1 within one conversation.

DPO's rows hold pairs: pair k of a row is segment k of its chosen half and of its rejected
half ([bos] prompt reply each). A reply's log-probability is the sum of its masked next-token
log-probabilities. The reference model is the run's starting parameters (`init_from`'s),
frozen; `DPO.prepare_batch` adds its per-pair log-probabilities to each batch.
"""

import dataclasses
import functools
from collections.abc import Callable

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from maxlm import tasks
from maxlm.model import training_flops_per_token

SFT_FIELDS = ("tokens", "segment_ids", "positions", "loss_mask")
HALVES = ("chosen", "rejected")
PREFERENCE_FIELDS = tuple(f"{half}_{name}" for half in HALVES for name in SFT_FIELDS)
LOSS_TYPES = ("sigmoid", "ipo")
REWARDS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")


def supervised_targets(tokens: jax.Array, segment_ids: jax.Array,
                       loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`tasks.next_token_targets` restricted to targets whose loss_mask is 1.
  tokens, segment_ids, loss_mask: [batch, seq]; returns (targets, bool weights) [batch, seq]."""
  targets, weights = tasks.next_token_targets(tokens, segment_ids)
  next_mask = jnp.pad(loss_mask[:, 1:], ((0, 0), (0, 1)))
  return targets, weights & (next_mask != 0)


def sft_loss(model, batch: dict[str, jax.Array], z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """Mean cross-entropy over the supervised next tokens (plus `z_loss` times mean log(Z)**2)."""
  logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  targets, weights = supervised_targets(batch["tokens"], batch["segment_ids"], batch["loss_mask"])
  nll, count, z_loss_sum = tasks.cross_entropy_with_mask(logits, targets, weights, z_loss)
  loss = (nll + z_loss_sum) / jnp.maximum(count, 1.0)
  return loss, {"nll_sum": nll, "z_loss_sum": z_loss_sum, "target_tokens": count}


def segment_logps(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array,
                  loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per segment of each row: the summed log-probabilities of its supervised next tokens, and
  how many there are. logits: [batch, seq, vocab]; the rest [batch, seq]. Returns
  ([batch, seq // 2], [batch, seq // 2]), column k - 1 for segment k: a segment with a target
  has two tokens at least, so seq // 2 columns hold every one."""
  targets, weights = supervised_targets(tokens, segment_ids, loss_mask)
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  token_logps = jnp.where(weights, target_logits - jax.nn.logsumexp(logits, axis=-1), 0.0)
  num_columns = tokens.shape[1] // 2
  per_row = jax.vmap(lambda values, ids: jax.ops.segment_sum(values, ids, num_columns + 1))
  return (per_row(token_logps, segment_ids)[:, 1:],
          per_row(weights.astype(jnp.float32), segment_ids)[:, 1:])


def pair_logps(model, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(chosen, rejected) reply log-probabilities [batch, seq // 2] under `model`, and which
  columns are real pairs (bool, same shape). One forward over both halves: their rows are
  interleaved (chosen 0, rejected 0, chosen 1, ...), so each device keeps its own rows."""
  rows, seq = batch["chosen_tokens"].shape
  def both(name):
    return jnp.stack([batch[f"{half}_{name}"] for half in HALVES], axis=1).reshape(2 * rows, seq)
  tokens, segment_ids = both("tokens"), both("segment_ids")
  logits, _ = model(tokens, both("positions"), segment_ids)
  sums, counts = segment_logps(logits, tokens, segment_ids, both("loss_mask"))
  sums, counts = sums.reshape(rows, 2, -1), counts.reshape(rows, 2, -1)
  return sums[:, 0], sums[:, 1], (counts[:, 0] > 0) & (counts[:, 1] > 0)


def dpo_losses(policy_chosen: jax.Array, policy_rejected: jax.Array,
               reference_chosen: jax.Array, reference_rejected: jax.Array, beta: float,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0):
  """Per pair: (loss, chosen reward, rejected reward); every argument array has one shape.

  With h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected):
  sigmoid (DPO, Rafailov et al. 2023) -log σ(βh), with `label_smoothing` ε the conservative
  -(1-ε) log σ(βh) - ε log σ(-βh); ipo (Azar et al. 2023) (h - 1/(2β))². A reward is
  β (policy - reference) of its reply.
  """
  chosen_ratio = policy_chosen - reference_chosen
  rejected_ratio = policy_rejected - reference_rejected
  margin = chosen_ratio - rejected_ratio
  if loss_type == "sigmoid":
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * margin)
              - label_smoothing * jax.nn.log_sigmoid(-beta * margin))
  elif loss_type == "ipo":
    losses = jnp.square(margin - 1.0 / (2.0 * beta))
  else:
    raise ValueError(f"DPO.loss_type={loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
  return losses, beta * chosen_ratio, beta * rejected_ratio


def reference_logps_fn(graphdef, param_shardings: dict, batch_sharding) -> Callable:
  """Jitted `(params, batch) -> (chosen, rejected)` reply log-probabilities of the reference
  model, sharded like the batch; its parameters are arguments, never baked-in constants."""
  def reference(params, batch):
    chosen, rejected, _ = pair_logps(nnx.merge(graphdef, params), batch)
    return chosen, rejected
  return jax.jit(reference, in_shardings=(param_shardings, batch_sharding),
                 out_shardings=batch_sharding)


@gin.configurable(module="maxlm")
@dataclasses.dataclass(frozen=True)
class SFT(tasks.Pretrain):
  """Supervised fine-tuning: next-token cross-entropy on the loss-masked tokens only."""
  batch_fields: tuple[str, ...] = SFT_FIELDS

  def loss(self, model, batch):
    return sft_loss(model, batch, self.z_loss)

  def summary(self, eval_scalars, manifest, step):
    eval_loss = eval_scalars["eval_loss"]
    print(f"\nheld-out loss on the supervised tokens after {step} steps: {eval_loss:.3f} "
          f"nats/token (perplexity {eval_scalars['eval_perplexity']:.2f})", flush=True)
    return {"eval_loss": eval_loss, "eval_perplexity": eval_scalars["eval_perplexity"],
            "step": step}


@gin.configurable(module="maxlm")
@dataclasses.dataclass(frozen=True)
class DPO:
  """Direct preference optimization against the frozen starting parameters.

  `beta` scales the implicit reward; `loss_type` "sigmoid" (the DPO paper's) or "ipo";
  `label_smoothing` > 0 assumes that fraction of the preferences flipped (sigmoid only).
  """
  beta: float = 0.1
  loss_type: str = "sigmoid"
  label_smoothing: float = 0.0
  batch_fields: tuple[str, ...] = PREFERENCE_FIELDS
  # Set by `bind`: the reference log-probabilities of a batch.
  reference_logps: Callable | None = dataclasses.field(default=None, repr=False, compare=False)

  def __post_init__(self):
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f"DPO.loss_type={self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if self.beta <= 0:
      raise ValueError(f"DPO.beta={self.beta} must be positive; 0.1 is the usual value")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"DPO.label_smoothing={self.label_smoothing} must be in [0, 0.5)")

  def bind(self, context: tasks.TaskContext) -> "DPO":
    forward = reference_logps_fn(context.graphdef, context.param_shardings,
                                 context.batch_sharding)
    return dataclasses.replace(
        self, reference_logps=functools.partial(forward, context.reference_params()))

  def prepare_batch(self, batch):
    if self.reference_logps is None:
      raise ValueError("DPO.prepare_batch needs the reference model; call DPO.bind first")
    chosen, rejected = self.reference_logps(batch)
    return {**batch, "reference_chosen_logps": chosen, "reference_rejected_logps": rejected}

  def step_cost(self, config, seq_len):
    """The policy trains on both halves of a row; the reference runs forward over both, a
    third of a training token's FLOPs (no backward)."""
    tokens = len(HALVES) * seq_len
    per_token = training_flops_per_token(config, seq_len)
    return tokens, tokens * per_token + tokens * per_token / 3

  def loss(self, model, batch):
    chosen, rejected, real = pair_logps(model, batch)
    losses, chosen_rewards, rejected_rewards = dpo_losses(
        chosen, rejected, batch["reference_chosen_logps"], batch["reference_rejected_logps"],
        self.beta, self.loss_type, self.label_smoothing)
    real = real.astype(jnp.float32)
    pairs = jnp.sum(real)
    total = lambda values: jnp.sum(values * real)  # noqa: E731
    metrics = {"dpo_loss_sum": total(losses), "pairs": pairs,
               "reward_chosen_sum": total(chosen_rewards),
               "reward_rejected_sum": total(rejected_rewards),
               "reward_margin_sum": total(chosen_rewards - rejected_rewards),
               "reward_accuracy_sum": total(chosen_rewards > rejected_rewards)}
    return metrics["dpo_loss_sum"] / jnp.maximum(pairs, 1.0), metrics

  def train_scalars(self, metrics):
    return reward_scalars(metrics)

  def eval_scalars(self, sums):
    pairs = max(float(sums["pairs"]), 1.0)
    return {"eval_loss": float(sums["dpo_loss_sum"]) / pairs, **reward_scalars(sums, "eval_")}

  def summary(self, eval_scalars, manifest, step):
    del manifest
    print(f"\nheld-out after {step} steps: reward accuracy "
          f"{eval_scalars['eval_reward_accuracy']:.3f} | reward margin "
          f"{eval_scalars['eval_reward_margin']:.3f} | DPO loss {eval_scalars['eval_loss']:.3f}",
          flush=True)
    return {**eval_scalars, "step": step}


def reward_scalars(sums: dict, prefix: str = "") -> dict[str, float]:
  """Mean reward metrics per real pair from their sums (`reward_*_sum`, `pairs`)."""
  pairs = max(float(sums["pairs"]), 1.0)
  return {prefix + name: float(sums[f"{name}_sum"]) / pairs for name in REWARDS}
