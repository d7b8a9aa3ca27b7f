"""The sharded train and eval steps, shared by every task.

A task hands in `loss_fn(model, batch) -> (loss, metrics)`; this module owns the state
pytree, its shardings on the mesh, and the jitted steps with explicit in/out shardings.
Parameters may be split into trainable ones (in the state, with optimizer state) and frozen
ones (a LoRA base, say), which the steps take as sharded arguments: never baked into the
compiled program as constants, and never given optimizer state.
"""

import ctypes
import dataclasses
import platform
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxlm import sharding
from maxlm.model import ModelConfig, Transformer

LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, dict]]
# The count a task's loss is a mean over: the first of these its metrics hold (else 1).
LOSS_COUNT_METRICS = ("target_tokens", "pairs")

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt options
_NEVER = -1  # as glibc's size_t: the largest threshold


def keep_freed_host_memory() -> bool:
  """Makes glibc malloc keep freed memory for reuse; returns whether it could (glibc only).

  XLA:CPU allocates a step's temporaries as one block per run (3.3 GB on the benchmark's
  shapes). glibc maps blocks over 32 MB afresh and unmaps them when freed, so every step
  page-faulted the whole block back in: ~800k faults, about 2 s of kernel time per step, and
  5 to 10 s after an idle pause on a VM that hands free memory back to its host. Kept, the
  block is reused from the second step on. Call it before JAX first touches a CPU device:
  threads that have allocated already keep their own arena, which maps large blocks anyway.
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER))
  return all(libc.mallopt(option, value) == 1 for option, value in settings)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def abstract_model(config: ModelConfig, seed: int = 0):
  """(graphdef, abstract nnx.State) without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(seed))))


def split_trainable(params: dict, trainable: str | None) -> tuple[dict, dict]:
  """(trainable, frozen) parts of a nested parameter dict (arrays, shapes or shardings alike):
  a leaf trains when its path, keys joined by "/" (`blocks/0/attention/q`), fully
  matches the regex `trainable`; None trains every leaf."""
  if trainable is None:
    return params, {}
  pattern = re.compile(trainable)
  def train_it(path):
    return pattern.fullmatch("/".join(str(key) for key in path)) is not None
  return _select(params, train_it), _select(params, lambda path: not train_it(path))


def _select(tree: dict, keep, prefix: tuple = ()) -> dict:
  selected = {}
  for key, value in tree.items():
    path = (*prefix, key)
    if isinstance(value, dict):
      if part := _select(value, keep, path):
        selected[key] = part
    elif keep(path):
      selected[key] = value
  return selected


def merge_params(trainable: dict, frozen: dict) -> dict:
  """The whole parameter dict again: inverse of `split_trainable`."""
  merged = dict(trainable)
  for key, value in frozen.items():
    merged[key] = merge_params(merged.get(key, {}), value) if isinstance(value, dict) else value
  return merged


def state_shardings(abstract_state: nnx.State, optimizer: optax.GradientTransformation,
                    mesh: Mesh, trainable: str | None = None) -> TrainState:
  """Where each leaf of the TrainState lives: optimizer moments follow their parameter.
  With `trainable`, the state holds only the parameters it matches (see `split_trainable`)."""
  params, _ = split_trainable(sharding.param_shardings(abstract_state, mesh), trainable)
  abstract_params, _ = split_trainable(nnx.to_pure_dict(abstract_state), trainable)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_state = optax.tree_map_params(
      optimizer, lambda _, param_sharding: param_sharding,
      jax.eval_shape(optimizer.init, abstract_params), params,
      transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=params, opt_state=opt_state)


def frozen_shardings(abstract_state: nnx.State, mesh: Mesh, trainable: str | None) -> dict:
  """Where each frozen parameter lives (those `trainable` does not match)."""
  return split_trainable(sharding.param_shardings(abstract_state, mesh), trainable)[1]


def abstract_train_state(abstract_state: nnx.State, optimizer, shardings: TrainState,
                         trainable: str | None = None):
  """ShapeDtypeStructs with shardings: the restore target for a checkpoint."""
  params, _ = split_trainable(nnx.to_pure_dict(abstract_state), trainable)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=jax.eval_shape(optimizer.init, params))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def init_train_state(config: ModelConfig, optimizer, shardings: TrainState,
                     seed: int = 0) -> TrainState:
  """Initializes parameters directly in their sharded layout (never whole on one device)."""
  def init():
    params = nnx.to_pure_dict(nnx.state(Transformer(config, rngs=nnx.Rngs(seed))))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
  return jax.jit(init, out_shardings=shardings)()


def train_state_from_params(params: dict, optimizer, shardings: TrainState) -> TrainState:
  """Step 0 and a fresh optimizer state around given (already sharded) parameters."""
  def init(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
  return jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings)(params)


def init_params(config: ModelConfig, param_shardings: dict, seed: int = 0) -> dict:
  """Freshly initialized parameters, made directly in their sharded layout."""
  def init():
    return nnx.to_pure_dict(nnx.state(Transformer(config, rngs=nnx.Rngs(seed))))
  return jax.jit(init, out_shardings=param_shardings)()


def make_train_step(graphdef, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    shardings: TrainState, batch_sharding: NamedSharding, microbatches: int = 1,
                    frozen_shardings: dict | None = None):
  """Returns jitted `step(state, batch) -> (state, metrics)`; `state` is donated. Given
  `frozen_shardings`, it is `step(state, batch, frozen)`: the frozen parameters join the
  state's in the model, and only the state's are differentiated and updated.

  With `microbatches > 1` the batch is split into that many slices whose gradients are
  accumulated before one optimizer update: the same update as the whole batch at a fraction
  of the activation memory. A step whose loss or gradient is not finite leaves parameters
  and optimizer state as they were (the batch is still consumed) and reports `skipped=1`.
  """
  def train_step(state: TrainState, batch: dict, frozen: dict) -> tuple[TrainState, dict]:
    loss, metrics, grads = _accumulated_gradients(graphdef, loss_fn, state.params, frozen,
                                                  batch, microbatches)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_bad = lambda new, old: jax.tree.map(  # noqa: E731
        lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
               "skipped": 1 - finite.astype(jnp.int32)}
    return TrainState(step=state.step + 1, params=keep_if_bad(params, state.params),
                      opt_state=keep_if_bad(opt_state, state.opt_state)), metrics

  # One sharding for every batch field: a task may bring whatever [batch, ...] arrays it needs.
  if frozen_shardings is None:
    return jax.jit(lambda state, batch: train_step(state, batch, {}),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                   donate_argnums=0)
  return jax.jit(train_step, in_shardings=(shardings, batch_sharding, frozen_shardings),
                 out_shardings=(shardings, None), donate_argnums=0)


def _accumulated_gradients(graphdef, loss_fn: LossFn, params: dict, frozen: dict, batch: dict,
                           microbatches: int) -> tuple[jax.Array, dict, dict]:
  """(loss, metrics, gradient) of the whole batch, computed one microbatch at a time.

  A task's loss is a mean over its microbatch's count (`LOSS_COUNT_METRICS`: target tokens,
  DPO's pairs; 1 if it reports none), so microbatches weigh by that count; the task's other
  metrics are sums and add up.
  """
  def loss_of(params, microbatch):
    return loss_fn(nnx.merge(graphdef, merge_params(params, frozen)), microbatch)
  loss_and_grad = jax.value_and_grad(loss_of, has_aux=True)
  if microbatches == 1:
    (loss, metrics), grads = loss_and_grad(params, batch)
    return loss, metrics, grads

  def add_microbatch(totals, microbatch):
    (loss, metrics), grads = loss_and_grad(params, microbatch)
    counts = [metrics[name] for name in LOSS_COUNT_METRICS if name in metrics]
    weight = jnp.asarray(counts[0] if counts else 1.0, jnp.float32)
    weighted = (weight * loss, weight, jax.tree.map(lambda g: weight * g, grads), metrics)
    return jax.tree.map(jnp.add, totals, weighted), None

  split = jax.tree.map(lambda x: _split_microbatches(x, microbatches), batch)
  first = jax.tree.map(lambda x: x[0], split)
  metric_shapes = jax.eval_shape(loss_of, params, first)[1]
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                       (jnp.float32(0), jnp.float32(0), params, metric_shapes))
  (loss_sum, weight_sum, grad_sum, metrics), _ = jax.lax.scan(add_microbatch, zeros, split)
  weight_sum = jnp.maximum(weight_sum, 1e-9)
  return loss_sum / weight_sum, metrics, jax.tree.map(lambda g: g / weight_sum, grad_sum)


def _split_microbatches(x: jax.Array, microbatches: int) -> jax.Array:
  """[batch, ...] -> [microbatches, batch / microbatches, ...]; microbatch i holds rows
  i, i + microbatches, ..., so every device keeps its own rows (no data moves)."""
  if x.shape[0] % microbatches:
    raise ValueError(f"batch of {x.shape[0]} rows does not split into {microbatches} "
                     "microbatches")
  rows = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
  return sharding.constrain(jnp.swapaxes(rows, 0, 1), (None, "batch") + (None,) * (x.ndim - 1))


def make_eval_step(graphdef, loss_fn: LossFn, param_shardings: dict,
                   batch_sharding: NamedSharding, frozen_shardings: dict | None = None):
  """Returns jitted `eval_step(params, batch) -> metrics` (sums, to be added over batches);
  given `frozen_shardings`, `eval_step(params, batch, frozen)`."""
  def eval_step(params: dict, batch: dict, frozen: dict) -> dict:
    _, metrics = loss_fn(nnx.merge(graphdef, merge_params(params, frozen)), batch)
    return metrics

  if frozen_shardings is None:
    return jax.jit(lambda params, batch: eval_step(params, batch, {}),
                   in_shardings=(param_shardings, batch_sharding))
  return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding, frozen_shardings))
