"""Checkpoints restore bit-identical state, onto another mesh too."""

import grain
import jax
import numpy as np

from maxlm import checkpoint, optim, sharding, steps
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
