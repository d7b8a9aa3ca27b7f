"""maxlm.data against a tiny data dir whose every record is known: record r has tokens[0] == r."""

import json
import os

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
import numpy as np
import orbax.checkpoint as ocp
import pytest

from beam_pipelines.records import (MANIFEST_NAME, RECORD_FORMAT, encode_packed, encode_record,
                                    manifest_fields, text_fields)
from beam_pipelines.records import field as record_field
from maxlm import data
from maxlm.errors import UserError

SEQ_LEN = 8
SHARD_SIZES = (20, 17)
NUM_RECORDS = sum(SHARD_SIZES)


def known_record(record_id: int) -> dict[str, np.ndarray]:
  """Two documents; tokens[0] names the record so any batch row can be traced back."""
  split_at = 3 + record_id % 4
  return {
      "tokens": np.arange(SEQ_LEN, dtype=np.int32) * 1000 + record_id,
      "segment_ids": np.where(np.arange(SEQ_LEN) < split_at, 1, 2).astype(np.int32),
      "positions": np.concatenate([np.arange(split_at), np.arange(SEQ_LEN - split_at)]).astype(
          np.int32),
  }


def write_shards(data_dir, split: str) -> list[str]:
  names, record_id = [], 0
  for shard_index, size in enumerate(SHARD_SIZES):
    name = f"{split}-{shard_index:05d}-of-{len(SHARD_SIZES):05d}.array_record"
    writer = ArrayRecordWriter(str(data_dir / name), "group_size:1")
    for _ in range(size):
      writer.write(encode_packed(**known_record(record_id)))
      record_id += 1
    writer.close()
    names.append(name)
  return names


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  split_info = lambda split: {
      "documents": 2 * NUM_RECORDS, "tokens": SEQ_LEN * NUM_RECORDS, "sequences": NUM_RECORDS,
      "shards": write_shards(root, split)}
  manifest = {
      "format": RECORD_FORMAT, "seq_len": SEQ_LEN, "fields": manifest_fields(text_fields(SEQ_LEN)),
      "tokenizer": {"file": "tokenizer.model", "vocab_size": 4096, "pad_id": 0},
      "splits": {"train": split_info("train"), "validation": split_info("validation")},
  }
  (root / MANIFEST_NAME).write_text(json.dumps(manifest))
  (root / "tokenizer.model").write_bytes(b"stand-in")
  return root


def record_ids(batches) -> list[int]:
  """Record ids in order; padding rows (no segment: a short last batch filled up) are left out."""
  return [int(row[0]) for batch in batches
          for row, segments in zip(batch["tokens"], batch["segment_ids"]) if segments.any()]


def take(iterator, n: int) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for field in x:
      np.testing.assert_array_equal(x[field], y[field])


def train_dataset(data_dir, **overrides):
  kwargs = dict(global_batch_size=4, seed=7, process_index=0, process_count=1) | overrides
  return data.make_dataset(data_dir, "train", **kwargs)


def test_load_manifest_reads_seq_len(data_dir):
  assert data.load_manifest(data_dir)["seq_len"] == SEQ_LEN
  assert data.tokenizer_path(data_dir).name == "tokenizer.model"


def test_each_record_once_per_epoch_with_a_new_order_each_epoch(data_dir):
  ds = train_dataset(data_dir, global_batch_size=5, num_epochs=3, drop_remainder=False)
  ids = record_ids(ds)
  epochs = [ids[e * NUM_RECORDS:(e + 1) * NUM_RECORDS] for e in range(3)]
  assert len(ids) == 3 * NUM_RECORDS
  for epoch in epochs:
    assert sorted(epoch) == list(range(NUM_RECORDS))
  assert epochs[0] != list(range(NUM_RECORDS))
  assert epochs[0] != epochs[1] != epochs[2]


def test_batches_decode_to_the_written_int32_records(data_dir):
  batch = next(iter(train_dataset(data_dir)))
  assert set(batch) == {"tokens", "segment_ids", "positions"}
  for field, rows in batch.items():
    assert rows.dtype == np.int32 and rows.shape == (4, SEQ_LEN)
    for record_id, row in zip(batch["tokens"][:, 0], rows):
      np.testing.assert_array_equal(row, known_record(int(record_id))[field])


def test_repeat_forever_gives_full_batches_past_the_first_epoch(data_dir):
  batches = take(iter(train_dataset(data_dir, global_batch_size=4)), 3 * NUM_RECORDS // 4)
  assert all(b["tokens"].shape == (4, SEQ_LEN) for b in batches)


def test_finite_training_epochs_drop_the_ragged_batch(data_dir):
  batches = list(train_dataset(data_dir, num_epochs=1))
  assert len(batches) == NUM_RECORDS // 4


def test_same_seed_same_batches_other_seed_other_order(data_dir):
  first = take(iter(train_dataset(data_dir, seed=7)), 12)
  assert_same_batches(first, take(iter(train_dataset(data_dir, seed=7)), 12))
  assert record_ids(first) != record_ids(take(iter(train_dataset(data_dir, seed=8)), 12))


def test_eval_sees_each_validation_sequence_once_in_order(data_dir):
  ds = data.make_dataset(data_dir, "validation", global_batch_size=8, seed=0, shuffle=False,
                         num_epochs=1, process_index=0, process_count=1)
  batches = list(ds)
  assert [len(b["tokens"]) for b in batches] == [8, 8, 8, 8, 8]  # the last one padded
  assert not batches[-1]["segment_ids"][5:].any()
  assert record_ids(batches) == list(range(NUM_RECORDS))


def test_processes_read_disjoint_slices_covering_the_split(data_dir):
  per_process = [
      record_ids(train_dataset(data_dir, global_batch_size=4, num_epochs=1, drop_remainder=False,
                               process_index=i, process_count=2))
      for i in range(2)]
  assert all(len(ids) == len(set(ids)) for ids in per_process)
  assert not set(per_process[0]) & set(per_process[1])
  assert sorted(per_process[0] + per_process[1]) == list(range(NUM_RECORDS))


@pytest.mark.parametrize("shuffle", [True, False])
def test_global_batches_do_not_depend_on_the_process_count(data_dir, shuffle):
  """Two processes' rows, stacked, are exactly one process's global batches."""
  def batches(index, count):
    return take(iter(data.make_dataset(data_dir, "train", global_batch_size=6, seed=3,
                                       shuffle=shuffle, process_index=index,
                                       process_count=count)), 8)
  single, first, second = batches(0, 1), batches(0, 2), batches(1, 2)
  stacked = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(first, second)]
  assert_same_batches(stacked, single)


def test_per_process_batch_is_global_over_process_count(data_dir):
  batch = next(iter(train_dataset(data_dir, global_batch_size=6, process_index=1,
                                  process_count=3)))
  assert batch["tokens"].shape == (2, SEQ_LEN)


def test_process_defaults_to_the_jax_process(data_dir):
  ds = data.make_dataset(data_dir, "train", global_batch_size=4, seed=7)
  assert_same_batches(take(iter(ds), 3), take(iter(train_dataset(data_dir)), 3))


def test_state_round_trip_resumes_at_the_same_batch(data_dir):
  ds = train_dataset(data_dir)
  iterator = iter(ds)
  take(iterator, 11)  # past the first epoch boundary
  state = iterator.get_state()
  expected = take(iterator, 5)
  resumed = iter(train_dataset(data_dir))
  resumed.set_state(state)
  assert_same_batches(take(resumed, 5), expected)


def test_state_round_trip_with_read_threads(data_dir):
  iterator = iter(train_dataset(data_dir, read_threads=2))
  take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 4)
  resumed = iter(train_dataset(data_dir, read_threads=2))
  resumed.set_state(state)
  assert_same_batches(take(resumed, 4), expected)
  assert_same_batches(expected, take(iter(train_dataset(data_dir)), 7)[3:])


def test_orbax_checkpoint_manager_round_trip(data_dir, tmp_path):
  iterator = iter(train_dataset(data_dir))
  take(iterator, 6)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(6, args=ocp.args.Composite(
        step=ocp.args.JsonSave({"step": 6}), data_iter=data.iterator_save_args(iterator)))
    manager.wait_until_finished()
  expected = take(iterator, 3)

  fresh = iter(train_dataset(data_dir))
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        step=ocp.args.JsonRestore(), data_iter=data.iterator_restore_args(fresh)))
  assert restored.step == {"step": 6}
  assert restored.data_iter is fresh
  assert_same_batches(take(fresh, 3), expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(global_batch_size=5, process_count=2), "multiple of 2"),
    (dict(global_batch_size=0), "positive multiple"),
    (dict(num_epochs=0), "num_epochs=0"),
    (dict(seed=-1), "seed=-1"),
    (dict(process_index=2, process_count=2), "process_index=2"),
])
def test_bad_arguments_name_the_fix(data_dir, kwargs, message):
  with pytest.raises(ValueError, match=message):
    train_dataset(data_dir, **kwargs)


def test_unknown_split_lists_the_known_ones(data_dir):
  with pytest.raises(ValueError, match="pick one of"):
    data.make_dataset(data_dir, "test", global_batch_size=4, seed=0, process_count=1,
                      process_index=0)


def test_missing_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load_manifest(tmp_path / "nowhere")


def test_missing_manifest_says_to_run_prepare_text(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"has no manifest.json; run `python -m beam_pip"):
    data.load_manifest(tmp_path)


def copy_with_manifest(data_dir, tmp_path, **changes):
  manifest = json.loads((data_dir / MANIFEST_NAME).read_text()) | changes
  for path in data_dir.iterdir():
    (tmp_path / path.name).write_bytes(path.read_bytes())
  (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
  return tmp_path


def test_unknown_format(data_dir, tmp_path):
  copy = copy_with_manifest(data_dir, tmp_path, format="maxlm.packed_int16.v9")
  with pytest.raises(ValueError, match="maxlm.packed_int16.v9"):
    data.load_manifest(copy)


def test_missing_shard_is_named(data_dir, tmp_path):
  copy = copy_with_manifest(data_dir, tmp_path)
  (copy / "validation-00001-of-00002.array_record").unlink()
  with pytest.raises(FileNotFoundError, match="validation-00001-of-00002.array_record"):
    data.load_manifest(copy)


def test_sequence_count_mismatch(data_dir, tmp_path):
  manifest = json.loads((data_dir / MANIFEST_NAME).read_text())
  manifest["splits"]["train"]["sequences"] = NUM_RECORDS + 1
  copy = copy_with_manifest(data_dir, tmp_path, splits=manifest["splits"])
  with pytest.raises(ValueError, match="truncated or replaced"):
    train_dataset(copy)


def test_a_split_without_sequences_is_a_one_line_error_naming_the_data_dir(data_dir, tmp_path):
  manifest = json.loads((data_dir / MANIFEST_NAME).read_text())
  manifest["splits"]["train"] |= {"sequences": 0, "shards": ["train-empty.array_record"]}
  copy = copy_with_manifest(data_dir, tmp_path, splits=manifest["splits"])
  ArrayRecordWriter(str(copy / "train-empty.array_record"), "group_size:1").close()
  with pytest.raises(UserError, match=f"^--data_dir {copy}: split 'train' has no sequences"):
    train_dataset(copy)


def test_a_truncated_shard_is_named_when_the_dataset_is_built(data_dir, tmp_path):
  copy = copy_with_manifest(data_dir, tmp_path)
  shard = copy / "train-00001-of-00002.array_record"
  os.truncate(shard, shard.stat().st_size // 2)
  with pytest.raises(UserError, match=f"^ArrayRecord shard {shard} is corrupt or truncated "
                     r"\(.+\); rerun `python -m beam_pipelines.prepare_text`$"):
    train_dataset(copy)


def damage_record(shard, record_index: int) -> None:
  """Rewrites `shard` uncompressed, so that a record's bytes can be found, and flips one of
  the bytes of record `record_index`."""
  reader = ArrayRecordReader(str(shard))
  records = reader.read_all()
  reader.close()
  writer = ArrayRecordWriter(str(shard), "group_size:1,uncompressed")
  for record in records:
    writer.write(record)
  writer.close()
  content = bytearray(shard.read_bytes())
  at = content.find(records[record_index])
  assert at >= 0 and content.find(records[record_index], at + 1) < 0
  content[at + 5] ^= 0xFF
  shard.write_bytes(content)


@pytest.mark.parametrize("read_threads", [0, 2])
def test_a_corrupt_record_is_named_by_shard_and_record_when_read(data_dir, tmp_path,
                                                                  read_threads):
  copy = copy_with_manifest(data_dir, tmp_path)
  shard = copy / "train-00001-of-00002.array_record"
  damage_record(shard, 3)
  dataset = train_dataset(copy, shuffle=False, num_epochs=1, read_threads=read_threads)
  with pytest.raises(UserError, match=f"^ArrayRecord shard {shard} record 3 of 17 is corrupt "
                     r"or truncated \(.*hash mismatch.*\); rerun `python -m beam_pipelines"):
    record_ids(dataset)


def write_source_shard(data_dir, name: str, first_id: int, count: int) -> str:
  shard = f"train-{name}-00000-of-00001.array_record"
  writer = ArrayRecordWriter(str(data_dir / shard), "group_size:1")
  for record_id in range(first_id, first_id + count):
    writer.write(encode_packed(**known_record(record_id)))
  writer.close()
  return shard


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
  """Two sources of the train split: ids 0..39 weighted 3, ids 1000..1009 weighted 1."""
  root = tmp_path_factory.mktemp("mixed")
  sources = {}
  for name, first_id, count, weight in (("web", 0, 40, 3.0), ("code", 1000, 10, 1.0)):
    sources[name] = {"weight": weight, "documents": count, "tokens": count * SEQ_LEN,
                     "sequences": count, "shards": [write_source_shard(root, name, first_id, count)]}
  train = {"documents": 50, "tokens": 50 * SEQ_LEN, "sequences": 50,
           "shards": [s["shards"][0] for s in sources.values()], "sources": sources}
  manifest = {"format": RECORD_FORMAT, "seq_len": SEQ_LEN,
              "fields": manifest_fields(text_fields(SEQ_LEN)), "splits": {"train": train}}
  (root / MANIFEST_NAME).write_text(json.dumps(manifest))
  return root


def test_training_mixes_sources_by_their_weights(mixed_dir):
  ids = record_ids(take(iter(train_dataset(mixed_dir, global_batch_size=8)), 100))
  from_code = sum(i >= 1000 for i in ids)
  assert from_code / len(ids) == pytest.approx(0.25, abs=0.01)  # weight 1 of 4, not 10 of 50
  assert set(ids) == set(range(40)) | set(range(1000, 1010))  # the small source repeats
  first_code_epoch = [i for i in ids if i >= 1000][:10]
  assert sorted(first_code_epoch) == list(range(1000, 1010))  # each source reshuffled per pass


def test_mixture_is_the_same_on_any_process_count(mixed_dir):
  one = take(iter(train_dataset(mixed_dir, global_batch_size=8)), 5)
  halves = [take(iter(train_dataset(mixed_dir, global_batch_size=8, process_index=i,
                                    process_count=2)), 5) for i in range(2)]
  for step in range(5):
    merged = np.concatenate([halves[0][step]["tokens"], halves[1][step]["tokens"]])
    np.testing.assert_array_equal(merged, one[step]["tokens"])


def test_finite_epochs_of_a_mixture_count_the_whole_split(mixed_dir):
  batches = list(train_dataset(mixed_dir, global_batch_size=5, num_epochs=2))
  assert len(batches) == 2 * 50 // 5


def write_dir(root, manifest: dict, encoded_records: list[bytes]) -> None:
  """One shard per split holding `encoded_records`, and `manifest` with the splits filled in."""
  splits = {}
  for split in ("train", "validation"):
    name = f"{split}-00000-of-00001.array_record"
    writer = ArrayRecordWriter(str(root / name), "group_size:1")
    for record in encoded_records:
      writer.write(record)
    writer.close()
    splits[split] = {"sequences": len(encoded_records), "shards": [name]}
  (root / MANIFEST_NAME).write_text(json.dumps(manifest | {"splits": splits}))


def test_a_v1_dir_and_the_v2_dir_of_the_same_records_give_identical_batches(tmp_path):
  v1_bytes = [np.stack([known_record(r)[name] for name in ("tokens", "segment_ids", "positions")])
              .astype(np.int32).tobytes() for r in range(NUM_RECORDS)]  # v1: one int32 [3, L]
  (tmp_path / "v1").mkdir()
  write_dir(tmp_path / "v1", {"format": "maxlm.packed_int32.v1", "seq_len": SEQ_LEN,
                              "fields": ["tokens", "segment_ids", "positions"]}, v1_bytes)
  fields = text_fields(SEQ_LEN)
  (tmp_path / "v2").mkdir()
  write_dir(tmp_path / "v2", {"format": RECORD_FORMAT, "seq_len": SEQ_LEN,
                              "fields": manifest_fields(fields)},
            [encode_record(known_record(r), fields) for r in range(NUM_RECORDS)])
  versions = (tmp_path / "v1", tmp_path / "v2")
  train = [take(iter(train_dataset(root)), 12) for root in versions]
  assert_same_batches(*train)
  assert sorted(record_ids(train[0])[:NUM_RECORDS]) == list(range(NUM_RECORDS))
  evaluation = [list(data.make_dataset(root, "validation", global_batch_size=5, seed=0,
                                       shuffle=False, num_epochs=1, process_index=0,
                                       process_count=1)) for root in versions]
  assert_same_batches(*evaluation)


IMAGE_SHAPE = (4, 5, 3)


def image_record(record_id: int) -> dict[str, np.ndarray]:
  return known_record(record_id) | {
      "loss_weight": np.linspace(0, 1, SEQ_LEN, dtype=np.float32) + record_id,
      "pixels": np.full(IMAGE_SHAPE, record_id % 256, np.uint8)}


def test_a_v2_dir_with_float_and_image_fields_batches_them_in_their_dtypes(tmp_path):
  fields = text_fields(SEQ_LEN) + (record_field("loss_weight", np.float32, (SEQ_LEN,)),
                                   record_field("pixels", np.uint8, IMAGE_SHAPE))
  write_dir(tmp_path, {"format": RECORD_FORMAT, "seq_len": SEQ_LEN,
                       "fields": manifest_fields(fields)},
            [encode_record(image_record(r), fields) for r in range(NUM_RECORDS)])
  batch = next(iter(train_dataset(tmp_path)))
  assert {name: (rows.dtype, rows.shape) for name, rows in batch.items()} == {
      "tokens": (np.int32, (4, SEQ_LEN)), "segment_ids": (np.int32, (4, SEQ_LEN)),
      "positions": (np.int32, (4, SEQ_LEN)), "loss_weight": (np.float32, (4, SEQ_LEN)),
      "pixels": (np.uint8, (4, *IMAGE_SHAPE))}
  for i, record_id in enumerate(record_ids([batch])):
    for name, array in image_record(record_id).items():
      np.testing.assert_array_equal(batch[name][i], array)
  eval_batches = list(data.make_dataset(tmp_path, "validation", global_batch_size=8, seed=0,
                                        shuffle=False, num_epochs=1, process_index=0,
                                        process_count=1))
  assert not eval_batches[-1]["pixels"][5:].any()  # padding rows are zeros of every field


def test_a_record_of_another_size_than_the_fields_is_an_error_naming_the_shard(tmp_path):
  fields = text_fields(SEQ_LEN)
  write_dir(tmp_path, {"format": RECORD_FORMAT, "seq_len": SEQ_LEN,
                       "fields": manifest_fields(fields + (record_field("mask", np.int32, (2,)),))},
            [encode_record(known_record(r), fields) for r in range(NUM_RECORDS)])
  with pytest.raises(ValueError, match=r"shard .*train-00000-of-00001.array_record: record has "
                                       r"96 bytes but .*mask int32\[2\]\) take 104"):
    next(iter(train_dataset(tmp_path)))


def test_a_manifest_field_without_a_dtype_is_refused_at_load(data_dir, tmp_path):
  copy = copy_with_manifest(data_dir, tmp_path, fields=[{"name": "tokens", "shape": [SEQ_LEN]}])
  with pytest.raises(ValueError, match=r"manifest.json: manifest field .*exactly the keys"):
    data.load_manifest(copy)
