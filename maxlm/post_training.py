"""Post-training tasks: supervised fine-tuning (SFT) and direct preference optimization (DPO).

Both read the chat records of `beam_pipelines.prepare_chat` (see its manifest): packed rows
of conversations whose `loss_mask` is 1 on exactly the tokens to predict (an assistant's
content and its `<|end|>`). The loss at position t predicts tokens[t+1] and counts iff
loss_mask[t+1] == 1 within one conversation.

DPO's rows hold pairs: pair k of a row is segment k, its shared prefix ([bos] prompt, the
halves' longest common prefix) computed once, then the chosen continuation, then the rejected
one (`branch_ids` 0, 1, 2; see `beam_pipelines.chat_examples`). Attention keeps the two
continuations apart (`layers.attention_mask`), and a token's log-probability is read where its
predecessor is (`predecessors`): the rejected reply's first token follows the prefix, not the
chosen reply. A reply's log-probability is the sum over the supervised tokens of the prefix and
its own continuation. The reference model is the run's starting parameters (`init_from`'s),
frozen; `DPO.prepare_batch` adds its per-pair log-probabilities to each batch.
"""

import dataclasses
import functools
import logging
from collections.abc import Callable

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from maxlm import tasks
from maxlm.errors import UserError
from maxlm.model import training_flops_per_token

logger = logging.getLogger(__name__)

SFT_FIELDS = ("tokens", "segment_ids", "positions", "loss_mask")
PREFERENCE_FIELDS = (*SFT_FIELDS, "branch_ids")
CHOSEN, REJECTED = 1, 2  # branch ids; 0 is the shared prefix
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


def predecessors(segment_ids: jax.Array, positions: jax.Array,
                 branch_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per token, the index of the token before it in its own sequence (same segment, branch 0
  or its own, position - 1), and whether it has one. All [batch, seq] int; returns (int32
  index, bool). Within a segment the branches come in order 0, 1, 2, so that token is the
  one just before, except for a branch's first token after another branch: the last
  branch-0 token."""
  index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
  def shifted(values):  # values[:, i - 1] at i, -1 at 0
    return jnp.pad(values[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  previous_branch = shifted(branch_ids)
  last_shared = jax.lax.cummax(jnp.where(branch_ids == 0, index, -1), axis=1)
  predecessor = jnp.where((previous_branch == branch_ids) | (previous_branch == 0), index - 1,
                          shifted(last_shared))
  safe = jnp.maximum(predecessor, 0)
  at = lambda values: jnp.take_along_axis(values, safe, axis=1)  # noqa: E731
  has_one = ((predecessor >= 0) & (segment_ids != 0) & (at(segment_ids) == segment_ids)
             & (at(positions) == positions - 1))
  return safe, has_one


def token_logps(logits: jax.Array, tokens: jax.Array, predecessor: jax.Array) -> jax.Array:
  """log p(tokens[b, i]) from the logits at predecessor[b, i]: one scalar gather per token.
  logits: [batch, seq, vocab]; tokens, predecessor: [batch, seq]. Returns float32 [batch, seq]."""
  logits = logits.astype(jnp.float32)
  rows = jnp.arange(tokens.shape[0])[:, None]
  log_z = jnp.take_along_axis(jax.nn.logsumexp(logits, axis=-1), predecessor, axis=1)
  return logits[rows, predecessor, tokens] - log_z


def segment_logps(logits: jax.Array, batch: dict[str, jax.Array]):
  """Per segment of each row: the summed log-probabilities of its chosen and of its rejected
  reply's supervised tokens, and how many each has. logits: [batch, seq, vocab]; `batch`
  holds PREFERENCE_FIELDS, [batch, seq] each. Returns four [batch, seq // 2] arrays (chosen,
  rejected, chosen count, rejected count), column k - 1 for segment k: a segment with a
  target has two tokens at least, so seq // 2 columns hold every one."""
  segment_ids, branch_ids = batch["segment_ids"], batch["branch_ids"]
  predecessor, has_one = predecessors(segment_ids, batch["positions"], branch_ids)
  supervised = has_one & (batch["loss_mask"] != 0)
  logps = token_logps(logits, batch["tokens"], predecessor)
  num_columns = segment_ids.shape[1] // 2
  per_row = jax.vmap(lambda values, ids: jax.ops.segment_sum(values, ids, num_columns + 1))
  sums = []
  for other_reply in (REJECTED, CHOSEN):
    weights = supervised & (branch_ids != other_reply)
    sums.append((per_row(jnp.where(weights, logps, 0.0), segment_ids)[:, 1:],
                 per_row(weights.astype(jnp.float32), segment_ids)[:, 1:]))
  (chosen, chosen_count), (rejected, rejected_count) = sums
  return chosen, rejected, chosen_count, rejected_count


def pair_logps(model, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(chosen, rejected) reply log-probabilities [batch, seq // 2] under `model`, and which
  columns are real pairs (bool, same shape): one forward over the shared-prefix rows."""
  x, _ = model.decode(model.embed(batch["tokens"]), batch["positions"], batch["segment_ids"],
                      branch_ids=batch["branch_ids"])
  chosen, rejected, chosen_count, rejected_count = segment_logps(model.logits(x), batch)
  return chosen, rejected, (chosen_count > 0) & (rejected_count > 0)


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

  def __post_init__(self):  # gin builds the task as `train` starts: a UserError is one line
    if self.loss_type not in LOSS_TYPES:
      raise UserError(f"DPO.loss_type={self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if self.beta <= 0:
      raise UserError(f"DPO.beta={self.beta} must be positive; 0.1 is the usual value")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise UserError(f"DPO.label_smoothing={self.label_smoothing} must be in [0, 0.5)")

  def bind(self, context: tasks.TaskContext) -> "DPO":
    if context.reference_from is None:
      logger.warning("DPO's reference model is this run's random initialization (no "
                     "train.init_from); DPO usually starts from an SFT run, as "
                     "dpo_tiny.gin's train.init_from does")
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
    """The policy trains on a row's tokens (each pair's prompt once); the reference runs
    forward over them, a third of a training token's FLOPs (no backward)."""
    per_token = training_flops_per_token(config, seq_len)
    return seq_len, seq_len * per_token + seq_len * per_token / 3

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
