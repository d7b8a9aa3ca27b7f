"""The whole parameter set of a run directory, also when its checkpoints hold only part of it.

A run with `train.trainable` checkpoints only the parameters it trains. Each other parameter
is what the run started from: its `init_from` run's value where that run's model has the
parameter (itself possibly partial: a LoRA run from an SFT run from a pretraining run), else
the run's seed's initialization (a new LoRA adapter).
"""

import os

import jax
from flax import nnx

from maxlm import checkpoint, steps
from maxlm.model import ModelConfig, Transformer


def restore_params(run_dir: str | os.PathLike, abstract_params: dict,
                   step: int | None = None) -> dict:
  """The parameters `abstract_params` names (a pure dict of ShapeDtypeStructs with shardings)
  as `run_dir`'s latest (or given) checkpoint holds them, or as the run started them."""
  step, meta = checkpoint.read_meta(run_dir, step)
  trained, others = steps.split_trainable(abstract_params, meta.get("trainable"))
  params = checkpoint.restore_params(run_dir, trained, step) if trained else {}
  if not others:
    return params
  started = starting_params(meta.get("init_from"), checkpoint.config_from_meta(meta),
                            meta.get("seed", 0), others,  # 0: train.seed's default
                            meta.get("init_from_step"))  # None (older runs): the latest
  return steps.merge_params(params, started)


def starting_params(init_from: str | None, config: ModelConfig, seed: int,
                    abstract_params: dict, init_from_step: int | None = None) -> dict:
  """The parameters `abstract_params` names as a run of `config` and `seed` starts them:
  `init_from`'s (its latest checkpoint, or `init_from_step`'s) where its model has them, the
  seed's initialization for the rest."""
  params, fresh = {}, abstract_params
  if init_from:
    init_from_step, base_meta = checkpoint.read_meta(init_from, init_from_step)
    base_config = checkpoint.config_from_meta(base_meta)
    from_base, fresh = _split_like(abstract_params, _param_shapes(base_config))
    params = restore_params(init_from, from_base, init_from_step) if from_base else {}
  if fresh:
    params = steps.merge_params(params, fresh_params(config, fresh, seed))
  return params


def fresh_params(config: ModelConfig, abstract_params: dict, seed: int) -> dict:
  """The seed's initialization of the parameters `abstract_params` names, made in their
  layout; XLA drops the work of the others."""
  def init():
    whole = nnx.to_pure_dict(nnx.state(Transformer(config, rngs=nnx.Rngs(seed))))
    return _at_paths(whole, abstract_params)
  return jax.jit(init, out_shardings=jax.tree.map(lambda s: s.sharding, abstract_params))()


def _param_shapes(config: ModelConfig) -> dict:
  return nnx.to_pure_dict(steps.abstract_model(config)[1])


def _split_like(tree: dict, like: dict) -> tuple[dict, dict]:
  """(the leaves of `tree` whose path `like` also has, the others)."""
  inside, outside = {}, {}
  for key, value in tree.items():
    if key not in like:
      outside[key] = value
    elif isinstance(value, dict):
      inside[key], outside[key] = _split_like(value, like[key])
    else:
      inside[key] = value
  return _without_empty(inside), _without_empty(outside)


def _without_empty(tree: dict) -> dict:
  return {key: value for key, value in tree.items() if not isinstance(value, dict) or value}


def _at_paths(tree: dict, like: dict) -> dict:
  """The leaves of `tree` at the paths of `like`, shaped like `like`."""
  return {key: _at_paths(tree[key], value) if isinstance(value, dict) else tree[key]
          for key, value in like.items()}
