"""Orbax checkpoints of a training run: save, restore, reshard on restore. Nothing else.

Layout of a run directory (what `--workdir` names and what serving loads):
  WORKDIR/tokenizer.model             copied from the data dir
  WORKDIR/checkpoints/<step>/state     TrainState: step, params, opt_state (StandardSave)
  WORKDIR/checkpoints/<step>/data_iter Grain iterator position
  WORKDIR/checkpoints/<step>/meta      JSON: model_config, seq_len, tokenizer sha256, data_dir
Restoring with a target whose shardings differ from the saved ones reshards on the fly.
"""

import dataclasses
import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from maxlm.config_checks import build_model_config
from maxlm.model import ModelConfig

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer.model"


def run_paths(directory: str | os.PathLike) -> tuple[Path, Path]:
  """(checkpoints dir, tokenizer file) for a run dir, or for its checkpoints dir itself."""
  directory = Path(directory).resolve()
  if directory.name == CHECKPOINTS:
    directory = directory.parent
  return directory / CHECKPOINTS, directory / TOKENIZER


class Checkpointer:
  """Owns the Orbax CheckpointManager of one run directory."""

  def __init__(self, workdir: str | os.PathLike, *, save_every: int, max_to_keep: int = 3,
               keep_period: int | None = None):
    """Keeps the latest `max_to_keep` checkpoints, plus each step divisible by `keep_period`."""
    checkpoints, _ = run_paths(workdir)
    self._manager = ocp.CheckpointManager(
        checkpoints,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=max_to_keep, keep_period=keep_period,
            create=True, enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iter_args, meta: dict, *, force: bool = False) -> bool:
    """Starts an async save when `step` is on the period (or `force`); returns whether it did."""
    return self._manager.save(
        step, force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data_iter=data_iter_args,
                                meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, abstract_state, data_iter_args) -> tuple[object, dict]:
    """Restores into `abstract_state`'s shardings and advances the data iterator in place."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data_iter=data_iter_args, meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def model_meta(config: ModelConfig, **extra) -> dict:
  return {"model_config": dataclasses.asdict(config), **extra}


def config_from_meta(meta: dict) -> ModelConfig:
  return build_model_config(**meta["model_config"])


def read_meta(checkpoint_dir: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
  """(step, meta) of the latest (or given) checkpoint of a run directory."""
  checkpoints, _ = run_paths(checkpoint_dir)
  if not checkpoints.is_dir():
    raise FileNotFoundError(f"{checkpoint_dir} holds no {CHECKPOINTS}/ directory; pass the "
                            "--workdir of a `python -m maxlm.train` run")
  with ocp.CheckpointManager(checkpoints) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{checkpoints} has no complete checkpoint yet")
  meta_file = checkpoints / str(step) / "meta" / "metadata"
  return step, json.loads(meta_file.read_text())


def restore_params(checkpoint_dir: str | os.PathLike, abstract_params, step: int | None = None):
  """Only the parameters of a training checkpoint, laid out as `abstract_params` says
  (ShapeDtypeStructs with shardings: any mesh, one device included)."""
  checkpoints, _ = run_paths(checkpoint_dir)
  if step is None:
    step, _ = read_meta(checkpoint_dir)
  handler = ocp.PyTreeCheckpointer()
  target = {"params": abstract_params}
  restore_args = jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
      target)
  restored = handler.restore(checkpoints / str(step) / "state",
                             args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                         partial_restore=True))
  return restored["params"]
