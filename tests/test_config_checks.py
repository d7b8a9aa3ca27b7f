"""Config values are checked before a run builds anything: a wrong type or range is one line
naming the gin binding and exit code 2, and every shipped config passes."""

import dataclasses
import inspect
import re
import sys
from pathlib import Path

import gin
import pytest

from maxlm import optim, sharding
from maxlm import train as train_module
from maxlm.config_checks import (RULES, UserError, build_model_config, changed_numerics,
                                 check_run_configuration, check_values, ignored_moe_settings)
from maxlm.model import ModelConfig
from maxlm.model.vit import VisionConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.gin"))


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_every_setting_of_the_run_has_a_rule():
  assert set(RULES["ModelConfig"]) == {field.name for field in dataclasses.fields(ModelConfig)}
  assert set(RULES["VisionConfig"]) == {field.name for field in dataclasses.fields(VisionConfig)}
  for configurable in (train_module.train, optim.learning_rate_schedule, optim.make_optimizer,
                       sharding.make_mesh):
    assert set(RULES[configurable.__name__]) == set(inspect.signature(configurable).parameters)


@pytest.mark.parametrize("config_file", CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_passes(config_file):
  gin.parse_config_file(str(config_file))
  arguments = inspect.signature(train_module.train).bind("runs/x")
  arguments.apply_defaults()
  check_run_configuration(arguments.arguments | gin.get_bindings(train_module.train))
  assert build_model_config().num_heads > 0


@pytest.mark.parametrize("configurable, values, message", [
    ("ModelConfig", {"num_layers": True}, "ModelConfig.num_layers=True must be a positive int"),
    ("ModelConfig", {"vocab_size": 0}, "ModelConfig.vocab_size=0 must be a positive int or None"),
    ("ModelConfig", {"norm_eps": float("nan")}, "ModelConfig.norm_eps=nan must be a positive "),
    ("ModelConfig", {"attention": ["xla"]}, "ModelConfig.attention=['xla'] must be one of 'auto'"),
    ("ModelConfig", {"heads": 4}, "ModelConfig.heads is not a setting of ModelConfig"),
    ("train", {"profile_steps": (5, 2)}, "train.profile_steps=(5, 2) must be a pair of steps"),
    ("train", {"seed": 2**32}, "train.seed=4294967296 must be an int in"),
    ("Pretrain", {"z_loss": -1e-4}, "Pretrain.z_loss=-0.0001 must be a number >= 0"),
    ("make_optimizer", {"b2": 1.0}, "make_optimizer.b2=1.0 must be a number in [0, 1)"),
    ("make_mesh", {"tensor": -2}, "make_mesh.tensor=-2 must be a positive int, or -1"),
])
def test_a_value_of_the_wrong_type_or_range_names_its_binding(configurable, values, message):
  with pytest.raises(UserError, match="^" + re.escape(message)):
    check_values(configurable, values)


def test_a_long_value_is_cut_short_in_the_message():
  with pytest.raises(UserError) as raised:
    check_values("train", {"sample_prompt": ["x" * 1000]})
  assert len(str(raised.value)) < 120


def test_a_checkpoint_config_with_a_bad_value_is_refused():
  saved = dataclasses.asdict(ModelConfig(vocab_size=512)) | {"embed_dim": 192.5}
  with pytest.raises(UserError, match="^ModelConfig.embed_dim=192.5 must be a positive int$"):
    build_model_config(**saved)


def test_cross_field_checks_of_model_config_are_one_line_errors():
  gin.parse_config("ModelConfig.num_heads = 6\nModelConfig.num_kv_heads = 4")
  with pytest.raises(UserError, match="^ModelConfig.num_heads=6 must be a multiple of "
                     "ModelConfig.num_kv_heads=4$"):
    build_model_config()


@pytest.mark.parametrize("bindings, message", [
    ("ModelConfig.first_dense_layers = 4",
     "ModelConfig.first_dense_layers=4 must be below ModelConfig.num_layers=4, else no layer "
     "is MoE; set ModelConfig.num_experts=0 for a dense model"),
    ("ModelConfig.first_dense_layers = 2\nModelConfig.moe_every = 3",
     "ModelConfig.moe_every=3 must be at most 2 (the layers after "
     "ModelConfig.first_dense_layers=2), else no layer is MoE; set ModelConfig.num_experts=0 "
     "for a dense model"),
])
def test_an_moe_config_that_leaves_no_layer_moe_is_refused(bindings, message):
  gin.parse_config("ModelConfig.num_layers = 4\nModelConfig.num_experts = 8\n" + bindings)
  with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
    build_model_config()


def test_lora_on_mlps_of_a_model_whose_every_layer_is_moe_is_refused():
  gin.parse_config("ModelConfig.num_experts = 8\nModelConfig.lora_rank = 4")
  with pytest.raises(UserError, match=re.escape(
      "ModelConfig.lora_targets=('q', 'k', 'v', 'o', 'gate', 'up', 'down') must name only q, k, "
      "v or o when every layer is MoE: gate, up, down would get no adapter")):
    build_model_config()
  gin.parse_config("ModelConfig.lora_targets = ['q', 'v']")  # attention adapters: as asked
  assert build_model_config().lora_targets == ("q", "v")
  gin.parse_config("ModelConfig.lora_targets = ['q', 'up']\nModelConfig.first_dense_layers = 1")
  assert build_model_config().lora_targets == ("q", "up")  # layer 0's dense MLP takes them


def _run_train(argv, monkeypatch, capsys) -> tuple[int, str]:
  """`python -m maxlm.train ARGV` in this process: (exit code, stderr)."""
  # mallopt would change this test process's allocator for the rest of the session.
  monkeypatch.setattr(train_module.train_steps, "keep_freed_host_memory", lambda: False)
  monkeypatch.setattr(sys, "argv", ["maxlm.train", *argv])
  train_module.flags.FLAGS.unparse_flags()  # else --gin_param values pile up across runs
  with pytest.raises(SystemExit) as exited:
    train_module.run()
  train_module.flags.FLAGS.unparse_flags()
  return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flag, message", [
    ('--gin_param=train.global_batch_size = "eight"',
     "train.global_batch_size='eight' must be a positive int"),
    ("--gin_param=ModelConfig.embed_dim = 192.5",
     "ModelConfig.embed_dim=192.5 must be a positive int"),
    ("--gin_param=ModelConfig.num_heads = 0", "ModelConfig.num_heads=0 must be a positive int"),
    ("--gin_param=train.global_batch_size = -8",
     "train.global_batch_size=-8 must be a positive int"),
    ('--gin_param=ModelConfig.dtype = "float33"',
     "ModelConfig.dtype='float33' must be one of 'float32', 'bfloat16', 'float16'"),
    ("--checkpoint_every=0", "train.checkpoint_every=0 must be a positive int"),
    ("--steps=-5", "train.steps=-5 must be a positive int"),
    ("--gin_param=learning_rate_schedule.peak_learning_rate = -3e-4",
     "learning_rate_schedule.peak_learning_rate=-0.0003 must be a positive number"),
    ("--gin_param=make_mesh.data = 0",
     "make_mesh.data=0 must be a positive int, or -1 for the devices left over"),
    ("--gin_param=ModelConfig.vision = @VisionConfig()\nVisionConfig.patch_size = 0",
     "VisionConfig.patch_size=0 must be a positive int"),
    ("--gin_param=ModelConfig.vision = @VisionConfig()\nVisionConfig.embed_dim = 0",
     "VisionConfig.embed_dim=0 must be a positive int"),
    ("--gin_param=ModelConfig.vision = @VisionConfig()\nVisionConfig.num_layers = 2.5",
     "VisionConfig.num_layers=2.5 must be a positive int"),
    ("--gin_param=ModelConfig.vision = 5", "ModelConfig.vision=5 must be @VisionConfig() or None"),
    ("--gin_param=ModelConfig.lora_targets = 5",
     "ModelConfig.lora_targets=5 must be a list of projection names, e.g. ['q', 'v']"),
    # 8 fake devices
    ("--gin_param=make_mesh.data = 3",
     "make_mesh.fsdp=-1 must take the devices the other axes leave, but make_mesh.data=3, "
     "make_mesh.expert=1, make_mesh.tensor=1 make 3, which does not divide the 8 available "
     "devices; choose sizes whose product divides them"),
    ("--gin_param=make_mesh.data = 2\nmake_mesh.fsdp = 2\nmake_mesh.tensor = 4",
     "make_mesh.data=2, make_mesh.expert=1, make_mesh.fsdp=2, make_mesh.tensor=4 must multiply "
     "to the 8 available devices, not 16; change a size, or set one to -1 to take the rest"),
    ("--gin_param=make_mesh.data = -1",
     "make_mesh.data=-1, make_mesh.fsdp=-1 must be -1 on one axis at most (it takes the "
     "devices the others leave); give the others sizes"),
    # 12 experts do not split 8 ways, whether given or left over (-1)
    ("--gin_param=ModelConfig.num_experts = 12\nmake_mesh.expert = 8\nmake_mesh.fsdp = 1",
     "ModelConfig.num_experts=12 must be a multiple of make_mesh.expert=8, the devices the "
     "experts are split over; change one of them"),
    ("--gin_param=ModelConfig.num_experts = 12\nmake_mesh.expert = -1\nmake_mesh.fsdp = 1",
     "ModelConfig.num_experts=12 must be a multiple of make_mesh.expert=8, the devices the "
     "experts are split over; change one of them"),
])
def test_each_bad_value_from_the_issue_exits_2_with_one_line_before_anything_is_built(
    flag, message, tmp_path, monkeypatch, capsys):
  workdir, data_dir = tmp_path / "run", tmp_path / "data"
  code, stderr = _run_train([f"--workdir={workdir}", f"--data_dir={data_dir}", flag],
                            monkeypatch, capsys)
  assert (code, stderr) == (2, f"error: {message}\n")
  assert not workdir.exists()


@pytest.mark.parametrize("flag, message", [
    ("--bogus_flag=1", "Unknown command line flag 'bogus_flag'"),
    ("--steps=abc", "flag --steps=abc: invalid literal for int() with base 10: 'abc'"),
])
def test_a_bad_command_line_flag_exits_2_with_one_line_as_other_mistakes_do(
    flag, message, tmp_path, monkeypatch, capsys):
  code, stderr = _run_train([f"--workdir={tmp_path / 'run'}", flag], monkeypatch, capsys)
  assert (code, stderr) == (2, f"error: {message}; `python -m maxlm.train --helpshort` lists "
                               "the flags\n")
  assert not (tmp_path / "run").exists()


def test_a_run_that_computes_with_another_rope_theta_than_its_init_from_is_warned_by_name():
  imported = {"model_config": dataclasses.asdict(ModelConfig(vocab_size=64, rope_theta=500000.0))}
  warning = changed_numerics(imported, ModelConfig(vocab_size=64), "runs/llama")
  assert "rope_theta=10000.0 (it used 500000.0)" in warning and "runs/llama" in warning
  assert changed_numerics(imported, ModelConfig(vocab_size=64, rope_theta=500000.0,
                                                dtype="bfloat16"), "runs/llama") is None


def test_a_dense_model_names_the_moe_bindings_it_leaves_unused():
  moe_tiny_as_dense = {"ModelConfig": {"num_experts": 0, "experts_per_token": 4,
                                       "routing_bias": True, "embed_dim": 192},
                       "make_optimizer": {"routing_bias_update_rate": 0.2, "b2": 0.95}}
  assert ignored_moe_settings(moe_tiny_as_dense) == (
      "warning: ModelConfig.num_experts=0 (a dense model) leaves ModelConfig.experts_per_token, "
      "ModelConfig.routing_bias, make_optimizer.routing_bias_update_rate unused")
  with_experts = {**moe_tiny_as_dense,
                  "ModelConfig": {**moe_tiny_as_dense["ModelConfig"], "num_experts": 8}}
  assert ignored_moe_settings(with_experts) is None
  assert ignored_moe_settings({"ModelConfig": {"embed_dim": 64}}) is None
