"""The training entry point end to end on a small prepared corpus: it learns, it checkpoints,
and a restarted run continues from the checkpoint instead of starting over."""

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
from pathlib import Path

import gin
import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from flax import nnx

from beam_pipelines.records import read_shard
from maxlm import checkpoint, data, tasks, workdir_lock
from maxlm import steps as train_steps
from maxlm.data.loader import split_shard_paths
from maxlm import train as train_module
from maxlm.config_checks import UserError
from conftest import (TINY_RUN, TINY_RUN_PEAK_FLOPS, TINY_RUN_STEPS, gin_config, outputs_within,
                      train_subprocess)
from test_data import damage_record

@pytest.fixture(autouse=True)
def tiny_gin():
  with gin_config(TINY_RUN):
    yield


def _metrics(workdir):
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def test_a_run_checkpoints_at_its_first_step_and_every_kth_and_logs_every_step(tiny_run):
  assert _checkpoint_steps(tiny_run) == [1, TINY_RUN_STEPS]  # TINY_RUN: checkpoint_every 4
  rows = _metrics(tiny_run)
  assert [r["step"] for r in rows] == list(range(1, TINY_RUN_STEPS + 1))
  assert {"loss", "learning_rate", "tokens_per_s"} <= set(rows[0])
  assert "eval_loss" in rows[3] and "eval_loss" not in rows[2]  # eval_every 4
  assert (tiny_run / "tensorboard").is_dir() and any((tiny_run / "tensorboard").iterdir())


def test_train_resumes_from_its_last_checkpoint(data_dir, tiny_run_copy):
  run = tiny_run_copy
  summary = train_module.train(workdir=str(run), data_dir=data_dir, steps=8)
  assert summary["step"] == 8
  assert _checkpoint_steps(run) == [1, 4, 8]
  rows = _metrics(run)
  assert [r["step"] for r in rows] == list(range(1, 9)), "no step repeated or lost"
  assert "eval_loss" in rows[7] and "eval_loss" not in rows[6]
  assert rows[-1]["loss"] < rows[0]["loss"]


def test_resume_after_a_crash_drops_the_lost_steps_from_metrics(data_dir, tiny_run_copy):
  run = tiny_run_copy
  with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:  # steps 5-6 never saved
    f.write('{"step": 5, "loss": 1.0}\n{"step": 6, "loss": 1.0}\n')
  train_module.train(workdir=str(run), data_dir=data_dir, steps=6)
  rows = _metrics(run)
  assert [r["step"] for r in rows] == list(range(1, 7))
  assert rows[4]["loss"] != 1.0


def test_checkpoint_from_another_model_shape_is_refused(data_dir, tiny_run_copy):
  gin.bind_parameter("ModelConfig.num_layers", 3)
  with pytest.raises(UserError, match="num_layers: 2 -> 3"):
    train_module.train(workdir=str(tiny_run_copy), data_dir=data_dir, steps=8)


def test_missing_data_dir_is_a_one_line_error(tmp_path):
  with pytest.raises(UserError, match="has no manifest.json|does not exist"):
    train_module.train(workdir=str(tmp_path / "run"), data_dir=str(tmp_path / "nothing"))


def test_batch_that_does_not_divide_the_mesh_is_refused(data_dir, tmp_path):
  gin.bind_parameter("train.global_batch_size", 6)
  with pytest.raises(UserError, match="multiple of train.microbatches=1 times the mesh's "
                     "data\\*fsdp size 4"):
    train_module.train(workdir=str(tmp_path), data_dir=data_dir, steps=1)


def test_microbatches_and_z_loss_train(data_dir, tmp_path):
  gin.bind_parameter("train.microbatches", 2)
  gin.bind_parameter("Pretrain.z_loss", 1e-4)
  summary = train_module.train(workdir=str(tmp_path), data_dir=data_dir, steps=4)
  losses = [row["loss"] for row in _metrics(tmp_path) if "loss" in row]
  assert summary["step"] == 4 and losses[-1] < losses[0]


def _train_process(workdir, data_dir, *extra_flags, devices=8):
  """A real `python -m maxlm.train` with the tiny bindings, one progress line per step."""
  return train_subprocess(workdir, data_dir, TINY_RUN.strip().splitlines(),
                          "--gin_param=train.log_every=1", *extra_flags, devices=devices)


def _run_until_step(process, step: int) -> list[str]:
  output = []
  for line in process.stdout:  # the step lines are flushed as each step ends
    output.append(line)
    if line.startswith(f"step {step}/"):
      break
  return output


def test_sigterm_finishes_the_step_saves_and_exits_zero(data_dir, tmp_path):
  process = _train_process(tmp_path, data_dir, "--steps=100000",
                           "--gin_param=train.checkpoint_every=1000")
  output = _run_until_step(process, 3)
  process.send_signal(signal.SIGTERM)
  output.append(process.communicate(timeout=120)[0])
  assert process.returncode == 0, "".join(output)
  steps_done = [r["step"] for r in _metrics(tmp_path)]
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps_done[-1] >= 3 and saved[-1] == steps_done[-1], "".join(output)
  assert "SIGTERM: checkpoint of step" in "".join(output)


def test_a_sigterm_landing_right_after_a_step_decided_not_to_save_ends_on_a_saved_step(
    data_dir, tmp_path, monkeypatch):
  """The race the subprocess test above met about once in a dozen runs: the signal lands after
  step 3's save decided it had nothing to write and before the loop looked for it. The run
  must go on to save a step, not stop on step 1's checkpoint saying step 3's was written."""
  save = checkpoint.Checkpointer.save

  def save_then_signal(self, step, *args, **kwargs):
    written = save(self, step, *args, **kwargs)
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before this returns
    return written

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_signal)
  summary = train_module.train(workdir=str(tmp_path), data_dir=data_dir, steps=100,
                               checkpoint_every=1000)
  assert summary == {"step": 4, "preempted": True}
  assert _checkpoint_steps(tmp_path)[-1] == 4 and _metrics(tmp_path)[-1]["step"] == 4


@pytest.mark.slow  # test_post_training's DPO run takes the same SIGKILL-and-rerun path
def test_sigkill_then_rerun_gives_the_uninterrupted_losses_bitwise(data_dir, tmp_path):
  # A checkpoint every step: the kill lands right after a save, or in the middle of one.
  flags = ["--steps=9", "--checkpoint_every=1", "--gin_param=train.eval_every=100"]
  uninterrupted = _train_process(tmp_path / "a", data_dir, *flags)
  assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stdout.read()

  killed = _train_process(tmp_path / "b", data_dir, *flags)
  _run_until_step(killed, 5)
  killed.kill()
  killed.wait()
  rerun = _train_process(tmp_path / "b", data_dir, *flags)
  output = rerun.communicate(timeout=300)[0]
  assert rerun.returncode == 0 and "resumed from" in output, output
  losses = lambda run: [(r["step"], r["loss"]) for r in _metrics(tmp_path / run)]  # noqa: E731
  assert losses("b") == losses("a")


@pytest.mark.slow  # in `pytest -m slow` (CI keeps under 15 minutes)
def test_two_processes_train_in_lockstep_with_one_eight_device_process(data_dir, tmp_path):
  """2 processes x 4 CPU devices (gloo collectives) against 1 process x 8 devices, same mesh
  (data=2, fsdp=2, tensor=2) and the same global batches."""
  import portpicker  # pylint: disable=import-outside-toplevel
  flags = ["--steps=4", "--gin_param=train.eval_every=100"]
  coordinator = f"--coordinator_address=127.0.0.1:{portpicker.pick_unused_port()}"
  pair = [_train_process(tmp_path / "two", data_dir, *flags, coordinator, "--num_processes=2",
                         f"--process_id={i}", devices=4) for i in range(2)]
  single = _train_process(tmp_path / "one", data_dir, *flags)
  for process, output in zip([*pair, single], outputs_within([*pair, single], timeout=300)):
    assert process.returncode == 0, output
  two = [r["loss"] for r in _metrics(tmp_path / "two")]
  one = [r["loss"] for r in _metrics(tmp_path / "one")]
  assert len(two) == len(one) == 4
  # Same global batches and mesh; only the collectives' summation order differs.
  np.testing.assert_allclose(two, one, rtol=1e-5)


def test_a_save_cut_off_midway_is_never_restored(data_dir, tiny_run_copy):
  """What a kill during an async save leaves behind: Orbax's temporary directory, never
  renamed to its step. The restart must resume from the last complete checkpoint."""
  run = tiny_run_copy
  partial = run / "checkpoints" / "6.orbax-checkpoint-tmp"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 100)
  summary = train_module.train(workdir=str(run), data_dir=data_dir, steps=6)
  assert summary["step"] == 6
  assert [r["step"] for r in _metrics(run)] == list(range(1, 7))


def test_metrics_carry_perplexity_and_model_flops(tiny_run):
  rows = _metrics(tiny_run)
  assert rows[3]["eval_perplexity"] == pytest.approx(np.exp(rows[3]["eval_loss"]), rel=1e-6)
  assert rows[0]["mfu"] == pytest.approx(
      rows[0]["model_flops_per_s"] / (TINY_RUN_PEAK_FLOPS * jax.device_count()), rel=1e-6)


def test_retention_keeps_the_latest_and_every_kth(data_dir, tmp_path):
  gin.bind_parameter("train.keep_checkpoints", 1)
  gin.bind_parameter("train.keep_checkpoint_every", 4)
  train_module.train(workdir=str(tmp_path), data_dir=data_dir, steps=10, checkpoint_every=2)
  assert _checkpoint_steps(tmp_path) == [4, 8, 10]


def test_k_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(
    data_dir, tiny_run_copy):
  run = tiny_run_copy

  class Poisoned(tasks.Pretrain):
    def loss(self, model, batch):
      loss, metrics = super().loss(model, batch)
      return loss * float("nan"), metrics

  gin.bind_parameter("train.max_bad_steps", 5)  # step 8, a checkpoint step, is among them
  with pytest.raises(UserError, match="5 steps in a row up to step 9 had a non-finite loss"):
    train_module.train(workdir=str(run), data_dir=data_dir, steps=12, task=Poisoned())
  assert _checkpoint_steps(run)[-1] == 4
  assert [r.get("skipped_steps") for r in _metrics(run)[4:]] == [1, 2, 3, 4, 5]  # steps 5-9


def test_profile_steps_write_a_trace(data_dir, tmp_path):
  gin.bind_parameter("train.profile_steps", (2, 3))
  train_module.train(workdir=str(tmp_path), data_dir=data_dir, steps=4)
  assert list((tmp_path / "profile").rglob("*.xplane.pb"))


def test_gin_typo_is_one_line_and_exit_code_2(data_dir, tmp_path):
  process = _train_process(tmp_path, data_dir, "--gin_param=ModelConfig.num_layer=2")
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 2, output
  assert ("error: gin configuration error in --gin_param ModelConfig.num_layer=2: Configurable "
          "'ModelConfig' doesn't have a parameter named 'num_layer'") in output
  assert "Traceback" not in output


def test_a_gin_error_names_the_file_and_line_or_the_binding(tmp_path):
  gin_file = tmp_path / "typo.gin"
  gin_file.write_text("train.steps = 3\ntrain.stepz = 3\n")
  with pytest.raises(UserError, match=re.escape(
      f"gin configuration error in --gin_file {gin_file}: Configurable 'train' doesn't have a "
      f'parameter named \'stepz\' (file "{gin_file}", line 2: train.stepz = 3)')):
    train_module.parse_gin([str(gin_file)], [])
  with pytest.raises(UserError, match=re.escape(
      "gin configuration error in --gin_param train.global_batch_size=eight: Failed to parse "
      "token 'eight'")):
    train_module.parse_gin([], ["train.global_batch_size=eight"])
  with pytest.raises(UserError, match="in --gin_param train.steps=\\(3: unexpected EOF"):
    train_module.parse_gin([], ["train.steps=(3"])
  with pytest.raises(UserError, match=re.escape(
      "gin configuration error: %NAN names no macro; bind it (NAN = value) or drop the "
      "reference")):  # was a traceback from gin.finalize
    train_module.parse_gin([], ["learning_rate_schedule.peak_learning_rate=%NAN"])


# --- tasks and --init_from ---------------------------------------------------------------------

@gin.configurable
class CountTargets(tasks.Pretrain):
  """Pretraining that also reports how many targets its held-out pass saw."""

  def eval_scalars(self, sums):
    return {**super().eval_scalars(sums), "eval_targets": sums["target_tokens"]}


def _numpy_target_count(data_dir: str, split: str) -> int:
  """Positions whose next token belongs to the same document, counted in NumPy."""
  manifest = data.load_manifest(data_dir)
  count = 0
  for path in split_shard_paths(data_dir, manifest, split):
    for record in read_shard(path, manifest["seq_len"]):
      segments = record["segment_ids"]
      count += int(np.sum((segments[1:] == segments[:-1]) & (segments[1:] != 0)))
  return count


def test_the_loop_reports_what_its_task_makes_of_the_eval_sums(data_dir, tmp_path):
  gin.parse_config("train.task = @CountTargets()")
  gin.bind_parameter("train.eval_batches", 1000)  # the whole split, its last batch padded
  train_module.train(workdir=str(tmp_path), data_dir=data_dir, steps=4)
  row = _metrics(tmp_path)[3]
  assert row["eval_targets"] == _numpy_target_count(data_dir, "validation")
  assert row["eval_perplexity"] == pytest.approx(np.exp(row["eval_loss"]))


@dataclasses.dataclass(frozen=True)
class NeedsLossMask(tasks.Pretrain):
  batch_fields: tuple[str, ...] = ("tokens", "loss_mask")


def test_a_task_whose_fields_the_data_lacks_is_refused_with_one_line(data_dir, tmp_path):
  with pytest.raises(UserError, match="has no loss_mask field .*which the NeedsLossMask task"):
    train_module.train(workdir=str(tmp_path), data_dir=data_dir, task=NeedsLossMask(), steps=1)


def _latest_params(run_dir):
  step, meta = checkpoint.read_meta(run_dir)
  _, abstract_state = train_steps.abstract_model(checkpoint.config_from_meta(meta))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          nnx.to_pure_dict(abstract_state))
  return checkpoint.restore_params(run_dir, abstract, step), meta


def test_init_from_starts_a_new_run_from_another_runs_parameters(data_dir, tiny_run, tmp_path):
  source, run = tiny_run, tmp_path / "run"
  train_module.train(workdir=str(run), data_dir=data_dir, steps=2, init_from=str(source))
  assert [row["step"] for row in _metrics(run)] == [1, 2], "the step starts afresh"
  # Step 1's loss is that of the source's final parameters on the first batch, computed here
  # on one device, outside the loop.
  params, meta = _latest_params(source)
  graphdef, _ = train_steps.abstract_model(checkpoint.config_from_meta(meta))
  first_batch = next(iter(data.make_dataset(data_dir, "train", global_batch_size=8, seed=0)))
  expected, _ = tasks.next_token_loss(nnx.merge(graphdef, params), first_batch)
  assert _metrics(run)[0]["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_init_from_a_run_without_checkpoints_is_one_line_naming_its_command_before_any_data(
    tmp_path):
  def data_dir():
    raise AssertionError("the data was made before the source run was checked")
  source = tmp_path / "elsewhere"
  source.mkdir()
  with pytest.raises(UserError, match=re.escape(
      f"--init_from {source} has no checkpoint; train it first: python -m maxlm.train "
      f"--workdir={source}")):
    train_module.train(workdir=str(tmp_path / "run"), data_dir=data_dir, init_from=str(source))
  assert not (tmp_path / "run").exists()  # a refused run leaves no workdir behind


def test_init_from_a_missing_path_or_a_data_dir_says_which(data_dir, tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(UserError, match=re.escape(f"--init_from {missing} does not exist yet; "
                                                f"train it first: python -m maxlm.train")):
    train_module.train(workdir=str(tmp_path / "run"), data_dir=data_dir, init_from=str(missing))
  with pytest.raises(UserError, match=f"--init_from {data_dir} is a data dir"):
    train_module.train(workdir=str(tmp_path / "run"), data_dir=data_dir, init_from=data_dir)
  assert not (tmp_path / "run").exists()


def test_the_command_named_for_a_missing_run_is_its_configs_when_it_has_one():
  assert train_module.train_command("runs/tiny") == "python -m maxlm.train --gin_file=tiny.gin"
  assert train_module.train_command("./runs/sft_tiny") == ("python -m maxlm.train "
                                                           "--gin_file=sft_tiny.gin")
  assert train_module.train_command("/data/runs/sft_tiny") == (
      "python -m maxlm.train --gin_file=sft_tiny.gin --workdir=/data/runs/sft_tiny")
  assert train_module.train_command("mine") == "python -m maxlm.train --workdir=mine"


def test_init_from_refuses_another_model_shape_or_tokenizer(data_dir, tiny_run_copy, tmp_path):
  source = tiny_run_copy
  gin.bind_parameter("ModelConfig.mlp_dim", 96)
  with pytest.raises(UserError, match=r"another model shape \(mlp_dim: 128 -> 96\)"):
    train_module.train(workdir=str(tmp_path / "a"), data_dir=data_dir, steps=1,
                       init_from=str(source))
  assert not (tmp_path / "a").exists()  # nor its copied tokenizer and empty checkpoints/
  gin.bind_parameter("ModelConfig.mlp_dim", 128)
  meta_file = source / "checkpoints" / str(TINY_RUN_STEPS) / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  meta_file.write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64}))
  with pytest.raises(UserError, match="was trained with another tokenizer"):
    train_module.train(workdir=str(tmp_path / "b"), data_dir=data_dir, steps=1,
                       init_from=str(source))


@pytest.mark.slow  # in `pytest -m slow` (CI keeps under 15 minutes)
def test_a_run_training_only_some_parameters_resumes_exactly(data_dir, tmp_path):
  source = tmp_path / "source"
  train_module.train(workdir=str(source), data_dir=data_dir, steps=2)
  gin.bind_parameter("train.trainable", r"blocks/\d+/attention/.*")
  gin.bind_parameter("learning_rate_schedule.final_fraction", 1.0)  # same rates for 4 or 6 steps
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train_module.train(workdir=str(straight), data_dir=data_dir, steps=6, init_from=str(source))
  train_module.train(workdir=str(resumed), data_dir=data_dir, steps=4, init_from=str(source))
  train_module.train(workdir=str(resumed), data_dir=data_dir, steps=6, init_from=str(source))
  losses = [[row["loss"] for row in _metrics(run)] for run in (straight, resumed)]
  assert losses[0] == losses[1] and len(losses[0]) == 6
  saved = checkpoint.read_meta(resumed)[1]
  assert saved["trainable"] == r"blocks/\d+/attention/.*"
def _error_lines(output: str) -> list[str]:
  return [line for line in output.splitlines() if line.startswith("error:")]


def test_a_second_trainer_on_a_held_workdir_exits_2_naming_the_holder(data_dir, tmp_path):
  with workdir_lock.hold(tmp_path):  # this test process is the first trainer
    second = _train_process(tmp_path, data_dir,
                            "--gin_param=learning_rate_schedule.peak_learning_rate=1e-3")
    output = second.communicate(timeout=60)[0]
  assert second.returncode == 2 and "Traceback" not in output, output
  [error] = _error_lines(output)
  assert error.startswith(f"error: {tmp_path} is in use by another trainer (pid {os.getpid()} "
                          f"on {socket.gethostname()}, started "), output
  assert f"lock file {tmp_path / '.lock'})" in error
  assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"], "nothing written"


def test_every_process_of_a_refused_multi_process_run_exits_2(data_dir, tmp_path):
  import portpicker  # pylint: disable=import-outside-toplevel
  coordinator = f"--coordinator_address=127.0.0.1:{portpicker.pick_unused_port()}"
  with workdir_lock.hold(tmp_path):
    pair = [_train_process(tmp_path, data_dir, coordinator, "--num_processes=2",
                           f"--process_id={i}", devices=4) for i in range(2)]
    outputs = outputs_within(pair, timeout=120)
  assert [process.returncode for process in pair] == [2, 2], outputs
  assert _error_lines(outputs[0])[0].startswith(f"error: {tmp_path} is in use by another trainer")
  assert _error_lines(outputs[1]) == [f"error: process 0 was refused the lock of {tmp_path}; "
                                      "its error says by whom"]
  assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"], "nothing written"


def test_a_bad_flag_value_exits_2_with_one_line(data_dir, tmp_path):
  process = _train_process(tmp_path / "run", data_dir, "--steps=-5")
  output = process.communicate(timeout=60)[0]
  assert process.returncode == 2 and "Traceback" not in output, output
  assert _error_lines(output) == ["error: train.steps=-5 must be a positive int"]
  assert not (tmp_path / "run").exists()


def _first_record_of_batch(data_dir, batch_number: int) -> tuple[Path, int, int]:
  """(shard, record index in it, records in it) of the first sequence of the training run's
  `batch_number`th batch, found by content among the split's sequences in file order."""
  batches = iter(data.make_dataset(data_dir, "train", global_batch_size=8, seed=0))
  wanted = [next(batches) for _ in range(batch_number)][-1]["tokens"][0]
  in_order = data.make_dataset(data_dir, "train", global_batch_size=1, seed=0, shuffle=False,
                               num_epochs=1)
  matches = [i for i, batch in enumerate(in_order) if np.array_equal(batch["tokens"][0], wanted)]
  assert len(matches) == 1
  index = matches[0]
  for shard in data.load_manifest(data_dir)["splits"]["train"]["shards"]:
    reader = ArrayRecordReader(str(Path(data_dir) / shard))
    size = reader.num_records()
    reader.close()
    if index < size:
      return Path(data_dir) / shard, index, size
    index -= size
  raise AssertionError("index past the last shard")


def test_a_corrupt_record_mid_run_exits_2_naming_it_and_the_save_before_it_restores(
    data_dir, tmp_path):
  corrupt = Path(shutil.copytree(data_dir, tmp_path / "corrupt"))
  shard, record, size = _first_record_of_batch(corrupt, 3)
  damage_record(shard, record)
  run = tmp_path / "run"
  process = _train_process(run, corrupt, "--steps=6", "--checkpoint_every=2")
  output = process.communicate(timeout=300)[0]
  assert process.returncode == 2, output
  assert "Traceback" not in output
  [error] = _error_lines(output)
  assert error.startswith(f"error: ArrayRecord shard {shard} record {record} of {size} is "
                          "corrupt or truncated ("), output
  assert error.endswith("); rerun `python -m beam_pipelines.prepare_text`")
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"], output

  summary = train_module.train(workdir=str(run), data_dir=data_dir, steps=3)
  assert summary["step"] == 3
  assert [r["step"] for r in _metrics(run)] == [1, 2, 3]
def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    data_dir, tiny_run_copy, capsys):
  run = tiny_run_copy
  (run / "checkpoints" / "4" / "state" / "_METADATA").unlink()
  capsys.readouterr()
  summary = train_module.train(workdir=str(run), data_dir=data_dir, steps=4)
  warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
  assert len(warnings) == 1 and warnings[0].startswith(
      f"warning: checkpoint step 4 in {run / 'checkpoints'} is corrupt: state/_METADATA is "
      "missing; "), warnings
  assert warnings[0].endswith(f"moved it to {run / 'corrupt_checkpoints' / '4'} and "
                              "resumed from step 1")
  assert summary["step"] == 4 and (run / "checkpoints" / "4" / "state" / "_METADATA").exists()
  assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]

  for step_dir in (run / "checkpoints").iterdir():
    (step_dir / "meta" / "metadata").unlink(missing_ok=True)
  with pytest.raises(UserError, match="^checkpoint step 4 in .* is corrupt: meta/metadata is "
                     "missing; no checkpoint there is intact \\(2 tried\\): start a new "
                     "--workdir(\n|$)"):
    train_module.train(workdir=str(run), data_dir=data_dir, steps=8)


def test_a_run_whose_final_held_out_loss_is_not_finite_is_an_error(data_dir, tmp_path,
                                                                   monkeypatch):
  monkeypatch.setattr(train_module, "_evaluate",
                      lambda *args: {"eval_loss": float("nan"), "eval_perplexity": 1.0})
  with pytest.raises(UserError, match="^the held-out eval_loss=nan after step 1: the model "
                     "diverged"):
    train_module.train(workdir=str(tmp_path), data_dir=data_dir, steps=1)
