"""benchmarks/vit_timm.py's FLOP accounting (timm's ViT is widened to our FLOPs per image), its
matmul rates, and the busy-machine warning before ratios against PyTorch."""

import statistics

import jax
import numpy as np
import pytest
from flax import nnx
from test_model import equations

from benchmarks import machine_load, vit_timm
from maxlm.model.vit import VisionConfig, VisionEncoder

CONFIG = VisionConfig(image_size=16, patch_size=4, num_layers=2, embed_dim=32, num_heads=4,
                      num_kv_heads=2, head_dim=8, mlp_dim=48)


def test_our_flops_per_image_are_two_per_weight_per_patch_plus_the_attention_products():
  params = nnx.to_pure_dict(nnx.state(VisionEncoder(CONFIG, rngs=nnx.Rngs(0))))
  weights = sum(np.size(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                if np.ndim(leaf) >= 2 and path[-1].key != "position_embedding")
  tokens, c = CONFIG.num_patches, CONFIG
  scores_and_sums = c.num_layers * 2 * 2 * tokens * tokens * c.num_heads * c.head_dim
  assert vit_timm.vit_flops_per_image(CONFIG) == 2 * tokens * weights + scores_and_sums


def test_timms_mlp_is_widened_by_half_when_its_heads_have_our_width():
  config = VisionConfig(image_size=32, patch_size=8, num_layers=4, embed_dim=128, num_heads=4,
                        num_kv_heads=4, head_dim=32, mlp_dim=384)
  assert vit_timm.timm_mlp_dim(config) == 576  # SwiGLU's 3 x 384 columns = GELU's 2 x 576
  assert vit_timm.timm_flops_per_image(config, 576) == vit_timm.vit_flops_per_image(config)


def test_without_timm_our_rounds_are_still_measured_and_timms_are_none(capsys):
  ours, theirs, matmuls = vit_timm.paired_vit_rates(CONFIG, "/bin/false", rounds=2,
                                                  seconds=0.05)
  assert theirs is None and matmuls is None
  assert len(ours) == 2 and all(rate > 0 for rate in ours)
  assert "timm did not run under /bin/false" in capsys.readouterr().out


def test_a_timm_that_dies_mid_run_after_many_warnings_names_the_round_and_its_last_line(
    tmp_path):
  # 200 KiB of warnings first: on a pipe read only at the end they would stall it for good.
  fake_python = tmp_path / "python"
  fake_python.write_text("#!/bin/sh\necho ready\nread seconds\necho 1000.0\nread seconds\n"
                         "head -c 204800 /dev/zero | tr '\\0' 'w' >&2\n"
                         "echo >&2\necho 'RuntimeError: out of memory' >&2\nexit 1\n")
  fake_python.chmod(0o755)
  try:
    vit_timm.paired_vit_rates(CONFIG, str(fake_python), rounds=3, seconds=0.05)
  except SystemExit as error:
    assert str(error) == "timm stopped in round 2 of 3: ['RuntimeError: out of memory']"
  else:
    raise AssertionError("a timm that stopped must end the benchmark")


def test_the_matmul_rates_go_both_ways_in_alternating_rounds_and_their_ratio_is_a_geometric_mean(
    tmp_path):
  # A fake timm that answers every round with 500 images/s and every matmul with 10 GFLOP/s.
  fake_python = tmp_path / "python"
  fake_python.write_text(
      "#!/bin/sh\necho ready\nwhile read line; do\n  case \"$line\" in\n"
      "    matmuls*) echo '[10.0, 10.0, 10.0, 10.0]' ;;\n    *) echo 500.0 ;;\n  esac\ndone\n")
  fake_python.chmod(0o755)
  ours, theirs, matmuls = vit_timm.paired_vit_rates(CONFIG, str(fake_python), rounds=2,
                                                  seconds=0.05)
  assert theirs == [500.0, 500.0]
  assert matmuls["shapes"] == [(64 * 16, 32, 64), (64 * 16, 32, 32), (64 * 16, 32, 96),
                               (64 * 16, 48, 32)]
  assert matmuls["torch"] == [[10.0] * 4] * vit_timm.MATMUL_ROUNDS
  assert len(matmuls["ours"]) == vit_timm.MATMUL_ROUNDS
  assert all(len(rates) == 4 and min(rates) > 0 for rates in matmuls["ours"])
  made_up = {"ours": [[20.0, 5.0], [40.0, 40.0], [1.0, 4.0]], "torch": [[10.0, 10.0]] * 3}
  assert np.isclose(vit_timm.matmul_ratio(made_up), 1.0)  # per round 1.0, 4.0, 0.2


def test_a_busy_machine_is_named_before_the_ratios_against_pytorch(monkeypatch, capsys):
  monkeypatch.setattr(machine_load.psutil, "cpu_count", lambda: 2)
  monkeypatch.setattr(machine_load.psutil, "cpu_percent", lambda interval: 93.5)
  assert machine_load.load_before_run() == {"cpu_busy_percent": 93.5, "cpus": 2, "busy": True}
  assert "the CPUs are 94% busy before the run (2 cores)" in capsys.readouterr().err
  monkeypatch.setattr(machine_load.psutil, "cpu_percent", lambda interval: 4.0)
  assert machine_load.load_before_run()["busy"] is False
  assert capsys.readouterr().err == ""


def _dot_operand_dtypes(jaxpr) -> set:
  return {tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in equations(jaxpr)
          if eqn.primitive.name == "dot_general"}


def test_the_bfloat16_step_multiplies_in_bfloat16_and_keeps_float32_gradients_near_float32s():
  """What `vit_ratio_vs_timm` times in bfloat16 is mixed precision, as 1b.gin trains: every
  matmul of the forward and backward in bfloat16, float32 parameters and gradients."""
  mixed, params = vit_timm.vit_gradients(CONFIG, "bfloat16")
  full, _ = vit_timm.vit_gradients(CONFIG, "float32")
  assert _dot_operand_dtypes(jax.make_jaxpr(mixed)(params).jaxpr) == {("bfloat16", "bfloat16")}
  assert _dot_operand_dtypes(jax.make_jaxpr(full)(params).jaxpr) == {("float32", "float32")}
  got, want = jax.jit(mixed)(params), jax.jit(full)(params)
  assert {leaf.dtype for leaf in jax.tree.leaves(got)} == {np.dtype(np.float32)}
  flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])  # noqa: E731
  assert np.linalg.norm(flat(got) - flat(want)) < 0.05 * np.linalg.norm(flat(want))


def test_the_precision_reaches_timm_and_an_unknown_one_is_refused(tmp_path):
  fake_python = tmp_path / "python"
  fake_python.write_text(f"#!/bin/sh\necho \"$7\" > {tmp_path}/precision\necho ready\n"
                         "while read line; do\n  case \"$line\" in\n"
                         "    matmuls*) echo '[1.0, 1.0, 1.0, 1.0]' ;;\n    *) echo 500.0 ;;\n"
                         "  esac\ndone\n")
  fake_python.chmod(0o755)
  summary = vit_timm.paired_summary(CONFIG, str(fake_python), rounds=2, seconds=0.05,
                                    precision="bfloat16")
  assert (tmp_path / "precision").read_text() == "bfloat16\n"
  assert summary["timm_images_per_s"] == 500.0 and summary["precision"] == "bfloat16"
  assert np.isclose(summary["ratio_vs_timm"],
                    statistics.median(rate / 500.0 for rate in summary["rounds"]["vit"]),
                    atol=1e-3)
  with pytest.raises(ValueError, match="precision 'float16': one of bfloat16, float32"):
    vit_timm.paired_vit_rates(CONFIG, str(fake_python), rounds=1, seconds=0.05,
                              precision="float16")
