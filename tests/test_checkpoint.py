"""Checkpoints restore bit-identical state, onto another mesh too, and a corrupt one is never
trusted: it fails its checksums (or does not restore) and the newest intact step is used."""

import errno
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import dataclasses
import json

import grain
import jax
import numpy as np
import pytest
import zstandard

from maxlm import checkpoint, optim, sharding, steps
from maxlm.config_checks import UserError, check_compatible
from maxlm.model import ModelConfig
from serving import engine, server

# A vocabulary large enough that (un)embedding shards go to their own zstd frames.
CONFIG = ModelConfig(vocab_size=512, num_layers=1, embed_dim=32, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=64)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _setup(mesh_shape):
  mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10))
  _, abstract_state = steps.abstract_model(CONFIG)
  return optimizer, abstract_state, steps.state_shardings(abstract_state, optimizer, mesh)


def _state(step: int, seed: int):
  """A state whose Adam moments are random (as after training), not the zeros of init."""
  optimizer, _, shardings = _setup((1, 8, 1))
  state = steps.init_train_state(CONFIG, optimizer, shardings, seed=seed)
  rng = np.random.default_rng(seed)

  def moment(x):
    if not x.ndim:
      return x
    return jax.device_put(np.abs(rng.normal(size=x.shape)).astype(x.dtype) * 1e-3, x.sharding)
  return steps.TrainState(step=state.step + step, params=state.params,
                          opt_state=jax.tree.map(moment, state.opt_state))


def _save(workdir, states: dict, **options):
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  saver = checkpoint.Checkpointer(workdir, save_every=1, **options)
  for step, state in states.items():
    next(iterator)
    saver.save(step, state, grain.checkpoint.CheckpointSave(iterator),
               checkpoint.model_meta(CONFIG), force=True)
  saver.wait()
  saver.close()


def _restorer(workdir, mesh_shape=(1, 8, 1), verify=True):
  """`restore(step) -> state`, as training resumes: meta first, then the state."""
  optimizer, abstract_state, shardings = _setup(mesh_shape)
  target = steps.abstract_train_state(abstract_state, optimizer, shardings)
  loader = checkpoint.Checkpointer(workdir, save_every=1, verify=verify)
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())

  def restore(step):
    checkpoint.read_meta(workdir, step)
    return loader.restore(step, target, grain.checkpoint.CheckpointRestore(iterator))[0]
  return loader, restore


def _assert_identical(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def states():
  return {1: _state(1, seed=1), 2: _state(2, seed=2)}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, states) -> Path:
  workdir = tmp_path_factory.mktemp("run")
  _save(workdir, states)
  return workdir


@pytest.fixture
def run(saved_run, tmp_path) -> Path:
  return shutil.copytree(saved_run, tmp_path / "run")


def _zstd_frames(blob: bytes):
  """(start, end, decompressed) of each zstd frame in a file."""
  start = blob.find(ZSTD_MAGIC)
  while start >= 0:
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
      content = decompressor.decompress(blob[start:])
    except zstandard.ZstdError:
      start = blob.find(ZSTD_MAGIC, start + 1)
      continue
    end = len(blob) - len(decompressor.unused_data)
    yield start, end, content
    start = blob.find(ZSTD_MAGIC, end)


def flip_64_bytes_of(step_dir: Path, array: jax.Array):
  """XORs 64 bytes in the middle of the compressed chunk that holds one shard of `array` (each
  shard is a zstd frame in one of the step's files)."""
  shards = {np.asarray(shard.data).tobytes() for shard in array.addressable_shards}
  for path in sorted(p for p in (step_dir / "state").rglob("*") if p.is_file()):
    blob = bytearray(path.read_bytes())
    for start, end, content in _zstd_frames(bytes(blob)):
      if content in shards:
        middle = (start + end) // 2
        blob[middle:middle + 64] = bytes(b ^ 0xFF for b in blob[middle:middle + 64])
        path.write_bytes(bytes(blob))
        return
  raise AssertionError(f"no chunk of the array found in {step_dir}")


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
    _assert_identical(restored, state)
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
  with pytest.raises(UserError, match=r"dtype: float32 -> bfloat16"):
    check_compatible(saved, checkpoint.model_meta(
        dataclasses.replace(CONFIG, dtype="bfloat16"), seq_len=16), tmp_path)


def test_a_run_resumes_with_another_attention_or_remat(tmp_path):
  """A run saved with attention="xla" (the default before "auto") resumes under "auto", and
  one may change its remat policy: the same function, computed another way."""
  saved = saved_meta_without(tmp_path, "remat")
  saved["model_config"]["attention"] = "xla"
  check_compatible(saved, checkpoint.model_meta(
      dataclasses.replace(CONFIG, attention="auto", remat="full"), seq_len=16), tmp_path)


def test_a_saved_field_this_model_config_lacks_is_refused_naming_it():
  meta = checkpoint.model_meta(CONFIG, seq_len=16)
  meta["model_config"]["field_from_the_future"] = 8
  with pytest.raises(UserError, match="model_config has field_from_the_future, which this "
                                      "maxlm's ModelConfig lacks"):
    checkpoint.config_from_meta(meta)
  with pytest.raises(UserError, match="field_from_the_future"):
    check_compatible(meta, checkpoint.model_meta(CONFIG, seq_len=16), "runs/x")
def test_64_flipped_parameter_bytes_load_silently_unverified_and_fall_back_verified(run, states):
  flip_64_bytes_of(run / "checkpoints" / "2", states[2].params["unembedding"])
  _, restore_unverified = _restorer(run, verify=False)
  silently = restore_unverified(2)
  assert not np.array_equal(np.asarray(silently.params["unembedding"]),
                            np.asarray(states[2].params["unembedding"]))

  loader, restore = _restorer(run)
  step, restored, corrupt = checkpoint.newest_intact(loader.all_steps(), restore)
  assert step == 1
  _assert_identical(restored, states[1])
  assert [str(e) for e in corrupt] == [(f"checkpoint step 2 in {run / 'checkpoints'} is corrupt: "
                                        "params.unembedding does not match its checksum")]


@pytest.mark.parametrize("damage, reason", [
    (lambda step_dir, state: flip_64_bytes_of(step_dir, state.opt_state[1][0].nu["unembedding"]),
     "opt_state.1.0.nu.unembedding does not match its checksum"),
    (lambda step_dir, state: (step_dir / "meta" / "metadata").unlink(),
     "meta/metadata is missing"),
    (lambda step_dir, state: (step_dir / "state" / "_METADATA").unlink(),
     "state/_METADATA is missing"),
], ids=["flipped optimizer-state bytes", "deleted meta/metadata", "deleted state/_METADATA"])
def test_a_damaged_latest_step_falls_back_to_the_previous_one(run, states, damage, reason):
  damage(run / "checkpoints" / "2", states[2])
  loader, restore = _restorer(run)
  step, restored, corrupt = checkpoint.newest_intact(loader.all_steps(), restore)
  assert step == 1
  _assert_identical(restored, states[1])
  assert [e.step for e in corrupt] == [2] and reason in str(corrupt[0])
  assert "\n" not in str(corrupt[0])


def test_no_intact_step_is_reported_for_every_step(run, states):
  for step, state in states.items():
    flip_64_bytes_of(run / "checkpoints" / str(step), state.params["unembedding"])
  loader, restore = _restorer(run)
  step, restored, corrupt = checkpoint.newest_intact(loader.all_steps(), restore)
  assert (step, restored, [e.step for e in corrupt]) == (None, None, [2, 1])


def test_non_finite_values_are_refused_though_their_checksum_matches(tmp_path, states):
  state = states[1]
  nan_embedding = state.params["embedding"].at[3, 5].set(np.nan)
  state = steps.TrainState(step=state.step, opt_state=state.opt_state,
                           params={**state.params, "embedding": nan_embedding})
  _save(tmp_path, {1: state})
  _, restore = _restorer(tmp_path)
  with pytest.raises(checkpoint.CorruptCheckpointError,
                     match="params.embedding holds 1 non-finite values"):
    restore(1)


def test_a_step_set_aside_can_be_written_again(run, states):
  loader, _ = _restorer(run)
  moved = loader.set_aside(2)
  assert moved == run / checkpoint.CORRUPT_CHECKPOINTS / "2" and (moved / "state").is_dir()
  assert loader.all_steps() == [1]
  _save(run, {2: states[2]})
  _, restore = _restorer(run)
  _assert_identical(restore(2), states[2])


def test_served_params_are_verified_against_checksums_written_on_another_mesh(run, states):
  _, params = engine.one_device_params(run, CONFIG, 2)
  _assert_identical(params, states[2].params)
  flip_64_bytes_of(run / "checkpoints" / "2", states[2].params["unembedding"])
  with pytest.raises(checkpoint.CorruptCheckpointError, match="params.unembedding"):
    engine.one_device_params(run, CONFIG, 2)


def test_the_server_refuses_a_corrupt_checkpoint_naming_the_newest_intact_step(run, states,
                                                                              capsys):
  flip_64_bytes_of(run / "checkpoints" / "2", states[2].params["unembedding"])
  with pytest.raises(SystemExit) as exit_info:
    server.main(["--checkpoint_dir", str(run), "--engine_cpus=all"])
  assert exit_info.value.code == 2 and capsys.readouterr().err == (
      f"serving.server: checkpoint step 2 in {run / 'checkpoints'} is corrupt: "
      "params.unembedding does not match its checksum; the newest intact one is step 1: serve "
      "it with --step=1\n")


def test_the_server_asked_for_a_step_the_run_lacks_lists_those_it_has(run, capsys):
  with pytest.raises(SystemExit) as exit_info:
    server.main(["--checkpoint_dir", str(run), "--step=5", "--engine_cpus=all"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.endswith("has no checkpoint of step 5; its steps: 1, 2\n")


@pytest.fixture
def small_disk(tmp_path):
  """A 256 KiB tmpfs (needs the right to mount, which root has; skipped elsewhere)."""
  mount_point = tmp_path / "disk"
  mount_point.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                           capture_output=True, check=False)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
  yield mount_point
  subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_disk_full_tracebacks_of_unawaited_writes_are_dropped_and_others_kept(tmp_path, caplog):
  """On a busy machine several of a save's fragment writes fail, and asyncio logs each one
  nobody awaited: a full disk still shows as the one line the save raises."""
  checkpoint.Checkpointer(tmp_path, save_every=1).close()
  full = ValueError("RESOURCE_EXHAUSTED: Failed to write 69749 bytes to file 17: "
                    f"{os.strerror(errno.ENOSPC)} [os_error_code='{errno.ENOSPC}']")
  other = ValueError("RESOURCE_EXHAUSTED: some other failure")
  with caplog.at_level(logging.ERROR):
    for error in (full, other):
      logging.getLogger("asyncio").error("Task exception was never retrieved",
                                         exc_info=(type(error), error, None))
  assert [r.exc_info[1] for r in caplog.records] == [other]


def test_a_full_disk_is_one_line_and_leaves_no_partial_save(small_disk, states, caplog):
  with caplog.at_level(logging.ERROR), pytest.raises(UserError) as error:
    _save(small_disk, states)
  message = str(error.value)
  assert "\n" not in message and f"the disk of {small_disk} is full" in message
  assert not list((small_disk / "checkpoints").glob(f"*{checkpoint.TMP_SUFFIX}*"))
  assert not [r for r in caplog.records if "No space left" in r.getMessage()]


def test_a_partial_save_written_again_after_its_removal_is_removed_too(tmp_path):
  """A failed save's straggling writes create its directory again after the first removal."""
  partial = tmp_path / f"4{checkpoint.TMP_SUFFIX}" / "state" / "d"
  partial.mkdir(parents=True)
  (tmp_path / "3" / "state").mkdir(parents=True)

  def straggler():
    time.sleep(0.2)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "fragment").write_bytes(b"late")
  writer = threading.Thread(target=straggler)
  writer.start()
  checkpoint.remove_partial_saves(tmp_path, quiet_s=0.5)
  writer.join()
  assert sorted(path.name for path in tmp_path.iterdir()) == ["3"]


def test_a_partial_save_left_by_an_earlier_run_is_removed_by_the_next_ones_first_save(
    saved_run, states, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(saved_run, run)
  leftover = run / "checkpoints" / f"5{checkpoint.TMP_SUFFIX}"
  (leftover / "state").mkdir(parents=True)
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  saver = checkpoint.Checkpointer(run, save_every=1)
  saver.save(3, states[2], grain.checkpoint.CheckpointSave(iterator),
             checkpoint.model_meta(CONFIG), force=True)
  saver.wait()
  saver.close()
  assert not leftover.exists()
  assert saver.all_steps() == [1, 2, 3]


def test_a_tensorstore_reason_is_kept_without_the_repr_that_follows_it():
  error = ValueError("Encountered error while reading array index: (slice(0, 3, 1),). See full "
                     "TensorStore details: <bound method pybind11_detail_function_record.spec of "
                     "TensorStore({\n  'driver': 'zarr'})>")
  assert checkpoint._first_line(error) == ("Encountered error while reading array index: "
                                           "(slice(0, 3, 1),)")


def test_a_step_without_its_checksums_restores_with_a_warning_saying_so(run, states, caplog):
  shutil.rmtree(run / "checkpoints" / "2" / checkpoint.CHECKSUMS)
  _, restore = _restorer(run)
  with caplog.at_level(logging.WARNING, logger="maxlm.checkpoint"):
    _assert_identical(restore(2), states[2])
  assert [r.getMessage() for r in caplog.records if r.name == "maxlm.checkpoint"] == [
      f"checkpoint step 2 in {run / 'checkpoints'} has no checksums/ (saved without them or "
      "since removed): its arrays are checked only for non-finite values"]
