"""beam_pipelines.records: the manifest's field list drives the record bytes both ways."""

import numpy as np
import pytest

from beam_pipelines import records

SEQ_LEN = 6
IMAGE_FIELDS_MANIFEST = {
    "format": "maxlm.records.v2", "seq_len": SEQ_LEN,
    "fields": [{"name": "tokens", "dtype": "int32", "shape": [SEQ_LEN]},
               {"name": "loss_weight", "dtype": "float32", "shape": [SEQ_LEN]},
               {"name": "pixels", "dtype": "uint8", "shape": [2, 3, 3]}]}


def image_example(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"tokens": rng.integers(0, 2**31 - 1, SEQ_LEN, dtype=np.int32),
          "loss_weight": rng.standard_normal(SEQ_LEN).astype(np.float32),
          "pixels": rng.integers(0, 256, (2, 3, 3), dtype=np.uint8)}


def test_v2_manifest_fields_round_trip_through_json_form():
  fields = records.fields_of_manifest(IMAGE_FIELDS_MANIFEST)
  assert [(f.name, f.dtype, f.shape) for f in fields] == [
      ("tokens", np.int32, (SEQ_LEN,)), ("loss_weight", np.float32, (SEQ_LEN,)),
      ("pixels", np.uint8, (2, 3, 3))]
  assert records.manifest_fields(fields) == IMAGE_FIELDS_MANIFEST["fields"]


def test_a_record_is_each_fields_little_endian_bytes_in_manifest_order():
  example = image_example(0)
  encoded = records.encode_record(example, records.fields_of_manifest(IMAGE_FIELDS_MANIFEST))
  assert encoded == (example["tokens"].astype("<i4").tobytes()
                     + example["loss_weight"].astype("<f4").tobytes()
                     + example["pixels"].tobytes())


def test_any_fields_decode_to_what_was_encoded():
  fields = records.fields_of_manifest(IMAGE_FIELDS_MANIFEST)
  example = image_example(1)
  decoded = records.decode_record(records.encode_record(example, fields), fields)
  assert decoded.keys() == example.keys()
  for name, array in example.items():
    assert decoded[name].dtype == array.dtype and decoded[name].shape == array.shape
    np.testing.assert_array_equal(decoded[name], array)


def test_packed_text_is_byte_for_byte_the_v1_int32_rows():
  tokens, segment_ids, positions = (np.arange(SEQ_LEN) * k for k in (7, 1, 3))
  v1_bytes = np.stack([tokens, segment_ids, positions]).astype(np.int32).tobytes()
  assert records.encode_packed(tokens, segment_ids, positions) == v1_bytes
  v1_manifest = {"format": "maxlm.packed_int32.v1", "seq_len": SEQ_LEN,
                 "fields": ["tokens", "segment_ids", "positions"]}
  decoded = records.decode_record(v1_bytes, records.fields_of_manifest(v1_manifest))
  np.testing.assert_array_equal(decoded["positions"], positions)


def test_a_record_of_the_wrong_size_names_the_fields_and_the_likely_cause():
  fields = records.fields_of_manifest(IMAGE_FIELDS_MANIFEST)
  with pytest.raises(ValueError, match=r"has 42 bytes .*pixels uint8\[2, 3, 3\].* take 66; "
                                       r"was it written with a different --seq_len"):
    records.decode_record(b"\0" * 42, fields)


def test_encoding_a_field_of_the_wrong_shape_or_a_missing_field_is_refused():
  fields = records.fields_of_manifest(IMAGE_FIELDS_MANIFEST)
  example = image_example(2)
  with pytest.raises(ValueError, match="field 'pixels' has shape \\(3, 3\\)"):
    records.encode_record(example | {"pixels": example["pixels"][0]}, fields)
  del example["loss_weight"]
  with pytest.raises(ValueError, match="write exactly the listed fields"):
    records.encode_record(example, fields)


@pytest.mark.parametrize("entries, message", [
    ([{"name": "tokens", "dtype": "int32"}], "exactly the keys name, dtype and shape"),
    ([{"name": "tokens", "dtype": "int23", "shape": [4]}], "dtype 'int23'"),
    ([{"name": "tokens", "dtype": "str", "shape": [4]}], "numeric dtype"),
    ([{"name": "tokens", "dtype": "int32", "shape": ["seq_len"]}], "positive integers"),
    ([{"name": "a", "dtype": "int32", "shape": [4]}] * 2, "name a field twice"),
    ([], "non-empty list"),
])
def test_a_malformed_field_list_is_refused_naming_the_problem(entries, message):
  with pytest.raises(ValueError, match=message):
    records.fields_of_manifest({"format": records.RECORD_FORMAT, "seq_len": 4, "fields": entries})


def test_read_shard_names_the_shard_of_a_bad_record(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "train-00000-of-00001.array_record")
  writer = ArrayRecordWriter(path, "group_size:1")
  writer.write(b"\0" * 12)
  writer.close()
  with pytest.raises(ValueError, match="train-00000-of-00001.array_record: record has 12 bytes"):
    records.read_shard(path, SEQ_LEN)
