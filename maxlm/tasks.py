"""Training tasks: what a stage brings to the loop that `maxlm.train` writes once.

A task names the batch fields it reads, maps (model, batch) to (loss, metrics) for the
sharded steps of `maxlm.steps`, turns the metric sums of a held-out pass into scalars, may
prepare each batch on the host side first (DPO's reference log-probabilities), and says what
the run amounts to at its end. Pretraining is the first; SFT, DPO and vision plug in the same
way, chosen by gin (`train.task = @Pretrain()`).

Before the first step the loop binds the task to the run (`Task.bind(TaskContext)`): the
graphdef, shardings and mesh, and the run's starting parameters on demand, for a task that
needs a frozen reference model (DPO). A task without such needs returns itself.
"""

import collections
import dataclasses
import math
import re
from collections.abc import Callable
from typing import Protocol

import gin
import jax
import jax.numpy as jnp
import numpy as np

from maxlm.errors import UserError
from maxlm.model import ModelConfig, moe, training_flops_per_token


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


def next_token_loss(model, batch: dict[str, jax.Array], z_loss: float = 0.0,
                    load_balancing_loss: float = 0.01,
                    router_z_loss: float = 0.001) -> tuple[jax.Array, dict]:
  """Pretraining: mean next-token cross-entropy over packed documents, plus the mean z-loss
  times `z_loss` (0 turns it off), plus an MoE model's router losses (`with_router_losses`)."""
  (logits, _), router_stats = moe.run_with_router_stats(
      model, batch["tokens"], batch["positions"], batch["segment_ids"])
  targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
  nll, count, z_loss_sum = cross_entropy_with_mask(logits, targets, weights, z_loss)
  loss = (nll + z_loss_sum) / jnp.maximum(count, 1.0)
  metrics = {"nll_sum": nll, "z_loss_sum": z_loss_sum, "target_tokens": count}
  return with_router_losses(router_stats, loss, metrics, load_balancing_loss, router_z_loss)


def with_router_losses(stats: dict, loss: jax.Array, metrics: dict, load_balancing_loss: float,
                       router_z_loss: float) -> tuple[jax.Array, dict]:
  """(loss, metrics) plus the router losses and metrics of a forward pass's MoE layers
  (`stats` as `moe.run_with_router_stats` gives them): each loss's mean over layers times
  its weight, and each routing bias's `moe.balance_signal` (0 in value, there for its
  gradient). A dense model's pair (empty `stats`) comes back as it was."""
  if not stats:
    return loss, metrics
  mean = lambda name: sum(layer[name] for layer in stats.values()) / len(stats)
  aux = load_balancing_loss * mean("load_balancing_loss") + router_z_loss * mean("router_z_loss")
  aux += sum(layer.get("balance_signal", 0.0) for layer in stats.values())
  return loss + aux, {**metrics, **moe.router_metrics(stats)}


def router_scalars(metrics: dict) -> dict[str, float]:
  """The `moe/` metrics of one train step as means over its microbatches, plus the worst
  layer's `expert_load_max_over_mean` and `dropped_token_fraction`; {} for a dense model."""
  if "moe/passes" not in metrics:
    return {}
  passes = float(metrics["moe/passes"])
  scalars = {name: float(value) / passes for name, value in metrics.items()
             if name.startswith("moe/") and name != "moe/passes"}
  def worst(suffix):
    return max(value for name, value in scalars.items() if name.endswith(suffix))
  return {**scalars, "expert_load_max_over_mean": worst("/load_max_over_mean"),
          "dropped_token_fraction": worst("/dropped_fraction")}


EXPERT_SHARE = re.compile(r"moe/(layer\d+)/expert\d+_fraction")


class RouterLoadWindow:
  """Each MoE layer's expert shares, averaged over the steps added since the last `pop`: what
  one logging interval routed, where one step's share leans on its batch's few documents."""

  def __init__(self):
    self._sums: dict[str, float] = {}  # each expert's shares summed over the window's steps

  def add(self, scalars: dict[str, float]) -> None:
    """One train step's scalars (`router_scalars`'); a dense model's add nothing."""
    for name, value in scalars.items():
      if EXPERT_SHARE.fullmatch(name):
        self._sums[name] = self._sums.get(name, 0.0) + value

  def pop(self) -> dict[str, float]:
    """`moe/layer{i}/window_load_max_over_mean` (the most loaded expert's mean share over the
    mean expert's) for each layer and the worst as `expert_load_max_over_mean_window`, over
    the steps added since the last call, which starts the next window; {} when none were."""
    by_layer = collections.defaultdict(list)
    for name, total in self._sums.items():
      by_layer[EXPERT_SHARE.fullmatch(name).group(1)].append(total)
    window = {f"moe/{layer}/window_load_max_over_mean": max(totals) * len(totals) / sum(totals)
              for layer, totals in by_layer.items()}
    if window:
      window["expert_load_max_over_mean_window"] = max(window.values())
    self._sums = {}
    return window


@dataclasses.dataclass(frozen=True)
class TaskContext:
  """What the loop hands a task once, before the first step.

  `reference_params()` loads the parameters the run started from (`init_from`'s, else the
  seed's), laid out by `param_shardings`, on a resume too: a reference model stays the same
  across restarts. With frozen parameters it reuses the arrays the run already holds for them.
  `reference_from` is the `init_from` run they come from (None: the seed's initialization).
  """
  graphdef: object
  param_shardings: dict  # of the whole parameter dict
  batch_sharding: object  # every [batch, ...] field's NamedSharding
  mesh: object
  reference_params: Callable[[], dict]
  reference_from: str | None = None


class Task(Protocol):
  """The loop's view of a training stage."""
  batch_fields: tuple[str, ...]  # record fields its loss reads; checked against the data

  def bind(self, context: TaskContext) -> "Task":
    """The task ready for this run's loop; most tasks return themselves."""

  def loss(self, model, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    """(mean loss, metrics); metrics are sums over the batch, so batches add up."""

  def prepare_batch(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Host-side work on each global batch before the step; most tasks return it as is."""

  def step_cost(self, config: ModelConfig, seq_len: int) -> tuple[int, float]:
    """(tokens a train step trains on per batch row, the model FLOPs that row costs the
    step, `prepare_batch`'s included): what `tokens_per_s` and `mfu` count."""

  def train_scalars(self, metrics: dict[str, jax.Array]) -> dict[str, float]:
    """Scalars beside the loop's own (loss, grad_norm, ...) from one train step's metrics."""

  def eval_scalars(self, sums: dict[str, float]) -> dict[str, float]:
    """Scalars (named `eval_*`) from the metric sums of a held-out pass."""

  def summary(self, eval_scalars: dict[str, float], manifest: dict, step: int) -> dict:
    """Prints what the finished run amounts to; returns it as numbers."""


@gin.configurable(module="maxlm")
@dataclasses.dataclass(frozen=True)
class Pretrain:
  """Next-token prediction over packed documents; `z_loss` weighs mean log(Z)**2 (0: off).
  An MoE model adds its routers' losses, each a mean over MoE layers: Switch Transformer's
  load-balancing loss times `load_balancing_loss` and the router z-loss times `router_z_loss`."""
  z_loss: float = 0.0
  load_balancing_loss: float = 0.01
  router_z_loss: float = 0.001
  batch_fields: tuple[str, ...] = ("tokens", "segment_ids", "positions")

  def __post_init__(self):  # SFT and VisionSFT too, whose bindings the run's checks skip
    for name in ("z_loss", "load_balancing_loss", "router_z_loss"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
          math.isfinite(value) and value >= 0):
        raise UserError(f"{type(self).__name__}.{name}={value!r} must be a number >= 0")

  def bind(self, context):
    del context
    return self

  def loss(self, model, batch):
    return next_token_loss(model, batch, z_loss=self.z_loss,
                           load_balancing_loss=self.load_balancing_loss,
                           router_z_loss=self.router_z_loss)

  def prepare_batch(self, batch):
    return batch

  def step_cost(self, config, seq_len):
    return seq_len, seq_len * training_flops_per_token(config, seq_len)

  def train_scalars(self, metrics):
    return router_scalars(metrics)

  def eval_scalars(self, sums):
    loss = sums["nll_sum"] / max(sums["target_tokens"], 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss))}

  def summary(self, eval_scalars, manifest, step):
    eval_loss, entropy = eval_scalars["eval_loss"], manifest["unigram_entropy_nats"]
    below = 1.0 - eval_loss / entropy
    print(f"\nheld-out loss after {step} steps: {eval_loss:.3f} nats/token | unigram entropy "
          f"of the training tokens: {entropy:.3f} nats/token | "
          f"{abs(100 * below):.1f}% {'below' if below >= 0 else 'above'} it", flush=True)
    return {"eval_loss": eval_loss, "unigram_entropy_nats": entropy, "fraction_below": below,
            "step": step}
