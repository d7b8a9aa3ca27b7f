"""One sharded train step equals the single-device step; the loss equals a hand computation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from maxlm import optim, sharding, steps, tasks
from maxlm.model import ModelConfig

CONFIG = ModelConfig(vocab_size=128, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
                     head_dim=16, mlp_dim=128, max_seq_len=64)
# Float32 reductions run in a different order once split across devices; Adam's update
# divides by sqrt(v), which magnifies those last-bit differences in tiny gradients.
LOSS_TOLERANCE = 1e-5
PARAM_TOLERANCE = 5e-4


def _batch(seed=0, batch=8, seq=32):
  rng = np.random.default_rng(seed)
  segment_ids = np.repeat(np.array([[1] * 20 + [2] * 10 + [0] * 2]), batch, 0)
  positions = np.concatenate([np.arange(20), np.arange(10), np.arange(2)])[None].repeat(batch, 0)
  return {"tokens": rng.integers(1, 128, (batch, seq)).astype(np.int32),
          "segment_ids": segment_ids.astype(np.int32), "positions": positions.astype(np.int32)}


def _run(mesh_shape, num_steps=2):
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(*mesh_shape, devices=devices)
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10, 1e-2, 2))
  graphdef, abstract_state = steps.abstract_model(CONFIG)
  shardings = steps.state_shardings(abstract_state, optimizer, mesh)
  state = steps.init_train_state(CONFIG, optimizer, shardings)
  train_step = steps.make_train_step(graphdef, tasks.next_token_loss, optimizer, shardings,
                                     sharding.batch_sharding(mesh))
  losses = []
  with jax.set_mesh(mesh):
    for i in range(num_steps):
      state, metrics = train_step(state, _batch(seed=i))
      losses.append(float(metrics["loss"]))
  return losses, state


@pytest.fixture(scope="module")
def single_device():
  return _run((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_matches_single_device(single_device, mesh_shape):
  losses, state = _run(mesh_shape)
  base_losses, base_state = single_device
  np.testing.assert_allclose(losses, base_losses, rtol=LOSS_TOLERANCE)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(base_state.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=PARAM_TOLERANCE)
  assert int(state.step) == 2


def test_fsdp_gives_each_device_one_eighth_of_every_matrix():
  _, state = _run((1, 8, 1), num_steps=1)
  matrices = [p for p in jax.tree.leaves(state.params) if p.ndim >= 2]
  assert len(matrices) == 2 + 2 * 7  # embedding, unembedding; q, k, v, o, gate, up, down per layer
  for param in matrices:
    assert {s.data.size for s in param.addressable_shards} == {param.size // 8}, param.sharding


def test_loss_matches_hand_computation():
  logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6],
                             [1 / 3, 1 / 3, 1 / 3]]]))
  tokens = np.array([[0, 1, 2, 1]])
  segment_ids = np.array([[1, 1, 1, 2]])  # last token starts a new document: no target
  targets, weights = tasks.next_token_targets(tokens, segment_ids)
  nll, count, z_loss = tasks.cross_entropy_with_mask(logits, targets, weights)
  # position 0 predicts token 1 (p=0.25); position 1 predicts token 2 (p=0.1)
  assert float(count) == 2
  np.testing.assert_allclose(float(nll), -np.log(0.25) - np.log(0.1), rtol=1e-6)
  assert float(z_loss) == 0.0


def test_z_loss_matches_hand_computation():
  logits = np.array([[[2.0, -1.0, 0.5], [0.0, 3.0, 1.0], [-2.0, 0.0, 4.0]]])
  targets, weights = np.array([[1, 2, 0]]), np.array([[1, 1, 0]])
  _, _, z_loss = tasks.cross_entropy_with_mask(logits, targets, weights, z_loss=1e-2)
  log_z = np.log(np.exp(logits[0]).sum(-1))  # the third position carries no weight
  np.testing.assert_allclose(float(z_loss), 1e-2 * (log_z[0] ** 2 + log_z[1] ** 2), rtol=1e-6)


def test_z_loss_is_added_to_the_mean_loss():
  from flax import nnx
  from maxlm.model import Transformer
  model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  batch = _batch()
  plain, metrics = tasks.next_token_loss(model, batch)
  with_z, _ = tasks.next_token_loss(model, batch, z_loss=1e-3)
  logits = np.asarray(model(batch["tokens"], batch["positions"], batch["segment_ids"])[0],
                      np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  _, weights = tasks.next_token_targets(batch["tokens"], batch["segment_ids"])
  expected = 1e-3 * np.sum(np.asarray(weights) * log_z ** 2) / float(metrics["target_tokens"])
  np.testing.assert_allclose(float(with_z) - float(plain), expected, rtol=1e-4)


def test_non_finite_step_is_skipped_and_counted():
  def loss_poisoned_by_first_token(model, batch):
    loss, metrics = tasks.next_token_loss(model, batch)
    return loss * jax.numpy.where(batch["tokens"][0, 0] == 0, jax.numpy.nan, 1.0), metrics

  mesh = sharding.make_mesh(2, 2, 2)
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10, 1e-2, 2))
  graphdef, abstract_state = steps.abstract_model(CONFIG)
  shardings = steps.state_shardings(abstract_state, optimizer, mesh)
  state = steps.init_train_state(CONFIG, optimizer, shardings)
  before = jax.device_get(state)
  train_step = steps.make_train_step(graphdef, loss_poisoned_by_first_token, optimizer,
                                     shardings, sharding.batch_sharding(mesh))
  poisoned = _batch()
  poisoned["tokens"][0, 0] = 0
  with jax.set_mesh(mesh):
    state, metrics = train_step(state, poisoned)
    assert int(metrics["skipped"]) == 1 and int(state.step) == 1
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(before.params)):
      np.testing.assert_array_equal(np.asarray(got), want)
    for got, want in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(before.opt_state)):
      np.testing.assert_array_equal(np.asarray(got), want)
    for seed in (1, 2):  # the first good step runs at warm-up's learning rate 0
      state, metrics = train_step(state, _batch(seed=seed))
      assert int(metrics["skipped"]) == 0
  assert not np.array_equal(np.asarray(state.params["embedding"]), before.params["embedding"])


def _one_sgd_step(mesh_shape, microbatches, batch):
  """SGD, so the update is the gradient itself: Adam's first step is about sign(gradient),
  which would turn last-bit differences of near-zero gradients into whole steps."""
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(*mesh_shape, devices=devices)
  optimizer = optax.sgd(0.5)
  graphdef, abstract_state = steps.abstract_model(CONFIG)
  shardings = steps.state_shardings(abstract_state, optimizer, mesh)
  train_step = steps.make_train_step(graphdef, tasks.next_token_loss, optimizer, shardings,
                                     sharding.batch_sharding(mesh), microbatches=microbatches)
  with jax.set_mesh(mesh):
    return train_step(steps.init_train_state(CONFIG, optimizer, shardings), batch)


@pytest.mark.parametrize("mesh_shape, microbatches", [((1, 1, 1), 4), ((2, 2, 2), 2)])
def test_accumulated_microbatches_give_the_whole_batch_update(mesh_shape, microbatches):
  batch = _batch(seed=3, batch=16)
  batch["segment_ids"][::3, 25:] = 0  # microbatches hold different numbers of target tokens
  whole_state, whole = _one_sgd_step(mesh_shape, 1, batch)
  state, metrics = _one_sgd_step(mesh_shape, microbatches, batch)
  for key in ("loss", "grad_norm", "nll_sum", "target_tokens"):
    np.testing.assert_allclose(float(metrics[key]), float(whole[key]), rtol=1e-5)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(whole_state)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


# --- trainable and frozen parameters -----------------------------------------------------------

ATTENTION_ONLY = r"blocks/\d+/attention/.*"


def _split_setup(mesh_shape=(2, 2, 2)):
  mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10, 1e-2, 2))
  graphdef, abstract_state = steps.abstract_model(CONFIG)
  shardings = steps.state_shardings(abstract_state, optimizer, mesh, ATTENTION_ONLY)
  frozen_shardings = steps.frozen_shardings(abstract_state, mesh, ATTENTION_ONLY)
  params = steps.init_params(CONFIG, sharding.param_shardings(abstract_state, mesh))
  trainable, frozen = steps.split_trainable(params, ATTENTION_ONLY)
  state = steps.train_state_from_params(trainable, optimizer, shardings)
  train_step = steps.make_train_step(graphdef, tasks.next_token_loss, optimizer, shardings,
                                     sharding.batch_sharding(mesh),
                                     frozen_shardings=frozen_shardings)
  return mesh, graphdef, params, state, frozen, train_step


def _leaf_paths(tree):
  return {"/".join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_split_trainable_parts_make_up_the_whole_and_merge_back():
  _, abstract_state = steps.abstract_model(CONFIG)
  params = nnx.to_pure_dict(abstract_state)
  trainable, frozen = steps.split_trainable(params, ATTENTION_ONLY)
  assert _leaf_paths(trainable) and all("/attention/" in p for p in _leaf_paths(trainable))
  assert not any("/attention/" in p for p in _leaf_paths(frozen))
  assert _leaf_paths(trainable) | _leaf_paths(frozen) == _leaf_paths(params)
  assert steps.merge_params(trainable, frozen) == params


def test_only_trainable_parameters_change_and_hold_optimizer_state():
  mesh, graphdef, params, state, frozen, train_step = _split_setup()
  before = jax.tree.map(np.asarray, params)
  with jax.set_mesh(mesh):
    state, metrics = train_step(state, _batch(), frozen)
    state, _ = train_step(state, _batch(seed=1), frozen)  # the first step's rate is 0 (warmup)
  # The reference gradient: the whole model differentiated in one piece, frozen part dropped.
  def loss_of(all_params):
    return tasks.next_token_loss(nnx.merge(graphdef, all_params), _batch())[0]
  whole_grads = jax.grad(loss_of)(before)
  trainable_grads, _ = steps.split_trainable(whole_grads, ATTENTION_ONLY)
  np.testing.assert_allclose(float(metrics["grad_norm"]),
                             float(optax.tree.norm(trainable_grads)), rtol=1e-5)
  for path, value in jax.tree_util.tree_flatten_with_path(frozen)[0]:
    np.testing.assert_array_equal(np.asarray(value), _at(before, path))
  for path, value in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    assert not np.array_equal(np.asarray(value), _at(before, path))
  moments = [x.size for x in jax.tree.leaves(state.opt_state) if x.ndim]
  trainable_size = sum(x.size for x in jax.tree.leaves(state.params))
  assert sum(moments) == 2 * trainable_size  # Adam's mu and nu, for the trainable ones only
  assert trainable_size < sum(x.size for x in jax.tree.leaves(before)) / 2


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def _constant_sizes(program: str) -> list[int]:
  """Element counts of the tensor constants in a StableHLO program."""
  sizes = []
  for shape in re.findall(r"stablehlo.constant dense<.*?> : tensor<([0-9x]*)[a-z]", program):
    sizes.append(int(np.prod([int(d) for d in shape.split("x") if d])))
  return sizes


def test_frozen_parameters_are_arguments_of_the_compiled_step_not_constants():
  mesh, _, _, state, frozen, train_step = _split_setup()
  with jax.set_mesh(mesh):
    program = train_step.lower(state, _batch(), frozen).as_text()
  main = next(line for line in program.splitlines() if "func.func public @main" in line)
  assert main.count("%arg") == len(jax.tree.leaves((state, _batch(), frozen)))
  smallest_frozen = min(x.size for x in jax.tree.leaves(frozen))
  assert max(_constant_sizes(program)) < smallest_frozen
  with jax.set_mesh(mesh):
    same_state = jax.tree.map(jnp.copy, state)
    _, first = train_step(state, _batch(), frozen)
    _, second = train_step(same_state, _batch(), jax.tree.map(lambda x: 2 * x, frozen))
  assert float(first["loss"]) != float(second["loss"]), "a new frozen value reaches the step"
