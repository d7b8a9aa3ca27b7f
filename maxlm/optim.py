"""The optimizer: AdamW with linear warmup, cosine decay and global-norm clipping."""

import gin
import jax
import optax

from maxlm.model import moe


@gin.configurable(module="maxlm")
def learning_rate_schedule(total_steps: int, peak_learning_rate: float = 3e-4,
                           warmup_steps: int = 100, final_fraction: float = 0.1) -> optax.Schedule:
  warmup_steps = min(warmup_steps, max(total_steps - 1, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_learning_rate, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=peak_learning_rate * final_fraction)


def _is_matrix(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _named(name: str):
  """A mask over a parameter dict: the leaves with `name` on their path."""
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(key, "key", None) == name for key in path), params)


@gin.configurable(module="maxlm")
def make_optimizer(schedule: optax.Schedule, weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, max_grad_norm: float = 1.0,
                   router_learning_rate_scale: float = 1.0,
                   routing_bias_learning_rate_scale: float = 1.0,
                   routing_bias_update_rate: float | None = None) -> optax.GradientTransformation:
  """Weight decay skips vectors (norm scales): only matrices and embeddings decay.
  `router_learning_rate_scale` multiplies the updates of MoE routers (parameters named
  `router`): a router moving as fast as its experts keeps handing them other tokens.
  `routing_bias_learning_rate_scale` multiplies those of MoE routing biases (`routing_bias`,
  see `moe.balance_signal`). `routing_bias_update_rate` instead steps each routing bias by that
  rate times its expert's load excess (its share of the step's token copies over the mean
  share, minus 1), from the first step: the learning rate's warmup holds AdamW's steps near 0
  while the load is most skewed, and a step in proportion to the excess is large while it is
  and small once the load evens (DeepSeek-V3's fixed step against the excess's sign, at a rate
  that evens the first steps' load, keeps the routing jittering: a 17% drop rate at 0.3)."""
  chain = [optax.clip_by_global_norm(max_grad_norm),
           optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                       mask=_is_matrix)]
  # Each scale only when set: else the state stays as checkpoints hold it.
  for name, scale in (("router", router_learning_rate_scale),
                      ("routing_bias", routing_bias_learning_rate_scale)):
    if scale != 1.0:
      chain.append(optax.masked(optax.scale(scale), _named(name)))
  if routing_bias_update_rate is None:
    return optax.chain(*chain)
  if routing_bias_learning_rate_scale != 1.0:
    raise ValueError("make_optimizer: set routing_bias_update_rate or "
                     "routing_bias_learning_rate_scale, not both")
  if routing_bias_update_rate <= 0:
    raise ValueError(f"make_optimizer.routing_bias_update_rate={routing_bias_update_rate}: "
                     "must be positive")
  return _with_balancing_steps(optax.chain(*chain), _named("routing_bias"),
                               routing_bias_update_rate)


def _with_balancing_steps(inner: optax.GradientTransformation, mask, rate: float
                          ) -> optax.GradientTransformation:
  """`inner`, except that the leaves `mask` picks (routing biases, whose gradient is
  `moe.balance_signal`'s) step by -`rate` times their expert's load excess. Its state is
  `inner`'s, so checkpoints and shardings see the same tree either way."""

  def update(grads, state, params=None):
    updates, state = inner.update(grads, state, params)
    return jax.tree.map(
        lambda picked, update, grad: -rate * moe.load_excess(grad) if picked else update,
        mask(grads), updates, grads), state

  return optax.GradientTransformation(inner.init, update)
