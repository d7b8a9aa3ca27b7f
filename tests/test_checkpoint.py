"""Checkpoints restore bit-identical state, onto another mesh too."""

import dataclasses
import json

import grain
import jax
import numpy as np
import pytest

from maxlm import checkpoint, optim, sharding, steps
from maxlm.config_checks import UserError, check_compatible
from maxlm.model import ModelConfig

CONFIG = ModelConfig(vocab_size=64, num_layers=1, embed_dim=32, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=64)


def _setup(mesh_shape):
  mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10))
  _, abstract_state = steps.abstract_model(CONFIG)
  return optimizer, abstract_state, steps.state_shardings(abstract_state, optimizer, mesh)


def test_round_trip_is_bit_identical_and_reshards(tmp_path):
  optimizer, abstract_state, shardings = _setup((1, 8, 1))
  state = steps.init_train_state(CONFIG, optimizer, shardings, seed=5)
  state = steps.TrainState(step=state.step + 7, params=state.params,
                           opt_state=jax.tree.map(lambda x: x + 3, state.opt_state))
  dataset = grain.MapDataset.range(100).to_iter_dataset()
  iterator = iter(dataset)
  for _ in range(3):
    next(iterator)
  saver = checkpoint.Checkpointer(tmp_path, save_every=1)
  saver.save(7, state, grain.checkpoint.CheckpointSave(iterator), checkpoint.model_meta(CONFIG))
  saver.wait()
  saver.close()

  for mesh_shape in [(1, 8, 1), (2, 4, 1), (1, 1, 1)]:
    optimizer, abstract_state, target_shardings = _setup(mesh_shape)
    target = steps.abstract_train_state(abstract_state, optimizer, target_shardings)
    fresh_iterator = iter(dataset)
    loader = checkpoint.Checkpointer(tmp_path, save_every=1)
    assert loader.latest_step() == 7
    restored, meta = loader.restore(7, target, grain.checkpoint.CheckpointRestore(fresh_iterator))
    loader.close()
    assert checkpoint.config_from_meta(meta) == CONFIG
    assert next(fresh_iterator) == 3
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(target.params)):
      assert got.sharding == want.sharding


def saved_meta_without(tmp_path, key: str) -> dict:
  """A real checkpoint's meta, read back after `key` was deleted from its model_config on disk
  (as a run written before ModelConfig had that field would hold it)."""
  optimizer, abstract_state, shardings = _setup((1, 1, 1))
  state = steps.init_train_state(CONFIG, optimizer, shardings, seed=0)
  saver = checkpoint.Checkpointer(tmp_path, save_every=1)
  saver.save(1, state, grain.checkpoint.CheckpointSave(iter(grain.MapDataset.range(4)
                                                            .to_iter_dataset())),
             checkpoint.model_meta(CONFIG, seq_len=16), force=True)
  saver.wait()
  saver.close()
  meta_file = tmp_path / "checkpoints" / "1" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  del meta["model_config"][key]
  meta_file.write_text(json.dumps(meta))
  return checkpoint.read_meta(tmp_path)[1]


def test_a_run_saved_before_a_config_field_existed_resumes_with_its_default(tmp_path):
  saved = saved_meta_without(tmp_path, "remat")
  assert "remat" not in saved["model_config"]
  assert checkpoint.config_from_meta(saved) == CONFIG
  check_compatible(saved, checkpoint.model_meta(CONFIG, seq_len=16), tmp_path)


def test_a_changed_field_is_still_refused_naming_it(tmp_path):
  saved = saved_meta_without(tmp_path, "remat")
  wider = dataclasses.replace(CONFIG, mlp_dim=128)
  with pytest.raises(UserError, match=r"different model_config \(mlp_dim: 64 -> 128\)"):
    check_compatible(saved, checkpoint.model_meta(wider, seq_len=16), tmp_path)
  with pytest.raises(UserError, match=r"remat: none -> full"):
    check_compatible(saved, checkpoint.model_meta(
        dataclasses.replace(CONFIG, remat="full"), seq_len=16), tmp_path)


def test_a_saved_field_this_model_config_lacks_is_refused_naming_it():
  meta = checkpoint.model_meta(CONFIG, seq_len=16)
  meta["model_config"]["field_from_the_future"] = 8
  with pytest.raises(UserError, match="model_config has field_from_the_future, which this "
                                      "maxlm's ModelConfig lacks"):
    checkpoint.config_from_meta(meta)
  with pytest.raises(UserError, match="field_from_the_future"):
    check_compatible(meta, checkpoint.model_meta(CONFIG, seq_len=16), "runs/x")
