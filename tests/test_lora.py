"""LoRA adapters: fresh ones change nothing, merged ones compute the same function, only they
train and hold optimizer state, and a LoRA run from a base run trains, resumes and serves
merged."""

import dataclasses
import json
import shutil
from pathlib import Path

import gin
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from maxlm import checkpoint, optim, sampling, sharding, steps, tasks
from maxlm import train as train_module
from maxlm.config_checks import UserError, check_same_model
from maxlm.model import ModelConfig, Transformer, count_params, merge_adapters
from serving.engine import Engine, SamplingSettings, Step
from conftest import TINY_RUN, gin_config

CONFIG = ModelConfig(vocab_size=128, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
                     head_dim=16, mlp_dim=128, max_seq_len=64, lora_rank=4, lora_alpha=8.0)
BASE = dataclasses.replace(CONFIG, lora_rank=0)
LORA = train_module.LORA_TRAINABLE
TOKENS = np.random.default_rng(0).integers(1, 128, (2, 24)).astype(np.int32)


def _params(config, seed=0):
  return nnx.to_pure_dict(nnx.state(Transformer(config, rngs=nnx.Rngs(seed))))


def _logits(config, params, tokens=TOKENS):
  graphdef, _ = steps.abstract_model(config)
  return np.asarray(nnx.merge(graphdef, params)(tokens)[0])


def _paths(tree):
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _with_random_adapters(params, seed=1):
  """Every adapter leaf drawn at random (B too), so the adapters change the function."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32)
      if "lora" in str(path[-1].key) else x, params)


def _independent_adapter_size(config: ModelConfig) -> int:
  """rank * (inputs + outputs) of each adapted projection, summed over the layers."""
  c = config
  q_or_o, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  sides = {"q": (c.embed_dim, q_or_o), "k": (c.embed_dim, kv), "v": (c.embed_dim, kv),
           "o": (q_or_o, c.embed_dim), "gate": (c.embed_dim, c.mlp_dim),
           "up": (c.embed_dim, c.mlp_dim), "down": (c.mlp_dim, c.embed_dim)}
  return c.num_layers * sum(c.lora_rank * sum(sides[name]) for name in c.lora_targets)


def test_fresh_adapters_leave_the_base_weights_and_logits_exactly_as_they_were():
  base, lora = _params(BASE), _params(CONFIG)
  adapters, rest = steps.split_trainable(lora, LORA)
  assert jax.tree.all(jax.tree.map(np.array_equal, rest, base)), "a seed's base is the same"
  assert all(not np.any(leaf) for path, leaf in _paths(adapters).items() if path.endswith("_b"))
  np.testing.assert_array_equal(_logits(CONFIG, lora), _logits(BASE, base))


def test_merged_adapters_compute_the_unmerged_logits():
  lora = _with_random_adapters(_params(CONFIG))
  merged, merged_config = merge_adapters(lora, CONFIG)
  assert merged_config == BASE
  assert not [path for path in _paths(merged) if "lora" in path]
  unmerged = _logits(CONFIG, lora)
  assert np.abs(unmerged - _logits(BASE, _params(BASE))).max() > 0.1, "the adapters matter"
  np.testing.assert_allclose(_logits(BASE, merged), unmerged, atol=1e-5)


def test_adapters_sit_beside_exactly_the_target_projections():
  config = dataclasses.replace(CONFIG, lora_targets=["q", "down"])  # a list, as JSON holds it
  adapters, _ = steps.split_trainable(_params(config), LORA)
  assert {path: leaf.shape for path, leaf in _paths(adapters).items()} == {
      f"blocks/{i}/{path}": shape for i in range(2) for path, shape in (
          ("attention/q_lora_a", (64, 4)), ("attention/q_lora_b", (4, 4, 16)),
          ("mlp/down_lora_a", (128, 4)), ("mlp/down_lora_b", (4, 64)))}
  with pytest.raises(ValueError, match="lora_targets names qkv; choose from q, k, v"):
    ModelConfig(lora_targets=("qkv",))


def _optimizer_bytes(config: ModelConfig, trainable: str | None) -> int:
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10))
  _, abstract_state = steps.abstract_model(config)
  params, _ = steps.split_trainable(nnx.to_pure_dict(abstract_state), trainable)
  opt_state = jax.eval_shape(optimizer.init, params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state) if x.ndim)


def test_optimizer_state_is_adams_two_moments_of_the_adapters_alone():
  assert _optimizer_bytes(CONFIG, LORA) == 2 * 4 * _independent_adapter_size(CONFIG)


def test_lora_rank_8_optimizer_bytes_on_the_125m_shape_are_at_most_2_percent_of_full():
  gin.clear_config()
  gin.parse_config_files_and_bindings(
      [str(train_module.CONFIGS_DIR / name) for name in ("125m.gin", "lora.gin")], [])
  try:
    config = ModelConfig()
  finally:
    gin.clear_config()
  assert config.lora_rank == 8 and config.embed_dim == 768
  fraction = _optimizer_bytes(config, LORA) / _optimizer_bytes(
      dataclasses.replace(config, lora_rank=0), None)
  full_size = count_params(dataclasses.replace(config, lora_rank=0))
  assert fraction == pytest.approx(_independent_adapter_size(config) / full_size, rel=1e-9)
  assert fraction <= 0.02


def _lora_steps(mesh_shape, num_steps=3):
  config = dataclasses.replace(CONFIG, num_layers=1)  # compiles faster; the same code per layer
  mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10, 1e-2, 2))
  graphdef, abstract_state = steps.abstract_model(config)
  shardings = steps.state_shardings(abstract_state, optimizer, mesh, LORA)
  frozen_shardings = steps.frozen_shardings(abstract_state, mesh, LORA)
  params = steps.init_params(config, sharding.param_shardings(abstract_state, mesh))
  adapters, frozen = steps.split_trainable(params, LORA)
  state = steps.train_state_from_params(adapters, optimizer, shardings)
  train_step = steps.make_train_step(graphdef, tasks.next_token_loss, optimizer, shardings,
                                     sharding.batch_sharding(mesh),
                                     frozen_shardings=frozen_shardings)
  rng = np.random.default_rng(0)
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(num_steps):
      tokens = rng.integers(1, 128, (8, 32)).astype(np.int32)
      batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
               "positions": np.broadcast_to(np.arange(32, dtype=np.int32), tokens.shape)}
      state, metrics = train_step(state, batch, frozen)
      losses.append(float(metrics["loss"]))
  return losses, state, config


def test_the_same_lora_steps_on_a_2x2x2_mesh_match_one_device():
  losses, state, config = _lora_steps((2, 2, 2))
  one_losses, one_state, _ = _lora_steps((1, 1, 1))
  np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(one_state.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-4)
  assert np.any(np.asarray(state.params["blocks"][0]["mlp"]["up_lora_b"])), "B trained"
  attention = state.params["blocks"][0]["attention"]
  assert attention["q_lora_a"].sharding.spec == PartitionSpec("fsdp", None)
  assert attention["q_lora_b"].sharding.spec == PartitionSpec(None, "tensor", None)
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert moments == 2 * _independent_adapter_size(config)


# --- a LoRA run end to end ----------------------------------------------------------------------

RUN_BINDINGS = TINY_RUN + """
ModelConfig.num_layers = 1
ModelConfig.max_seq_len = 128
train.checkpoint_every = 2
train.eval_every = 100
train.sample_tokens = 0  # the test samples the unmerged model itself
learning_rate_schedule.warmup_steps = 1
learning_rate_schedule.final_fraction = 1.0
"""


@pytest.fixture()
def run_gin():
  with gin_config(RUN_BINDINGS):
    yield


def _metrics(workdir):
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _losses_of(rows):
  return [(row["loss"], row["grad_norm"], row.get("eval_loss")) for row in rows]


def _losses(workdir):
  return _losses_of(_metrics(workdir))


def _restored(run_dir, abstract_params):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        abstract_params)
  return checkpoint.restore_params(run_dir, target)


def _served_greedy(engine: Engine, prompt_ids: list[int], new_tokens: int) -> list[int]:
  prefix, choice = engine.prefill(prompt_ids, SamplingSettings(temperature=0.0))
  state = engine.insert(prefix, engine.init_decode_state(), 0)
  tokens = [int(Step.from_choice(choice).tokens[0])]
  for _ in range(new_tokens - 1):
    state, choice = engine.generate(state)
    tokens.append(int(Step.from_choice(choice).tokens[0]))
  return tokens


@pytest.mark.slow  # 46-49 s; merging is also checked by test_merged_adapters_compute_the_unmerged_logits
def test_a_lora_run_from_a_base_run_trains_resumes_and_serves_merged(data_dir, tmp_path,
                                                                      run_gin):
  base, run = tmp_path / "base", tmp_path / "lora"
  train_module.train(workdir=str(base), data_dir=data_dir, steps=2, eval_every=2)
  gin.bind_parameter("ModelConfig.lora_rank", 4)
  gin.bind_parameter("learning_rate_schedule.peak_learning_rate", 3e-2)
  train_module.train(workdir=str(run), data_dir=data_dir, steps=4, init_from=str(base))
  uninterrupted = _metrics(run)
  shutil.rmtree(run / "checkpoints" / "4")  # a crash lost the last checkpoint: resume from 2
  train_module.train(workdir=str(run), data_dir=data_dir, steps=4, init_from=str(base))
  # Adapters come from the checkpoint, the base from init_from, both as they were.
  assert _losses(run) == _losses_of(uninterrupted) and len(uninterrupted) == 4
  # Fresh adapters start as the base model, so the base's last eval is the LoRA run's step 0.
  start_loss, end_loss = (_metrics(dir_)[-1]["eval_loss"] for dir_ in (base, run))
  assert end_loss < start_loss - 0.05

  meta = checkpoint.read_meta(run)[1]
  assert meta["trainable"] == LORA and meta["init_from"] == str(base.resolve())
  lora_config = checkpoint.config_from_meta(meta)
  graphdef, abstract_state = steps.abstract_model(lora_config)
  adapters, base_part = steps.split_trainable(nnx.to_pure_dict(abstract_state), LORA)
  unmerged = steps.merge_params(_restored(run, adapters), _restored(base, base_part))
  engine = Engine.from_checkpoint(run, slots=1)
  assert engine.config.lora_rank == 0 and not [p for p in _paths(engine.params) if "lora" in p]
  prompt_ids = engine.encode("def ")
  expected = sampling.generate(graphdef, unmerged, prompt_ids, max_new_tokens=6,
                               temperature=0.0, config=lora_config)
  assert _served_greedy(engine, prompt_ids, 6) == expected


def test_init_from_takes_new_adapters_but_refuses_a_base_with_other_ones():
  base_meta = checkpoint.model_meta(BASE, tokenizer_sha256="t")
  check_same_model(base_meta, base_meta, "runs/base", CONFIG)  # adapters join a base without
  lora_meta = checkpoint.model_meta(dataclasses.replace(CONFIG, lora_rank=2), tokenizer_sha256="t")
  with pytest.raises(UserError, match=r"another model shape \(lora_rank: 2 -> 4\)"):
    check_same_model(lora_meta, base_meta, "runs/lora", CONFIG)


@pytest.mark.parametrize("bindings, trainable, why", [
    ("", "nomatch", "paths read like blocks/0/attention/k or unembedding"),
    ("ModelConfig.lora_rank = 4\nModelConfig.lora_targets = ()", None,
     "ModelConfig.lora_targets=() names no projection to put an adapter beside"),
    ("ModelConfig.lora_rank = 0", LORA, "ModelConfig.lora_rank=0 adds no adapters"),
], ids=["a_typo", "no_lora_targets", "lora_rank_0"])
def test_a_trainable_regex_matching_no_parameter_is_refused_before_a_step(
    data_dir, tmp_path, bindings, trainable, why):
  with gin_config(TINY_RUN + bindings):
    with pytest.raises(UserError) as error:
      train_module.train(workdir=str(tmp_path / "run"), data_dir=data_dir, steps=1,
                         trainable=trainable, sample_prompt=None)
  assert str(error.value).splitlines()[0] == (f"train.trainable={trainable or LORA!r} matches "
                                            f"no parameter, so nothing would train: {why}")
  assert not (tmp_path / "run").exists()
