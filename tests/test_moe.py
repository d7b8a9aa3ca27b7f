"""Mixture of experts against NumPy references: routing, the router losses, both dispatches,
the expert mesh axis, the router metrics, and serving an MoE checkpoint."""

import dataclasses
import hashlib
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sentencepiece as spm
from flax import nnx

from maxlm import config_checks, optim, sampling, sharding, steps, tasks
from maxlm.errors import UserError
from maxlm.model import (
  ModelConfig,
  Transformer,
  count_params,
  moe,
  training_flops_per_token,
)
from serving.engine import Engine, SamplingSettings
from serving.orchestrator import Orchestrator
from test_serving import CONTEXT, save_random_checkpoint, train_tokenizer
from conftest import TINY_RUN, gin_config
from test_train import _metrics, _run_until_step, _train_process

CONFIG = ModelConfig(vocab_size=128, num_layers=3, embed_dim=32, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=64, max_seq_len=64, num_experts=8, experts_per_token=2,
                     moe_mlp_dim=16, num_shared_experts=1, first_dense_layers=1)
LOSS_TOLERANCE = 1e-5
PARAM_TOLERANCE = 5e-4  # Adam magnifies reduction-order differences in tiny gradients


def _np_softmax(logits):
  exps = np.exp(logits - logits.max(-1, keepdims=True))
  return exps / exps.sum(-1, keepdims=True)


def _np_swiglu_expert(x, gate, up, down):
  """x: [embed] through one expert, in float64."""
  g, u = x @ gate, x @ up
  return (g / (1 + np.exp(-g)) * u) @ down


def _np_moe(x, logits, k, gate, up, down, capacity=None):
  """Token by token: top-k of the softmax, renormalized; with `capacity`, each expert takes
  the first `capacity` copies in queue order (all first choices in token order, then all
  second choices, ...). Returns (out [tokens, embed], kept bool [tokens, k])."""
  x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
  probs = _np_softmax(np.asarray(logits, np.float64))
  chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
  kept = np.ones(chosen.shape, bool)
  if capacity is not None:
    taken = np.zeros(gate.shape[0], int)
    for choice in range(k):
      for token in range(len(x)):
        expert = chosen[token, choice]
        kept[token, choice] = taken[expert] < capacity
        taken[expert] += 1
  out = np.zeros_like(x)
  for token in range(len(x)):
    weights = probs[token, chosen[token]] / probs[token, chosen[token]].sum()
    for choice, expert in enumerate(chosen[token]):
      if kept[token, choice]:
        out[token] += weights[choice] * _np_swiglu_expert(x[token], gate[expert], up[expert],
                                                          down[expert])
  return out, kept


def _experts(seed, num_experts=4, embed=8, hidden=6):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(num_experts, embed, hidden)).astype(np.float32) * 0.5,
          rng.normal(size=(num_experts, embed, hidden)).astype(np.float32) * 0.5,
          rng.normal(size=(num_experts, hidden, embed)).astype(np.float32) * 0.5)


def test_routing_matches_a_numpy_top_k_reference():
  logits = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
  weights, experts = moe.route(jnp.asarray(logits), 3)
  probs = _np_softmax(logits.astype(np.float64))
  want_experts = np.argsort(-probs, axis=-1)[:, :3]
  want_weights = np.take_along_axis(probs, want_experts, -1)
  np.testing.assert_array_equal(experts, want_experts)
  np.testing.assert_allclose(weights, want_weights / want_weights.sum(-1, keepdims=True),
                             rtol=1e-5)


def test_routing_without_renormalization_keeps_the_softmax_probabilities():
  logits = np.random.default_rng(8).normal(size=(50, 8)).astype(np.float32)
  weights, experts = moe.route(jnp.asarray(logits), 2, renormalize=False)
  probs = _np_softmax(logits.astype(np.float64))
  want_experts = np.argsort(-probs, axis=-1)[:, :2]
  np.testing.assert_array_equal(experts, want_experts)
  np.testing.assert_allclose(weights, np.take_along_axis(probs, want_experts, -1), rtol=1e-5)


def test_a_routing_bias_chooses_the_experts_and_leaves_their_weights_unbiased():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(50, 8)).astype(np.float32)
  bias = rng.normal(size=8).astype(np.float32) * 2
  weights, experts = moe.route(jnp.asarray(logits), 2, bias=jnp.asarray(bias))
  want_experts = np.argsort(-(logits.astype(np.float64) + bias), axis=-1)[:, :2]
  want_weights = np.take_along_axis(_np_softmax(logits.astype(np.float64)), want_experts, -1)
  np.testing.assert_array_equal(experts, want_experts)
  np.testing.assert_allclose(weights, want_weights / want_weights.sum(-1, keepdims=True),
                             rtol=1e-5)
  unbiased = np.argsort(-logits, axis=-1)[:, :2]
  assert (want_experts != unbiased).any()  # the bias did change some choices


def test_the_balance_signal_is_zero_with_the_load_excess_as_its_gradient():
  experts = jnp.asarray(np.random.default_rng(4).integers(0, 6, (40, 2)), jnp.int32)
  bias = jnp.asarray(np.random.default_rng(5).normal(size=6), jnp.float32)
  value, grad = jax.value_and_grad(moe.balance_signal)(bias, moe.expert_fractions(experts, 6))
  shares = np.bincount(np.asarray(experts).reshape(-1), minlength=6) / 80
  assert value == 0.0
  np.testing.assert_allclose(grad, moe.BALANCE_SIGNAL_SCALE * (shares - 1 / 6), rtol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_a_top_1_router_learns_from_the_task_loss_only_without_renormalization(renormalize):
  config = dataclasses.replace(CONFIG, experts_per_token=1, num_shared_experts=0,
                               first_dense_layers=0, renormalize_routing=renormalize)
  graphdef, params = nnx.split(moe.MoE(config, nnx.Rngs(0)))
  x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 5, 32)), jnp.float32)
  grads = jax.grad(lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x))))(params)
  router_grad = np.abs(np.asarray(grads["router"][...])).max()
  assert router_grad > 1e-3 if not renormalize else router_grad < 1e-6  # p / p: rounding


def test_load_balancing_loss_is_one_for_a_uniform_router_and_n_for_a_collapsed_one():
  uniform = jnp.zeros((64, 8))
  _, experts = moe.route(uniform, 2)
  np.testing.assert_allclose(moe.load_balancing_loss(uniform, experts), 1.0, rtol=1e-6)
  collapsed = jnp.zeros((64, 8)).at[:, 5].set(30.0)
  _, experts = moe.route(collapsed, 1)
  np.testing.assert_allclose(moe.load_balancing_loss(collapsed, experts), 8.0, rtol=1e-5)


def test_router_losses_match_numpy_formulas():
  logits = np.random.default_rng(1).normal(size=(40, 6)).astype(np.float32) * 2
  _, experts = moe.route(jnp.asarray(logits), 2)
  probs = _np_softmax(logits.astype(np.float64))
  chosen = np.argsort(-probs, axis=-1)[:, :2]
  f = np.bincount(chosen.reshape(-1), minlength=6) / chosen.size
  np.testing.assert_allclose(moe.load_balancing_loss(jnp.asarray(logits), experts),
                             6 * np.sum(f * probs.mean(0)), rtol=1e-5)
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(moe.router_z_loss(jnp.asarray(logits)), np.mean(log_z ** 2),
                             rtol=1e-5)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_one_expert_with_top_1_equals_the_dense_mlp_with_the_same_weights(dispatch):
  gate, up, down = _experts(2, num_experts=1)
  x = np.random.default_rng(3).normal(size=(10, 8)).astype(np.float32)
  weights, experts = moe.route(jnp.zeros((10, 1)), 1)
  if dispatch == "dropless":
    out = moe.dropless(x, weights, experts, gate, up, down)
  else:
    out = moe.with_capacity(x, weights, experts, gate, up, down, capacity=10)
  want = [_np_swiglu_expert(row.astype(np.float64), gate[0], up[0], down[0]) for row in x]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_dropless_matches_the_numpy_reference_and_capacity_agrees_when_nothing_drops():
  gate, up, down = _experts(4)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(24, 8)).astype(np.float32)
  logits = rng.normal(size=(24, 4)).astype(np.float32)
  weights, experts = moe.route(jnp.asarray(logits), 2)
  dropless = moe.dropless(x, weights, experts, gate, up, down)
  np.testing.assert_allclose(dropless, _np_moe(x, logits, 2, gate, up, down)[0], rtol=1e-4,
                             atol=1e-5)
  no_drop = moe.capacity_of(24, 2, 4, factor=2.0)  # 4 experts, top-2: every token fits
  assert no_drop == 24
  capacity = moe.with_capacity(x, weights, experts, gate, up, down, no_drop)
  np.testing.assert_allclose(capacity, dropless, rtol=1e-5, atol=1e-6)

  def loss(kernels, run):
    return jnp.sum(jnp.sin(run(x, weights, experts, *kernels)))
  dropless_grads = jax.grad(loss)((gate, up, down), moe.dropless)
  capacity_grads = jax.grad(loss)(
      (gate, up, down), lambda *a: moe.with_capacity(*a, capacity=no_drop))
  for got, want in zip(capacity_grads, dropless_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_capacity_drops_the_copies_past_each_experts_capacity_in_queue_order():
  gate, up, down = _experts(6)
  rng = np.random.default_rng(7)
  x = rng.normal(size=(16, 8)).astype(np.float32)
  logits = rng.normal(size=(16, 4)).astype(np.float32)
  logits[:, 0] += 1.5  # expert 0 is popular: it overflows
  weights, experts = moe.route(jnp.asarray(logits), 2)
  out = moe.with_capacity(x, weights, experts, gate, up, down, capacity=5)
  want, kept = _np_moe(x, logits, 2, gate, up, down, capacity=5)
  assert 0 < (~kept).sum() < kept.size
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  places = np.asarray(moe.slots(experts, 4))
  np.testing.assert_array_equal(places < 5, kept)


def test_a_dense_config_builds_todays_parameter_tree_and_loss():
  dense = dataclasses.replace(CONFIG, num_experts=0, num_shared_experts=0)
  model = Transformer(dense, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model))
  block = {"attention_norm": {"scale"}, "attention": {"q", "k", "v", "o"},
           "mlp_norm": {"scale"}, "mlp": {"gate", "up", "down"}}
  assert set(params) == {"embedding", "blocks", "final_norm", "unembedding"}
  for layer in params["blocks"].values():
    assert {name: set(part) for name, part in layer.items()} == block
  batch = _batch(0)
  loss, metrics = tasks.Pretrain().loss(model, batch)
  logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  targets, weights = tasks.next_token_targets(batch["tokens"], batch["segment_ids"])
  nll, count, _ = tasks.cross_entropy_with_mask(logits, targets, weights)
  assert float(loss) == float(nll / count)  # bit for bit: no router term joins a dense loss
  assert not any(name.startswith("moe/") for name in metrics)


def test_moe_layers_follow_first_dense_layers_and_moe_every():
  config = dataclasses.replace(CONFIG, num_layers=7, first_dense_layers=2, moe_every=2)
  assert [config.is_moe_layer(layer) for layer in range(7)] == [
      False, False, False, True, False, True, False]
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  assert [isinstance(block.mlp, moe.MoE) for block in model.blocks] == [
      config.is_moe_layer(layer) for layer in range(7)]


def test_experts_are_mlp_dim_wide_when_moe_mlp_dim_is_unset():
  config = dataclasses.replace(CONFIG, moe_mlp_dim=None)
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  moe_layer = next(block.mlp for block in model.blocks if isinstance(block.mlp, moe.MoE))
  assert moe_layer.gate.get_value().shape == (config.num_experts, config.embed_dim,
                                               config.mlp_dim)


def test_total_and_active_parameter_counts_match_the_module():
  params = nnx.state(nnx.eval_shape(lambda: Transformer(CONFIG, rngs=nnx.Rngs(0))))
  sizes = {"/".join(map(str, path)): leaf.size
           for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))}
  assert sum(sizes.values()) == count_params(CONFIG)
  # One token multiplies 2 of the 8 experts in each of the 2 MoE layers.
  unused = 2 * 6 * 3 * CONFIG.embed_dim * CONFIG.moe_mlp_dim
  assert count_params(CONFIG, active=True) == count_params(CONFIG) - unused
  dense = dataclasses.replace(CONFIG, num_experts=0, num_shared_experts=0)
  added = training_flops_per_token(CONFIG, 32) - training_flops_per_token(dense, 32)
  moe_mlp = 8 * 32 + 3 * 32 * 16 * (2 + 1)  # router; two routed experts and the shared one
  assert added == 6 * 2 * (moe_mlp - 3 * 32 * 64)


def test_a_routing_bias_is_counted_as_a_parameter_but_not_as_flops():
  config = dataclasses.replace(CONFIG, routing_bias=True)
  params = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  assert sum(leaf.size for leaf in jax.tree.leaves(nnx.to_pure_dict(params))) == (
      count_params(CONFIG) + 2 * 8)  # a bias per expert in each of the 2 MoE layers
  assert count_params(config, active=True) == count_params(CONFIG, active=True) + 2 * 8
  assert training_flops_per_token(config, 32) == training_flops_per_token(CONFIG, 32)


def _batch(seed, batch=8, seq=32):
  rng = np.random.default_rng(seed)
  segment_ids = np.repeat(np.array([[1] * 20 + [2] * 10 + [0] * 2]), batch, 0)
  positions = np.concatenate([np.arange(20), np.arange(10), np.arange(2)])[None].repeat(batch, 0)
  return {"tokens": rng.integers(1, 128, (batch, seq)).astype(np.int32),
          "segment_ids": segment_ids.astype(np.int32), "positions": positions.astype(np.int32)}


def _train(config, mesh_shape, num_steps=2, microbatches=1):
  """(losses, metrics of the last step, state, the step's compiled HLO text)."""
  data, fsdp, tensor, expert = mesh_shape
  mesh = sharding.make_mesh(data, fsdp, tensor, expert,
                            devices=jax.devices()[:data * fsdp * tensor * expert])
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10, 1e-2, 2))
  graphdef, abstract_state = steps.abstract_model(config)
  shardings = steps.state_shardings(abstract_state, optimizer, mesh)
  state = steps.init_train_state(config, optimizer, shardings)
  train_step = steps.make_train_step(graphdef, tasks.Pretrain().loss, optimizer, shardings,
                                     sharding.batch_sharding(mesh), microbatches)
  losses = []
  with jax.set_mesh(mesh):
    hlo = train_step.lower(state, _batch(0)).compile().as_text()
    for i in range(num_steps):
      state, metrics = train_step(state, _batch(seed=i))
      losses.append(float(metrics["loss"]))
  return losses, metrics, state, hlo


@pytest.mark.parametrize("dispatch, routing_bias", [("dropless", False), ("capacity", False),
                                                   ("capacity", True)])
@pytest.mark.parametrize("mesh_shape", [(1, 2, 1, 4), (2, 2, 1, 2)])
def test_an_moe_layer_on_an_expert_mesh_matches_one_device(mesh_shape, dispatch, routing_bias):
  config = dataclasses.replace(CONFIG, moe_dispatch=dispatch, capacity_factor=4.0,  # no drops
                               routing_bias=routing_bias)
  graphdef, params = nnx.split(moe.MoE(config, nnx.Rngs(0)))
  if routing_bias:
    params["routing_bias"].set_value(
        jnp.asarray(np.random.default_rng(2).normal(size=config.num_experts), jnp.float32))
  x = jnp.asarray(np.random.default_rng(8).normal(size=(8, 16, config.embed_dim)), jnp.float32)

  def loss(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))
  want_loss, want_grads = jax.jit(jax.value_and_grad(loss))(params, x)
  data, fsdp, tensor, expert = mesh_shape
  mesh = sharding.make_mesh(data, fsdp, tensor, expert, devices=jax.devices()[:8])
  with jax.set_mesh(mesh):
    step = jax.jit(jax.value_and_grad(loss))
    sharded_x = jax.device_put(x, sharding.batch_sharding(mesh, ndim=3))
    got_loss, got_grads = step(params, sharded_x)
    assert "all-to-all" in step.lower(params, sharded_x).compile().as_text()
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def one_device():
  return _train(CONFIG, (1, 1, 1, 1))


@pytest.mark.slow  # 40 s; test_an_moe_layer_on_an_expert_mesh_matches_one_device is the fast one
@pytest.mark.parametrize("mesh_shape", [(1, 2, 1, 4), (2, 2, 1, 2)])
def test_an_expert_mesh_trains_like_one_device(one_device, mesh_shape):
  losses, _, state, hlo = _train(CONFIG, mesh_shape)
  base_losses, _, base_state, _ = one_device
  np.testing.assert_allclose(losses, base_losses, rtol=LOSS_TOLERANCE)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(base_state.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=PARAM_TOLERANCE)
  assert "all-to-all" in hlo
  gate = state.params["blocks"][1]["mlp"]["gate"]
  expert_devices = mesh_shape[3]
  assert {s.data.shape[0] for s in gate.addressable_shards} == {8 // expert_devices}


@pytest.mark.slow  # 30 s
def test_capacity_dispatch_on_an_expert_mesh_matches_one_device_when_nothing_drops():
  config = dataclasses.replace(CONFIG, moe_dispatch="capacity", capacity_factor=4.0)
  losses, metrics, _, hlo = _train(config, (1, 2, 1, 4), num_steps=1)
  base_losses, _, _, _ = _train(config, (1, 1, 1, 1), num_steps=1)
  np.testing.assert_allclose(losses, base_losses, rtol=LOSS_TOLERANCE)
  assert float(metrics["moe/layer1/dropped_fraction"]) == 0.0
  assert "all-to-all" in hlo


def test_a_capacity_run_with_room_for_every_token_trains_like_a_dropless_run(one_device):
  # 8 experts, top-2: capacity factor 4 makes each expert's capacity every token of the batch.
  config = dataclasses.replace(CONFIG, moe_dispatch="capacity", capacity_factor=4.0)
  losses, metrics, state, _ = _train(config, (1, 1, 1, 1))
  dropless_losses, _, dropless_state, _ = one_device
  assert CONFIG.moe_dispatch == "dropless"
  np.testing.assert_allclose(losses, dropless_losses, rtol=LOSS_TOLERANCE)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(dropless_state.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=PARAM_TOLERANCE)
  assert float(metrics["moe/layer1/dropped_fraction"]) == 0.0


def test_a_forward_pass_outside_capture_keeps_no_router_stats_and_warns_nothing():
  model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(_batch(2)["tokens"])
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # flax's sow-outside-capture DeprecationWarning included
    plain, _ = model(tokens)
    (captured, _), stats = moe.run_with_router_stats(model, tokens)
  assert not any(hasattr(block.mlp, "router_stats") for block in model.blocks)
  np.testing.assert_array_equal(captured, plain)
  assert sorted(stats) == [1, 2]  # layer 0 is dense (first_dense_layers=1)
  assert moe.run_with_router_stats(
      Transformer(dataclasses.replace(CONFIG, num_experts=0, num_shared_experts=0),
                  rngs=nnx.Rngs(0)), tokens)[1] == {}


def test_router_metrics_reach_the_train_scalars(one_device):
  _, metrics, _, _ = one_device
  scalars = tasks.Pretrain().train_scalars(jax.device_get(metrics))
  for layer in (1, 2):
    fractions = [scalars[f"moe/layer{layer}/expert{e}_fraction"] for e in range(8)]
    np.testing.assert_allclose(sum(fractions), 1.0, rtol=1e-6)
    np.testing.assert_allclose(scalars[f"moe/layer{layer}/load_max_over_mean"],
                               max(fractions) * 8, rtol=1e-6)
    assert scalars[f"moe/layer{layer}/load_balancing_loss"] >= 1.0 - 1e-6
  assert "moe/layer0/load_max_over_mean" not in scalars  # the first layer is dense
  assert scalars["expert_load_max_over_mean"] == max(
      scalars[f"moe/layer{layer}/load_max_over_mean"] for layer in (1, 2))
  assert scalars["dropped_token_fraction"] == 0.0


def _bias_training(bias_scale, num_steps, first_bias, schedule=optax.constant_schedule(1e-2),
                   update_rate=None):
  """A one-device MoE run whose router stands still (learning-rate scale 0) and starts with
  routing biases `first_bias` [experts], with `bias_scale` the biases' learning-rate scale
  (or `update_rate`, their step per unit of load excess). Returns (the worst layer's load
  max/mean and layer 1's expert shares at each step, layer 1's bias before each step)."""
  config = dataclasses.replace(CONFIG, routing_bias=True)
  mesh = sharding.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
  optimizer = optim.make_optimizer(schedule, router_learning_rate_scale=0.0,
                                   routing_bias_learning_rate_scale=bias_scale,
                                   routing_bias_update_rate=update_rate)
  graphdef, abstract_state = steps.abstract_model(config)
  shardings = steps.state_shardings(abstract_state, optimizer, mesh)
  params = nnx.to_pure_dict(nnx.state(Transformer(config, rngs=nnx.Rngs(0))))
  for layer in (1, 2):
    params["blocks"][layer]["mlp"]["routing_bias"] = jnp.asarray(first_bias, jnp.float32)
  state = steps.train_state_from_params(params, optimizer, shardings)
  train_step = steps.make_train_step(graphdef, tasks.Pretrain().loss, optimizer, shardings,
                                     sharding.batch_sharding(mesh), 1)
  loads, biases = [], []
  with jax.set_mesh(mesh):
    for i in range(num_steps):
      biases.append(np.asarray(state.params["blocks"][1]["mlp"]["routing_bias"]))
      state, metrics = train_step(state, _batch(seed=i))
      scalars = tasks.Pretrain().train_scalars(jax.device_get(metrics))
      loads.append((scalars["expert_load_max_over_mean"],
                    np.array([scalars[f"moe/layer1/expert{e}_fraction"] for e in range(8)])))
  return loads, biases


def test_a_routing_bias_steps_against_its_experts_load_excess_and_evens_the_load():
  first_bias = np.array([1.5, 1.0, 0, 0, 0, 0, 0, 0])  # experts 0 and 1 start favoured
  loads, biases = _bias_training(bias_scale=20.0, num_steps=12, first_bias=first_bias)
  # AdamW's first step is the learning rate times the gradient's sign; vectors do not decay.
  first_shares = loads[0][1]
  np.testing.assert_allclose(biases[1] - biases[0],
                             -1e-2 * 20.0 * np.sign(first_shares - first_shares.mean()),
                             rtol=1e-2)
  frozen, _ = _bias_training(bias_scale=0.0, num_steps=12, first_bias=first_bias)
  last_loads = lambda run: np.mean([load for load, _ in run[-6:]])
  assert last_loads(frozen) > 2.5  # the router does not move: the load stays skewed
  assert last_loads(loads) < 0.65 * last_loads(frozen), (last_loads(loads), last_loads(frozen))


def test_a_routing_bias_update_rate_steps_against_the_load_excess_from_the_first_step():
  """Each step moves an expert's bias by the rate times its load's excess over the mean
  (share / mean share - 1), whatever the learning rate (here still 0: the warmup's start)."""
  first_bias = np.array([1.5, 1.0, 0, 0, 0, 0, 0, 0])
  warmup = optax.linear_schedule(0.0, 1e-2, 100)
  loads, biases = _bias_training(bias_scale=1.0, num_steps=12, first_bias=first_bias,
                                 schedule=warmup, update_rate=0.2)
  for step in range(11):
    shares = loads[step][1]
    np.testing.assert_allclose(biases[step + 1] - biases[step],
                               -0.2 * (shares / shares.mean() - 1), atol=1e-5)
  scaled, _ = _bias_training(bias_scale=1.0, num_steps=12, first_bias=first_bias,
                             schedule=warmup)
  last_loads = lambda run: np.mean([load for load, _ in run[-6:]])
  assert last_loads(loads) < 0.65 * last_loads(scaled), (last_loads(loads), last_loads(scaled))
  with pytest.raises(ValueError, match="not both"):
    optim.make_optimizer(warmup, routing_bias_learning_rate_scale=10.0,
                         routing_bias_update_rate=0.2)


def test_router_losses_join_the_loss_with_their_gin_weights():
  model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  batch = _batch(1)
  plain, metrics = tasks.Pretrain(load_balancing_loss=0.0, router_z_loss=0.0).loss(model, batch)
  weighted, _ = tasks.Pretrain(load_balancing_loss=0.5, router_z_loss=0.25).loss(model, batch)
  mean = lambda name: (metrics[f"moe/layer1/{name}"] + metrics[f"moe/layer2/{name}"]) / 2
  np.testing.assert_allclose(
      weighted, plain + 0.5 * mean("load_balancing_loss") + 0.25 * mean("router_z_loss"),
      rtol=1e-6)


@pytest.mark.slow  # 16 s
def test_microbatched_router_metrics_are_means_over_microbatches():
  _, metrics, _, _ = _train(CONFIG, (1, 1, 1, 1), num_steps=1, microbatches=2)
  assert float(metrics["moe/passes"]) == 2.0
  scalars = tasks.Pretrain().train_scalars(jax.device_get(metrics))
  np.testing.assert_allclose(sum(scalars[f"moe/layer1/expert{e}_fraction"] for e in range(8)),
                             1.0, rtol=1e-6)


def test_both_routing_bias_steps_set_is_a_one_line_error(data_dir, tmp_path):
  process = _train_process(tmp_path / "run", data_dir, *MOE_RUN_FLAGS,
                           "--gin_param=make_optimizer.routing_bias_learning_rate_scale = 10.0")
  output = process.communicate(timeout=300)[0]
  assert process.returncode != 0
  assert output.strip().splitlines()[-1] == (
      "error: make_optimizer: set routing_bias_update_rate or routing_bias_learning_rate_scale, "
      "not both"), output
  assert "Traceback" not in output


@pytest.mark.parametrize("values, message", [
    ({"num_experts": -1}, "ModelConfig.num_experts=-1 must be an int >= 0"),
    ({"moe_dispatch": "sorted"}, "ModelConfig.moe_dispatch='sorted' must be one of"),
    ({"num_experts": 4, "experts_per_token": 5},
     "ModelConfig.experts_per_token=5 must be between 1 and ModelConfig.num_experts=4"),
])
def test_bad_moe_settings_are_refused_in_one_sentence(values, message):
  with pytest.raises(UserError, match=message):
    config_checks.build_model_config(vocab_size=8, **values)


def test_an_expert_axis_that_does_not_divide_the_experts_is_refused():
  layer = moe.MoE(dataclasses.replace(CONFIG, num_experts=6), nnx.Rngs(0))
  mesh = sharding.make_mesh(1, 2, 1, 4, devices=jax.devices()[:8])
  with jax.set_mesh(mesh), pytest.raises(
      ValueError, match="num_experts=6 does not split over make_mesh.expert=4"):
    layer(jnp.zeros((8, 4, CONFIG.embed_dim)))


@pytest.mark.slow  # 66 s: trains a checkpoint, then three decodes
def test_an_moe_checkpoint_serves_greedy_with_cache_as_without(tmp_path):
  tokenizer_file = train_tokenizer(tmp_path)
  vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer_file)).vocab_size()
  config = dataclasses.replace(CONFIG, vocab_size=vocab_size, max_seq_len=CONTEXT,
                               moe_dispatch="capacity", capacity_factor=1.0)
  workdir = tmp_path / "run"
  save_random_checkpoint(workdir, config, hashlib.sha256(tokenizer_file.read_bytes()).hexdigest())
  shutil.copy(tokenizer_file, workdir / "tokenizer.model")
  engine = Engine.from_checkpoint(workdir, slots=2)
  assert engine.config.moe_dispatch == "dropless"  # served without dropping tokens
  prompts = [engine.encode(text) for text in ("def wrap(text, width=70):", "import os")]
  orchestrator = Orchestrator(engine).start()
  try:
    for prompt_ids in prompts:
      cached = sampling.generate(engine.graphdef, engine.params, prompt_ids, max_new_tokens=10,
                                 eos_id=engine.eos_id, config=engine.config)
      batched = [delta.token_id for delta in orchestrator.generate(
          prompt_ids, max_tokens=10, settings=SamplingSettings(temperature=0.0))]
      assert cached == batched == engine.greedy_decode_without_cache(prompt_ids, 10)
  finally:
    orchestrator.shutdown(grace_s=10)


MOE_RUN_FLAGS = [f"--gin_param={binding}" for binding in (
    "ModelConfig.num_experts = 8", "ModelConfig.experts_per_token = 2",
    "ModelConfig.moe_mlp_dim = 32", "ModelConfig.moe_dispatch = 'capacity'",
    "ModelConfig.routing_bias = True", "make_optimizer.routing_bias_update_rate = 0.2",
    "make_mesh.data = 1", "make_mesh.fsdp = 2", "make_mesh.tensor = 1", "make_mesh.expert = 4",
    "train.eval_every = 100")]


@pytest.mark.slow  # two real training processes on 8 devices
def test_a_killed_moe_run_reruns_to_the_same_losses(data_dir, tmp_path):
  flags = ["--steps=7", "--checkpoint_every=1", *MOE_RUN_FLAGS]
  uninterrupted = _train_process(tmp_path / "a", data_dir, *flags)
  assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stdout.read()
  killed = _train_process(tmp_path / "b", data_dir, *flags)
  _run_until_step(killed, 4)
  killed.kill()
  killed.wait()
  rerun = _train_process(tmp_path / "b", data_dir, *flags)
  output = rerun.communicate(timeout=300)[0]
  assert rerun.returncode == 0 and "resumed from" in output, output
  rows = _metrics(tmp_path / "a")
  assert [(r["step"], r["loss"]) for r in _metrics(tmp_path / "b")] == [
      (r["step"], r["loss"]) for r in rows]
  for row in rows:  # train.log_every = 1: every step logs the router metrics
    assert 1.0 <= row["expert_load_max_over_mean"] <= 8.0
    assert 0.0 <= row["dropped_token_fraction"] < 1.0
    np.testing.assert_allclose(sum(row[f"moe/layer0/expert{e}_fraction"] for e in range(8)), 1.0,
                               rtol=1e-5)


def test_the_load_window_averages_each_experts_share_over_the_logging_interval():
  rng = np.random.default_rng(6)
  steps = [rng.dirichlet(np.ones(4), size=2) for _ in range(3)]  # [layer, expert] each step
  window = tasks.RouterLoadWindow()
  for shares in steps:
    window.add({**{f"moe/layer{layer + 1}/expert{e}_fraction": float(shares[layer, e])
                   for layer in range(2) for e in range(4)},
                "moe/layer1/dropped_fraction": 0.5, "loss": 3.0})
  got = window.pop()
  mean = np.mean(steps, axis=0)  # [layer, expert]
  want = {f"moe/layer{layer + 1}/window_load_max_over_mean": mean[layer].max() / mean[layer].mean()
          for layer in range(2)}
  assert got.keys() == {*want, "expert_load_max_over_mean_window"}
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-6)
  np.testing.assert_allclose(got["expert_load_max_over_mean_window"], max(want.values()))
  assert window.pop() == {}  # the next window starts empty
  window.add({"loss": 3.0})  # a dense model's scalars
  assert window.pop() == {}


def test_the_loop_logs_the_load_window_every_log_every_steps(data_dir, tmp_path):
  from maxlm import train as train_module  # noqa: PLC0415
  with gin_config(TINY_RUN + "\nModelConfig.num_experts = 4\nModelConfig.moe_mlp_dim = 16\n"):
    train_module.train(workdir=str(tmp_path), data_dir=data_dir, steps=4, sample_prompt=None)
  rows = _metrics(tmp_path)
  assert [("expert_load_max_over_mean_window" in row) for row in rows] == [False, True] * 2
  for end in (2, 4):
    window = rows[end - 2:end]
    mean = np.mean([[row[f"moe/layer0/expert{e}_fraction"] for e in range(4)] for row in window],
                   axis=0)
    np.testing.assert_allclose(rows[end - 1]["moe/layer0/window_load_max_over_mean"],
                               mean.max() / mean.mean(), rtol=1e-6)
